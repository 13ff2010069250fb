"""from_peft for PEFT's LoRA Linear (``peft.tuners.lora.layer.Linear``): plain LoRA and KaSA
adapters on lora_linear, with PEFT's scaling as a number or as a tensor (compiled hot-swap).

The other LoRA variants a fused layer runs register with registry.py (DoRA: dora.py), and so
does the forward for mixed-adapter batches and several active adapters (multi_lora.py).
"""

from __future__ import annotations

import functools

from torch import Tensor, nn

from lowrank_kernels.nn.peft.common import (
    CONV1D,
    adapter_dropout,
    peft_class_name,
    qualname,
    refusal,
    runs_peft,
    scaled_lora_B,
    skips_hooks,
)
from lowrank_kernels.nn.peft.registry import (
    FUSED_MODULE,
    lora_variant,
    multi_adapter_forward,
    register_fused_layer,
    register_lora_variant,
)
from lowrank_kernels.ops._checks import check_adapter_dtype
from lowrank_kernels.ops.lora import lora_linear


def peft_variant_problem(layer: nn.Module, adapter: str) -> str | None:
    """Why the LoRA variant of ``adapter`` of a PEFT LoRA Linear cannot run fused, or None for a
    variant registered with register_lora_variant (KaSA, DoRA) whose adapter can."""
    variant = layer.lora_variant.get(adapter)
    if variant is None:
        return "use_dora=True without PEFT's DoRA variant"
    handling = lora_variant(variant)
    if handling is None:
        return f"LoRA variant {getattr(variant, '__name__', type(variant).__name__)}"
    return handling.problem(layer, adapter)


def lora_adapter_problem(layer: nn.Module, adapter: str) -> str | None:
    """Why ``adapter`` of a PEFT LoRA Linear cannot run fused, or None."""
    if layer.use_dora.get(adapter, False) or layer.lora_variant.get(adapter) is not None:
        problem = peft_variant_problem(layer, adapter)
        if problem is not None:
            return problem
    lora_A, lora_B = layer.lora_A[adapter], layer.lora_B[adapter]
    if layer.lora_bias.get(adapter, False) or lora_B.bias is not None:
        return "lora_bias=True"
    if type(lora_A) is not nn.Linear or type(lora_B) is not nn.Linear or lora_A.bias is not None:
        return f"adapter modules {type(lora_A).__name__}/{type(lora_B).__name__} (expected bias-free nn.Linear)"
    if type(layer.lora_dropout[adapter]) not in (nn.Dropout, nn.Identity):
        return f"lora_dropout module {type(layer.lora_dropout[adapter]).__name__}"
    return None


def _lora_linear_problem(layer: nn.Module, adapter: str) -> str | None:
    """lora_adapter_problem, plus the adapter dtype against a dense base's."""
    problem = lora_adapter_problem(layer, adapter)
    if problem is not None:
        return problem
    try:
        check_adapter_dtype(layer.base_layer.weight.dtype, layer.lora_A[adapter].weight.dtype, "lora_A")
    except TypeError as err:
        return str(err)
    return None


def fused_call(layer: nn.Module, args: tuple, kwargs: dict, problem=lora_adapter_problem):
    """What the fused forward of a PEFT LoRA layer runs, shared by the fused layer classes.

    None where PEFT's own forward gives the result: adapters disabled or merged, extra arguments,
    not exactly one active adapter, an adapter whose setting ``problem(layer, adapter)`` objects
    to (adapters can be added after from_peft, so the one about to run is checked; with
    strict=True this raises instead), module hooks the fused op would skip (skips_hooks), a KaSA
    adapter whose SVD truncation PEFT has not applied yet, or everything dropped (p = 1: PEFT's
    exact result, no adapter term and zero adapter gradients).
    (None, 0.0) where the active adapter is not on this layer (the base layer alone). Otherwise
    (adapter, dropout p).
    """
    active = layer.active_adapters
    if layer.disable_adapters or layer.merged or args or kwargs or len(active) != 1:
        return None
    adapter = active[0]
    if adapter not in layer.lora_A:
        return None, 0.0
    if runs_peft(layer, adapter, problem(layer, adapter)) or skips_hooks(layer, [adapter]):
        return None
    if adapter in getattr(layer, "_lora_kasa_truncation_deferred", ()):
        return None  # PEFT's KaSA forward truncates W on this first call (adapters made on the meta device)
    p = adapter_dropout(layer.lora_dropout[adapter])
    return None if p >= 1.0 else (adapter, p)


def lora_term(layer: nn.Module, adapter: str, x: Tensor, weight: Tensor, lora_B: Tensor, dropout_p: float,
              bias: Tensor | None) -> Tensor:
    """lora_linear for ``adapter`` of a PEFT LoRA layer, with ``lora_B`` in place of its B and
    PEFT's scaling (a number or a tensor: scaled_lora_B)."""
    lora_B, scaling = scaled_lora_B(layer, adapter, lora_B)
    return lora_linear(x, weight, layer.lora_A[adapter].weight, lora_B, scaling, bias, dropout_p=dropout_p,
                       training=dropout_p > 0, backend=layer.lowrank_backend)


def adapter_forward(layer: nn.Module, adapter: str, x: Tensor, weight: Tensor, dropout_p: float,
                    bias: Tensor | None) -> Tensor:
    """The fused output of a PEFT LoRA layer running ``adapter`` (one that fused_call admitted):
    its LoRA variant's registered forward, or lora_linear."""
    variant = lora_variant(layer.lora_variant.get(adapter))
    if variant is not None:
        return variant.forward(layer, adapter, x, weight, dropout_p, bias)
    return lora_term(layer, adapter, x, weight, layer.lora_B[adapter].weight, dropout_p, bias)


def several_active(layer: nn.Module) -> str:
    return f"several active adapters {list(layer.active_adapters)} (the fused op runs one adapter per layer)"


# ----------------------------------------------------------------------------------------------
# KaSA: peft.tuners.lora.variants.KasaLinearVariant
# ----------------------------------------------------------------------------------------------
def _kasa_problem(layer: nn.Module, adapter: str) -> str | None:
    """Why PEFT's KaSA adapter ``adapter`` cannot run fused, or None."""
    diag = layer.lora_diag[adapter]
    if diag.dtype != layer.lora_A[adapter].weight.dtype:
        return f"KaSA lora_diag dtype {diag.dtype} differs from lora_A's {layer.lora_A[adapter].weight.dtype}"
    return None


def _kasa_forward(layer: nn.Module, adapter: str, x: Tensor, weight: Tensor, dropout_p: float,
                  bias: Tensor | None) -> Tensor:
    # KaSA: ΔW = s·B diag(ΔΣ) A, LoRA's op with B·diag(ΔΣ) (differentiable in B and ΔΣ).
    lora_B = layer.lora_B[adapter].weight * layer.lora_diag[adapter]
    return lora_term(layer, adapter, x, weight, lora_B, dropout_p, bias)


# ----------------------------------------------------------------------------------------------
# The fused class
# ----------------------------------------------------------------------------------------------
def _check_lora_linear(name: str, layer: nn.Module) -> type:
    base = layer.base_layer
    base_name = qualname(type(base))
    if type(base) is nn.Linear:
        if layer.fan_in_fan_out:
            raise refusal(name, "fan_in_fan_out=True on an nn.Linear base")
    elif base_name == CONV1D:
        if not layer.fan_in_fan_out:
            raise refusal(name, "fan_in_fan_out=False on a Conv1D base")
    else:
        raise refusal(name, f"base layer {base_name} (only a plain nn.Linear or transformers Conv1D, "
                             "not quantised or wrapped layers)")
    if type(base.weight) is not nn.Parameter or not base.weight.is_floating_point():
        raise refusal(name, f"base weight of type {type(base.weight).__name__} and dtype {base.weight.dtype} "
                             "(quantised or tensor-subclass weights are not supported)")
    for adapter in layer.lora_A:
        problem = _lora_linear_problem(layer, adapter)
        if problem is not None:
            raise refusal(name, f"adapter {adapter!r}: {problem}")
    return fused_lora_linear_class()


@functools.lru_cache(maxsize=None)
def fused_lora_linear_class() -> type:
    """The subclass of ``peft.tuners.lora.layer.Linear`` whose forward runs lora_linear
    (``lowrank_kernels.nn.peft.FusedLoraLinear``)."""
    from peft.tuners.lora.layer import Linear

    class FusedLoraLinear(Linear):
        __qualname__ = "FusedLoraLinear"
        __module__ = FUSED_MODULE
        _get_name = peft_class_name

        def forward(self, x, *args, **kwargs):
            # PEFT's argument checks first, so that a bad call fails with PEFT's own message.
            self._check_forward_args(x, *args, **kwargs)
            if not (self.disable_adapters or self.merged or args) and (
                    set(kwargs) == {"adapter_names"} or (not kwargs and len(self.active_adapters) > 1)):
                # A mixed-adapter batch (adapter_names=...) or several active adapters: one call of
                # multi_lora_linear (multi_lora.py); None where only PEFT's path reproduces PEFT.
                multi = multi_adapter_forward()
                y = None if multi is None else multi(self, x, kwargs.get("adapter_names"), _lora_linear_problem)
                if y is not None:
                    return y
            call = fused_call(self, args, kwargs, _lora_linear_problem)
            if call is None:
                # PEFT's own path (it also unmerges on disable), or what the multi-adapter path declined.
                return super().forward(x, *args, **kwargs)
            adapter, p = call
            if adapter is None:
                return self.base_layer(x)
            base = self.base_layer
            weight = base.weight.t() if self.fan_in_fan_out else base.weight
            return adapter_forward(self, adapter, x, weight, p, base.bias)

    return FusedLoraLinear


register_lora_variant("KasaLinearVariant", _kasa_problem, _kasa_forward)
register_fused_layer("peft.tuners.lora.layer.Linear", "FusedLoraLinear", fused_lora_linear_class, _check_lora_linear)
