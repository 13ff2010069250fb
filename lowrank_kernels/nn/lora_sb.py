"""LoRA-SB method for LowRankLinear (arXiv 2411.19557, "Initialization using Update Approximation
is a Silver Bullet for Extreme Efficient Low-Rank Fine-Tuning"; op: ops/lora.py).

y = x Wᵀ + bias + s · drop(x) Aᵀ Rᵀ Bᵀ with frozen ``lora_sb_A`` (r, K) and ``lora_sb_B`` (N, r)
(buffers, saved in adapter checkpoints) and the trainable r×r core ``lora_sb_R`` (LoRA-XS's
architecture). Only r² parameters train per layer.

Fused: the core is folded into the down-projection, A' = R·A (r, K), and the layer is the fused
LoRA op ``lora_linear(x, W, A', B, s)`` (nn/folded_core.py): autograd forms dR = dA' Aᵀ (r·r·K
flops, nothing of size M). No new kernel: the op's dB (s·dyᵀh, 2·M·N·r flops) is computed and
dropped, the one cost above a dedicated kernel.

Initialisation: ``lowrank_kernels.nn.calibrate(model, batches, init="lora_sb", lr=...)`` sets A, B
and R from the approximated first full fine-tuning update (nn/lora_init.py). Before calibration
the layer has orthonormal random A and B (QR of a Gaussian) and R = 0, so its output is the base
model's. Defaults are the reference code's (train_glue.py): r = 24, alpha = r (s = 1).
"""

from __future__ import annotations

import torch
from torch import nn

from lowrank_kernels.nn.folded_core import FoldedCoreMethod
from lowrank_kernels.nn.registry import adapter_dtype_option, register_method


class LoRASBMethod(FoldedCoreMethod):
    name = "lora_sb"
    default_rank = 24
    peer = "LoRA-SB reference code"
    options = {"adapter_dtype": adapter_dtype_option("lora_sb_A/B/R")}

    def create(self, module, base, device, dtype, bias=True, adapter_dtype=None):
        adapter_dtype = self.attach_base_for_adapters(module, base, device, dtype, bias, adapter_dtype)
        r, K, N = module.rank, module.in_features, module.out_features
        if r > min(K, N):
            raise ValueError(f"lora_sb needs rank <= min(in_features, out_features) = {min(K, N)}, got rank {r}")
        device = module.weight.device
        module.scaling = module.alpha / r
        A = torch.linalg.qr(torch.randn(K, r, device=device))[0].t()
        B = torch.linalg.qr(torch.randn(N, r, device=device))[0]
        module.register_buffer("lora_sb_A", A.to(adapter_dtype).contiguous())
        module.register_buffer("lora_sb_B", B.to(adapter_dtype).contiguous())
        module.lora_sb_R = nn.Parameter(torch.zeros(r, r, device=device, dtype=adapter_dtype))

    def factors(self, module):
        return module.lora_sb_B, module.lora_sb_R, module.lora_sb_A


register_method(LoRASBMethod())
