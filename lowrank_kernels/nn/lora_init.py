"""LoRA initialisations: PiSSA, LoRA-GA, CorDA, EoRA (and LoRA-SB's, for method="lora_sb"), and
``calibrate`` for those that need data.

All of them only choose the starting values of the factors (and, where the paper does so, move
the frozen weight by the same amount), so every one trains on the fused LoRA op unchanged. With
y = x Wᵀ + s · x Aᵀ Bᵀ, A (r, K), B (N, r), s the layer's scaling:

- PiSSA (arXiv 2404.02948; PEFT ``init_lora_weights="pissa"`` / ``"pissa_niter_K"``): W = U S Vᵀ,
  A = diag(√(S_r / s)) V_rᵀ, B = U_r diag(√(S_r / s)), W ← W − s·B·A (the residual). ``pissa_niter_K``
  takes U_r, S_r, V_r from torch.svd_lowrank with K subspace iterations (PEFT's randomized SVD).
  Data-free: ``LowRankLinear.from_linear(..., init="pissa")`` / ``convert(..., init="pissa")``.
- LoRA-GA (arXiv 2407.05000; PEFT ``init_lora_weights="lora_ga"``): G = the gradient of the loss
  with respect to W averaged over the calibration batches, G ≈ U S Vᵀ from
  torch.svd_lowrank(G, q = min(4r, N, K), niter = 4). ``direction`` picks which 2r singular
  triplets go where ("ArB2r", PEFT's default: A = V[:, :r]ᵀ, B = U[:, r:2r] diag(S[r:2r])), ``scale``
  rescales them ("stable", default: B · N^¼ / √γ with γ = ``stable_gamma`` = 16; "gd_scale": both
  / s; "weight_svd": B · σ₁(W) / S_B[0]; "unit": none); then the offset correction W ← W − s·B·A, so
  the model's output at init is the base model's. These are PEFT's formulas (singular values
  on B; its "stable" scale on B only).
- CorDA (arXiv 2406.05223; PEFT ``init_lora_weights="corda"``): C = the mean over calibration calls
  of X̂ᵀX̂, X̂ = a call's inputs divided by their max (PEFT's), damped by d·mean(diag C)·I (d = 0.01,
  doubled until ‖C C⁻¹ − I‖ < 0.05, PEFT's); W C = U S Vᵀ, V̂ = C⁻ᵀ V. ``mode="ipm"``
  (instruction-previewed) adapts the r largest components, ``"kpm"`` (knowledge-preserving) the r
  smallest: A = diag(√(S_r / s)) V̂_rᵀ, B = U_r diag(√(S_r / s)), W ← W − s·B·A.
- EoRA (arXiv 2410.21271): compensates a compressed layer W' (the layer's frozen weight) for the
  original W (``original_weights``): ΔW = W − W', C = XᵀX over the calibration tokens = Q Λ Qᵀ,
  ΔW Q √Λ ≈ U_r S_r V_rᵀ (truncated SVD), B = U_r S_r / s, A = V_rᵀ √Λ⁻¹ Qᵀ, so that s·B·A is the
  rank-r L minimising ‖(ΔW − L) Xᵀ‖_F. W' is not changed. Eigenvalues of C below 1e-6·max(Λ) are
  raised to that floor, so √Λ⁻¹ stays finite.
- LoRA-SB (arXiv 2411.19557; method="lora_sb", nn/lora_sb.py): the first full fine-tuning update is
  approximated from the calibration gradient, ΔW = −lr·sign(Σ G) (Adam's first step, the reference
  code's ``update="adam"``) or −lr·mean G (``update="sgd"``); ΔW ≈ U_r S_r V_rᵀ, B = U_r, A = V_rᵀ
  (frozen), R = diag(S_r) / s (trained), so s·B·R·A is the best rank-r approximation of ΔW. W is not
  changed: the model starts from the approximated first step.

``calibrate`` runs the batches through a converted model with hooks on its LowRankLinear layers
(activation covariances under no_grad, or gradients of the frozen weights, accumulated in fp32),
then sets each layer's factors. Factors are computed in fp32 and rounded once to the adapter dtype;
the offset correction uses the rounded factors, so W + s·B·A (what merge_and_unload writes) is the
original weight within one rounding of the weight's dtype.

The changed W is part of the base model, not of an adapter checkpoint (``save_adapters``): save the
base model too, or repeat the initialisation on the same base before loading the adapters.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from torch import Tensor, nn

CALIBRATED_INITS = ("lora_ga", "corda", "eora", "lora_sb")
LORA_GA_DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")
LORA_GA_SCALES = ("stable", "gd_scale", "weight_svd", "unit")
CORDA_MODES = ("ipm", "kpm")
LORA_SB_UPDATES = ("adam", "sgd")


# ----------------------------------------------------------------------------------------------
# The formulas (fp32 in, fp32 factors out): the specification each initialisation is tested on
# ----------------------------------------------------------------------------------------------
def pissa_niter(init) -> Optional[int]:
    """K for ``init="pissa_niter_K"`` (PEFT's name for the randomized SVD), None for ``"pissa"``;
    ValueError for a malformed name."""
    if init == "pissa":
        return None
    prefix = "pissa_niter_"
    tail = init[len(prefix):] if isinstance(init, str) and init.startswith(prefix) else ""
    if not tail.isdigit() or int(tail) < 1:
        raise ValueError(f"init must be 'pissa' or 'pissa_niter_K' with an int K >= 1 (e.g. 'pissa_niter_4'), "
                         f"got {init!r}")
    return int(tail)


def _split_sqrt(U: Tensor, S: Tensor, Vh: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
    root = (S / scaling).sqrt()
    return root[:, None] * Vh, U * root[None, :]


def pissa_factors(weight: Tensor, rank: int, scaling: float, niter: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """PiSSA's (A, B), fp32: the top-``rank`` SVD of ``weight`` (N, K) split as
    A = diag(√(S_r/s)) V_rᵀ (r, K), B = U_r diag(√(S_r/s)) (N, r); ``niter`` uses torch.svd_lowrank."""
    w = weight.detach().float()
    if niter is None:
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        U, S, Vh = U[:, :rank], S[:rank], Vh[:rank]
    else:
        U, S, V = torch.svd_lowrank(w, q=rank, niter=niter)
        Vh = V.t()
    return _split_sqrt(U, S, Vh, scaling)


def lora_ga_factors(grad: Tensor, rank: int, scaling: float, direction: str = "ArB2r", scale: str = "stable",
                    stable_gamma: float = 16, weight: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """LoRA-GA's (A, B), fp32, from the averaged gradient ``grad`` (N, K) (PEFT's formulas; see the
    module docstring). ``weight`` is needed for ``scale="weight_svd"`` only."""
    g = grad.detach().float()
    N = g.shape[0]
    U, S, V = torch.svd_lowrank(g, q=min(4 * rank, *g.shape), niter=4)
    Vh = V.t()
    if direction == "ArB2r":
        ia, ib = slice(0, rank), slice(rank, 2 * rank)
    elif direction == "A2rBr":
        ia, ib = slice(rank, 2 * rank), slice(0, rank)
    elif direction == "ArBr":
        ia, ib = slice(1, 2 * rank, 2), slice(0, 2 * rank, 2)
    else:
        ia = ib = torch.randperm(2 * rank)[:rank]
    A, B, S_B = Vh[ia], U[:, ib] * S[ib], S[ib]
    if scale == "stable":
        B = B * (N ** 0.25 / stable_gamma ** 0.5)
    elif scale == "gd_scale":
        A, B = A / scaling, B / scaling
    elif scale == "weight_svd":
        top = torch.svd_lowrank(weight.detach().float(), q=rank, niter=4)[1][0]
        if S_B[0] > 0:
            B = B * (top / S_B[0])
    return A, B


def corda_covariance_damped(cov: Tensor) -> tuple[Tensor, Tensor]:
    """(C + d·mean(diag C)·I, its inverse), d = 0.01 doubled until the inverse is accurate (PEFT's)."""
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    damp = 0.01
    while True:
        fixed = cov + eye * (cov.diagonal().mean() * damp)
        inv = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inv, eye).item() < 0.05:
            return fixed, inv
        damp *= 2


def corda_factors(weight: Tensor, covariance: Tensor, rank: int, scaling: float, mode: str = "ipm"
                  ) -> tuple[Tensor, Tensor]:
    """CorDA's (A, B), fp32: SVD of W·C (C damped), the r largest (``"ipm"``) or smallest (``"kpm"``)
    components, V̂ = (Vᵀ C⁻¹)ᵀ, split by √(S/s) as PiSSA."""
    fixed, inv = corda_covariance_damped(covariance.float())
    U, S, Vh = torch.linalg.svd(weight.detach().float() @ fixed, full_matrices=False)
    Vh = Vh @ inv
    keep = slice(0, rank) if mode == "ipm" else slice(S.shape[0] - rank, S.shape[0])
    return _split_sqrt(U[:, keep], S[keep], Vh[keep], scaling)


def eora_factors(delta: Tensor, covariance: Tensor, rank: int, scaling: float) -> tuple[Tensor, Tensor]:
    """EoRA's (A, B), fp32, for the compression error ``delta`` = W − W' (N, K) and the input
    covariance C = XᵀX (K, K): s·B·A is the rank-r L minimising ‖(ΔW − L) Xᵀ‖_F."""
    lam, Q = torch.linalg.eigh(covariance.double())
    lam = lam.clamp_min(lam.max().clamp_min(torch.finfo(torch.float64).tiny) * 1e-6)
    root = lam.sqrt()
    U, S, Vh = torch.linalg.svd(delta.double() @ (Q * root), full_matrices=False)
    B = U[:, :rank] * S[:rank] / scaling
    A = (Vh[:rank] / root) @ Q.t()
    return A.float(), B.float()


def lora_sb_factors(grad: Tensor, rank: int, scaling: float, lr: float, update: str = "adam"
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """LoRA-SB's (A, B, R), fp32, from the summed (``update="adam"``: ΔW = −lr·sign(G)) or averaged
    (``"sgd"``: ΔW = −lr·G) gradient: ΔW ≈ U_r S_r V_rᵀ, A = V_rᵀ, B = U_r, R = diag(S_r) / s."""
    g = grad.detach().float()
    delta = -lr * (torch.sign(g) if update == "adam" else g)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return Vh[:rank].contiguous(), U[:, :rank].contiguous(), torch.diag(S[:rank] / scaling)


# ----------------------------------------------------------------------------------------------
# Writing factors into a layer
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def set_factors(module, A: Tensor, B: Tensor, offset: bool) -> None:
    """Copy fp32 factors into ``module.lora_A`` / ``lora_B`` (rounded once to their dtype); with
    ``offset`` also W ← W + s·B₀·A₀ − s·B·A in place (B₀, A₀ the factors replaced, zero after
    convert's default init; B, A the rounded new ones), in fp32 then rounded once, so the layer
    computes what it did before."""
    w = module.weight.float() + module.scaling * (module.lora_B.float() @ module.lora_A.float()) if offset else None
    module.lora_A.copy_(A)
    module.lora_B.copy_(B)
    if offset:
        module.weight.copy_(w - module.scaling * (module.lora_B.float() @ module.lora_A.float()))


def init_lora_layer(module, init) -> None:
    """Apply a data-free ``init`` (PEFT's ``init_lora_weights`` values: True / "default",
    "gaussian", "pissa", "pissa_niter_K") to a freshly created LoRA layer."""
    if init is True or init == "default":
        return  # create() already drew PEFT's default (Kaiming-uniform A, B = 0)
    if init == "gaussian":
        with torch.no_grad():
            nn.init.normal_(module.lora_A, std=1.0 / module.rank)
        return
    if isinstance(init, str) and init.startswith("pissa"):
        niter = pissa_niter(init)
        if module.rank > min(module.in_features, module.out_features):
            raise ValueError(f"init={init!r} needs rank <= min(in_features, out_features) = "
                             f"{min(module.in_features, module.out_features)}, got rank {module.rank}")
        A, B = pissa_factors(module.weight, module.rank, module.scaling, niter)
        set_factors(module, A, B, offset=True)
        return
    if init in CALIBRATED_INITS:
        raise ValueError(f"init={init!r} needs calibration data: convert with the default init, then call "
                         f"lowrank_kernels.nn.calibrate(model, batches, init={init!r})")
    raise ValueError(f"init must be True, 'default', 'gaussian', 'pissa' or 'pissa_niter_K' (or, through "
                     f"calibrate(), one of {CALIBRATED_INITS}), got {init!r}")


# ----------------------------------------------------------------------------------------------
# calibrate(): hooks, statistics, then the per-layer initialisation
# ----------------------------------------------------------------------------------------------
def _run(model: nn.Module, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _loss(model, batch, loss_fn):
    if loss_fn is not None:
        loss = loss_fn(model, batch)
    else:
        output = _run(model, batch)
        loss = output if isinstance(output, Tensor) else getattr(output, "loss", None)
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError("calibrate: gradient-based inits need a scalar loss: pass loss_fn(model, batch), or "
                         "batches for which the model returns a scalar or an output with .loss (e.g. labels=)")
    return loss.reshape(())


def _targets(model: nn.Module, method: str) -> list:
    from lowrank_kernels.nn.module import LowRankLinear

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LowRankLinear) and m.method == method]
    if not layers:
        raise ValueError(f"calibrate: {type(model).__name__} has no LowRankLinear layer of method {method!r}; "
                         f"convert(model, method={method!r}, ...) first")
    for name, m in layers:
        if m.merged:
            raise ValueError(f"calibrate: layer {name or '<model>'!r} is merged; unmerge() it first")
    return layers


def _covariances(model, layers, batches, corda: bool) -> tuple[dict, int]:
    """Per layer: the input covariance in fp32, PEFT CorDA's normalisation (each call's inputs
    divided by their max, mean over calls) or the plain sum XᵀX over all tokens (EoRA)."""
    stats = {id(m): torch.zeros(m.in_features, m.in_features, device=m.weight.device) for _, m in layers}
    counts = dict.fromkeys(stats, 0)

    names = {id(m): name or "<model>" for name, m in layers}

    def hook(module, args):
        if not isinstance(args[0], Tensor) or args[0].dim() == 0 or args[0].shape[-1] != module.in_features:
            raise ValueError(f"calibrate: batches: layer {names[id(module)]!r} takes inputs whose last dim is "
                             f"in_features = {module.in_features}, got "
                             f"{tuple(args[0].shape) if isinstance(args[0], Tensor) else type(args[0]).__name__}")
        x = args[0].detach().reshape(-1, module.in_features).float()
        if corda:
            x = x / torch.max(x).abs()
        if not torch.isfinite(x).all():
            raise ValueError("calibrate: non-finite activations in a calibration batch")
        stats[id(module)].add_(x.t() @ x)
        counts[id(module)] += 1

    handles = [m.register_forward_pre_hook(hook) for _, m in layers]
    calls = 0
    try:
        with torch.no_grad():
            for batch in batches:
                _run(model, batch)
                calls += 1
    finally:
        for h in handles:
            h.remove()
    if calls == 0:
        raise ValueError("calibrate: batches was empty")
    for key, c in counts.items():
        if c == 0:
            raise ValueError("calibrate: a target layer saw no calibration input (is it used by the forward?)")
        if corda:
            stats[key] /= c
    return stats, calls


def _gradients(model, layers, batches, loss_fn) -> tuple[dict, int]:
    """Per layer: Σ over batches of ∂loss/∂W in fp32, with only the target weights requiring grad."""
    params = list(model.parameters())
    saved = [p.requires_grad for p in params]
    sums = {id(m): torch.zeros(m.out_features, m.in_features, device=m.weight.device) for _, m in layers}
    handles = []

    def accumulate(key):
        def hook(p):
            sums[key].add_(p.grad.float())
            p.grad = None
        return hook

    for p in params:
        p.requires_grad_(False)
    for _, m in layers:
        m.weight.requires_grad_(True)
        handles.append(m.weight.register_post_accumulate_grad_hook(accumulate(id(m))))
    steps = 0
    try:
        with torch.enable_grad():
            for batch in batches:
                _loss(model, batch, loss_fn).backward()
                steps += 1
    finally:
        for h in handles:
            h.remove()
        for p, flag in zip(params, saved):
            p.requires_grad_(flag)
    return sums, steps


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_positive(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def calibrate(model: nn.Module, batches: Iterable, init: str, *, loss_fn: Optional[Callable] = None,
              direction: str = "ArB2r", scale: str = "stable", stable_gamma: float = 16, mode: str = "ipm",
              original_weights: Optional[dict] = None, lr: Optional[float] = None, update: str = "adam"
              ) -> nn.Module:
    """Initialise the converted layers of ``model`` from calibration data, in place.

    Args:
        model: a model converted with ``method="lora"`` (``"lora_sb"`` for ``init="lora_sb"``). The
            statistics are those of the model as it is; the factors are overwritten. LoRA-GA and
            CorDA fold the factors they replace into W first, so the model's output is unchanged
            (after convert's default init, B = 0, this is the base model's); EoRA and LoRA-SB
            discard them.
        batches: an iterable of model inputs: a dict (``model(**batch)``), a tuple/list
            (``model(*batch)``) or a tensor (``model(batch)``). Read once.
        init: ``"lora_ga"`` (gradients), ``"corda"`` (covariances), ``"eora"`` (covariances of a
            compressed model) or ``"lora_sb"`` (gradients); the formulas are in the module docstring.
        loss_fn: ``loss_fn(model, batch) -> scalar loss`` for the gradient inits (it runs the
            model); by default the model's output on the batch when it is a scalar, else its
            ``.loss`` (transformers with ``labels`` in the batch).
        direction, scale, stable_gamma: LoRA-GA's options (PEFT's ``LoraGAConfig`` names and defaults).
        mode: CorDA's ``"ipm"`` (instruction-previewed: adapt the principal components) or ``"kpm"``
            (knowledge-preserving: adapt the least ones), PEFT's ``corda_method``.
        original_weights: EoRA: {layer's qualified name or ``name + ".weight"``: the uncompressed
            (N, K) weight} (an ``original_model.state_dict()`` works); every converted layer needs one.
        lr, update: LoRA-SB: the step size of the approximated first update (required) and
            ``"adam"`` (−lr·sign(ΣG), the reference code) or ``"sgd"`` (−lr·mean G).

    Returns ``model``. The model's train/eval mode and every requires_grad are restored.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_choice("init", init, CALIBRATED_INITS)
    layers = _targets(model, "lora_sb" if init == "lora_sb" else "lora")
    for name, m in layers:
        if m.rank > min(m.in_features, m.out_features) // (2 if init == "lora_ga" else 1):
            need = "2·rank" if init == "lora_ga" else "rank"
            raise ValueError(f"calibrate: layer {name or '<model>'!r}: init={init!r} needs {need} <= "
                             f"min(in_features, out_features) = {min(m.in_features, m.out_features)}")
    if init == "lora_ga":
        _check_choice("direction", direction, LORA_GA_DIRECTIONS)
        _check_choice("scale", scale, LORA_GA_SCALES)
        _check_positive("stable_gamma", stable_gamma)
    elif init == "corda":
        _check_choice("mode", mode, CORDA_MODES)
    elif init == "eora":
        originals = _original_weights(layers, original_weights)
    else:
        _check_positive("lr", lr)
        _check_choice("update", update, LORA_SB_UPDATES)
    was_training = model.training
    try:
        if init in ("corda", "eora"):
            model.eval()  # PEFT's CorDA collects the covariance in eval mode (no dropout)
            stats, n = _covariances(model, layers, batches, corda=init == "corda")
        else:
            model.train()
            stats, n = _gradients(model, layers, batches, loss_fn)
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("calibrate: batches was empty")
    for name, m in layers:
        stat = stats[id(m)]
        if init == "lora_ga":
            A, B = lora_ga_factors(stat / n, m.rank, m.scaling, direction, scale, stable_gamma, m.weight)
            set_factors(m, A, B, offset=True)
        elif init == "corda":
            A, B = corda_factors(m.weight, stat, m.rank, m.scaling, mode)
            set_factors(m, A, B, offset=True)
        elif init == "eora":
            delta = originals[name].to(m.weight.device).float() - m.weight.float()
            A, B = eora_factors(delta, stat, m.rank, m.scaling)
            set_factors(m, A, B, offset=False)
        else:
            A, B, R = lora_sb_factors(stat if update == "adam" else stat / n, m.rank, m.scaling, lr, update)
            with torch.no_grad():
                for t, value in ((m.lora_sb_A, A), (m.lora_sb_B, B), (m.lora_sb_R, R)):
                    t.copy_(value)
    return model


def _original_weights(layers, original_weights) -> dict:
    if not isinstance(original_weights, dict):
        raise ValueError("calibrate(init='eora') needs original_weights: {layer name: uncompressed weight} "
                         "(e.g. the original model's state_dict())")
    out = {}
    for name, m in layers:
        w = original_weights.get(name + ".weight" if name else "weight", original_weights.get(name))
        if not isinstance(w, Tensor) or tuple(w.shape) != (m.out_features, m.in_features):
            raise ValueError(f"original_weights: layer {name or '<model>'!r} needs a ({m.out_features}, "
                             f"{m.in_features}) tensor under {name + '.weight' if name else 'weight'!r}, got "
                             f"{None if w is None else tuple(getattr(w, 'shape', ()))}")
        out[name] = w.detach()
    return out
