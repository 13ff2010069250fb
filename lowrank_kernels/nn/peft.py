"""PEFT interop: run an existing PEFT model's adapter layers on the fused ops (from_peft).

Each supported PEFT layer has its class swapped, in place, for a subclass that overrides only
``forward``. Nothing else changes: the same ``base_layer``, ``lora_A``/``lora_B`` ModuleDicts and
parameter objects, so an optimizer built before the swap keeps training them, and PEFT's own
machinery (``save_pretrained``, ``PeftModel.from_pretrained``, ``set_adapter``, ``merge``,
``disable_adapter()``, ``merge_and_unload``) keeps working, since ``isinstance`` checks still
hold and the state_dict keys are unchanged. Patching ``forward`` on each instance would do the
same, but a bound method stored on the instance does not pickle cleanly; a class swap does.

PEFT layer types are dispatched through a table (``register_peft_converter``), so other adapter
families (VeRA, RandLoRA, ...) plug in from their own nn/ file. A layer that cannot run fused (a
type without a converter, a setting its converter refuses) keeps PEFT's own forward, and
``peft_model.lowrank_report`` says which and why.

peft is imported only when from_peft runs: it is an optional dependency.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Callable, Union

import torch
from torch import nn
from torch.nn.modules import module as _module

from lowrank_kernels.backend import CHOICES
from lowrank_kernels.nn.dora import peft_dora_forward, peft_variant_problem
from lowrank_kernels.nn.multi_lora import peft_multi_adapter_forward
from lowrank_kernels.ops._checks import check_adapter_dtype
from lowrank_kernels.ops.lora import lora_linear

Converter = Callable[[str, nn.Module], type]
_CONVERTERS: dict[str, Converter] = {}
# The PEFT classes from_peft supports, as its messages list them (the fused classes, registered
# so that converting twice is harmless, are not PEFT's and are not listed).
_LISTED: set = set()

_CONV1D = "transformers.pytorch_utils.Conv1D"

logger = logging.getLogger(__name__)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_peft_converter(layer_type: Union[type, str], converter: Converter, listed: bool = True) -> Converter:
    """Register how from_peft handles one PEFT layer class.

    Args:
        layer_type: the PEFT layer class (exact type, subclasses are not matched: PEFT's
            quantised variants subclass its plain layers), or its fully qualified name as a
            str (``"peft.tuners.vera.layer.Linear"``), so registering does not import peft.
        converter: ``converter(name, layer) -> fused_cls``. It checks ``layer`` (at qualified
            name ``name``) and raises ValueError naming the layer and the setting when it cannot
            run fused with exactly PEFT's results; otherwise it returns a subclass of
            ``type(layer)`` that overrides only ``forward`` and reads its backend from
            ``self.lowrank_backend``. A layer whose converter raises stays on PEFT's own forward,
            with the error's ``setting`` (``refusal``) as the reason in from_peft's report; with
            ``strict=True`` from_peft checks every layer before swapping any class, so a refusal
            leaves the model untouched. Register the fused class under the same converter, with
            ``listed=False``, so converting twice is harmless.
        listed: whether messages name ``layer_type`` among the supported PEFT classes.
    """
    key = layer_type if isinstance(layer_type, str) else _qualname(layer_type)
    _CONVERTERS[key] = converter
    if listed:
        _LISTED.add(key)
    return converter


def supported_peft_layers() -> list:
    """The PEFT layer classes from_peft runs fused, by qualified name."""
    return sorted(_LISTED)


def adapter_dropout(dropout: nn.Module) -> float:
    """The dropout probability a fused call applies for PEFT's dropout module: its p in training,
    0 in eval mode (where PEFT applies none, whatever p is)."""
    if not isinstance(dropout, nn.Dropout) or not dropout.training:
        return 0.0
    return dropout.p


@dataclasses.dataclass
class FromPeftReport:
    """What from_peft did, layer by layer (``peft_model.lowrank_report``).

    Attributes:
        fused: qualified layer name -> the PEFT class of the layer, now running the fused ops.
        unfused: qualified layer name -> why the layer stays on PEFT's own forward.
    """

    fused: dict = dataclasses.field(default_factory=dict)
    unfused: dict = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        text = f"from_peft: {len(self.fused)} layers run fused, {len(self.unfused)} stay on PEFT's own path"
        if self.unfused:
            text += ": " + "; ".join(f"{name!r} ({why})" for name, why in self.unfused.items())
        return text


def from_peft(peft_model: nn.Module, backend: str | None = None, *, strict: bool = False) -> nn.Module:
    """Make a PEFT model's adapter layers use the fused ops, in place; returns ``peft_model``.

    Outputs and gradients equal PEFT's (dropout aside: with dropout active the mask comes from
    this package's RNG, so parity is statistical; with p = 0 or in eval mode it is exact). PEFT's
    runtime state is honoured on every call: the active adapter(s), ``disable_adapter()``, merged
    adapters, the scaling dict (rsLoRA included), the dropout module's p and training flag,
    fp32 adapters on a bf16/fp16 base, and torch.autocast. ``repr`` and PEFT's argument checks
    (and their messages) are PEFT's.

    Every layer that can run fused does; the others stay on PEFT's own forward. Fused:
    ``peft.tuners.lora.layer.Linear`` over a plain nn.Linear, or over a transformers Conv1D with
    ``fan_in_fan_out=True`` (run with the transposed weight), with plain LoRA, DoRA (dora_linear)
    or KaSA adapters (lora_linear with B·diag(ΔΣ); the SVD truncation of W is PEFT's, done when the
    adapter was created), plus whatever other nn/ files register (``supported_peft_layers()``),
    among them PEFT's VeRA and RandLoRA Linear layers (nn/random_basis.py) and PEFT's QLoRA layer
    ``peft.tuners.lora.bnb.Linear4bit`` (nn/qlora.py). Left on PEFT: other PEFT layer types
    (Conv2d, Embedding, MultiheadAttention, ...), wrapped or quantised bases (an MHA's
    ``out_proj``, 8-bit bitsandbytes), and settings the fused ops cannot reproduce (LoRA variants
    other than DoRA and KaSA, ``lora_bias``, adapter dtypes the kernels do not take).

    What was done is attached as ``peft_model.lowrank_report`` (a FromPeftReport: the fused layers
    and, for each layer left on PEFT, the reason) and logged on the ``lowrank_kernels.nn.peft``
    logger (a warning when some layers stay on PEFT); ``peft_model.lowrank_unconverted`` is the
    report's ``unfused`` dict.

    At run time a fused layer takes PEFT's own forward whenever PEFT's result cannot come from
    the fused op: adapters disabled or merged, no adapter or several active adapters (except on
    LoRA Linear layers, where several active adapters and mixed-adapter batches,
    ``model(..., adapter_names=[...])``, run multi_lora_linear: nn/multi_lora.py), an adapter
    added after from_peft with an unsupported setting, training with dropout p = 1, and module
    hooks on the base layer or on the adapter's modules (see ``skips_hooks``: FSDP2's
    ``fully_shard`` of a base layer on its own, tensor parallelism, accelerate's offloading, a
    forward hook), logged once per layer. A scaling that PEFT holds as a tensor
    (``peft.utils.hotswap.prepare_model_for_compiled_hotswap``) runs fused, read from the tensor
    on every call, so a hot-swapped alpha needs no recompilation under torch.compile.

    Args:
        peft_model: a ``peft.PeftModel`` or any module containing PEFT tuner layers.
        backend: None, "reference", "triton" or "cuda", stored per layer as ``lowrank_backend``.
        strict: refuse instead of leaving layers on PEFT: ValueError, naming every layer that
            cannot run fused and why, before any layer is swapped (so the model is untouched);
            and a fused layer raises, instead of running PEFT's forward, when an adapter added
            later has a setting the fused op cannot reproduce.

    Raises:
        ValueError: ``peft_model`` has no PEFT adapter layers, ``backend`` is unknown, or (with
            ``strict=True``) a layer cannot run fused.
    """
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError as err:
        raise ImportError("from_peft needs the peft package (pip install peft)") from err
    if not isinstance(peft_model, nn.Module):
        raise TypeError(f"peft_model must be an nn.Module, got {type(peft_model).__name__}")
    if backend is not None and backend not in CHOICES:
        raise ValueError(f"backend must be one of {CHOICES} or None, got {backend!r}")
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be a bool, got {strict!r}")
    layers = [(name, m) for name, m in peft_model.named_modules() if isinstance(m, BaseTunerLayer)]
    if not layers:
        raise ValueError(f"peft_model ({type(peft_model).__name__}) has no PEFT adapter layers")
    swaps, report = [], FromPeftReport()
    for name, layer in layers:
        converter = _CONVERTERS.get(_qualname(type(layer)))
        if converter is None:
            report.unfused[name] = f"{_qualname(type(layer))} has no fused counterpart"
            continue
        try:
            swaps.append((name, layer, converter(name, layer)))
        except ValueError as err:
            report.unfused[name] = getattr(err, "setting", str(err))
    if strict and report.unfused:
        raise ValueError(f"from_peft(strict=True): {len(report.unfused)} of {len(layers)} PEFT layers cannot run "
                         "fused: " + "; ".join(f"layer {n!r} ({why})" for n, why in report.unfused.items())
                         + f". Supported: {supported_peft_layers()}")
    for name, layer, fused_cls in swaps:
        report.fused[name] = _qualname(peft_class(fused_cls))
        layer.__class__ = fused_cls
        layer.lowrank_backend = backend
        layer.lowrank_name = name
        layer.lowrank_strict = strict
    peft_model.lowrank_report = report
    peft_model.lowrank_unconverted = dict(report.unfused)
    # A log record, not a warnings.warn: the report must not bury or reorder the warnings PEFT itself
    # emits, which callers (and PEFT's tests) inspect.
    logger.log(logging.WARNING if report.unfused else logging.INFO, "%s", report)
    return peft_model


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


def runs_peft(layer: nn.Module, adapter: str, problem: str | None) -> bool:
    """Whether ``adapter``, about to run on a fused layer, takes PEFT's own forward because of
    ``problem`` (a setting the fused op cannot reproduce, or None); raises it with strict=True."""
    if problem is None:
        return False
    if getattr(layer, "lowrank_strict", False):
        raise refusal(getattr(layer, "lowrank_name", ""), f"adapter {adapter!r}: {problem}")
    return True


# ----------------------------------------------------------------------------------------------
# LoRA: peft.tuners.lora.layer.Linear
# ----------------------------------------------------------------------------------------------
def _is_variant(variant, cls_name: str) -> bool:
    """Whether PEFT's LoRA variant ``variant`` (a class or an instance) is ``variants.<cls_name>``."""
    from peft.tuners.lora import variants

    cls = getattr(variants, cls_name, None)
    return cls is not None and (variant is cls or isinstance(variant, cls))


def _kasa_problem(layer: nn.Module, adapter: str) -> str | None:
    """Why PEFT's KaSA adapter ``adapter`` cannot run fused, or None."""
    diag = layer.lora_diag[adapter]
    if diag.dtype != layer.lora_A[adapter].weight.dtype:
        return f"KaSA lora_diag dtype {diag.dtype} differs from lora_A's {layer.lora_A[adapter].weight.dtype}"
    return None


def _lora_adapter_problem(layer: nn.Module, adapter: str) -> str | None:
    """Why ``adapter`` of a PEFT LoRA Linear cannot run fused, or None."""
    variant = layer.lora_variant.get(adapter)
    if _is_variant(variant, "KasaLinearVariant"):
        problem = _kasa_problem(layer, adapter)
    elif layer.use_dora.get(adapter, False) or variant is not None:
        # PEFT's DoRA runs on dora_linear (nn/dora.py); other variants stay on PEFT.
        problem = peft_variant_problem(layer, adapter)
    else:
        problem = None
    if problem is not None:
        return problem
    lora_A, lora_B = layer.lora_A[adapter], layer.lora_B[adapter]
    if layer.lora_bias.get(adapter, False) or lora_B.bias is not None:
        return "lora_bias=True"
    if type(lora_A) is not nn.Linear or type(lora_B) is not nn.Linear or lora_A.bias is not None:
        return f"adapter modules {type(lora_A).__name__}/{type(lora_B).__name__} (expected bias-free nn.Linear)"
    if type(layer.lora_dropout[adapter]) not in (nn.Dropout, nn.Identity):
        return f"lora_dropout module {type(layer.lora_dropout[adapter]).__name__}"
    return None


def _lora_linear_problem(layer: nn.Module, adapter: str) -> str | None:
    """_lora_adapter_problem, plus the adapter dtype against a dense base's."""
    problem = _lora_adapter_problem(layer, adapter)
    if problem is not None:
        return problem
    try:
        check_adapter_dtype(layer.base_layer.weight.dtype, layer.lora_A[adapter].weight.dtype, "lora_A")
    except TypeError as err:
        return str(err)
    return None


def fused_call(layer: nn.Module, args: tuple, kwargs: dict, problem=_lora_adapter_problem):
    """What the fused forward of a PEFT LoRA layer runs, shared by the fused layer classes.

    None where PEFT's own forward gives the result: adapters disabled or merged, extra arguments,
    not exactly one active adapter, an adapter whose setting ``problem(layer, adapter)`` objects
    to (adapters can be added after from_peft, so the one about to run is checked; with
    strict=True this raises instead), module hooks the fused op would skip (skips_hooks), a KaSA
    adapter whose SVD truncation PEFT has not applied yet, or everything dropped (p = 1: PEFT's
    exact result, no adapter term and zero adapter gradients).
    (None, 0.0) where the active adapter is not on this layer (the base layer alone). Otherwise
    (adapter, dropout p).
    """
    active = layer.active_adapters
    if layer.disable_adapters or layer.merged or args or kwargs or len(active) != 1:
        return None
    adapter = active[0]
    if adapter not in layer.lora_A:
        return None, 0.0
    if runs_peft(layer, adapter, problem(layer, adapter)) or skips_hooks(layer, [adapter]):
        return None
    if adapter in getattr(layer, "_lora_kasa_truncation_deferred", ()):
        return None  # PEFT's KaSA forward truncates W on this first call (adapters made on the meta device)
    p = adapter_dropout(layer.lora_dropout[adapter])
    return None if p >= 1.0 else (adapter, p)


def _several_active(layer: nn.Module) -> str:
    return f"several active adapters {list(layer.active_adapters)} (the fused op runs one adapter per layer)"


def _check_lora_linear(name: str, layer: nn.Module) -> type:
    base = layer.base_layer
    base_name = _qualname(type(base))
    if type(base) is nn.Linear:
        if layer.fan_in_fan_out:
            raise refusal(name, "fan_in_fan_out=True on an nn.Linear base")
    elif base_name == _CONV1D:
        if not layer.fan_in_fan_out:
            raise refusal(name, "fan_in_fan_out=False on a Conv1D base")
    else:
        raise refusal(name, f"base layer {base_name} (only a plain nn.Linear or transformers Conv1D, "
                             "not quantised or wrapped layers)")
    if type(base.weight) is not nn.Parameter or not base.weight.is_floating_point():
        raise refusal(name, f"base weight of type {type(base.weight).__name__} and dtype {base.weight.dtype} "
                             "(quantised or tensor-subclass weights are not supported)")
    for adapter in layer.lora_A:
        problem = _lora_linear_problem(layer, adapter)
        if problem is not None:
            raise refusal(name, f"adapter {adapter!r}: {problem}")
    return fused_lora_linear_class()


class PeftRefusal(ValueError):
    """A PEFT layer that cannot run fused: ``layer`` its qualified name, ``setting`` why."""

    def __init__(self, layer: str, setting: str):
        super().__init__(f"from_peft: layer {layer!r} cannot run fused: unsupported setting {setting}")
        self.layer, self.setting = layer, setting


def refusal(name: str, setting: str) -> PeftRefusal:
    """The error of a PEFT layer (at qualified name ``name``) that cannot run fused."""
    return PeftRefusal(name, setting)


@functools.lru_cache(maxsize=None)
def fused_lora_linear_class() -> type:
    """The subclass of ``peft.tuners.lora.layer.Linear`` whose forward runs lora_linear.

    Built on first use so that importing lowrank_kernels does not import peft; reachable as
    ``lowrank_kernels.nn.peft.FusedLoraLinear`` so that pickled models load.
    """
    from peft.tuners.lora.layer import Linear

    class FusedLoraLinear(Linear):
        __qualname__ = "FusedLoraLinear"
        __module__ = __name__
        _get_name = peft_class_name

        def forward(self, x, *args, **kwargs):
            # PEFT's argument checks first, so that a bad call fails with PEFT's own message.
            self._check_forward_args(x, *args, **kwargs)
            if not (self.disable_adapters or self.merged or args) and (
                    set(kwargs) == {"adapter_names"} or (not kwargs and len(self.active_adapters) > 1)):
                # A mixed-adapter batch (adapter_names=...) or several active adapters: one call of
                # multi_lora_linear (nn/multi_lora.py); None where only PEFT's path reproduces PEFT.
                y = peft_multi_adapter_forward(self, x, kwargs.get("adapter_names"), _lora_linear_problem)
                if y is not None:
                    return y
            call = fused_call(self, args, kwargs, _lora_linear_problem)
            if call is None:
                # PEFT's own path (it also unmerges on disable), or what the multi-adapter path declined.
                return super().forward(x, *args, **kwargs)
            adapter, p = call
            if adapter is None:
                return self.base_layer(x)
            base = self.base_layer
            weight = base.weight.t() if self.fan_in_fan_out else base.weight
            variant = self.lora_variant.get(adapter)
            lora_B = self.lora_B[adapter].weight
            if _is_variant(variant, "KasaLinearVariant"):
                # KaSA: ΔW = s·B diag(ΔΣ) A, LoRA's op with B·diag(ΔΣ) (differentiable in B and ΔΣ).
                lora_B = lora_B * self.lora_diag[adapter]
            elif variant is not None:  # DoRA, the other variant _lora_adapter_problem admits
                return peft_dora_forward(self, adapter, x, weight, p)
            lora_B, scaling = scaled_lora_B(self, adapter, lora_B)
            return lora_linear(x, weight, self.lora_A[adapter].weight, lora_B, scaling, base.bias,
                               dropout_p=p, training=p > 0, backend=self.lowrank_backend)

    return FusedLoraLinear


def __getattr__(name: str):
    if name == "FusedLoraLinear":
        return fused_lora_linear_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


register_peft_converter("peft.tuners.lora.layer.Linear", _check_lora_linear)
register_peft_converter(f"{__name__}.FusedLoraLinear", _check_lora_linear, listed=False)
