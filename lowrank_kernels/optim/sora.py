"""SoRA's gate optimizer (arXiv 2311.11696, §3): an AdamW step on the gates followed by the
proximal operator of the L1 penalty, the soft threshold T_λ(g) = sign(g)·max(|g| − λ, 0), which sets
gate entries exactly to zero (those rank components are then removed by
``lowrank_kernels.nn.prune_sora``).

The Adam part is the reference code's (``SparseAdamW``, transformers' AdamW: bias correction folded
into the step size, decoupled weight decay lr·wd·g added to the same step); λ = ``sparse_lambda``,
taken as the threshold itself as the reference code does (its README: "sparse_lambda: η_t in the
paper"). The reference code zeroes |g| < 2λ after shifting by λ (its three masked assignments run in
sequence); this is the paper's soft threshold, which zeroes |g| ≤ λ only.
"""

from __future__ import annotations

import math

import torch

from lowrank_kernels.optim._common import check_betas, check_numbers, closure_loss


class SoRAAdamW(torch.optim.Optimizer):
    """AdamW + soft threshold for SoRA gates (``lowrank_kernels.nn.sora_gates(model)``).

    Args:
        params: the gate parameters (or param groups).
        sparse_lambda: the threshold λ >= 0 of the proximal step (required: the reference code's
            default 0.1 depends on the task's learning rate).
        lr, betas, eps, weight_decay: as transformers' AdamW (the reference's), default lr 1e-3,
            betas (0.9, 0.999), eps 1e-6, weight_decay 0.
    """

    def __init__(self, params, sparse_lambda: float, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0):
        check_numbers(sparse_lambda=sparse_lambda, lr=lr, eps=eps, weight_decay=weight_decay)
        check_betas(betas)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      sparse_lambda=sparse_lambda))

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step on each gate, then g ← T_λ(g)."""
        loss = closure_loss(closure)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                g = p.grad.float()
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(g, alpha=1.0 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
                t = state["step"]
                step_size = group["lr"] * math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)
                value = p.float()
                value = value - step_size * m / (v.sqrt() + group["eps"]) - group["lr"] * group["weight_decay"] * value
                lam = group["sparse_lambda"]
                p.copy_(value.sign() * (value.abs() - lam).clamp_min(0.0))
        return loss
