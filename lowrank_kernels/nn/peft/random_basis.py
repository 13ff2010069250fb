"""from_peft for PEFT's VeRA and RandLoRA Linear layers (``peft.tuners.vera.layer.Linear``,
``peft.tuners.randlora.layer.Linear``) on vera_linear / randlora_linear (ops/random_basis.py)."""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import nn

from lowrank_kernels.nn.peft.common import (
    CONV1D,
    adapter_dropout,
    peft_class_name,
    qualname,
    refusal,
    runs_peft,
    skips_hooks,
)
from lowrank_kernels.nn.peft.registry import FUSED_MODULE, register_fused_layer
from lowrank_kernels.ops.random_basis import randlora_linear, vera_linear


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
        base_name = qualname(type(base))
        # A plain nn.Linear, or transformers' Conv1D (weight stored (in, out), fan_in_fan_out=True).
        if not ((type(base) is nn.Linear and not layer.fan_in_fan_out)
                or (base_name == CONV1D and layer.fan_in_fan_out)):
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
    """The subclass of PEFT's VeRA or RandLoRA Linear whose forward runs the fused op
    (``lowrank_kernels.nn.peft.FusedVeraLinear`` / ``FusedRandLoraLinear``)."""
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
                                              "__module__": FUSED_MODULE, "__qualname__": cls_name})


for _spec, _peft_name, _fused_name in ((_VERA, "peft.tuners.vera.layer.Linear", "FusedVeraLinear"),
                                       (_RANDLORA, "peft.tuners.randlora.layer.Linear", "FusedRandLoraLinear")):
    register_fused_layer(_peft_name, _fused_name, functools.partial(_fused_class, _spec.kind), _checker(_spec))
