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
``lora_linear(x, W, A', B, s)``; autograd forms dN = dA' Aᵀ and dA = Nᵀ dA' from the op's dA'
(r·r·K work, nothing of size M). No new kernel.
"""

from __future__ import annotations

import torch
from torch import nn

from lowrank_kernels.nn.registry import Method, register_method
from lowrank_kernels.ops._checks import check_adapter_dtype
from lowrank_kernels.ops.lora import lora_linear

NLORA_ALPHA = 8.0


@torch.no_grad()
def nlora_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference code's (A, N, B) = (W[:r, :], W[:r, :r], W[:, :r]) of ``weight`` (N, K)."""
    return weight[:rank, :].clone(), weight[:rank, :rank].clone(), weight[:, :rank].clone()


class NLoRAMethod(Method):
    name = "nlora"
    default_rank = 8
    peer = "NLoRA reference code"
    options = {
        "adapter_dtype": (None, "dtype of lora_A/lora_N/lora_B: the base dtype (None) or torch.float32 on a "
                                "16-bit base"),
    }

    def default_alpha(self, rank):
        return NLORA_ALPHA

    def alpha_doc(self):
        return f"alpha {NLORA_ALPHA:g} (s = {NLORA_ALPHA:g} / r)"

    def create(self, module, base, device, dtype, bias=True, adapter_dtype=None):
        self.attach_base(module, base, device, dtype, bias)
        base_dtype = module.weight.dtype
        adapter_dtype = adapter_dtype or base_dtype
        check_adapter_dtype(base_dtype, adapter_dtype, "adapter_dtype")
        r = module.rank
        if r > min(module.in_features, module.out_features):
            raise ValueError(f"nlora needs rank <= min(in_features, out_features) = "
                             f"{min(module.in_features, module.out_features)}, got rank {r}")
        module.scaling = module.alpha / r
        A, N, B = nlora_factors(module.weight, r)
        module.lora_A = nn.Parameter(A.to(adapter_dtype))
        module.lora_N = nn.Parameter(N.to(adapter_dtype))
        module.lora_B = nn.Parameter(B.to(adapter_dtype))

    def forward(self, module, x):
        folded = module.lora_N @ module.lora_A
        return lora_linear(x, module.weight, folded, module.lora_B, module.scaling, module.bias,
                           dropout_p=module.dropout, training=module.training, backend=module.backend)

    def delta_weight(self, module):
        return (module.lora_B.float() @ module.lora_N.float() @ module.lora_A.float()) * module.scaling

    def extra_repr(self, module):
        return f"scaling={module.scaling:g}"


register_method(NLoRAMethod())
