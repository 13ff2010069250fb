"""Modules: LowRankLinear and its method registry (one method per file, mirroring ops/)."""

from lowrank_kernels.nn import lora as _lora  # noqa: F401  (registers "lora")
from lowrank_kernels.nn import random_basis as _random_basis  # noqa: F401  (registers "vera", "randlora")
from lowrank_kernels.nn import sparse_lowrank as _sparse_lowrank  # noqa: F401  (registers "sltrain", "lowrank")
from lowrank_kernels.nn.sparse_lowrank import memory_report
from lowrank_kernels.nn.convert import convert, merge_and_unload
from lowrank_kernels.nn.module import LowRankLinear, num_parameters
from lowrank_kernels.nn.peft import from_peft, register_peft_converter
from lowrank_kernels.nn.registry import Method, available_methods, get_method, register_method

__all__ = ["LowRankLinear", "Method", "available_methods", "get_method", "register_method",
           "convert", "merge_and_unload", "from_peft", "register_peft_converter",
           "num_parameters", "memory_report"]
