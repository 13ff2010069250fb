"""PEFT configs whose layers are fused from the start: ``get_peft_model(model, peft_config(config))``.

PEFT lets a LoraConfig map layer types to custom LoRA layer classes
(``LoraConfig._register_custom_module``; PEFT's developer guide, "custom models"). peft_config
registers one dispatcher for every module type. For each target it lets PEFT build the layer it
would build anyway (PEFT's own dispatch: nn.Linear, transformers' Conv1D with
``fan_in_fan_out``, bitsandbytes' 4-bit layers, ...), then, where this package has a fused
counterpart for that PEFT class, runs it fused in place (``from_peft`` on that one layer: same
parameters and state_dict keys, forward on the fused ops). So the adapters' initial values, the
files ``save_pretrained`` writes, ``merge_and_unload`` and every other PEFT behaviour are PEFT's;
only forward and backward run on the fused ops. Layers without a fused counterpart (Embedding,
Conv2d, ...), or with a setting the fused ops cannot reproduce, stay PEFT's; ``unfused_layers(config)``
lists them and why.

PEFT does not save the registration (``_custom_modules`` is not a config field): the saved
adapter is a plain PEFT adapter that plain PEFT loads, and ``peft_from_pretrained`` is the load
call that registers again, so the reloaded layers are fused too.
"""

from __future__ import annotations

from torch import nn

from lowrank_kernels.backend import CHOICES
from lowrank_kernels.nn import from_peft
from lowrank_kernels.nn.peft import supported_peft_layers
from lowrank_kernels.nn.peft.common import qualname


class FusedDispatch:
    """The custom-module entry peft_config registers: called by PEFT as
    ``dispatch(target, adapter_name, config=config, **kwargs)`` for each target layer; returns
    PEFT's own layer for it, fused where a fused counterpart exists.

    A picklable object (not a closure), so that PEFT's deep copies of the config keep it.
    """

    def __init__(self, config, backend: str | None, strict: bool):
        # Kept for PEFT versions that call custom classes without ``config=``.
        self.config = config
        self.backend = backend
        self.strict = strict
        # Qualified name -> why, for the adapter layers left on PEFT's own path.
        self.unfused: dict[str, str] = {}

    def __call__(self, target: nn.Module, adapter_name: str, config=None, **kwargs):
        from peft.tuners.lora import LoraModel

        config = self.config if config is None else config
        # PEFT's own dispatch for this target, without the custom entry (which would call this
        # again): the layer, and the config changes (fan_in_fan_out on Conv1D), are PEFT's.
        custom, config._custom_modules = config._custom_modules, None
        try:
            layer = LoraModel._create_new_module(config, adapter_name, target, **kwargs)
        finally:
            config._custom_modules = custom
        name = kwargs.get("target_name") or ""
        peft_cls = type(layer)
        if qualname(peft_cls) not in supported_peft_layers():
            self.unfused[name] = f"{qualname(peft_cls)} has no fused counterpart"
            return layer
        # from_peft on this one layer: it swaps the class, or leaves the layer on PEFT's path with the
        # reason (under the empty name, the layer's own), or with strict=True raises naming it.
        try:
            from_peft(layer, backend=self.backend, **({"strict": True} if self.strict else {}))
        except ValueError as err:
            raise ValueError(f"peft_config: layer {name!r}: {err}") from err
        reason = layer.lowrank_unconverted.get("")
        for attribute in ("lowrank_unconverted", "lowrank_report"):
            layer.__dict__.pop(attribute, None)
        if type(layer) is peft_cls:
            self.unfused[name] = f"{qualname(peft_cls)}: {reason}"
        else:
            layer.lowrank_name = name  # for its messages: from_peft saw the layer alone
        return layer


def peft_config(config, backend: str | None = None, strict: bool = False):
    """Register the fused layers on a PEFT ``LoraConfig``, in place; returns ``config``.

    ``get_peft_model(model, peft_config(LoraConfig(...)))`` then builds PEFT's LoRA layers and runs
    each one that has a fused counterpart (LoRA and DoRA on nn.Linear, transformers' Conv1D, PEFT's
    4-bit QLoRA layers: see ``lowrank_kernels.nn.peft.supported_peft_layers()``) on the fused ops
    from the moment it is created. Outputs, gradients, ``save_pretrained`` files and merged
    weights are PEFT's (dropout aside: with p > 0 in training the mask comes from this
    package's RNG). Layers PEFT builds without a fused counterpart (Embedding, Conv2d, ...) or
    with a setting the fused ops cannot reproduce (``lora_bias``, LoRA variants the fused ops do
    not run, 8-bit bases) stay on PEFT's own path: ``unfused_layers(config)`` names them and why,
    after ``get_peft_model``; with ``strict=True`` such a setting raises ValueError naming the layer
    instead.

    The registration is not saved with the adapter; load with ``peft_from_pretrained``.

    Args:
        config: a ``peft.LoraConfig``.
        backend: None, "reference", "triton" or "cuda", for every fused layer.
        strict: from_peft's strict: refuse a LoRA layer that cannot run fused instead of leaving
            it on PEFT's path.
    """
    try:
        from peft import LoraConfig
    except ImportError as err:
        raise ImportError("peft_config needs the peft package (pip install peft)") from err
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a peft.LoraConfig, got {type(config).__name__}")
    if backend is not None and backend not in CHOICES:
        raise ValueError(f"backend must be one of {CHOICES} or None, got {backend!r}")
    if not hasattr(config, "_register_custom_module"):
        raise ImportError("peft_config needs a peft version with LoraConfig._register_custom_module; "
                          "with an older peft, build the model with get_peft_model and call lowrank_kernels.from_peft")
    # One entry for every module type: PEFT's dispatch decides what layer a target gets.
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be a bool, got {strict!r}")
    config._register_custom_module({nn.Module: FusedDispatch(config, backend, strict)})
    return config


def unfused_layers(config) -> dict:
    """The adapter layers built with ``config`` (registered by peft_config) that stay on PEFT's own
    path: qualified name -> the PEFT class and why."""
    dispatch = (getattr(config, "_custom_modules", None) or {}).get(nn.Module)
    if not isinstance(dispatch, FusedDispatch):
        raise ValueError("config was not registered by lowrank_kernels.peft_config")
    return dict(dispatch.unfused)


def peft_from_pretrained(model: nn.Module, model_id, backend: str | None = None, **kwargs):
    """``PeftModel.from_pretrained`` with the fused layers registered: a saved LoRA adapter (a
    folder or Hub id, any PEFT save) reloads into fused layers.

    Args:
        model: the base model, as for PeftModel.from_pretrained.
        model_id: the adapter's folder or Hub id.
        backend: as peft_config.
        **kwargs: PeftModel.from_pretrained's other arguments (adapter_name, is_trainable,
            subfolder, revision, ...); ``config=`` takes a LoraConfig to use instead of the saved one.
    """
    from peft import PeftConfig, PeftModel

    config = kwargs.pop("config", None)
    if config is None:
        hub = {k: kwargs[k] for k in ("subfolder", "revision", "cache_dir", "token") if k in kwargs}
        config = PeftConfig.from_pretrained(model_id, **hub)
    return PeftModel.from_pretrained(model, model_id, config=peft_config(config, backend), **kwargs)
