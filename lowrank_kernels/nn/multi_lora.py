"""Multi-adapter LoRA for LowRankLinear (op: ops/multi_lora.py): many adapters in one layer, each
sample (or token) routed to its adapter, or a top-k mixture of them.

- ``LowRankLinear(..., method="multi_lora", adapters=n)`` / ``convert(model, method="multi_lora",
  adapters=n)``: a frozen base and a stack of n LoRA adapters, lora_A (n, r, K) (each slice
  Kaiming-uniform, a = sqrt(5), as PEFT) and lora_B (n, N, r) (zeros), s = alpha / r (PEFT's
  defaults: r = 8, alpha = 8).
- ``adapter_context(model, adapter_index, adapter_weight=None)``: which adapter each sample (or
  token) uses in the forward passes inside the ``with`` block, for every multi-adapter layer of
  ``model`` (any nn.Module tree, transformers models included). Gradients of adapter a come from
  its samples only: training n adapters in one batch gives each exactly the gradient it would get
  alone on its samples (for a loss that is a sum over samples).
- ``TopKRouter``: a linear gate with top-k routing; its (index, weight) pair goes straight into
  ``adapter_context`` (X-LoRA / MixLoRA-style mixtures; the gate trains through the weights).
- PEFT: a PEFT LoRA layer's mixed-adapter batch (``model(..., adapter_names=[...])``) and several
  active adapters (``set_adapter([...])``) run on the same op through from_peft (nn/peft/multi_lora.py).
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
from torch import Tensor, nn

from lowrank_kernels.nn.lora import PEFT_LORA_ALPHA
from lowrank_kernels.nn.module import LowRankLinear
from lowrank_kernels.nn.registry import Method, adapter_dtype_option, register_method
from lowrank_kernels.ops.multi_lora import multi_lora_linear


class MultiLoRAMethod(Method):
    name = "multi_lora"
    default_rank = 8
    peer = "PEFT LoraConfig, per adapter"
    fixed_alpha = PEFT_LORA_ALPHA
    options = {
        "adapters": (2, "number of LoRA adapters n in the layer; pick each sample's with nn.adapter_context"),
        "use_rslora": (False, "s = alpha / sqrt(r) instead of alpha / r (rsLoRA)"),
        "adapter_dtype": adapter_dtype_option("lora_A/lora_B"),
    }

    def create(self, module, base, device, dtype, bias=True, adapters=2, use_rslora=False, adapter_dtype=None):
        if isinstance(adapters, bool) or not isinstance(adapters, int) or adapters < 1:
            raise ValueError(f"adapters must be a positive int (the number of adapters), got {adapters!r}")
        adapter_dtype = self.attach_base_for_adapters(module, base, device, dtype, bias, adapter_dtype)
        device = module.weight.device
        module.adapters = adapters
        module.use_rslora = bool(use_rslora)
        module.scaling = module.alpha / (math.sqrt(module.rank) if use_rslora else module.rank)
        module.lora_A = nn.Parameter(torch.empty(adapters, module.rank, module.in_features, device=device,
                                                 dtype=adapter_dtype))
        module.lora_B = nn.Parameter(torch.zeros(adapters, module.out_features, module.rank, device=device,
                                                 dtype=adapter_dtype))
        with torch.no_grad():
            for a in range(adapters):
                nn.init.kaiming_uniform_(module.lora_A[a], a=math.sqrt(5))
        module.lowrank_route = None

    def forward(self, module, x):
        route = module.lowrank_route
        if route is None:
            raise RuntimeError("a multi_lora layer needs each sample's adapter: run the model inside "
                               "`with lowrank_kernels.nn.adapter_context(model, adapter_index): ...`")
        index, weight = _broadcast_route(route, x.shape[:-1])
        return multi_lora_linear(x, module.weight, module.lora_A, module.lora_B, index, module.scaling, module.bias,
                                 dropout_p=module.dropout, training=module.training, backend=module.backend,
                                 adapter_weight=weight)

    def delta_weight(self, module):
        raise ValueError("a multi_lora layer holds one update per adapter, so it has no single merged weight")

    def extra_repr(self, module):
        return f"adapters={module.adapters}, scaling={module.scaling:g}" + (", rslora" if module.use_rslora else "")


register_method(MultiLoRAMethod())


def _broadcast_route(route, lead: torch.Size):
    """(index, weight) per token for an input of leading shape ``lead``: a per-sample route
    (first dim = batch) is repeated over the sample's tokens."""
    index, weight = route
    k_dims = 0 if weight is None else 1
    per_token = index.shape[:index.dim() - k_dims]
    if per_token == lead:
        return index, weight
    if len(per_token) == 1 and len(lead) >= 1 and per_token[0] == lead[0]:
        shape = (lead[0],) + (1,) * (len(lead) - 1) + index.shape[1:]
        full = tuple(lead) + tuple(index.shape[1:])
        return index.reshape(shape).expand(full), None if weight is None else weight.reshape(shape).expand(full)
    raise ValueError(f"adapter_index of shape {tuple(index.shape)} fits neither the batch ({lead[0] if lead else 0} "
                     f"samples) nor the tokens {tuple(lead)} of a layer's input")


@contextlib.contextmanager
def adapter_context(model: nn.Module, adapter_index: Tensor, adapter_weight: Optional[Tensor] = None):
    """Route every multi-adapter layer of ``model`` for the forward passes inside the block.

    Args:
        model: any nn.Module with ``LowRankLinear(method="multi_lora")`` layers (e.g. after
            ``convert(model, method="multi_lora", adapters=n)``; a transformers model works as is).
        adapter_index: int64, (batch,) one adapter per sample, or the layers' token shape
            (batch, seq) one per token; -1 runs the base alone. With ``adapter_weight``: (batch, k)
            or (batch, seq, k), k adapters mixed per sample or token.
        adapter_weight: the mixture weights, adapter_index's shape (e.g. ``TopKRouter``'s output).

    Backward may run after the block (the route is captured by the forward). Activation
    checkpointing that recomputes outside the block needs the recomputation inside one too.
    """
    if not isinstance(adapter_index, Tensor) or adapter_index.dtype != torch.int64:
        raise TypeError("adapter_index must be an int64 tensor")
    if adapter_weight is not None and (not isinstance(adapter_weight, Tensor)
                                       or adapter_weight.shape != adapter_index.shape):
        raise ValueError("adapter_weight must be a tensor of adapter_index's shape")
    layers = [m for m in model.modules() if isinstance(m, LowRankLinear) and m.method == "multi_lora"]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no multi_lora layers (convert(model, method='multi_lora', ...))")
    previous = [m.lowrank_route for m in layers]
    for m in layers:
        m.lowrank_route = (adapter_index, adapter_weight)
    try:
        yield model
    finally:
        for m, route in zip(layers, previous):
            m.lowrank_route = route


class TopKRouter(nn.Module):
    """A linear gate over ``adapters`` adapters with top-k routing, as X-LoRA / MixLoRA route
    their LoRA experts: ``forward(h)`` returns ``(adapter_index, adapter_weight)`` of shape
    (..., k), the k largest gate logits' adapters and their softmax over those k (differentiable,
    so the gate trains), ready for ``adapter_context``."""

    def __init__(self, in_features: int, adapters: int, k: int = 2, bias: bool = False, device=None, dtype=None):
        super().__init__()
        if not 1 <= k <= adapters:
            raise ValueError(f"k must be in [1, adapters = {adapters}], got {k}")
        self.k = k
        self.gate = nn.Linear(in_features, adapters, bias=bias, device=device, dtype=dtype)

    def forward(self, h: Tensor):
        top, index = self.gate(h).topk(self.k, dim=-1)
        return index, torch.softmax(top.float(), dim=-1).to(h.dtype)
