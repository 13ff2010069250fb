"""LowRankLinear: a drop-in nn.Linear replacement whose low-rank part runs on the fused ops."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lowrank_kernels.backend import CHOICES
from lowrank_kernels.nn.registry import get_method


def num_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of floating-point parameters of ``module`` (a layer or a model); ``trainable_only``
    counts those with requires_grad. Buffers and integer parameters (a sparse support's index,
    ``sp_index``, frozen) are not counted."""
    return sum(p.numel() for p in module.parameters()
               if p.is_floating_point() and (p.requires_grad or not trainable_only))


class LowRankLinear(nn.Module):
    """y = method(x): a linear layer with a low-rank (and possibly sparse) trainable part.

    Args:
        in_features, out_features: as nn.Linear.
        rank: the rank r (>= 1); None means the method's default (the table below).
        method: a registered method name ("lora", ...): see lowrank_kernels.nn.available_methods().
        alpha: scaling numerator; None means the method's default (the table below: with only a
            rank given, the scaling equals what the peer's config gives with only ``r`` set).
        dropout: dropout probability on the adapter's input, in [0, 1).
        bias: whether the base layer has a bias.
        device, dtype: of the base weight (and, unless a method says otherwise, of the adapters).
        backend: None, "reference", "triton" or "cuda", passed to the op on each call.
        **options: method-specific options, listed below per method (others raise TypeError).

    ``LowRankLinear.from_linear(linear, ...)`` wraps an existing nn.Linear instead of allocating a
    new base weight.
    """

    def __init__(self, in_features, out_features, rank=None, method="lora", alpha=None, dropout=0.0, bias=True,
                 device=None, dtype=None, backend=None, **options):
        super().__init__()
        self._build(in_features, out_features, rank, method, alpha, dropout, bias, device, dtype, backend, None,
                    options)

    def _build(self, in_features, out_features, rank, method, alpha, dropout, bias, device, dtype, backend, base,
               options) -> None:
        if not isinstance(method, str):
            raise TypeError(f"method must be a registered method name (str), got {type(method).__name__}")
        impl = get_method(method)
        rank = impl.default_rank if rank is None else rank
        for name, value in (("in_features", in_features), ("out_features", out_features), ("rank", rank)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}")
        if backend is not None and backend not in CHOICES:
            raise ValueError(f"backend must be one of {CHOICES} or None, got {backend!r}")
        impl.check_options(options)
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.method = method
        self._method = impl
        alpha = self._method.default_alpha(rank) if alpha is None else alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite number, got {alpha!r}")
        self.alpha = float(alpha)
        self.dropout = float(dropout)
        self.backend = backend
        self.merged = False
        self._method.create(self, base, device, dtype, bias=bias, **options)

    @classmethod
    def from_linear(cls, linear: nn.Linear, method="lora", rank=None, alpha=None, dropout=0.0, backend=None,
                    **options):
        """Wrap an existing nn.Linear: its weight and bias are kept (frozen, not copied).

        rank=None and alpha=None take the method's defaults, as in LowRankLinear. Only a plain
        nn.Linear: a subclass (bitsandbytes' quantised layers, nn.MultiheadAttention's out_proj,
        ...) stores or uses its weight differently, and wrapping it would be silently wrong.
        """
        if type(linear) is not nn.Linear:
            kind = f"{type(linear).__module__}.{type(linear).__qualname__}"
            raise TypeError(f"linear must be a plain nn.Linear, got {kind}")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._build(linear.in_features, linear.out_features, rank, method, alpha, dropout, linear.bias is not None,
                      linear.weight.device, linear.weight.dtype, backend, linear, options)
        return module

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

    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        """The base weight with the update folded in, as a new tensor of the weight's dtype.

        Computed in fp32 and rounded once; the module is left as it is. Used for export
        (lowrank_kernels.merge_and_unload).
        """
        if self.merged:
            return self.weight.detach().clone()
        return self._weight_plus(+1.0)

    def _weight_plus(self, sign: float) -> Tensor:
        if not self._method.has_base_weight:
            raise RuntimeError(f"method {self.method!r} has no base weight to merge into")
        weight = (self.weight.float() + sign * self._method.delta_weight(self)).to(self.weight.dtype)
        # Checked after rounding: a finite update can still overflow a half-precision weight.
        if not torch.isfinite(weight).all():
            raise ValueError(f"the {self.method} update is non-finite or overflows {self.weight.dtype}; "
                             "refusing to merge it into the weight")
        return weight

    def _apply_delta(self, sign: float) -> None:
        weight = self._weight_plus(sign)  # first: it raises for methods without a base weight
        self.weight.copy_(weight)

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of parameters (buffers such as a sparse support's index are not counted)."""
        return num_parameters(self, trainable_only)

    # A merged layer's saved weight already holds the update: a "merged" flag travels with it so
    # that a fresh layer loading the state does not add the update a second time. It is a 0-d
    # bool tensor (not get_extra_state's Python object, which safetensors and transformers'
    # save_pretrained cannot write), kept out of the buffers so forward reads a plain bool.
    # The method's extra state (Method.save_extra, e.g. a basis seed) travels the same way.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "merged"] = torch.tensor(self.merged)
        for key, value in self._method.save_extra(self).items():
            destination[prefix + key] = value

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "merged"
        if key in state_dict:
            self.merged = bool(state_dict.pop(key))
        elif strict:
            missing_keys.append(key)
        extra = {}
        for name in self._method.save_extra(self):
            if prefix + name in state_dict:
                extra[name] = state_dict.pop(prefix + name)
            elif strict:
                missing_keys.append(prefix + name)
        if extra:
            problem = self._method.load_extra(self, extra, state_dict, prefix)
            if problem:
                error_msgs.append(f"{prefix or '<layer>'}: {problem}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        extra = self._method.extra_repr(self)
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"method={self.method!r}, alpha={self.alpha:g}, dropout={self.dropout:g}"
                + (f", {extra}" if extra else ""))
