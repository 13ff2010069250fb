"""NLoRA method for LowRankLinear (arXiv 2502.14482, "NLoRA: Nyström-Initiated Low-Rank Adaptation
for Large Language Models"; op: ops/lora.py).

SLoRA's three-factor adapter, y = x Wᵀ + bias + s · drop(x) Aᵀ Nᵀ Bᵀ, with trainable ``lora_A``
(r, K), ``lora_N`` (r, r) and ``lora_B`` (N, r) (the reference code's names), initialised from the
blocks of W that a Nyström approximation W ≈ W[:, :r] · W[:r, :r]⁺ · W[:r, :] reads: A = W[:r, :]
(the first r rows), B = W[:, :r] (the first r columns), N = W[:r, :r]. This is the reference code's
initialisation (TracyGuo2001/NLoRA, peft/tuners/lora/layer.py ``nlora_init``): the core is the
block itself, not its pseudo-inverse, and W is left unchanged, so the output at init is not the
base model's. Defaults are the reference script's: r = 8, alpha = 8 (s = 8 / r).

Fused: N is folded into the down-projection, A' = N·A, and the layer is the fused LoRA op
``lora_linear(x, W, A', B, s)`` (nn/folded_core.py); autograd forms dN = dA' Aᵀ and dA = Nᵀ dA'
from the op's dA' (r·r·K work, nothing of size M). No new kernel.
"""

from __future__ import annotations

import torch
from torch import nn

from lowrank_kernels.nn.folded_core import FoldedCoreMethod
from lowrank_kernels.nn.registry import adapter_dtype_option, register_method

NLORA_ALPHA = 8.0


@torch.no_grad()
def nlora_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference code's (A, N, B) = (W[:r, :], W[:r, :r], W[:, :r]) of ``weight`` (N, K)."""
    return weight[:rank, :].clone(), weight[:rank, :rank].clone(), weight[:, :rank].clone()


class NLoRAMethod(FoldedCoreMethod):
    name = "nlora"
    default_rank = 8
    peer = "NLoRA reference code"
    fixed_alpha = NLORA_ALPHA
    options = {"adapter_dtype": adapter_dtype_option("lora_A/lora_N/lora_B")}

    def create(self, module, base, device, dtype, bias=True, adapter_dtype=None):
        adapter_dtype = self.attach_base_for_adapters(module, base, device, dtype, bias, adapter_dtype)
        r = module.rank
        if r > min(module.in_features, module.out_features):
            raise ValueError(f"nlora needs rank <= min(in_features, out_features) = "
                             f"{min(module.in_features, module.out_features)}, got rank {r}")
        module.scaling = module.alpha / r
        A, N, B = nlora_factors(module.weight, r)
        module.lora_A = nn.Parameter(A.to(adapter_dtype))
        module.lora_N = nn.Parameter(N.to(adapter_dtype))
        module.lora_B = nn.Parameter(B.to(adapter_dtype))

    def factors(self, module):
        return module.lora_B, module.lora_N, module.lora_A


register_method(NLoRAMethod())
