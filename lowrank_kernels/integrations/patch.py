"""One-line patching of a transformers model: ``lk.apply_to(model, method="lora", rank=16)``.

The layers to convert are chosen by architecture (``model.config.model_type``): every projection
of the attention and the MLP blocks, by the names the architecture gives them. The conversion is
``convert``'s (the base frozen for adapter methods, LowRankLinear layers on the fused ops).
GPT-2's projections are transformers ``Conv1D`` layers, whose weight is stored transposed
(in, out): each becomes an nn.Linear holding the transposed weight (one copy of that weight,
the same outputs), then is converted; ``merge_and_unload`` gives nn.Linear layers back, not Conv1D.

Nothing happens silently: the returned report names every converted layer, the architecture and
the method, and is printed unless ``verbose=False``; a model type without a known target list
raises ValueError unless ``target_modules`` is given.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from lowrank_kernels.nn import LowRankLinear, convert

_LLAMA_LIKE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Attention and MLP projections per transformers model_type.
TARGETS = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "gpt2": ("c_attn", "c_proj", "c_fc"),
}
_CONV1D = "transformers.pytorch_utils.Conv1D"


@dataclasses.dataclass
class ApplyReport:
    """What apply_to did: the architecture, the method and the qualified names of the layers it
    converted (``converted``); ``from_conv1d`` lists those that were transformers Conv1D layers."""

    model_type: str
    method: str
    converted: list
    from_conv1d: list

    def __str__(self) -> str:
        kinds = sorted({name.rsplit(".", 1)[-1] for name in self.converted})
        conv = f" ({len(self.from_conv1d)} from Conv1D)" if self.from_conv1d else ""
        return (f"lowrank_kernels.apply_to: {len(self.converted)} layers of a {self.model_type} model to "
                f"LowRankLinear(method={self.method!r}){conv}: {', '.join(kinds)}")


def _is_conv1d(module: nn.Module) -> bool:
    return f"{type(module).__module__}.{type(module).__qualname__}" == _CONV1D


def _conv1d_as_linear(conv: nn.Module) -> nn.Linear:
    """An nn.Linear computing what a transformers Conv1D computes (its weight is (in, out))."""
    in_features, out_features = conv.weight.shape
    linear = nn.Linear(in_features, out_features, bias=conv.bias is not None, device="meta")
    linear.weight = nn.Parameter(conv.weight.detach().t().contiguous(), requires_grad=conv.weight.requires_grad)
    if conv.bias is not None:
        linear.bias = conv.bias
    return linear


def _matches(name: str, targets) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def apply_to(model: nn.Module, method: str = "lora", rank: int | None = None, alpha: float | None = None,
             target_modules=None, dropout: float = 0.0, backend: str | None = None, verbose: bool = True,
             **method_options) -> ApplyReport:
    """Convert a transformers model's attention and MLP projections to LowRankLinear, in place.

    Args:
        model: a transformers model (Llama, Mistral, Qwen2/3, Gemma 1-3, GPT-2; any other with
            ``target_modules``).
        method, rank, alpha, dropout, backend, **method_options: as ``convert``.
        target_modules: the layer names to convert (names or name suffixes, as convert's list);
            None takes the architecture's projections (``TARGETS[model.config.model_type]``).
        verbose: print the report's summary line.

    Returns:
        ApplyReport: the architecture, the method and every converted layer's qualified name.

    Raises:
        ValueError: an unknown model type without ``target_modules``, or nothing matched (convert's
            message); convert's errors for settings a layer cannot take.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if target_modules is None:
        if model_type not in TARGETS:
            raise ValueError(f"apply_to: no target list for model type {model_type!r} (known: {sorted(TARGETS)}); "
                             "pass target_modules=[...] naming the layers to convert")
        target_modules = TARGETS[model_type]
    if isinstance(target_modules, str) or not all(isinstance(t, str) and t for t in target_modules):
        raise TypeError(f"target_modules must be a list of layer names, got {target_modules!r}")
    targets = list(target_modules)
    before = {id(m) for m in model.modules() if isinstance(m, LowRankLinear)}
    # Conv1D layers (GPT-2) become equivalent nn.Linear layers first, so that convert takes them.
    from_conv1d = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent._modules.items()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if child is not None and _is_conv1d(child) and _matches(name, targets):
                setattr(parent, child_name, _conv1d_as_linear(child))
                from_conv1d.append(name)
    convert(model, method=method, rank=rank, alpha=alpha, target_modules=targets, dropout=dropout, backend=backend,
            **method_options)
    converted = [name for name, module in model.named_modules()
                 if isinstance(module, LowRankLinear) and id(module) not in before]
    report = ApplyReport(model_type=str(model_type), method=method, converted=converted, from_conv1d=from_conv1d)
    if verbose:
        print(report)
    return report
