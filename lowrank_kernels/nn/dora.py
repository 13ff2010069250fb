"""DoRA method for LowRankLinear (op: ops/dora.py); from_peft for PEFT's DoRA adapters is nn/peft/dora.py.

Parameters as PEFT's DoRA Linear: LoRA's frozen ``weight``/``bias`` and trainable ``lora_A``/``lora_B``
(nn/lora.py: the same initialisation, scaling and options), plus the trainable ``magnitude`` m (N),
initialised, as PEFT does, to the row norms ‖W_j + s(BA)_j‖ = ‖W_j‖ (B starts at zero), in the
adapters' dtype. Defaults are PEFT's ``LoraConfig(use_dora=True)``'s.

‖W_j‖², the part of the norm that depends on W alone, is cached per weight tensor and recomputed
when W changes: the cache is keyed on the tensor's storage pointer, shape, dtype and version
counter (which every in-place update, optimizer steps and ``merge`` included, bumps), so a stale
value is never used. Inference tensors (no version counter) and torch.compile traces skip it.

merge() follows PEFT's DoRA merge: W' = γ ⊙ (W + s·BA) with γ = m / ‖W + s·BA‖_c from the unmerged
W, and unmerge() inverts it, W = W' / γ − s·BA, with the norm kept from merge time.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lowrank_kernels.nn.lora import LoRAMethod
from lowrank_kernels.nn.registry import register_method
from lowrank_kernels.ops.dora import dora_linear, dora_weight_norm, weight_sq_norm


def peft_weight_sq_norm(weight: Tensor) -> Tensor:
    """‖W_j‖² (N,) fp32 (float64 for float64 W) of a dense W, as the square of PEFT's
    ``torch.linalg.norm(W, dim=1)`` in that dtype, by row blocks (no full-size copy of a 16-bit W).

    Squaring a norm and taking the root gives the norm back exactly in binary floating point, so
    with B = 0 the fused ops' ‖W_j + s(BA)_j‖ = sqrt(‖W_j‖² + 0) is PEFT's magnitude at
    initialisation bit for bit: γ = 1 exactly and DoRA starts as an exact no-op, as in PEFT. (A
    sum of squares differs from torch.linalg.norm in the last bit.)"""
    acc = torch.promote_types(weight.dtype, torch.float32)
    step = max(1, -(-weight.shape[0] // 8))
    with torch.no_grad():
        return torch.cat([torch.linalg.vector_norm(weight[i:i + step].to(acc), dim=1)
                          for i in range(0, weight.shape[0], step)]).square()


class WeightNormCache:
    """‖W_j‖² of one weight, recomputed whenever the weight's storage, shape, dtype or version changes."""

    def __init__(self):
        self._key = None
        self._value = None

    def get(self, weight: Tensor) -> "Tensor | None":
        """‖W_j‖² (N,) fp32 for ``weight``, or None where it cannot be cached (compile, inference tensors)."""
        if torch.compiler.is_compiling() or weight.is_inference():
            return None
        quant_state = getattr(weight, "quant_state", None)  # a bitsandbytes 4-bit weight's
        key = (weight.data_ptr(), tuple(weight.shape), tuple(weight.stride()), weight.dtype, weight.device,
               weight._version, id(quant_state))
        if key != self._key:
            self._value, self._key = (weight_sq_norm(weight) if quant_state is not None
                                      else peft_weight_sq_norm(weight.detach())), key
        return self._value

    def __getstate__(self):
        # A cached value belongs to this process's tensors: copies and pickles start empty.
        return {"_key": None, "_value": None}


class DoRAMethod(LoRAMethod):
    name = "dora"
    peer = "PEFT LoraConfig(use_dora=True)"
    options = {k: v for k, v in LoRAMethod.options.items() if k != "use_dora"}

    def create(self, module, base, device, dtype, bias=True, **options):
        super().create(module, base, device, dtype, bias=bias, **options)
        module._dora_w_sq = WeightNormCache()
        with torch.no_grad():
            # From the cached ‖W_j‖² the forward reads: γ = 1 exactly at initialisation.
            norm = dora_weight_norm(module.weight, module.lora_A, module.lora_B, module.scaling,
                                    weight_sq_norm=module._dora_w_sq.get(module.weight), backend="reference")
        module.magnitude = nn.Parameter(norm.to(module.lora_A.dtype))

    def forward(self, module, x):
        return dora_linear(x, module.weight, module.lora_A, module.lora_B, module.magnitude, module.scaling,
                           module.bias, dropout_p=module.dropout, training=module.training,
                           weight_sq_norm=module._dora_w_sq.get(module.weight), backend=module.backend)

    def delta_weight(self, module):
        weight = module.weight.float()
        lora = (module.lora_B.float() @ module.lora_A.float()) * module.scaling
        if not module.merged:
            # merge (or merged_weight): the norm of the unmerged weight, kept for unmerge.
            norm = dora_weight_norm(module.weight, module.lora_A, module.lora_B, module.scaling,
                                    backend="reference").float()
            module._dora_merge_norm = norm
            gamma = (module.magnitude.float() / norm)[:, None]
            return (gamma - 1) * weight + gamma * lora
        norm = getattr(module, "_dora_merge_norm", None)
        if norm is None:
            raise RuntimeError("this DoRA layer was merged elsewhere (e.g. loaded merged from a state_dict): the "
                               "norm of its unmerged weight is unknown, so it cannot be unmerged")
        gamma = (module.magnitude.float() / norm)[:, None]
        return weight - (weight / gamma - lora)

    def extra_repr(self, module):
        return super().extra_repr(module) + ", dora"


register_method(DoRAMethod())
