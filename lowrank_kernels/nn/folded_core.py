"""What LoRA-SB (nn/lora_sb.py), NLoRA (nn/nlora.py) and SoRA (nn/sora.py) share: a trainable core
C between LoRA's factors, y = x Wᵀ + bias + s · drop(x) Aᵀ Cᵀ Bᵀ (an r×r matrix, or for SoRA a
gate g on the rank components, C = diag(g)), run as the fused LoRA op with the core folded into
the down-projection, A' = C·A: ``lora_linear(x, W, A', B, s)``. The op's backward returns
dA' = s·gᵀ drop(x) (g = dy B), from which autograd forms the core's and A's gradients (r·r·K
work, nothing of size M). No new kernel: the op's dB is computed, and dropped where B is frozen.
"""

from __future__ import annotations

from torch import Tensor

from lowrank_kernels.nn.registry import Method
from lowrank_kernels.ops.lora import lora_linear


class FoldedCoreMethod(Method):
    """A method whose layer is lora_linear with the core folded into A; subclasses give the
    factors (``factors``) and create them."""

    def factors(self, module) -> tuple[Tensor, Tensor, Tensor]:
        """(B (N, r), the core: (r, r) or a gate (r,), A (r, K)) of ``module``."""
        raise NotImplementedError

    @staticmethod
    def fold(core: Tensor, A: Tensor) -> Tensor:
        """A' = C·A (r, K): a matrix core's product, or A's rows scaled by a gate."""
        return core @ A if core.dim() == 2 else core[:, None] * A

    def forward(self, module, x):
        B, core, A = self.factors(module)
        return lora_linear(x, module.weight, self.fold(core, A), B, module.scaling, module.bias,
                           dropout_p=module.dropout, training=module.training, backend=module.backend)

    def delta_weight(self, module):
        B, core, A = (t.float() for t in self.factors(module))
        # In fp32: (B·C)·A for a matrix core, B·(g ⊙ A) for a gate.
        return (B @ core @ A if core.dim() == 2 else B @ self.fold(core, A)) * module.scaling

    def extra_repr(self, module):
        return f"scaling={module.scaling:g}"
