"""LoRA-SB method for LowRankLinear (arXiv 2411.19557, "Initialization using Update Approximation
is a Silver Bullet for Extreme Efficient Low-Rank Fine-Tuning"; op: ops/lora.py).

y = x Wᵀ + bias + s · drop(x) Aᵀ Rᵀ Bᵀ with frozen ``lora_sb_A`` (r, K) and ``lora_sb_B`` (N, r)
(buffers, saved in adapter checkpoints) and the trainable r×r core ``lora_sb_R`` (LoRA-XS's
architecture). Only r² parameters train per layer.

Fused: the core is folded into the down-projection, A' = R·A (r, K), and the layer is the fused
LoRA op ``lora_linear(x, W, A', B, s)``: its backward returns dA' = s·gᵀ drop(x) (g = dy B), from
which autograd forms dR = dA' Aᵀ (r·r·K flops, nothing of size M). No new kernel: the op's dB
(s·dyᵀh, 2·M·N·r flops) is computed and dropped, the one cost above a dedicated kernel.

Initialisation: ``lowrank_kernels.nn.calibrate(model, batches, init="lora_sb", lr=...)`` sets A, B
and R from the approximated first full fine-tuning update (nn/lora_init.py). Before calibration
the layer has orthonormal random A and B (QR of a Gaussian) and R = 0, so its output is the base
model's. Defaults are the reference code's (train_glue.py): r = 24, alpha = r (s = 1).
"""

from __future__ import annotations

import torch
from torch import nn

from lowrank_kernels.nn.registry import Method, register_method
from lowrank_kernels.ops._checks import check_adapter_dtype
from lowrank_kernels.ops.lora import lora_linear


class LoRASBMethod(Method):
    name = "lora_sb"
    default_rank = 24
    peer = "LoRA-SB reference code"
    options = {
        "adapter_dtype": (None, "dtype of lora_sb_A/B/R: the base dtype (None) or torch.float32 on a 16-bit base"),
    }

    def create(self, module, base, device, dtype, bias=True, adapter_dtype=None):
        self.attach_base(module, base, device, dtype, bias)
        base_dtype = module.weight.dtype
        adapter_dtype = adapter_dtype or base_dtype
        check_adapter_dtype(base_dtype, adapter_dtype, "adapter_dtype")
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

    def forward(self, module, x):
        folded = module.lora_sb_R @ module.lora_sb_A
        return lora_linear(x, module.weight, folded, module.lora_sb_B, module.scaling, module.bias,
                           dropout_p=module.dropout, training=module.training, backend=module.backend)

    def delta_weight(self, module):
        return (module.lora_sb_B.float() @ module.lora_sb_R.float() @ module.lora_sb_A.float()) * module.scaling

    def extra_repr(self, module):
        return f"scaling={module.scaling:g}"


register_method(LoRASBMethod())
