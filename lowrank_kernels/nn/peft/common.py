"""What the fused PEFT layer classes share: refusals, the runtime checks that send a call back to
PEFT's own forward, the dropout probability and scaling a fused call takes, and the class names
PEFT prints."""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn.modules import module as _module

# The package's one logger ("lowrank_kernels.nn.peft"), whichever of its modules logs.
logger = logging.getLogger(__package__)

CONV1D = "transformers.pytorch_utils.Conv1D"


def qualname(cls: type) -> str:
    """``module.QualName`` of a class, as the converter table keys it."""
    return f"{cls.__module__}.{cls.__qualname__}"


class PeftRefusal(ValueError):
    """A PEFT layer that cannot run fused: ``layer`` its qualified name, ``setting`` why."""

    def __init__(self, layer: str, setting: str):
        super().__init__(f"from_peft: layer {layer!r} cannot run fused: unsupported setting {setting}")
        self.layer, self.setting = layer, setting


def refusal(name: str, setting: str) -> PeftRefusal:
    """The error of a PEFT layer (at qualified name ``name``) that cannot run fused."""
    return PeftRefusal(name, setting)


def runs_peft(layer: nn.Module, adapter: str, problem: str | None) -> bool:
    """Whether ``adapter``, about to run on a fused layer, takes PEFT's own forward because of
    ``problem`` (a setting the fused op cannot reproduce, or None); raises it with strict=True."""
    if problem is None:
        return False
    if getattr(layer, "lowrank_strict", False):
        raise refusal(getattr(layer, "lowrank_name", ""), f"adapter {adapter!r}: {problem}")
    return True


def adapter_dropout(dropout: nn.Module) -> float:
    """The dropout probability a fused call applies for PEFT's dropout module: its p in training,
    0 in eval mode (where PEFT applies none, whatever p is)."""
    if not isinstance(dropout, nn.Dropout) or not dropout.training:
        return 0.0
    return dropout.p


def peft_class(fused_cls: type) -> type:
    """The PEFT class a fused layer class subclasses (the fused classes override forward only)."""
    return fused_cls.__mro__[1]


def peft_class_name(self) -> str:
    """``nn.Module._get_name`` of the fused classes: the PEFT class's name, so that ``repr`` prints
    what PEFT prints (``lora.Linear(...)``, ``vera.Linear(...)``)."""
    return peft_class(type(self)).__name__


def skips_hooks(layer: nn.Module, adapters) -> bool:
    """Whether a fused forward of ``layer`` running ``adapters`` would skip module hooks that
    PEFT's forward runs, in which case PEFT's forward runs (logged once per layer).

    PEFT calls the base layer and each adapter's modules (lora_A, lora_B, the dropout, DoRA's
    magnitude, ...); the fused op reads their tensors instead. Hooks on those modules, or global
    module hooks, would be skipped: FSDP2's unshard of a base layer given its own ``fully_shard``
    (the fused op would read the sharded DTensor), tensor parallelism's input hooks, accelerate's
    offloading (a ``forward`` replaced on the instance), a user's forward hook.
    """
    if (_module._global_forward_pre_hooks or _module._global_forward_hooks or _module._global_backward_pre_hooks
            or _module._global_backward_hooks):
        hooked = "global module hooks"
    else:
        modules = [("base_layer", layer.base_layer)] + [
            (f"{name}[{adapter!r}]", child[adapter]) for name, child in layer.named_children()
            if isinstance(child, nn.ModuleDict) for adapter in adapters if adapter in child]
        hooked = next((name for name, m in modules if m._forward_pre_hooks or m._forward_hooks
                       or m._backward_pre_hooks or m._backward_hooks or "forward" in vars(m)), None)
        if hooked is None:
            return False
    if not layer.__dict__.get("_lowrank_hooks_logged"):
        layer.__dict__["_lowrank_hooks_logged"] = True
        logger.warning("from_peft: layer %r runs PEFT's forward: %s carries module hooks (FSDP2 fully_shard, "
                       "tensor parallelism, offloading, ...) that the fused op would skip",
                       getattr(layer, "lowrank_name", ""), hooked)
    return True


def scaled_lora_B(layer: nn.Module, adapter: str, lora_B: torch.Tensor):
    """(lora_B, scaling) for the fused op: PEFT's ``scaling[adapter]`` when it is a number; when
    it is a tensor (``prepare_model_for_compiled_hotswap`` makes it one, so that hot-swapping an
    alpha does not recompile), s·lora_B and 1.0, the same product read from the tensor on every
    call (the fused ops take a Python float)."""
    scaling = layer.scaling[adapter]
    if isinstance(scaling, torch.Tensor):
        return lora_B * scaling.to(lora_B.dtype), 1.0
    return lora_B, scaling
