"""Optimizers: GaLore and Fira AdamW on the fused projected step, with refresh kinds, per-layer
mode, batched launches and CUDA-graph replay of the steps without a refresh; APOLLO / APOLLO-Mini
(ApolloAdamW) on the same kernels."""

from lowrank_kernels.optim.apollo import ApolloAdamW
from lowrank_kernels.optim.graphed_step import GraphedStep
from lowrank_kernels.optim.lora_pro import LoRAPro, LoRAProAdamW, lora_pro_gradients
from lowrank_kernels.optim.projected_adamw import FiraAdamW, GaLoreAdamW, projection_side, remove_per_layer_hooks
from lowrank_kernels.optim.sora import SoRAAdamW

__all__ = ["LoRAPro", "LoRAProAdamW", "lora_pro_gradients", "SoRAAdamW", "ApolloAdamW", "FiraAdamW", "GaLoreAdamW",
           "GraphedStep", "projection_side", "remove_per_layer_hooks"]
