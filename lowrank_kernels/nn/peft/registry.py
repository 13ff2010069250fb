"""from_peft and the tables it dispatches through, which each PEFT layer family fills from its own
file (lora.py, dora.py, multi_lora.py, random_basis.py, qlora.py); this module imports none of them.

- converters: PEFT layer class -> ``converter(name, layer) -> fused class`` (register_peft_converter,
  or register_fused_layer for a PEFT class together with its fused class);
- fused classes: name -> the builder of the class, reachable as ``lowrank_kernels.nn.peft.<name>``;
- LoRA variants: a ``peft.tuners.lora.variants`` class name -> how a fused LoRA layer checks and
  runs an adapter of that variant (register_lora_variant: KaSA, DoRA);
- the multi-adapter forward a fused LoRA layer runs for a mixed-adapter batch or several active
  adapters (register_multi_adapter_forward).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, NamedTuple, Optional, Union

from torch import nn

from lowrank_kernels.backend import CHOICES
from lowrank_kernels.nn.peft.common import logger, peft_class, qualname

Converter = Callable[[str, nn.Module], type]
_CONVERTERS: dict[str, Converter] = {}
# The PEFT classes from_peft supports, as its messages list them (the fused classes, registered
# so that converting twice is harmless, are not PEFT's and are not listed).
_LISTED: set = set()
# Where the fused classes live for pickling: the package, whose __getattr__ builds them.
FUSED_MODULE = __package__
_FUSED: dict[str, Callable[[], type]] = {}


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
    key = layer_type if isinstance(layer_type, str) else qualname(layer_type)
    _CONVERTERS[key] = converter
    if listed:
        _LISTED.add(key)
    return converter


def register_fused_layer(peft_layer: str, fused_name: str, build: Callable[[], type], converter: Converter) -> None:
    """Register ``converter`` for the PEFT class ``peft_layer`` (fully qualified name) and for its
    fused class, so converting twice is harmless. ``build()`` returns the fused class (the same
    object on every call), named ``fused_name`` in module FUSED_MODULE: built on first use, so
    that importing lowrank_kernels does not import peft, and reachable as
    ``lowrank_kernels.nn.peft.<fused_name>``, so that pickled models load."""
    _FUSED[fused_name] = build
    register_peft_converter(peft_layer, converter)
    register_peft_converter(f"{FUSED_MODULE}.{fused_name}", converter, listed=False)


def fused_attribute(module: str, names: Optional[tuple] = None) -> Callable[[str], type]:
    """A module ``__getattr__`` (PEP 562) that resolves the registered fused classes (those in
    ``names``, or all), for the package and for the older module paths pickles may name."""

    def __getattr__(name: str) -> type:
        if name in _FUSED and (names is None or name in names):
            return _FUSED[name]()
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__


def supported_peft_layers() -> list:
    """The PEFT layer classes from_peft runs fused, by qualified name."""
    return sorted(_LISTED)


class LoraVariant(NamedTuple):
    """How a fused PEFT LoRA layer handles an adapter of one of PEFT's LoRA variants.

    problem: ``problem(layer, adapter)``, why the adapter cannot run fused, or None.
    forward: ``forward(layer, adapter, x, weight, dropout_p, bias)``, the layer's output, with
        ``weight`` the base weight as (out, in) (or the base's Params4bit) and ``bias`` the bias
        to add, both as the layer's forward prepared them.
    """

    problem: Callable[[nn.Module, str], Optional[str]]
    forward: Callable


_LORA_VARIANTS: dict[str, LoraVariant] = {}


def register_lora_variant(name: str, problem: Callable, forward: Callable) -> None:
    """Run adapters of the LoRA variant ``peft.tuners.lora.variants.<name>`` fused (see LoraVariant);
    adapters of variants nobody registered stay on PEFT's forward."""
    _LORA_VARIANTS[name] = LoraVariant(problem, forward)


def lora_variant(variant) -> Optional[LoraVariant]:
    """The registered handling of PEFT's LoRA variant ``variant`` (a class, an instance, or None)."""
    if variant is None:
        return None
    from peft.tuners.lora import variants

    for name, handling in _LORA_VARIANTS.items():
        cls = getattr(variants, name, None)
        if cls is not None and (variant is cls or isinstance(variant, cls)):
            return handling
    return None


_MULTI_ADAPTER_FORWARD: list = []  # the registered forward, at most one


def register_multi_adapter_forward(forward: Callable) -> None:
    """The forward a fused PEFT LoRA Linear runs for a mixed-adapter batch or several active
    adapters: ``forward(layer, x, adapter_names, problem) -> output or None`` (None: PEFT's
    forward gives the result). Without one, such calls run PEFT's forward."""
    _MULTI_ADAPTER_FORWARD[:] = [forward]


def multi_adapter_forward() -> Optional[Callable]:
    """The registered multi-adapter forward, or None."""
    return _MULTI_ADAPTER_FORWARD[0] if _MULTI_ADAPTER_FORWARD else None


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
    adapter was created), plus whatever other files register (``supported_peft_layers()``),
    among them PEFT's VeRA and RandLoRA Linear layers (nn/peft/random_basis.py) and PEFT's QLoRA
    layer ``peft.tuners.lora.bnb.Linear4bit`` (nn/peft/qlora.py). Left on PEFT: other PEFT layer
    types (Conv2d, Embedding, MultiheadAttention, ...), wrapped or quantised bases (an MHA's
    ``out_proj``, 8-bit bitsandbytes), and settings the fused ops cannot reproduce (LoRA variants
    other than DoRA and KaSA, ``lora_bias``, adapter dtypes the kernels do not take).

    What was done is attached as ``peft_model.lowrank_report`` (a FromPeftReport: the fused layers
    and, for each layer left on PEFT, the reason) and logged on the ``lowrank_kernels.nn.peft``
    logger (a warning when some layers stay on PEFT); ``peft_model.lowrank_unconverted`` is the
    report's ``unfused`` dict.

    At run time a fused layer takes PEFT's own forward whenever PEFT's result cannot come from
    the fused op: adapters disabled or merged, no adapter or several active adapters (except on
    LoRA Linear layers, where several active adapters and mixed-adapter batches,
    ``model(..., adapter_names=[...])``, run multi_lora_linear: nn/peft/multi_lora.py), an adapter
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
        converter = _CONVERTERS.get(qualname(type(layer)))
        if converter is None:
            report.unfused[name] = f"{qualname(type(layer))} has no fused counterpart"
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
        report.fused[name] = qualname(peft_class(fused_cls))
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
