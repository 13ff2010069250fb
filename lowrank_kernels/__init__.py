"""lowrank_kernels: fused GPU kernels for low-rank layers.

Public API only; implementations live in lowrank_kernels.ops (one file per op),
lowrank_kernels.nn (modules) and lowrank_kernels.optim (optimizers).
"""

from lowrank_kernels import backend
from lowrank_kernels._version import __version__
from lowrank_kernels.compress import compress
from lowrank_kernels.integrations import (
    apply_to,
    peft_config,
    peft_from_pretrained,
    projected_param_groups,
    trainer_optimizer,
    unfused_layers,
)
from lowrank_kernels.nn import (
    LowRankLinear,
    adapter_state_dict,
    available_methods,
    calibrate,
    convert,
    from_peft,
    load_adapter_state_dict,
    load_adapters,
    memory_report,
    merge_and_unload,
    save_adapters,
)
from lowrank_kernels.ops.dora import dora_linear
from lowrank_kernels.ops.lora import lora_linear
from lowrank_kernels.ops.multi_lora import multi_lora_linear
from lowrank_kernels.ops.projected_step import adamw_step, projected_adamw_step
from lowrank_kernels.ops.random_basis import nola_linear, randlora_linear, vera_linear
from lowrank_kernels.ops.sparse_lowrank import SparseSupport, prepare_support, random_support, sparse_lowrank_linear
from lowrank_kernels.optim import ApolloAdamW, FiraAdamW, GaLoreAdamW, GraphedStep, LoRAPro, LoRAProAdamW, SoRAAdamW
from lowrank_kernels.warmup import warmup

__all__ = ["__version__",
           "LowRankLinear", "lora_linear", "dora_linear", "multi_lora_linear", "convert", "merge_and_unload",
           "from_peft", "available_methods", "adapter_state_dict", "load_adapter_state_dict", "save_adapters",
           "load_adapters", "memory_report",
           "GraphedStep", "backend", "compress",
           "sparse_lowrank_linear", "prepare_support", "random_support", "SparseSupport",
           "vera_linear", "randlora_linear", "nola_linear",
           "GaLoreAdamW", "FiraAdamW", "ApolloAdamW", "projected_adamw_step", "adamw_step",
           "calibrate", "LoRAPro", "LoRAProAdamW", "SoRAAdamW",
           "peft_config", "peft_from_pretrained", "unfused_layers", "projected_param_groups", "trainer_optimizer",
           "apply_to", "warmup"]
