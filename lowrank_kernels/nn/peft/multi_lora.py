"""PEFT LoRA Linear layers with several adapters at once on multi_lora_linear (ops/multi_lora.py):
mixed-adapter batches (``model(..., adapter_names=[...])``) and several active adapters
(``set_adapter([...])``), run by the fused LoRA layer (lora.py) through registry.py."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from lowrank_kernels.nn.peft.common import adapter_dropout, skips_hooks
from lowrank_kernels.nn.peft.registry import register_multi_adapter_forward
from lowrank_kernels.ops.multi_lora import multi_lora_linear

# PEFT's marker, in adapter_names, of a sample that runs the base layer alone.
PEFT_BASE_NAME = "__base__"


def peft_multi_adapter_forward(layer: nn.Module, x: Tensor, adapter_names, problem) -> Optional[Tensor]:
    """A PEFT LoRA Linear's output for a mixed-adapter batch (``adapter_names``: one adapter name
    per sample, PEFT_BASE_NAME for the base alone; names this layer lacks run the base, as in
    PEFT) or, with ``adapter_names=None``, for its several active adapters (each token gets the
    sum of every active adapter's term, PEFT's definition), on multi_lora_linear. None where the
    fused op cannot reproduce PEFT (an adapter for which ``problem(layer, name)`` objects, module
    hooks the fused op would skip, or adapters with different dropout probabilities while
    training); the caller then runs PEFT.
    """
    if adapter_names is not None:
        # The caller ran PEFT's _check_forward_args: one name per sample.
        names = sorted({a for a in adapter_names if a in layer.lora_A})
    else:
        names = [a for a in layer.active_adapters if a in layer.lora_A]
    if skips_hooks(layer, names):
        return None
    base = layer.base_layer
    weight = base.weight.t() if layer.fan_in_fan_out else base.weight
    if not names:
        return nn.functional.linear(x, weight, base.bias)
    if any(a in layer.lora_variant or problem(layer, a) is not None for a in names):
        return None
    dtypes = {layer.lora_A[a].weight.dtype for a in names}
    drops = {adapter_dropout(layer.lora_dropout[a]) for a in names}
    if len(dtypes) > 1 or len(drops) > 1:
        return None
    p = drops.pop()
    if p >= 1.0:
        return None
    device = x.device
    scaling = torch.tensor([float(layer.scaling[a]) for a in names], device=device)
    lists = ([layer.lora_A[a].weight for a in names], [layer.lora_B[a].weight for a in names])
    if adapter_names is not None:
        slot = {a: i for i, a in enumerate(names)}
        per_sample = torch.tensor([slot.get(a, -1) for a in adapter_names], dtype=torch.int64, device=device)
        index = per_sample.reshape((-1,) + (1,) * (x.dim() - 2)).expand(x.shape[:-1])
        mix = None
    else:
        index = torch.arange(len(names), device=device).expand(*x.shape[:-1], len(names))
        mix = torch.ones(index.shape, device=device, dtype=lists[0][0].dtype)
    return multi_lora_linear(x, weight, *lists, index, scaling, base.bias, dropout_p=p, training=p > 0,
                             backend=layer.lowrank_backend, adapter_weight=mix)


register_multi_adapter_forward(peft_multi_adapter_forward)
