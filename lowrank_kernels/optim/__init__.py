"""Optimizers: GaLore and Fira AdamW on the fused projected step, with refresh kinds and per-layer mode."""

from lowrank_kernels.optim.projected_adamw import FiraAdamW, GaLoreAdamW, projection_side

__all__ = ["FiraAdamW", "GaLoreAdamW", "projection_side"]
