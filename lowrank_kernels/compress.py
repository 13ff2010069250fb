"""Model compression into low-rank (or low-rank + sparse) layers, and WeLore's per-layer ranks.

``compress(model, ratio, method)`` replaces the targeted nn.Linear layers of ``model`` by
LowRankLinear layers without a base weight (``method="lowrank"``: W ≈ s·B·A, the top-k SVD;
with ``density > 0`` ``method="sltrain"``: W ≈ s·B·A + S, S the largest-magnitude entries of the
residual), choosing each layer's rank k so that the targeted layers hold at most ``ratio`` of
their dense parameter count (biases are kept as they are and not counted). A compressed layer
costs k·(N + K) + nnz parameters against N·K.

- ``method="lord"`` (LoRD, Kaushal et al., arXiv 2309.14021): the same reduction in every layer,
  the largest k with k·(N + K) + nnz <= ratio·N·K.
- ``method="welore"`` (WeLore, Jaiswal et al., arXiv 2407.11239, its reference code's
  ``adaptive_rank_pruning``): each layer's singular values are min-max normalised,
  σ̃ = (σ − σ_min) / (σ_max − σ_min); one global threshold τ prunes the σ̃ < τ, so a layer with a
  heavy-tailed spectrum keeps few components and a flat one keeps many; a layer whose kept rank
  saves no parameters stays dense (WeLore's non-low-rank components). τ is the smallest threshold
  (by bisection) at which the model meets the budget.

The report gives, per targeted layer, its rank (None: kept dense), its relative reconstruction
error ‖W − Ŵ‖_F / ‖W‖_F, its parameter counts, and the model's parameter count before and after.

``welore_ranks`` gives WeLore's ranks for any named matrices (weights or gradients) at a
threshold or at a target rank-reduction ratio, and ``projected_param_groups`` turns per-layer
ranks into GaLoreAdamW / FiraAdamW / ApolloAdamW param groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional

import torch
from torch import Tensor, nn

from lowrank_kernels.nn.convert import Targets, find_targets, no_targets_error, replace_modules
from lowrank_kernels.nn.module import LowRankLinear, num_parameters

__all__ = ["compress", "CompressionReport", "LayerReport", "welore_rank", "welore_ranks", "projected_param_groups"]

METHODS = ("lord", "welore")
_BISECTIONS = 60


def normalized_spectrum(singular_values: Tensor) -> Tensor:
    """WeLore's min-max normalised singular values (σ − σ_min) / (σ_max − σ_min), float64; all
    ones for a flat spectrum (a spread within fp32 rounding of σ_max, 1e-6·σ_max, counts as flat)."""
    s = singular_values.detach().double()
    span = s.max() - s.min()
    return torch.ones_like(s) if span <= 1e-6 * s.max() else (s - s.min()) / span


def welore_rank(singular_values: Tensor, threshold: float) -> int:
    """Components a layer keeps under WeLore's rule: #{σ̃ >= threshold} (at least 1)."""
    return max(1, int((normalized_spectrum(singular_values) >= threshold).sum()))


def _spectra(matrices: Mapping[str, Tensor]) -> dict:
    return {name: torch.linalg.svdvals(m.detach().float()) for name, m in matrices.items()}


def _bisect(fits, lo: float = 0.0, hi: float = 1.0) -> float:
    """The smallest threshold in [lo, hi] for which ``fits`` holds (``fits`` is monotone, true at hi)."""
    if fits(lo):
        return lo
    for _ in range(_BISECTIONS):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


def welore_ranks(matrices: Mapping[str, Tensor], threshold: Optional[float] = None,
                 ratio: Optional[float] = None) -> dict:
    """WeLore's rank of each named 2-D matrix (a weight, or a gradient to size a GaLore/Fira/APOLLO
    projection), from one global threshold on the normalised spectra.

    Give ``threshold`` (τ in [0, 1]) or ``ratio``: the kept fraction of the total rank,
    Σ k / Σ min(N, K) <= ratio, reached with the smallest τ (bisection). Returns {name: k}.
    """
    if (threshold is None) == (ratio is None):
        raise ValueError("give exactly one of threshold= and ratio=")
    for name, m in matrices.items():
        if not isinstance(m, Tensor) or m.dim() != 2:
            raise ValueError(f"matrices[{name!r}] must be a 2-D tensor")
    spectra = _spectra(matrices)
    if threshold is not None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
        return {name: welore_rank(s, threshold) for name, s in spectra.items()}
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
    total = sum(s.numel() for s in spectra.values())

    def fits(tau):
        return sum(welore_rank(s, tau) for s in spectra.values()) <= ratio * total

    if not fits(1.0):
        raise ValueError(f"ratio {ratio} is below what rank 1 in every matrix keeps ({len(spectra)}/{total})")
    tau = _bisect(fits)
    return {name: welore_rank(s, tau) for name, s in spectra.items()}


def projected_param_groups(model: nn.Module, ranks: Mapping[str, int], **group_options) -> list:
    """Param groups for GaLoreAdamW / FiraAdamW / ApolloAdamW with a rank per layer: one group per
    distinct rank holding the ``.weight`` of the modules named in ``ranks`` (e.g. from
    ``welore_ranks``), each with ``group_options`` (update_proj_gap, scale, ...), and a last group
    with every other parameter (plain AdamW)."""
    modules = dict(model.named_modules())
    by_rank, projected = {}, set()
    for name, rank in ranks.items():
        if name not in modules or not isinstance(getattr(modules[name], "weight", None), Tensor):
            raise ValueError(f"ranks names {name!r}, which is not a module of the model with a weight")
        weight = modules[name].weight
        by_rank.setdefault(int(rank), []).append(weight)
        projected.add(id(weight))
    groups = [{"params": params, "rank": rank, **group_options} for rank, params in sorted(by_rank.items())]
    rest = [p for p in model.parameters() if id(p) not in projected]
    if rest:
        groups.append({"params": rest})
    return groups


@dataclass
class LayerReport:
    """One targeted layer: ``rank`` None when it stays dense."""

    shape: tuple
    rank: Optional[int]
    relative_error: float
    parameters: int
    dense_parameters: int


@dataclass
class CompressionReport:
    """What ``compress`` did: per-layer reports and the model's parameter counts."""

    method: str
    ratio: float
    layers: dict = field(default_factory=dict)
    parameters_before: int = 0
    parameters_after: int = 0

    @property
    def achieved_ratio(self) -> float:
        """Parameters of the targeted layers after / before."""
        return (sum(r.parameters for r in self.layers.values())
                / max(1, sum(r.dense_parameters for r in self.layers.values())))

    def __str__(self) -> str:
        lines = [f"compress(method={self.method!r}, ratio={self.ratio:g}): targeted layers at "
                 f"{self.achieved_ratio:.4f} of their parameters; model {self.parameters_before} -> "
                 f"{self.parameters_after} parameters",
                 f"{'layer':40} {'shape':>14} {'rank':>6} {'rel. error':>11} {'params':>10}"]
        for name, r in self.layers.items():
            rank = "dense" if r.rank is None else str(r.rank)
            lines.append(f"{name:40} {str(r.shape):>14} {rank:>6} {r.relative_error:11.4e} {r.parameters:>10}")
        return "\n".join(lines)


def _nnz(N: int, K: int, density: float) -> int:
    # The count ops/sparse_lowrank.magnitude_support keeps for a uniform support.
    return int(round(density * N * K))


def _cost(N: int, K: int, rank: Optional[int], density: float) -> int:
    return N * K if rank is None else rank * (N + K) + _nnz(N, K, density)


def _lord_ranks(targets, ratio, density) -> dict:
    ranks = {}
    for name, linear in targets:
        N, K = linear.weight.shape
        k = min(int((ratio * N * K - _nnz(N, K, density)) // (N + K)), min(N, K))
        if k < 1:
            raise ValueError(f"layer {name!r} ({N}, {K}): ratio {ratio} leaves no room for rank 1 "
                             f"(with density {density})")
        ranks[name] = k
    return ranks


def _welore_layer_ranks(targets, ratio, density) -> dict:
    spectra = _spectra({name: linear.weight for name, linear in targets})
    shapes = {name: tuple(linear.weight.shape) for name, linear in targets}
    budget = ratio * sum(N * K for N, K in shapes.values())

    def ranks_at(tau):
        out = {}
        for name, s in spectra.items():
            N, K = shapes[name]
            k = welore_rank(s, tau)
            # A layer that compression would not shrink stays dense (WeLore's non-low-rank ones).
            out[name] = k if _cost(N, K, k, density) < N * K else None
        return out

    def fits(tau):
        return sum(_cost(*shapes[n], k, density) for n, k in ranks_at(tau).items()) <= budget

    if not fits(1.0):
        raise ValueError(f"ratio {ratio} is below what rank 1 in every targeted layer keeps")
    return ranks_at(_bisect(fits))


@torch.no_grad()
def compress(model: nn.Module, ratio: float, method: str = "lord", target_modules: Targets = None,
             density: float = 0.0) -> CompressionReport:
    """Replace the targeted nn.Linear layers of ``model`` (in place) by low-rank, or low-rank plus
    sparse, LowRankLinear layers so that they keep at most ``ratio`` of their parameters.

    Args:
        model: any nn.Module; its targeted layers are replaced in place.
        ratio: target parameter fraction of the targeted layers, in (0, 1).
        method: ``"lord"`` (the same reduction in every layer) or ``"welore"`` (ranks from the heavy
            tail of each layer's spectrum, one global threshold); module docstring.
        target_modules: as ``convert`` (None: every nn.Linear but the output embedding).
        density: fraction of each compressed layer's entries kept as a sparse part S (the
            largest-magnitude entries of W − s·B·A); 0 gives pure low-rank layers.

    Returns:
        CompressionReport: per layer its rank (None if kept dense), relative reconstruction error
        ‖W − Ŵ‖_F / ‖W‖_F and parameter counts; the model's parameters before and after.
        The new layers train (they have no frozen base weight).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must be in (0, 1), got {ratio!r}")
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 <= density < ratio:
        raise ValueError(f"density must be in [0, ratio), got {density!r}")
    targets = find_targets(model, target_modules)
    if not targets:
        raise no_targets_error(model, target_modules)
    if targets[0][1] is model:
        raise ValueError("model is itself an nn.Linear, which cannot be replaced in place: compress a module "
                         "that holds it (e.g. nn.Sequential(linear))")
    before = num_parameters(model)
    ranks = (_lord_ranks if method == "lord" else _welore_layer_ranks)(targets, ratio, density)
    report = CompressionReport(method=method, ratio=float(ratio), parameters_before=before)
    replacements = {}
    for name, linear in targets:
        N, K = linear.weight.shape
        k = ranks[name]
        if k is None:
            report.layers[name] = LayerReport((N, K), None, 0.0, N * K, N * K)
            continue
        options = {"density": density} if density > 0 else {}
        layer = LowRankLinear.from_linear(linear, method="sltrain" if density > 0 else "lowrank", rank=k,
                                          init="svd", **options)
        W = linear.weight.float()
        error = ((W - layer._method.delta_weight(layer)).norm() / W.norm().clamp_min(1e-30)).item()
        report.layers[name] = LayerReport((N, K), k, error, _cost(N, K, k, density), N * K)
        replacements[id(linear)] = layer
    model = replace_modules(model, replacements)
    report.parameters_after = num_parameters(model)
    return report
