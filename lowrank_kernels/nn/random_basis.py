"""VeRA and RandLoRA methods for LowRankLinear, and from_peft for PEFT's VeRA/RandLoRA layers
(op: ops/random_basis.py).

``method="vera"``: frozen ``weight``/``bias``, trainable ``vera_lambda_d`` (r) = d_initial (0.1)
and ``vera_lambda_b`` (N) = 0, frozen random bases ``vera_A`` (r, K_max), ``vera_B`` (N_max, r).
``method="randlora"``: trainable ``randlora_lambda`` (r, n_b) = 0 and ``randlora_gamma``
(n_b, d_min) = 1 / max(n_b, d_min), frozen ``randlora_A`` (r, 1, d_min_max) and ``randlora_B``
(d_max_max, n_b_max, r); s = alpha / r, default alpha 640 (PEFT's). Parameter names, shapes and
initial values are PEFT's.

The bases (option ``bases``):
- ``"stored"`` (default): drawn exactly as PEFT draws them, from a CPU torch.Generator seeded with
  ``projection_prng_key`` (default 0, PEFT's): Kaiming-uniform, RandLoRA's normalised to unit
  std. convert() with the same key and targets gives the same bases, hence the same layers, as
  PEFT's ``get_peft_model``. The buffers are not saved (``save_projection=False``, as they are
  regenerated from the key) unless the caller passed their own tensors or asked to save them.
- ``"seeded"``: generated inside the kernels from ``projection_prng_key`` by the package's RNG
  (ops/random_basis.py module docstring); no basis memory at all, and nothing to save but the
  key. Same spread as PEFT's bases, other values.

convert(model, method="vera" | "randlora", rank=r) shares one pair of bases across all converted
layers, sized for the largest of them (Method.prepare_convert), each layer using its slice, as
PEFT does: one tensor object, not one copy per layer.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
from torch import nn

from lowrank_kernels.nn.peft import (adapter_dropout, peft_class_name, refusal, register_peft_converter, runs_peft,
                                     skips_hooks)
from lowrank_kernels.nn.registry import Method, register_method
from lowrank_kernels.ops.random_basis import (
    randlora_bases,
    randlora_delta_weight,
    randlora_linear,
    randlora_num_bases,
    vera_bases,
    vera_delta_weight,
    vera_linear,
)

_BASES = ("stored", "seeded")


def _peft_kaiming(shape: tuple, generator: torch.Generator) -> torch.Tensor:
    """PEFT's VeRA ``_kaiming_init`` (vera/model.py): fp32 uniform, bound sqrt(6 / fan_in)."""
    tensor = torch.empty(shape)
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(nn.init._calculate_correct_fan(tensor, "fan_in"))
    with torch.no_grad():
        return tensor.uniform_(-bound, bound, generator=generator)


class _SharedBasisMethod(Method):
    """What VeRA and RandLoRA share: frozen random bases, sized for the largest layer using them."""

    basis_names: tuple[str, str] = ("", "")

    def make_bases(self, rank: int, n_max: int, k_max: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
        """PEFT's stored bases for a largest layer shape (n_max, k_max)."""
        raise NotImplementedError

    def prepare_convert(self, model, targets, rank, bases="stored", projection_prng_key=0, adapter_dtype=None,
                        save_projection=False, **options):
        """One pair of bases for all targets, sized like PEFT's (largest in and out features)."""
        n_max = max(linear.out_features for _, linear in targets)
        k_max = max(linear.in_features for _, linear in targets)
        shared = {"max_shape": (n_max, k_max)}
        _check_bases_option(bases, projection_prng_key)
        if bases == "stored":
            weight = targets[0][1].weight
            A, B = self.make_bases(rank, n_max, k_max, projection_prng_key)
            dt = adapter_dtype or weight.dtype
            shared.update({self.basis_names[0]: A.to(weight.device, dt), self.basis_names[1]: B.to(weight.device, dt),
                           "save_projection": save_projection})
        return shared

    def attach_bases(self, module, rank, bases, key, given, save_projection, max_shape, adt):
        """Register the bases (or the seed) on ``module``; returns (n_max, k_max)."""
        _check_bases_option(bases, key)
        module.bases = bases
        module.projection_prng_key = key
        n_max, k_max = max_shape or (module.out_features, module.in_features)
        if n_max < module.out_features or k_max < module.in_features:
            raise ValueError(f"max_shape {max_shape} is smaller than the layer ({module.out_features}, "
                             f"{module.in_features})")
        if bases == "seeded":
            if any(t is not None for t in given):
                raise ValueError(f"{self.basis_names[0]}/{self.basis_names[1]} must be None with bases='seeded'")
            for name in self.basis_names:
                module.register_buffer(name, None)
            return n_max, k_max
        if all(t is None for t in given):
            given = self.make_bases(rank, n_max, k_max, key)
            persistent = bool(save_projection)
        elif any(t is None for t in given):
            raise ValueError(f"pass both {self.basis_names[0]} and {self.basis_names[1]}, or neither")
        else:
            # The caller's own tensors cannot be regenerated from the key: saved unless told not to.
            persistent = True if save_projection is None else bool(save_projection)
        device = module.weight.device
        for name, t in zip(self.basis_names, given):
            # .to() returns the very tensor when nothing changes: every layer holds the shared object.
            module.register_buffer(name, (t.detach() if t.requires_grad else t).to(device, adt), persistent=persistent)
        return n_max, k_max

    def basis_seed(self, module):
        return module.projection_prng_key if module.bases == "seeded" else None

    def save_extra(self, module):
        # The seed is what rebuilds seeded bases, and stored bases that are not saved.
        return {"projection_prng_key": torch.tensor(module.projection_prng_key, dtype=torch.int64)}

    def load_extra(self, module, values, state_dict, prefix):
        key = int(values["projection_prng_key"])
        saved_bases = all(prefix + n in state_dict for n in self.basis_names)
        if key != module.projection_prng_key and module.bases == "stored" and not saved_bases:
            return (f"the checkpoint's bases come from projection_prng_key={key}, this layer's from "
                    f"{module.projection_prng_key}: convert with projection_prng_key={key}")
        module.projection_prng_key = key
        return None


_BASIS_OPTIONS = {
    "bases": ("stored", "'stored': PEFT's bases, drawn from projection_prng_key and kept as buffers; "
                        "'seeded': generated inside the kernels from the key, no basis memory"),
    "projection_prng_key": (0, "seed of the bases (PEFT's projection_prng_key)"),
    "save_projection": (None, "whether the stored bases go into the state_dict (default: only the caller's "
                              "own basis tensors; PEFT's regenerate from the key)"),
    "adapter_dtype": (None, "dtype of the trainable scales and bases: the base dtype (None) or torch.float32"),
    "max_shape": (None, "(N_max, K_max) the shared bases are sized for; set by convert()"),
}


def _check_bases_option(bases, key) -> None:
    if bases not in _BASES:
        raise ValueError(f"bases must be one of {_BASES}, got {bases!r}")
    if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key < 2**62:
        raise ValueError(f"projection_prng_key must be an int in [0, 2**62), got {key!r}")


def _adapter_dtype(module, adapter_dtype):
    base_dtype = module.weight.dtype
    adt = adapter_dtype or base_dtype
    if adt != base_dtype and adt != torch.float32:
        raise TypeError(f"adapter_dtype {adt} on a {base_dtype} base; adapters must share the base dtype or be float32")
    return adt


# ----------------------------------------------------------------------------------------------
# VeRA
# ----------------------------------------------------------------------------------------------
class VeRAMethod(_SharedBasisMethod):
    name = "vera"
    basis_names = ("vera_A", "vera_B")
    default_rank = 256
    peer = "PEFT VeraConfig"
    options = {**_BASIS_OPTIONS,
               "d_initial": (0.1, "initial value of vera_lambda_d"),
               "vera_A": (None, "the shared (r, K_max) basis tensor (convert() passes it)"),
               "vera_B": (None, "the shared (N_max, r) basis tensor (convert() passes it)")}

    def alpha_doc(self):
        return "no alpha (VeRA has no scaling; lambda_b and lambda_d carry it)"

    def make_bases(self, rank, n_max, k_max, key):
        generator = torch.Generator(device="cpu").manual_seed(key)
        A = _peft_kaiming((rank, k_max), generator)
        return A, _peft_kaiming((n_max, rank), generator)

    def create(self, module, base, device, dtype, bias=True, bases="stored", projection_prng_key=0,
               save_projection=None, max_shape=None, adapter_dtype=None, vera_A=None, vera_B=None, d_initial=0.1):
        """Options: ``bases``, ``projection_prng_key``, ``save_projection``, ``d_initial`` (0.1),
        ``adapter_dtype`` (base dtype or fp32), ``vera_A``/``vera_B`` (shared basis tensors)."""
        self.attach_base(module, base, device, dtype, bias)
        adt = _adapter_dtype(module, adapter_dtype)
        r = module.rank
        _, k_max = self.attach_bases(module, r, bases, projection_prng_key, (vera_A, vera_B), save_projection,
                                     max_shape, adt)
        dev = module.weight.device
        module.vera_lambda_d = nn.Parameter(torch.full((r,), float(d_initial), device=dev, dtype=adt))
        module.vera_lambda_b = nn.Parameter(torch.zeros(module.out_features, device=dev, dtype=adt))
        # Seeded bases are uniform in [-1, 1): this scale gives them the spread of PEFT's.
        module.basis_scale = 6.0 / math.sqrt(k_max * r) if bases == "seeded" else 1.0

    def forward(self, module, x):
        return vera_linear(x, module.weight, module.vera_A, module.vera_B, module.vera_lambda_d, module.vera_lambda_b,
                           module.bias, dropout_p=module.dropout, training=module.training, backend=module.backend,
                           basis_seed=self.basis_seed(module), basis_scale=module.basis_scale)

    def delta_weight(self, module):
        A, B = vera_bases(module.vera_A, module.vera_B, module.rank, module.in_features, module.out_features,
                          self.basis_seed(module), module.weight.device)
        return vera_delta_weight(A, B, module.vera_lambda_d, module.vera_lambda_b, module.basis_scale)

    def extra_repr(self, module):
        return f"bases={module.bases}"


# ----------------------------------------------------------------------------------------------
# RandLoRA
# ----------------------------------------------------------------------------------------------
class RandLoRAMethod(_SharedBasisMethod):
    name = "randlora"
    basis_names = ("randlora_A", "randlora_B")

    default_rank = 32
    peer = "PEFT RandLoraConfig"
    options = {**_BASIS_OPTIONS,
               "randlora_A": (None, "the shared (r, 1, d_min_max) basis tensor (convert() passes it)"),
               "randlora_B": (None, "the shared (d_max_max, n_b_max, r) basis tensor (convert() passes it)")}

    def default_alpha(self, rank):
        return 640.0

    def alpha_doc(self):
        return "alpha 640 (s = 640 / r)"

    def make_bases(self, rank, n_max, k_max, key):
        # PEFT's _init_randlora_A_randlora_B: one A basis and n_b B bases, Kaiming-uniform (a = √5)
        # drawn in bf16 (fp16 where accelerate says bf16 is unavailable), then normalised to unit
        # std, in that dtype, as PEFT does.
        try:
            from accelerate.utils.imports import is_bf16_available
        except ImportError:
            low = torch.bfloat16
        else:
            low = torch.bfloat16 if is_bf16_available() else torch.float16
        d_max, d_min = max(n_max, k_max), min(n_max, k_max)
        generator = torch.Generator(device="cpu").manual_seed(key)

        def draw(shape):
            return nn.init.kaiming_uniform_(torch.empty(shape, dtype=low), a=math.sqrt(5), generator=generator)

        A = draw((rank, 1, d_min))
        n_b = randlora_num_bases(n_max, k_max, rank)
        B = torch.cat([draw((d_max, 1, rank)) for _ in range(n_b)], dim=1)
        return A / A.std(), B / B.std()

    def create(self, module, base, device, dtype, bias=True, bases="stored", projection_prng_key=0,
               save_projection=None, max_shape=None, adapter_dtype=None, randlora_A=None, randlora_B=None):
        """Options: ``bases``, ``projection_prng_key``, ``save_projection``, ``adapter_dtype``,
        ``randlora_A``/``randlora_B`` (shared basis tensors)."""
        self.attach_base(module, base, device, dtype, bias)
        adt = _adapter_dtype(module, adapter_dtype)
        r = module.rank
        self.attach_bases(module, r, bases, projection_prng_key, (randlora_A, randlora_B), save_projection,
                          max_shape, adt)
        n_b = randlora_num_bases(module.in_features, module.out_features, r)
        d_min = min(module.in_features, module.out_features)
        dev = module.weight.device
        module.scaling = module.alpha / r
        module.randlora_lambda = nn.Parameter(torch.zeros(r, n_b, device=dev, dtype=adt))
        module.randlora_gamma = nn.Parameter(torch.full((n_b, d_min), 1.0 / max(n_b, d_min), device=dev, dtype=adt))

    def forward(self, module, x):
        return randlora_linear(x, module.weight, module.randlora_A, module.randlora_B, module.randlora_lambda,
                               module.randlora_gamma, module.scaling, module.bias, dropout_p=module.dropout,
                               training=module.training, backend=module.backend, basis_seed=self.basis_seed(module))

    def delta_weight(self, module):
        K, N = module.in_features, module.out_features
        r, n_b = module.randlora_lambda.shape
        A3, B3 = randlora_bases(module.randlora_A, module.randlora_B, r, n_b, K, N, self.basis_seed(module),
                                module.weight.device)
        return randlora_delta_weight(A3, B3, module.randlora_lambda, module.randlora_gamma, module.scaling, K, N)

    def extra_repr(self, module):
        return f"scaling={module.scaling:g}, bases={module.bases}"


register_method(VeRAMethod())
register_method(RandLoRAMethod())


# ----------------------------------------------------------------------------------------------
# from_peft: peft.tuners.vera.layer.Linear and peft.tuners.randlora.layer.Linear
# ----------------------------------------------------------------------------------------------
class _PeftSpec(NamedTuple):
    """Where a PEFT random-basis layer keeps its tensors, and which op runs it."""

    kind: str
    scale_names: tuple[str, str]
    basis_names: tuple[str, str]
    dropout_name: str


_VERA = _PeftSpec("vera", ("vera_lambda_d", "vera_lambda_b"), ("vera_A", "vera_B"), "vera_dropout")
_RANDLORA = _PeftSpec("randlora", ("randlora_lambda", "randlora_gamma"), ("randlora_A", "randlora_B"),
                      "randlora_dropout")


def _adapter_problem(layer, spec: _PeftSpec, adapter: str):
    """Why ``adapter`` of a PEFT VeRA/RandLoRA Linear cannot run fused, or None."""
    dropout = getattr(layer, spec.dropout_name)[adapter]
    if type(dropout) not in (nn.Dropout, nn.Identity):
        return f"dropout module {type(dropout).__name__}"
    scale = getattr(layer, spec.scale_names[0])[adapter]
    base_dtype = layer.base_layer.weight.dtype
    if scale.dtype != base_dtype and scale.dtype != torch.float32:
        return f"adapter dtype {scale.dtype} on a {base_dtype} base"
    other = getattr(layer, spec.scale_names[1])[adapter]
    if other.dtype != scale.dtype:
        return f"{spec.scale_names[1]} dtype {other.dtype} differs from {spec.scale_names[0]}'s {scale.dtype}"
    for name in spec.basis_names:
        basis = getattr(layer, name)[adapter]
        # RandLoRA casts its bases to the scales' dtype (PEFT on the CPU: both to fp32), VeRA does not
        # (PEFT's F.linear then fails, and so does its own path, which such a layer keeps).
        if basis.dtype != scale.dtype and (spec.kind == "vera" or not basis.is_floating_point()):
            return f"{name} dtype {basis.dtype} differs from the trainable scales' {scale.dtype}"
    return None


def _checker(spec: _PeftSpec):
    def check(name, layer):
        base = layer.base_layer
        base_name = f"{type(base).__module__}.{type(base).__qualname__}"
        # A plain nn.Linear, or transformers' Conv1D (weight stored (in, out), fan_in_fan_out=True).
        if not ((type(base) is nn.Linear and not layer.fan_in_fan_out)
                or (base_name == "transformers.pytorch_utils.Conv1D" and layer.fan_in_fan_out)):
            raise refusal(name, f"base layer {base_name} with fan_in_fan_out={layer.fan_in_fan_out} (only a plain "
                                 "nn.Linear, or a transformers Conv1D with fan_in_fan_out=True)")
        if type(base.weight) is not nn.Parameter or not base.weight.is_floating_point():
            raise refusal(name, f"base weight of type {type(base.weight).__name__} and dtype {base.weight.dtype}")
        for adapter in getattr(layer, spec.scale_names[0]):
            problem = _adapter_problem(layer, spec, adapter)
            if problem is not None:
                raise refusal(name, f"adapter {adapter!r}: {problem}")
        return _fused_class(spec.kind)

    return check


@functools.lru_cache(maxsize=None)
def _fused_class(kind: str) -> type:
    """The subclass of PEFT's VeRA or RandLoRA Linear whose forward runs the fused op.

    Built on first use so that importing lowrank_kernels does not import peft; reachable as
    ``lowrank_kernels.nn.random_basis.FusedVeraLinear`` / ``FusedRandLoraLinear`` for pickling.
    """
    if kind == "vera":
        from peft.tuners.vera.layer import Linear
        spec, cls_name = _VERA, "FusedVeraLinear"
    else:
        from peft.tuners.randlora.layer import Linear
        spec, cls_name = _RANDLORA, "FusedRandLoraLinear"

    def forward(self, x, *args, **kwargs):
        active = self.active_adapters
        s1 = getattr(self, spec.scale_names[0])
        if self.disable_adapters or self.merged or args or kwargs or len(active) != 1 or active[0] not in s1:
            # PEFT's own path: the base layer alone (it also unmerges on disable), or the sum of
            # several active adapters' terms.
            return Linear.forward(self, x, *args, **kwargs)
        adapter = active[0]
        # Adapters can be added after from_peft: check the one about to run.
        if runs_peft(self, adapter, _adapter_problem(self, spec, adapter)) or skips_hooks(self, [adapter]):
            return Linear.forward(self, x)
        p = adapter_dropout(getattr(self, spec.dropout_name)[adapter])
        if p >= 1.0:
            # Everything dropped: PEFT's own forward gives its exact result (and zero gradients).
            return Linear.forward(self, x)
        base = self.base_layer
        weight = base.weight.t() if self.fan_in_fan_out else base.weight
        A, B = (getattr(self, n)[adapter] for n in spec.basis_names)
        s2 = getattr(self, spec.scale_names[1])[adapter]
        if kind == "vera":
            return vera_linear(x, weight, A, B, s1[adapter], s2, base.bias, dropout_p=p,
                               training=p > 0, backend=self.lowrank_backend)
        if A.dtype != s2.dtype:
            # PEFT's cast of its (sliced) bases to the scales' dtype.
            n_b, dims = s1[adapter].shape[1], (self.in_features, self.out_features)
            A, B = A[:, :n_b, :min(dims)].to(s2.dtype), B[:max(dims), :n_b].to(s2.dtype)
        return randlora_linear(x, weight, A, B, s1[adapter], s2, self.scaling[adapter], base.bias, dropout_p=p,
                               training=p > 0, backend=self.lowrank_backend)

    return type(Linear)(cls_name, (Linear,), {"forward": forward, "_get_name": peft_class_name,
                                              "__module__": __name__, "__qualname__": cls_name})


def __getattr__(name: str):
    if name == "FusedVeraLinear":
        return _fused_class("vera")
    if name == "FusedRandLoraLinear":
        return _fused_class("randlora")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


for _spec, _peft_name, _fused_name in ((_VERA, "peft.tuners.vera.layer.Linear", "FusedVeraLinear"),
                                       (_RANDLORA, "peft.tuners.randlora.layer.Linear", "FusedRandLoraLinear")):
    register_peft_converter(_peft_name, _checker(_spec))
    register_peft_converter(f"{__name__}.{_fused_name}", _checker(_spec), listed=False)
