"""from_peft for PEFT's DoRA adapters (``peft.tuners.lora.variants.DoraLinearVariant``) of LoRA
Linear layers, plain (lora.py) or over a bitsandbytes 4-bit base (qlora.py): dora_linear, with
‖W_j‖² cached per weight (nn/dora.py's WeightNormCache)."""

from __future__ import annotations

from torch import Tensor, nn

from lowrank_kernels.nn.dora import WeightNormCache
from lowrank_kernels.nn.peft.common import scaled_lora_B
from lowrank_kernels.nn.peft.registry import register_lora_variant
from lowrank_kernels.ops import _checks, _quant
from lowrank_kernels.ops.dora import dora_linear


def peft_dora_problem(layer: nn.Module, adapter: str) -> str | None:
    """Why PEFT's DoRA adapter ``adapter`` cannot run fused (a quantised base other than
    bitsandbytes 4-bit, a magnitude dtype other than lora_A's), or None."""
    weight = layer.get_base_layer().weight
    four_bit = _quant.is_4bit(weight) and type(weight).__name__ == "Params4bit"
    if not four_bit and (type(weight) is not nn.Parameter or not weight.is_floating_point()):
        return (f"DoRA on a quantised base weight ({type(weight).__name__}, {weight.dtype}): only bitsandbytes "
                "4-bit (Params4bit) bases run DoRA fused")
    magnitude = layer.lora_magnitude_vector[adapter].weight
    try:
        _checks.check_same_dtype("lora_magnitude_vector", magnitude, "lora_A", layer.lora_A[adapter].weight)
    except TypeError as err:
        return f"DoRA {err}"
    return None


def peft_dora_forward(layer: nn.Module, adapter: str, x: Tensor, weight: Tensor, dropout_p: float,
                      bias: Tensor | None = None) -> Tensor:
    """A PEFT DoRA adapter's layer output on dora_linear (``weight`` already un-transposed, or the
    base's Params4bit); ``bias`` defaults to the base layer's."""
    cache = layer.__dict__.get("_lowrank_dora_w_sq")
    if cache is None:
        cache = layer.__dict__["_lowrank_dora_w_sq"] = WeightNormCache()
    lora_B, scaling = scaled_lora_B(layer, adapter, layer.lora_B[adapter].weight)
    return dora_linear(x, weight, layer.lora_A[adapter].weight, lora_B, layer.lora_magnitude_vector[adapter].weight,
                       scaling, layer.base_layer.bias if bias is None else bias,
                       dropout_p=dropout_p, training=dropout_p > 0, weight_sq_norm=cache.get(weight),
                       backend=layer.lowrank_backend)


register_lora_variant("DoraLinearVariant", peft_dora_problem, peft_dora_forward)
