"""LoRA method for LowRankLinear (op: ops/lora.py).

Parameters as PEFT's LoRA Linear: frozen ``weight`` (N, K) and ``bias``, trainable
``lora_A`` (r, K) (Kaiming-uniform, a = sqrt(5)) and ``lora_B`` (N, r) (zeros). Scaling
s = alpha / r, or alpha / sqrt(r) with ``use_rslora=True``. Defaults are PEFT's LoraConfig's:
r = 8, lora_alpha = 8 whatever the rank (so s = 8 / r). ``adapter_dtype=torch.float32`` keeps
the adapters in fp32 on a bf16/fp16 base (PEFT's default). ``init`` takes PEFT's
``init_lora_weights`` values that need no data (True, "gaussian", "pissa", "pissa_niter_K");
the data-driven ones (LoRA-GA, CorDA, EoRA) go through ``lowrank_kernels.nn.calibrate``
(nn/lora_init.py).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lowrank_kernels.nn.lora_init import init_lora_layer
from lowrank_kernels.nn.registry import Method, adapter_dtype_option, register_method
from lowrank_kernels.ops.lora import lora_linear

# PEFT's LoraConfig default lora_alpha: a constant, not the rank.
PEFT_LORA_ALPHA = 8.0


class LoRAMethod(Method):
    name = "lora"
    default_rank = 8
    peer = "PEFT LoraConfig"
    fixed_alpha = PEFT_LORA_ALPHA
    options = {
        "use_rslora": (False, "s = alpha / sqrt(r) instead of alpha / r (rsLoRA)"),
        "adapter_dtype": adapter_dtype_option("lora_A/lora_B"),
        "init": (True, "PEFT's init_lora_weights: True (Kaiming-uniform A, B = 0), 'gaussian', 'pissa' or "
                       "'pissa_niter_K' (W keeps the residual); data-driven inits: nn.calibrate()"),
        "use_dora": (False, "PEFT's DoRA flag: True is refused here, DoRA is method='dora'"),
    }

    def create(self, module, base, device, dtype, bias=True, use_rslora=False, adapter_dtype=None, use_dora=False,
               init=True):
        if use_dora:
            raise ValueError("use_dora=True: DoRA is its own method, method='dora'")
        adapter_dtype = self.attach_base_for_adapters(module, base, device, dtype, bias, adapter_dtype)
        device = module.weight.device
        module.use_rslora = bool(use_rslora)
        module.scaling = module.alpha / (math.sqrt(module.rank) if use_rslora else module.rank)
        module.lora_A = nn.Parameter(torch.empty(module.rank, module.in_features, device=device, dtype=adapter_dtype))
        module.lora_B = nn.Parameter(torch.zeros(module.out_features, module.rank, device=device, dtype=adapter_dtype))
        nn.init.kaiming_uniform_(module.lora_A, a=math.sqrt(5))
        init_lora_layer(module, init)

    def forward(self, module, x):
        return lora_linear(x, module.weight, module.lora_A, module.lora_B, module.scaling, module.bias,
                           dropout_p=module.dropout, training=module.training, backend=module.backend)

    def delta_weight(self, module):
        return (module.lora_B.float() @ module.lora_A.float()) * module.scaling

    def extra_repr(self, module):
        return f"scaling={module.scaling:g}" + (", rslora" if module.use_rslora else "")


register_method(LoRAMethod())
