"""LowRankLinear: a drop-in nn.Linear replacement whose low-rank part runs on the fused ops."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lowrank_kernels.nn.registry import get_method


class LowRankLinear(nn.Module):
    """y = method(x): a linear layer with a low-rank (and possibly sparse) trainable part.

    Args:
        in_features, out_features: as nn.Linear.
        rank: the adapter's rank r (>= 1).
        method: a registered method name ("lora", ...): see lowrank_kernels.nn.available_methods().
        alpha: scaling numerator; None means the method's documented default (LoRA: alpha = rank).
        dropout: dropout probability on the adapter's input, in [0, 1).
        bias: whether the base layer has a bias.
        device, dtype: of the base weight (and, unless a method says otherwise, of the adapters).
        backend: None, "reference", "triton" or "cuda", passed to the op on each call.
        **options: method-specific options (e.g. ``use_rslora`` for LoRA).
    """

    def __init__(self, in_features, out_features, rank, method="lora", alpha=None, dropout=0.0, bias=True,
                 device=None, dtype=None, backend=None, *, _base: nn.Linear | None = None, **options):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features), ("rank", rank)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.method = method
        self._method = get_method(method)
        alpha = self._method.default_alpha(rank) if alpha is None else alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite number, got {alpha!r}")
        self.alpha = float(alpha)
        self.dropout = float(dropout)
        self.backend = backend
        self.merged = False
        self._method.create(self, _base, device, dtype, bias=bias, **options)

    @classmethod
    def from_linear(cls, linear: nn.Linear, method="lora", rank=8, alpha=16, dropout=0.0, backend=None, **options):
        """Wrap an existing nn.Linear: its weight and bias are kept (frozen, not copied)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        return cls(linear.in_features, linear.out_features, rank, method=method, alpha=alpha, dropout=dropout,
                   bias=linear.bias is not None, device=linear.weight.device, dtype=linear.weight.dtype,
                   backend=backend, _base=linear, **options)

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return nn.functional.linear(x, self.weight, self.bias)
        return self._method.forward(self, x)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the low-rank update into the base weight (in fp32, rounded once)."""
        if self.merged:
            return
        self._apply_delta(+1.0)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge(): the base weight comes back within one rounding of its dtype."""
        if not self.merged:
            return
        self._apply_delta(-1.0)
        self.merged = False

    def _apply_delta(self, sign: float) -> None:
        if not self._method.has_base_weight:
            raise RuntimeError(f"method {self.method!r} has no base weight to merge into")
        delta = self._method.delta_weight(self)
        if not torch.isfinite(delta).all():
            raise ValueError(f"{self.method} update has non-finite values; refusing to merge it into the weight")
        self.weight.copy_((self.weight.float() + sign * delta).to(self.weight.dtype))

    def extra_repr(self) -> str:
        extra = self._method.extra_repr(self)
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"method={self.method!r}, alpha={self.alpha:g}, dropout={self.dropout:g}"
                + (f", {extra}" if extra else ""))
