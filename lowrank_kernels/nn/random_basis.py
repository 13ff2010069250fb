"""VeRA and RandLoRA methods for LowRankLinear (op: ops/random_basis.py); from_peft for PEFT's
VeRA/RandLoRA layers is nn/peft/random_basis.py.

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

import math

import torch
from torch import nn

from lowrank_kernels.nn.peft.registry import fused_attribute
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

    def attach_base_and_bases(self, module, base, device, dtype, bias, adapter_dtype, bases, key, given,
                              save_projection, max_shape):
        """attach_base, then the bases (or the seed) for ``module``'s rank; returns (the adapters'
        dtype, (n_max, k_max))."""
        self.attach_base(module, base, device, dtype, bias)
        adt = adapter_dtype_of(module, adapter_dtype)
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
            return adt, (n_max, k_max)
        if all(t is None for t in given):
            given = self.make_bases(module.rank, n_max, k_max, key)
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
        return adt, (n_max, k_max)

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


def adapter_dtype_of(module, adapter_dtype):
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
        adt, (_, k_max) = self.attach_base_and_bases(module, base, device, dtype, bias, adapter_dtype, bases,
                                                     projection_prng_key, (vera_A, vera_B), save_projection, max_shape)
        r = module.rank
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
    fixed_alpha = 640.0
    options = {**_BASIS_OPTIONS,
               "randlora_A": (None, "the shared (r, 1, d_min_max) basis tensor (convert() passes it)"),
               "randlora_B": (None, "the shared (d_max_max, n_b_max, r) basis tensor (convert() passes it)")}

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
        adt, _ = self.attach_base_and_bases(module, base, device, dtype, bias, adapter_dtype, bases,
                                            projection_prng_key, (randlora_A, randlora_B), save_projection, max_shape)
        r = module.rank
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


# Where PEFT's VeRA/RandLoRA layers ran fused before nn/peft/random_basis.py: pickles may name it.
__getattr__ = fused_attribute(__name__, ("FusedVeraLinear", "FusedRandLoraLinear"))
