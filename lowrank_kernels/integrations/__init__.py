"""One-line paths into the stacks users run: PEFT configs whose layers are fused (peft.py), the
transformers Trainer's and TRL's optimizer argument (trainer.py), in-place patching of a
transformers model by architecture (patch.py). Each imports its library only when called."""

from lowrank_kernels.integrations.patch import ApplyReport, apply_to
from lowrank_kernels.integrations.peft import peft_config, peft_from_pretrained, unfused_layers
from lowrank_kernels.integrations.trainer import projected_param_groups, trainer_optimizer

__all__ = ["apply_to", "ApplyReport", "peft_config", "peft_from_pretrained", "unfused_layers", "projected_param_groups",
           "trainer_optimizer"]
