"""from_peft for PEFT's QLoRA layers: ``peft.tuners.lora.bnb.Linear4bit`` runs fused.

A PEFT QLoRA model (bitsandbytes ``Linear4bit`` bases, usually after
``prepare_model_for_kbit_training``) holds ``peft.tuners.lora.bnb.Linear4bit`` layers. Their class
is swapped for a subclass whose forward calls lora_linear on the base's ``Params4bit`` as
bitsandbytes stores it (ops/_quant.py): the dequantised weight never exists, forward or backward.
Everything else (state_dict keys, ``save_pretrained`` / ``from_pretrained``, merge, disable_adapter)
stays PEFT's, as for the plain LoRA layers (lora.py).

Semantics are PEFT's: the base runs as ``Linear4bit`` does (x cast to its ``compute_dtype``, the
weight dequantised to it, the bias cast to it, the result cast back to x's dtype) and the
adapter term is added in the adapter dtype. One difference within the 16-bit tolerance: when
x's dtype differs from compute_dtype, the adapter reads x in compute_dtype (PEFT: in x's dtype).

DoRA adapters (``use_dora=True``) run dora_linear on the same Params4bit (QLoRA + DoRA, ops/dora.py,
dora.py), with PEFT's semantics: the base term in compute_dtype as above, the DoRA norm from W as
``dequantize_4bit`` gives it (quant_state.dtype), the magnitude applied as PEFT's DoRA layer does
(to the dropped input when dropout is active).

A weight that bitsandbytes repacked for its CPU kernel (``packing_format_for_cpu``: its eval-mode
forward without gradients does so on a CPU with AVX512-BF16) is read in that layout (ops/_quant.py),
so a model evaluated on such a CPU converts and trains on.

8-bit bases (``peft.tuners.lora.bnb.Linear8bitLt``) are refused with an error naming the layer:
their int8 weights with outlier decomposition have no fused kernel here.
"""

from __future__ import annotations

import functools

from torch import nn

from lowrank_kernels.nn.peft.common import peft_class_name, qualname, refusal
from lowrank_kernels.nn.peft.lora import adapter_forward, fused_call, lora_adapter_problem, several_active
from lowrank_kernels.nn.peft.registry import FUSED_MODULE, register_fused_layer, register_peft_converter
from lowrank_kernels.ops import _quant
from lowrank_kernels.ops._checks import check_adapter_dtype

_LINEAR4BIT = "bitsandbytes.nn.modules.Linear4bit"


def _check_lora_4bit(name: str, layer: nn.Module) -> type:
    base = layer.get_base_layer()
    base_name = qualname(type(base))
    if base_name != _LINEAR4BIT:
        raise refusal(name, f"base layer {base_name} (expected bitsandbytes Linear4bit)")
    if not _quant.is_4bit(base.weight):
        raise refusal(name, "a Linear4bit whose weight is not quantised yet (bitsandbytes quantises it when "
                             "the layer moves to its device)")
    try:
        _quant.from_params4bit(base.weight, name=f"{name}.base_layer.weight")
    except (TypeError, ValueError) as err:
        raise refusal(name, str(err)) from None
    if layer.fan_in_fan_out:
        raise refusal(name, "fan_in_fan_out=True on a Linear4bit base")
    if len(layer.active_adapters) > 1:
        raise refusal(name, several_active(layer))
    for adapter in layer.lora_A:
        problem = lora_adapter_problem(layer, adapter)
        if problem is not None:
            raise refusal(name, f"adapter {adapter!r}: {problem}")
        if base.compute_dtype is not None:
            try:
                check_adapter_dtype(base.compute_dtype, layer.lora_A[adapter].weight.dtype, "lora_A")
            except TypeError as err:
                raise refusal(name, f"adapter {adapter!r}: {err}") from None
    return fused_lora_4bit_class()


def _refuse_8bit(name: str, layer: nn.Module) -> type:
    raise refusal(name, "an 8-bit bitsandbytes base (Linear8bitLt): only 4-bit (Linear4bit, NF4/FP4) "
                        "bases run fused; quantise the model with load_in_4bit=True or leave this layer to PEFT")


@functools.lru_cache(maxsize=None)
def fused_lora_4bit_class() -> type:
    """The subclass of ``peft.tuners.lora.bnb.Linear4bit`` whose forward runs lora_linear on the
    4-bit base (``lowrank_kernels.nn.peft.FusedLora4bit``)."""
    from peft.tuners.lora.bnb import Linear4bit

    class FusedLora4bit(Linear4bit):
        __qualname__ = "FusedLora4bit"
        __module__ = FUSED_MODULE
        _get_name = peft_class_name

        def forward(self, x, *args, **kwargs):
            call = fused_call(self, args, kwargs)
            if call is None:
                return super().forward(x, *args, **kwargs)
            adapter, p = call
            if adapter is None:
                return self.base_layer(x)
            base = self.base_layer
            # Linear4bit's compute dtype (None until its first call, then x's dtype)
            xc = x.to(base.compute_dtype or x.dtype)
            bias = base.bias.to(xc.dtype) if base.bias is not None else None
            return adapter_forward(self, adapter, xc, base.weight, p, bias).to(x.dtype)

    return FusedLora4bit


register_fused_layer("peft.tuners.lora.bnb.Linear4bit", "FusedLora4bit", fused_lora_4bit_class, _check_lora_4bit)
register_peft_converter("peft.tuners.lora.bnb.Linear8bitLt", _refuse_8bit, listed=False)
