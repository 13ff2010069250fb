"""LoRA-Pro (arXiv 2407.18242, "LoRA-Pro: Are Low-Rank Adapters Properly Optimized?"): the
gradients of A and B adjusted in closed form so that the low-rank update approximates the
full-gradient step, as an optimizer wrapper.

With ΔW = s·B·A (A (r, K), B (N, r)) and the full gradient g = ∂L/∂W' of the merged weight, LoRA's
gradients are g_A = s·Bᵀg and g_B = s·g·Aᵀ, and one step of (dA, dB) moves W' by s·(B·dA + dB·A).
LoRA-Pro picks the (g̃_A, g̃_B) whose equivalent gradient g̃ = s·(B·g̃_A + g̃_B·A) is closest to g in
Frobenius norm (Theorem 2.1), which needs only g_A and g_B:

    g̃_A = (1/s²) (BᵀB)⁻¹ g_A + X A
    g̃_B = (1/s²) [I − B (BᵀB)⁻¹ Bᵀ] g_B (AAᵀ)⁻¹ − B X

for any r×r X (g̃ does not depend on X). Theorem 2.2 picks the X that keeps (g̃_A, g̃_B) closest to
(g_A, g_B): the solution of the Sylvester equation

    BᵀB X + X AAᵀ = −(1/s²) (BᵀB)⁻¹ g_A Aᵀ

(``x_mode="sylvester"``, the default; ``"symmetry"`` takes X = −(1/2s²) (BᵀB)⁻¹ Bᵀ g_B AAᵀ and
``"zero"`` X = 0, the reference code's other two choices). As in the reference code the inverses
are pseudo-inverses of BᵀB + δI and AAᵀ + δI (δ = 1e-8), so B = 0 at LoRA's init is fine. The
Sylvester equation is solved exactly through the eigendecompositions of the two symmetric r×r
matrices: with BᵀB = P Λ Pᵀ and AAᵀ = Q M Qᵀ, X = P [(Pᵀ C Q)_ij / (λ_i + μ_j)] Qᵀ.

``LoRAProAdamW(model, ...)`` is the reference code's "full" mode: AdamW on the N×K equivalent
gradient g̃ (fp32 moments of W's shape per layer, as full fine-tuning would keep), the Adam
direction u = m̂ / (√v̂ + ε) mapped back through g_A = s·Bᵀu, g_B = s·u·Aᵀ and the same closed form,
then A ← A − lr·g̃_A(u), B ← B − lr·g̃_B(u). Its decoupled weight decay is the reference's too:
A and B are scaled by √(1 − lr·wd) and the frozen W by (1 − lr·wd), so the merged weight decays by
(1 − lr·wd) as in full fine-tuning (W is changed in place). Other trainable parameters get AdamW.

``LoRAPro(optimizer, model)`` replaces the gradients of every LoRA layer's (lora_A, lora_B) by
(g̃_A, g̃_B) and then steps ``optimizer``; with torch.optim.AdamW this is the reference code's
"efficient" LoRA-Pro AdamW (adjusted gradients, Adam moments of the r-sized factors). The
adjustment is r×r algebra plus products with g_A, g_B, A and B (O((N + K)·r²) per layer), in fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lowrank_kernels.optim._common import check_betas, check_numbers, closure_loss

X_MODES = ("sylvester", "symmetry", "zero")


def solve_sylvester_spd(P: Tensor, Q: Tensor, C: Tensor) -> Tensor:
    """X with P X + X Q = C for symmetric positive semi-definite P (r, r) and Q (r, r), not both
    singular in the same direction (λ_i(P) + λ_j(Q) > 0)."""
    lam, U = torch.linalg.eigh(P)
    mu, V = torch.linalg.eigh(Q)
    return U @ ((U.t() @ C @ V) / (lam[:, None] + mu[None, :])) @ V.t()


def lora_pro_gradients(A: Tensor, B: Tensor, grad_A: Tensor, grad_B: Tensor, scaling: float,
                       x_mode: str = "sylvester", delta: float = 1e-8) -> tuple[Tensor, Tensor]:
    """LoRA-Pro's adjusted (g̃_A, g̃_B) for A (r, K), B (N, r) and their gradients, in the dtype of
    ``A`` (compute in float64 by passing float64 tensors). The formulas are in the module docstring."""
    _check_x_mode(x_mode)
    r = A.shape[0]
    eye = torch.eye(r, dtype=A.dtype, device=A.device)
    AAt, BtB = A @ A.t(), B.t() @ B
    AAt_inv = torch.linalg.pinv(AAt + delta * eye)
    BtB_inv = torch.linalg.pinv(BtB + delta * eye)
    inv_s2 = 1.0 / scaling ** 2
    if x_mode == "sylvester":
        X = solve_sylvester_spd(BtB, AAt, -inv_s2 * (BtB_inv @ grad_A @ A.t()))
    elif x_mode == "symmetry":
        X = -0.5 * inv_s2 * (BtB_inv @ B.t() @ grad_B @ AAt)
    else:
        X = torch.zeros_like(eye)
    new_A = inv_s2 * (BtB_inv @ grad_A) + X @ A
    # [I − B (BᵀB)⁻¹ Bᵀ] g_B without the N×N projector.
    projected = grad_B - B @ (BtB_inv @ (B.t() @ grad_B))
    new_B = inv_s2 * (projected @ AAt_inv) - B @ X
    return new_A, new_B


def _check_x_mode(x_mode) -> None:
    if x_mode not in X_MODES:
        raise ValueError(f"x_mode must be one of {X_MODES}, got {x_mode!r}")


def _lora_layers(model: nn.Module) -> list:
    """Every LoRA layer (LowRankLinear with method="lora") of ``model``."""
    from lowrank_kernels.nn.module import LowRankLinear

    return [m for m in model.modules() if isinstance(m, LowRankLinear) and m.method == "lora"]


def _require_lora(model: nn.Module, found: list) -> None:
    if not found:
        raise ValueError(f"model ({type(model).__name__}) has no LoRA layer (LowRankLinear, method='lora')")


def lora_pairs(model: nn.Module) -> list:
    """(lora_A, lora_B, scaling) of every LoRA layer (LowRankLinear with method="lora") of ``model``."""
    return [(m.lora_A, m.lora_B, m.scaling) for m in _lora_layers(model)]


class LoRAPro:
    """Wrap ``optimizer`` so that each step first replaces the LoRA gradients of ``model`` by
    LoRA-Pro's (``lora_pro_gradients``), then steps ``optimizer``.

    Args:
        optimizer: any torch optimizer holding the LoRA factors (torch.optim.AdamW gives the
            reference's "efficient" LoRA-Pro AdamW).
        model: the converted model whose LoRA layers (method="lora") are adjusted.
        x_mode: "sylvester" (Theorem 2.2, default), "symmetry" or "zero".
        delta: the ridge δ of the pseudo-inverses (1e-8, the reference's).

    ``param_groups``, ``state``, ``zero_grad``, ``state_dict`` and ``load_state_dict`` are the wrapped
    optimizer's (checkpoints are its checkpoints); an LR scheduler takes the wrapped optimizer,
    ``opt.optimizer``. The reference code's "full" mode (Adam moments of the equivalent gradient)
    is ``LoRAProAdamW``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, x_mode: str = "sylvester",
                 delta: float = 1e-8):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        _check_x_mode(x_mode)
        check_numbers(delta=delta)
        self.pairs = lora_pairs(model)
        _require_lora(model, self.pairs)
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = sum(id(A) not in held or id(B) not in held for A, B, _ in self.pairs)
        if missing:
            raise ValueError(f"optimizer does not hold the lora_A/lora_B of {missing} LoRA layer(s) of model")
        self.optimizer, self.x_mode, self.delta = optimizer, x_mode, float(delta)

    @property
    def param_groups(self):
        """The wrapped optimizer's param_groups."""
        return self.optimizer.param_groups

    @property
    def state(self):
        """The wrapped optimizer's state."""
        return self.optimizer.state

    @torch.no_grad()
    def adjust_gradients(self) -> None:
        """Replace ``lora_A.grad`` / ``lora_B.grad`` of each layer with LoRA-Pro's, in place."""
        for A, B, scaling in self.pairs:
            if A.grad is None or B.grad is None:
                continue
            new_A, new_B = lora_pro_gradients(A.float(), B.float(), A.grad.float(), B.grad.float(), scaling,
                                              self.x_mode, self.delta)
            A.grad.copy_(new_A)
            B.grad.copy_(new_B)

    def step(self, closure=None):
        """Run ``closure`` (with grad enabled) if given, adjust the LoRA gradients, step the optimizer."""
        loss = closure_loss(closure)
        self.adjust_gradients()
        self.optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The wrapped optimizer's zero_grad."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        """The wrapped optimizer's state_dict (LoRA-Pro itself keeps no state)."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """Load the wrapped optimizer's state_dict."""
        self.optimizer.load_state_dict(state_dict)


class LoRAProAdamW(torch.optim.Optimizer):
    """LoRA-Pro's full mode (see the module docstring): AdamW moments of the equivalent gradient.

    Args:
        model: the converted model; its trainable parameters are optimised, each LoRA layer's
            (lora_A, lora_B) pair through the equivalent gradient, the rest with AdamW.
        lr, betas, eps, weight_decay: AdamW's (defaults 1e-3, (0.9, 0.999), 1e-8, 0).
        x_mode, delta: as ``lora_pro_gradients``.
    """

    def __init__(self, model: nn.Module, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, x_mode: str = "sylvester", delta: float = 1e-8):
        check_numbers(lr=lr, eps=eps, weight_decay=weight_decay, delta=delta)
        check_betas(betas)
        _check_x_mode(x_mode)
        self._layers = _lora_layers(model)
        _require_lora(model, self._layers)
        params = [p for p in model.parameters() if p.requires_grad]
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      x_mode=x_mode, delta=delta))

    @staticmethod
    def _adam_direction(state: dict, grad: Tensor, group: dict) -> Tensor:
        beta1, beta2 = group["betas"]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(grad, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(grad, dtype=torch.float32)
        state["step"] += 1
        m, v, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
        m.lerp_(grad, 1.0 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        return (m / (1.0 - beta1 ** t)) / (v.sqrt() / (1.0 - beta2 ** t) ** 0.5 + group["eps"])

    @torch.no_grad()
    def step(self, closure=None):
        """One LoRA-Pro (full mode) step for every LoRA layer, AdamW for the other parameters."""
        loss = closure_loss(closure)
        group = self.param_groups[0]
        lr, wd = group["lr"], group["weight_decay"]
        paired = set()
        for layer in self._layers:
            A, B, s = layer.lora_A, layer.lora_B, layer.scaling
            paired.update((id(A), id(B)))
            if A.grad is None or B.grad is None:
                continue
            a, b = A.float(), B.float()
            # The equivalent gradient does not depend on X: take X = 0 for it.
            ga, gb = lora_pro_gradients(a, b, A.grad.float(), B.grad.float(), s, "zero", group["delta"])
            u = self._adam_direction(self.state[A], s * (b @ ga + gb @ a), group)
            new_a, new_b = lora_pro_gradients(a, b, s * b.t() @ u, s * u @ a.t(), s, group["x_mode"], group["delta"])
            if wd:
                shrink = (1.0 - lr * wd) ** 0.5
                A.mul_(shrink)
                B.mul_(shrink)
                layer.weight.mul_(1.0 - lr * wd)
            A.sub_(lr * new_a)
            B.sub_(lr * new_b)
        for p in group["params"]:
            if id(p) in paired or p.grad is None:
                continue
            u = self._adam_direction(self.state[p], p.grad.float(), group)
            p.mul_(1.0 - lr * wd)
            p.sub_(lr * u)
        return loss
