"""PEFT interop: run an existing PEFT model's adapter layers on the fused ops (from_peft).

Each supported PEFT layer has its class swapped, in place, for a subclass that overrides only
``forward``. Nothing else changes: the same ``base_layer``, ``lora_A``/``lora_B`` ModuleDicts and
parameter objects, so an optimizer built before the swap keeps training them, and PEFT's own
machinery (``save_pretrained``, ``PeftModel.from_pretrained``, ``set_adapter``, ``merge``,
``disable_adapter()``, ``merge_and_unload``) keeps working, since ``isinstance`` checks still
hold and the state_dict keys are unchanged. Patching ``forward`` on each instance would do the
same, but a bound method stored on the instance does not pickle cleanly; a class swap does.

PEFT layer types are dispatched through a table (registry.py: ``register_peft_converter``), which
each layer family fills from its own file: lora.py (LoRA Linear, KaSA, tensor scalings), dora.py
(DoRA adapters), multi_lora.py (mixed-adapter batches, several active adapters), random_basis.py
(VeRA, RandLoRA), qlora.py (bitsandbytes 4-bit bases). A layer that cannot run fused (a type
without a converter, a setting its converter refuses) keeps PEFT's own forward, and
``peft_model.lowrank_report`` says which and why. The fused classes are reachable here
(``lowrank_kernels.nn.peft.FusedLoraLinear``, ``FusedLora4bit``, ``FusedVeraLinear``,
``FusedRandLoraLinear``) so that pickled models load.

peft is imported only when from_peft runs: it is an optional dependency.
"""

from lowrank_kernels.nn.peft import dora as _dora  # noqa: F401  (registers DoRA adapters)
from lowrank_kernels.nn.peft import multi_lora as _multi_lora  # noqa: F401  (registers several adapters)
from lowrank_kernels.nn.peft import qlora as _qlora  # noqa: F401  (registers bitsandbytes 4-bit layers)
from lowrank_kernels.nn.peft import random_basis as _random_basis  # noqa: F401  (registers VeRA, RandLoRA)
from lowrank_kernels.nn.peft.common import (
    PeftRefusal,
    adapter_dropout,
    logger,
    peft_class,
    peft_class_name,
    refusal,
    runs_peft,
    scaled_lora_B,
    skips_hooks,
)
from lowrank_kernels.nn.peft.dora import peft_dora_forward, peft_dora_problem
from lowrank_kernels.nn.peft.lora import fused_call, fused_lora_linear_class, peft_variant_problem
from lowrank_kernels.nn.peft.multi_lora import PEFT_BASE_NAME, peft_multi_adapter_forward
from lowrank_kernels.nn.peft.qlora import fused_lora_4bit_class
from lowrank_kernels.nn.peft.registry import (
    Converter,
    FromPeftReport,
    LoraVariant,
    from_peft,
    fused_attribute,
    register_fused_layer,
    register_lora_variant,
    register_multi_adapter_forward,
    register_peft_converter,
    supported_peft_layers,
)

__getattr__ = fused_attribute(__name__)

__all__ = ["from_peft", "FromPeftReport", "register_peft_converter", "supported_peft_layers", "Converter",
           "register_fused_layer", "register_lora_variant", "LoraVariant", "register_multi_adapter_forward",
           "PeftRefusal", "refusal", "runs_peft", "adapter_dropout", "skips_hooks", "scaled_lora_B", "peft_class",
           "peft_class_name", "fused_call", "fused_lora_linear_class", "fused_lora_4bit_class",
           "peft_variant_problem", "peft_dora_problem", "peft_dora_forward", "peft_multi_adapter_forward",
           "PEFT_BASE_NAME", "logger"]
