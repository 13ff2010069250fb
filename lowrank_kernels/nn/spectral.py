"""Frozen bases from a factorisation of W with a trainable diagonal: SVFit, LoLDU (on the
diagonal-scaled kernel of ops/random_basis.py) and KaSA (on the LoRA kernel).

Each changes W in place when the layer is created (as PEFT's PiSSA does), so that the layer's
output at creation equals the original layer's up to rounding, and ``merge``/``merge_and_unload``
give W_res + ΔW.

``method="svfit"`` (SVFit, Sun et al., arXiv 2409.05926): W = U Σ Vᵀ in fp32; the top-r singular
vectors are frozen buffers ``spectral_A`` = V_rᵀ (r, K) and ``spectral_B`` = U_r (N, r), the top-r
singular values are the trainable ``spectral_sigma`` (r), initialised to Σ_r, and W keeps the
residual W − U_r Σ_r V_rᵀ. y = x W_resᵀ + bias + ((x V_r) ⊙ σ) U_rᵀ: VeRA's product with A = V_rᵀ,
B = U_r, λ_d = σ and λ_b = 1 (a frozen buffer, ``spectral_ones``), run by ``vera_linear``.

``method="loldu"`` (LoLDU, Shi et al., arXiv 2410.13618, its reference code's ``ldu`` init):
W = P L D U by ``torch.linalg.lu`` in fp32 (D = diag of LU's upper factor, U unit upper). Frozen
``spectral_A`` = U[:r] (r, K) and ``spectral_B`` = P L[:, :r] (N, r) (the permutation folded into
the rows of L), trainable ``spectral_sigma`` = z (r) = D[:r] and the scalar ``loldu_scale`` = α / r
(trainable, as in the reference code); W keeps W − α/r · P L_r diag(z) U_r. The forward is VeRA's
with λ_d = z and λ_b = the scalar broadcast to N (autograd sums λ_b's gradient into it). Defaults
from the reference code's ``from_linear``: r = 4, α = 1.

``method="kasa"`` (KaSA, Wang et al., arXiv 2412.06071, its reference code's LoRA layer): the
knowledge-aware truncation replaces W by its SVD without the r smallest singular components,
W ← U_{:k} Σ_{:k} V_{:k}ᵀ with k = min(N, K) − r (the reference code takes k = in_features − r,
the same when in_features <= out_features); then a LoRA with a trainable diagonal between its
factors: y = x Wᵀ + bias + s · ((x Aᵀ) ⊙ d) Bᵀ, A (r, K) Kaiming-uniform, B (N, r) zeros,
``kasa_diag`` d (r) drawn N(0, 1), s = α / r (PEFT's LoraConfig defaults r = 8, α = 8). Unlike
SVFit and LoLDU, A and B train, so KaSA does not run on the frozen-basis kernel: it runs on
``lora_linear`` with A' = d ⊙ A (an r×K product per call; autograd takes dA' to A and d). This is
PEFT's KaSA variant (``LoraConfig(kasa_config=KasaConfig())``, peft >= 0.19) too, whose parameter
names (``lora_A``, ``lora_B``, the diagonal as ``kasa_diag``) and initialisation it follows. The
paper's regularisers are added to the loss by the caller, as with PEFT's ``_get_kasa_loss``:
``kasa_regularization(model)`` (below).

LaMDA and SST do not reduce to the diagonal-scaled kernel (README, method table): LaMDA
(arXiv 2406.12832) trains an r×r core between its projections, which is not a diagonal; SST
(arXiv 2405.15481) trains the singular vectors it samples at each step besides all singular
values, which needs LoRA-type gradients of U and V.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lowrank_kernels.nn.random_basis import adapter_dtype_of
from lowrank_kernels.nn.registry import Method, register_method
from lowrank_kernels.ops.lora import lora_linear
from lowrank_kernels.ops.random_basis import vera_delta_weight, vera_linear

_OPTIONS = {"adapter_dtype": (None, "dtype of the bases and the trainable diagonal: the base dtype (None) or "
                                    "torch.float32 on a 16-bit base")}


def _check_rank(module, need: int) -> None:
    if module.rank > need:
        raise ValueError(f"method {module.method!r} needs rank <= {need} for a ({module.out_features}, "
                         f"{module.in_features}) layer, got rank {module.rank}")


def svfit_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(V_rᵀ (r, K), U_r (N, r), Σ_r (r)) of the fp32 SVD of ``weight`` (N, K)."""
    U, S, Vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    return Vh[:rank].contiguous(), U[:, :rank].contiguous(), S[:rank].contiguous()


def loldu_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U[:r] (r, K), P L[:, :r] (N, r), D[:r] (r)) of W = P L D U, fp32 ``torch.linalg.lu``."""
    P, L, U = torch.linalg.lu(weight.detach().float())
    D = torch.diagonal(U)
    return (U[:rank] / D[:rank, None]).contiguous(), (P @ L[:, :rank]).contiguous(), D[:rank].contiguous()


def kasa_truncate(weight: torch.Tensor, rank: int) -> torch.Tensor:
    """KaSA's knowledge-aware truncation: ``weight`` without its ``rank`` smallest singular
    components, in fp32 (U_{:k} Σ_{:k} V_{:k}ᵀ, k = min(N, K) − rank)."""
    U, S, Vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    k = S.shape[0] - rank
    return (U[:, :k] * S[:k]) @ Vh[:k]


class _DiagonalBasisMethod(Method):
    """Frozen bases ``spectral_A`` (r, K), ``spectral_B`` (N, r) from W, trainable ``spectral_sigma``
    (r), W ← W − scale · B diag(σ) A; the forward is ops/random_basis.py's VeRA product."""

    options = _OPTIONS

    def factors(self, weight, rank):
        """(A, B, σ) fp32 for a layer of weight ``weight``."""
        raise NotImplementedError

    def scale_of(self, module):
        """The factor multiplying B diag(σ) A: a float, or a trainable 0-d parameter."""
        raise NotImplementedError

    def create(self, module, base, device, dtype, bias=True, adapter_dtype=None):
        self.attach_base(module, base, device, dtype, bias)
        _check_rank(module, min(module.in_features, module.out_features))
        adt = adapter_dtype_of(module, adapter_dtype)
        A, B, sigma = self.factors(module.weight, module.rank)
        dev = module.weight.device
        module.register_buffer("spectral_A", A.to(dev, adt))
        module.register_buffer("spectral_B", B.to(dev, adt))
        module.spectral_sigma = nn.Parameter(sigma.to(dev, adt))
        self.init_scale(module, adt)
        with torch.no_grad():
            # W keeps the residual of the rounded factors: the layer's output is unchanged.
            module.weight.copy_(module.weight.float() - self.delta_weight(module))

    def init_scale(self, module, adt):
        """Register what ``scale_of`` and ``lambda_b`` read."""
        raise NotImplementedError

    def lambda_b(self, module):
        """VeRA's λ_b (N,) for this layer."""
        raise NotImplementedError

    def forward(self, module, x):
        return vera_linear(x, module.weight, module.spectral_A, module.spectral_B, module.spectral_sigma,
                           self.lambda_b(module), module.bias, dropout_p=module.dropout, training=module.training,
                           backend=module.backend)

    def delta_weight(self, module):
        return vera_delta_weight(module.spectral_A, module.spectral_B, module.spectral_sigma, self.lambda_b(module))


class SVFitMethod(_DiagonalBasisMethod):
    name = "svfit"
    default_rank = 8
    peer = "SVFit paper (arXiv 2409.05926)"

    def alpha_doc(self):
        return "no alpha (the trainable singular values carry the scale)"

    def factors(self, weight, rank):
        return svfit_factors(weight, rank)

    def init_scale(self, module, adt):
        # Not saved: it is rebuilt with the layer.
        module.register_buffer("spectral_ones", torch.ones(module.out_features, device=module.weight.device,
                                                           dtype=adt), persistent=False)

    def lambda_b(self, module):
        return module.spectral_ones


class LoLDUMethod(_DiagonalBasisMethod):
    name = "loldu"
    default_rank = 4
    peer = "LoLDU reference code (from_linear defaults)"

    def default_alpha(self, rank):
        return 1.0

    def alpha_doc(self):
        return "alpha 1 (the trainable scalar starts at alpha / r)"

    def factors(self, weight, rank):
        return loldu_factors(weight, rank)

    def init_scale(self, module, adt):
        module.loldu_scale = nn.Parameter(torch.tensor(module.alpha / module.rank, device=module.weight.device,
                                                       dtype=adt))

    def lambda_b(self, module):
        return module.loldu_scale.expand(module.out_features)


class KaSAMethod(Method):
    name = "kasa"
    default_rank = 8
    peer = "KaSA reference code (PEFT LoraConfig defaults)"
    options = _OPTIONS

    def default_alpha(self, rank):
        return 8.0

    def alpha_doc(self):
        return "alpha 8 (s = 8 / r, PEFT's LoraConfig)"

    def create(self, module, base, device, dtype, bias=True, adapter_dtype=None):
        self.attach_base(module, base, device, dtype, bias)
        _check_rank(module, min(module.in_features, module.out_features) - 1)
        adt = adapter_dtype_of(module, adapter_dtype)
        dev = module.weight.device
        with torch.no_grad():
            module.weight.copy_(kasa_truncate(module.weight, module.rank))
        module.scaling = module.alpha / module.rank
        module.lora_A = nn.Parameter(torch.empty(module.rank, module.in_features, device=dev, dtype=adt))
        module.lora_B = nn.Parameter(torch.zeros(module.out_features, module.rank, device=dev, dtype=adt))
        nn.init.kaiming_uniform_(module.lora_A, a=math.sqrt(5))
        module.kasa_diag = nn.Parameter(torch.randn(module.rank, device=dev, dtype=adt))

    def forward(self, module, x):
        return lora_linear(x, module.weight, module.kasa_diag[:, None] * module.lora_A, module.lora_B, module.scaling,
                           module.bias, dropout_p=module.dropout, training=module.training, backend=module.backend)

    def delta_weight(self, module):
        return (module.lora_B.float() * module.kasa_diag.float()) @ module.lora_A.float() * module.scaling

    def extra_repr(self, module):
        return f"scaling={module.scaling:g}"


def kasa_regularization(model: nn.Module, beta: float = 1e-4, gamma: float = 1e-3) -> torch.Tensor:
    """KaSA's auxiliary loss over every ``method="kasa"`` layer of ``model`` (paper Eq. 9-11, PEFT's
    ``LoraModel._get_kasa_loss`` and its ``KasaConfig`` defaults): Σ β·‖d‖² + γ·(‖BᵀB − I‖_F +
    ‖AAᵀ − I‖_F), in fp32, a 0-d tensor to add to the task loss (0 without KaSA layers)."""
    from lowrank_kernels.nn.module import LowRankLinear

    total = None
    for module in model.modules():
        if not (isinstance(module, LowRankLinear) and module.method == "kasa"):
            continue
        d, A, B = module.kasa_diag.float(), module.lora_A.float(), module.lora_B.float()
        eye = torch.eye(d.shape[0], device=d.device)
        orthogonality = torch.linalg.norm(B.t() @ B - eye) + torch.linalg.norm(A @ A.t() - eye)
        term = beta * d.square().sum() + gamma * orthogonality
        total = term if total is None else total + term
    return total if total is not None else torch.zeros(())


register_method(SVFitMethod())
register_method(LoLDUMethod())
register_method(KaSAMethod())
