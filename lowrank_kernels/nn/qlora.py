"""The module path of PEFT's QLoRA layers before they moved to nn/peft/qlora.py, kept so that
models pickled with it (``lowrank_kernels.nn.qlora.FusedLora4bit``) load and its imports work."""

from lowrank_kernels.nn.peft.qlora import fused_lora_4bit_class
from lowrank_kernels.nn.peft.registry import fused_attribute

__getattr__ = fused_attribute(__name__, ("FusedLora4bit",))

__all__ = ["fused_lora_4bit_class"]
