"""Modules: LowRankLinear and its method registry (one method per file, mirroring ops/)."""

from lowrank_kernels.nn import dora as _dora  # noqa: F401  (registers "dora")
from lowrank_kernels.nn import lora as _lora  # noqa: F401  (registers "lora")
from lowrank_kernels.nn import lora_sb as _lora_sb  # noqa: F401  (registers "lora_sb")
from lowrank_kernels.nn import nlora as _nlora  # noqa: F401  (registers "nlora")
from lowrank_kernels.nn import random_basis as _random_basis  # noqa: F401  (registers "vera", "randlora")
from lowrank_kernels.nn import sparse_lowrank as _sparse_lowrank  # noqa: F401  (registers "sltrain", "lowrank")
from lowrank_kernels.nn import spectral as _spectral  # noqa: F401  (registers "svfit", "loldu", "kasa")
from lowrank_kernels.nn.adapters import adapter_state_dict, load_adapter_state_dict, load_adapters, save_adapters
from lowrank_kernels.nn.convert import convert, merge_and_unload
from lowrank_kernels.nn.lora_init import calibrate
from lowrank_kernels.nn.module import LowRankLinear, num_parameters
from lowrank_kernels.nn.multi_lora import TopKRouter, adapter_context  # registers "multi_lora"
from lowrank_kernels.nn.peft import from_peft, register_peft_converter
from lowrank_kernels.nn.registry import Method, available_methods, get_method, methods_doc, register_method
from lowrank_kernels.nn.sora import prune_sora, sora_gates  # registers "sora"
from lowrank_kernels.nn.sparse_lowrank import memory_report

# help(LowRankLinear) and help(convert) list every registered method's defaults and options, from
# the methods themselves.
for _documented in (LowRankLinear, convert):
    _documented.__doc__ = f"{_documented.__doc__.rstrip()}\n\n    {methods_doc()}"

__all__ = ["LowRankLinear", "Method", "available_methods", "get_method", "register_method", "methods_doc",
           "convert", "merge_and_unload", "from_peft", "register_peft_converter",
           "num_parameters", "memory_report", "calibrate", "prune_sora", "sora_gates",
           "adapter_state_dict", "load_adapter_state_dict", "save_adapters", "load_adapters",
           "adapter_context", "TopKRouter"]
