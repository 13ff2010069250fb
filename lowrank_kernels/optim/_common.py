"""What the optimizers share: the plain-torch ones' (SoRAAdamW, LoRAProAdamW, LoRAPro) hyper-parameter
checks and torch.optim's closure protocol."""

from __future__ import annotations

import torch


def check_numbers(**values) -> None:
    """Each value a plain number (int or float, not bool) >= 0, else a ValueError naming it."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")


def check_betas(betas) -> None:
    """Adam's (beta1, beta2), each in [0, 1)."""
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas)):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")


def closure_loss(closure):
    """The loss of ``closure`` evaluated with grad enabled (a step runs under no_grad), or None."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()
