"""SoRA method for LowRankLinear (arXiv 2311.11696, "Sparse Low-rank Adaptation of Pre-trained
Language Models"; op: ops/lora.py), and ``prune_sora`` which turns a trained SoRA model into plain
LoRA layers of the surviving ranks.

y = x Wᵀ + bias + s · ((drop(x) Aᵀ) ⊙ g) Bᵀ: LoRA's trainable ``lora_A`` (r, K), ``lora_B`` (N, r)
with a trainable gate ``sora_gate`` (r) on the rank components. The gate is trained with a
proximal step for an L1 penalty (``lowrank_kernels.optim.SoRAAdamW``), which sets gate entries to
exactly zero; ``prune_sora`` then drops those components.

Fused: the gate is folded into the down-projection, A' = diag(g)·A, and the layer is the fused
LoRA op ``lora_linear(x, W, A', B, s)`` (nn/folded_core.py); autograd forms dA = g ⊙ dA' and
dg = Σ_k dA' ⊙ A from the op's dA' (r·K work, nothing of size M). No new kernel.

Defaults are the reference code's (TsinghuaC3I/SoRA, src/lora.py): r = 8, alpha = 16 (s = 16 / r),
A Kaiming-uniform (a = √5), B = 0, g ~ N(0, 1).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lowrank_kernels.nn.folded_core import FoldedCoreMethod
from lowrank_kernels.nn.registry import adapter_dtype_option, register_method

SORA_ALPHA = 16.0


class SoRAMethod(FoldedCoreMethod):
    name = "sora"
    default_rank = 8
    peer = "SoRA reference code"
    fixed_alpha = SORA_ALPHA
    options = {"adapter_dtype": adapter_dtype_option("lora_A/lora_B/sora_gate")}

    def create(self, module, base, device, dtype, bias=True, adapter_dtype=None):
        adapter_dtype = self.attach_base_for_adapters(module, base, device, dtype, bias, adapter_dtype)
        device = module.weight.device
        r = module.rank
        module.scaling = module.alpha / r
        module.lora_A = nn.Parameter(torch.empty(r, module.in_features, device=device, dtype=adapter_dtype))
        module.lora_B = nn.Parameter(torch.zeros(module.out_features, r, device=device, dtype=adapter_dtype))
        module.sora_gate = nn.Parameter(torch.randn(r, device=device).to(adapter_dtype))
        nn.init.kaiming_uniform_(module.lora_A, a=math.sqrt(5))

    def factors(self, module):
        return module.lora_B, module.sora_gate, module.lora_A

    def extra_repr(self, module):
        return f"{super().extra_repr(module)}, active_rank={int((module.sora_gate != 0).sum())}"


def sora_gates(model: nn.Module) -> list:
    """The ``sora_gate`` parameters of ``model``'s SoRA layers (for ``lowrank_kernels.optim.SoRAAdamW``)."""
    from lowrank_kernels.nn.module import LowRankLinear

    return [m.sora_gate for m in model.modules() if isinstance(m, LowRankLinear) and m.method == "sora"]


@torch.no_grad()
def prune_sora(model: nn.Module) -> nn.Module:
    """Replace each SoRA layer of ``model`` by a plain LoRA layer (method="lora") of its surviving
    rank r' = #{i : g_i ≠ 0}, in place: A' = A[keep], B' = B[:, keep]·diag(g[keep]), the same scaling
    s (alpha = s·r'), so the layer computes exactly what it did. A layer whose gate is all zero
    becomes its frozen base nn.Linear. The new LoRA factors keep their requires_grad (they train
    on). Returns ``model`` (the new layer where ``model`` is itself a SoRA layer).
    """
    from lowrank_kernels.nn.convert import replace_modules
    from lowrank_kernels.nn.module import LowRankLinear

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    replacements = {}
    for name, m in model.named_modules():
        if not (isinstance(m, LowRankLinear) and m.method == "sora"):
            continue
        if m.merged:
            raise ValueError(f"prune_sora: layer {name or '<model>'!r} is merged; unmerge() it first")
        linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        linear.weight, linear.bias = m.weight, m.bias
        keep = (m.sora_gate != 0).nonzero().flatten()
        if keep.numel() == 0:
            replacements[id(m)] = linear
            continue
        lora = LowRankLinear.from_linear(linear, method="lora", rank=keep.numel(), alpha=m.scaling * keep.numel(),
                                         dropout=m.dropout, backend=m.backend, adapter_dtype=m.lora_A.dtype)
        lora.scaling = m.scaling  # exactly, not through alpha / r' rounding
        lora.lora_A.copy_(m.lora_A[keep])
        lora.lora_B.copy_(m.lora_B[:, keep] * m.sora_gate[keep])
        lora.lora_A.requires_grad_(m.lora_A.requires_grad)
        lora.lora_B.requires_grad_(m.lora_B.requires_grad)
        lora.train(m.training)
        replacements[id(m)] = lora
    if not replacements:
        raise ValueError(f"prune_sora: {type(model).__name__} has no SoRA layer (convert(model, method='sora'))")
    return replace_modules(model, replacements)


register_method(SoRAMethod())
