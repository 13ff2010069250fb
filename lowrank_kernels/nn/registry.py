"""Method registry for LowRankLinear.

Each low-rank method (LoRA, VeRA, RandLoRA, SLTrain, ...) is one ``Method`` subclass registered
under its name, in the nn/ file that mirrors its op (nn/lora.py for ops/lora.py, ...). The
module itself knows nothing method-specific, so adding a method never edits another's code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lowrank_kernels.ops._checks import check_adapter_dtype

if TYPE_CHECKING:
    from lowrank_kernels.nn.module import LowRankLinear


class Method:
    """How LowRankLinear builds, runs and merges one method.

    Subclasses set ``name`` and implement ``create``, ``forward`` and ``delta_weight``;
    ``has_base_weight`` is False for methods whose whole weight is low-rank (SLTrain).
    ``prepare_convert`` is an optional hook for state shared across the layers of one convert().
    """

    name: str = ""
    has_base_weight: bool = True
    #: rank used when the caller passes rank=None (the peer's default: PEFT's config, or the paper's).
    default_rank: int = 8
    #: where the defaults come from, for the documentation ("PEFT LoraConfig", "SLTrain paper", ...).
    peer: str = ""
    #: the peer's default alpha where it does not depend on the rank (PEFT's LoRA: 8, so s = 8 / r);
    #: None for alpha = rank.
    fixed_alpha: float | None = None
    #: the method's options: name -> (default, description). They are shown by
    #: help(LowRankLinear) and help(convert), and an option not listed here is refused.
    options: dict = {}

    def default_alpha(self, rank: int) -> float:
        """alpha used when the caller passes alpha=None (the peer's default for this rank)."""
        return float(rank) if self.fixed_alpha is None else self.fixed_alpha

    def alpha_doc(self) -> str:
        """How the default alpha is chosen, in words (for the documentation)."""
        if self.fixed_alpha is None:
            return "alpha = rank"
        return f"alpha {self.fixed_alpha:g} (s = {self.fixed_alpha:g} / r)"

    def check_options(self, options: dict) -> None:
        """TypeError naming any option this method does not take."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise TypeError(f"method {self.name!r} got unexpected option(s) {unknown}; its options are "
                            f"{sorted(self.options)}")

    def create(self, module: "LowRankLinear", base: nn.Linear | None, device, dtype, **options) -> None:
        """Register the method's parameters and buffers on ``module`` and initialise them.

        ``base`` is an existing nn.Linear to wrap (from_linear / convert): its weight and bias are
        kept, frozen, instead of allocating new ones.
        """
        raise NotImplementedError

    def forward(self, module: "LowRankLinear", x: Tensor) -> Tensor:
        """The layer's output for x of shape (..., in_features), in the base dtype."""
        raise NotImplementedError

    def delta_weight(self, module: "LowRankLinear") -> Tensor:
        """The (out_features, in_features) update in fp32, for merge()/unmerge()."""
        raise NotImplementedError

    def save_extra(self, module: "LowRankLinear") -> dict:
        """0-d tensors, by state_dict key, that the method needs besides its parameters and buffers to
        rebuild the layer from a state_dict (e.g. the seed of generated bases)."""
        return {}

    def load_extra(self, module: "LowRankLinear", values: dict, state_dict: dict, prefix: str) -> str | None:
        """Apply the ``save_extra`` values found in a loaded state_dict; returns an error message
        (the load then fails) or None."""
        return None

    def extra_repr(self, module: "LowRankLinear") -> str:
        """Method-specific text appended to LowRankLinear's repr."""
        return ""

    def prepare_convert(self, model: nn.Module, targets: list[tuple[str, nn.Linear]], rank: int,
                        **options) -> dict:
        """Hook called once by ``convert()`` before any layer of ``model`` is replaced.

        ``targets`` lists the ``(qualified_name, linear)`` pairs about to be converted, in
        ``model.named_modules()`` order; ``options`` are the caller's method options. The returned
        dict is added to the options of every ``create`` call of this conversion (its keys win
        over the caller's), which is how a method shares state across layers without convert()
        knowing about it: VeRA/RandLoRA build one pair of random bases sized for all targets and
        pass it to each layer; a method may also check or re-initialise the targets here. After
        this hook convert() freezes every parameter of ``model`` (for methods with a base weight),
        then creates the layers (whose new parameters train). The default shares nothing.
        """
        return {}

    # Shared helper for methods that wrap a frozen base weight.
    @staticmethod
    def attach_base(module, base, device, dtype, bias: bool) -> None:
        if base is not None:
            module.weight = base.weight
            module.bias = base.bias
        else:
            module.weight = nn.Parameter(torch.empty(module.out_features, module.in_features, device=device,
                                                     dtype=dtype))
            module.bias = nn.Parameter(torch.empty(module.out_features, device=device, dtype=dtype)) if bias else None
            # nn.Linear's own initialisation, so a fresh LowRankLinear is a valid layer.
            nn.Linear.reset_parameters(module)
        module.weight.requires_grad_(False)
        if module.bias is not None:
            module.bias.requires_grad_(False)

    def attach_base_for_adapters(self, module, base, device, dtype, bias: bool, adapter_dtype) -> torch.dtype:
        """attach_base, then the adapters' dtype: ``adapter_dtype``, or the base weight's where it is
        None; TypeError unless it is the base dtype or float32."""
        self.attach_base(module, base, device, dtype, bias)
        adapter_dtype = adapter_dtype or module.weight.dtype
        check_adapter_dtype(module.weight.dtype, adapter_dtype, "adapter_dtype")
        return adapter_dtype


def adapter_dtype_option(factors: str) -> tuple:
    """The ``adapter_dtype`` entry of Method.options for adapters named ``factors`` ("lora_A/lora_B")."""
    return None, f"dtype of {factors}: the base dtype (None) or torch.float32 on a 16-bit base"


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Make ``method`` available to LowRankLinear(method=method.name) and convert(); returns it."""
    if not method.name:
        raise ValueError("a Method needs a non-empty name")
    _METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered Method called ``name``; ValueError listing the registered names otherwise."""
    if name not in _METHODS:
        raise ValueError(f"method must be one of {sorted(_METHODS)}, got {name!r}")
    return _METHODS[name]


def available_methods() -> list[str]:
    """Names of the registered methods, sorted."""
    return sorted(_METHODS)


def methods_doc() -> str:
    """Each registered method with its defaults and options, as help() shows them."""
    lines = ["Methods (``method=``), their defaults with only a rank given, and their options", ""]
    for name in sorted(_METHODS):
        m = _METHODS[name]
        lines.append(f"    {name!r}: default rank {m.default_rank}, {m.alpha_doc()}"
                     + (f" ({m.peer})" if m.peer else ""))
        for option, (default, text) in m.options.items():
            lines.append(f"        {option}={default!r}: {text}")
        lines.append("")
    return "\n".join(lines)
