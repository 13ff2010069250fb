"""GraphedStep: a GaLore/Fira optimizer step replayed from a CUDA graph between projector refreshes."""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from lowrank_kernels.optim.projected_adamw import ProjectedAdamW


class GraphedStep:
    """``optimizer.step()`` replayed from a CUDA graph on the steps without a projector refresh.

    A GaLoreAdamW / FiraAdamW step without a refresh reads nothing back to the host and takes
    its step sizes from device counters, so one captured graph replays every such step. Refresh
    steps (the schedule lives on the host; the SVD, range finder or DCT selection runs eagerly)
    run ``optimizer.step()`` eagerly; they write the projectors in place, so the graph reads the
    new ones. After ``warmup_steps`` eager steps on a side stream (Triton compiles its kernels
    there, outside the capture) the next step without a refresh is captured; later ones replay.

    CUDA graph requirements: the gradients stay at the same addresses from step to step (zero
    them with ``zero_grad(set_to_none=False)``, or capture backward as well), the same
    parameters have gradients at every step, and an LR schedule needs lr as a tensor on the
    device (a float lr is frozen into the graph at capture). Standard mode only: in per-layer
    mode the steps run inside backward.

    Example::

        opt = GaLoreAdamW(groups, lr=torch.tensor(1e-3, device="cuda"))
        step = GraphedStep(opt)
        for x, y in data:
            loss_fn(model(x), y).backward()
            step()
            opt.zero_grad(set_to_none=False)
    """

    def __init__(self, optimizer: ProjectedAdamW, warmup_steps: int = 2):
        if not isinstance(optimizer, ProjectedAdamW) or optimizer.per_layer:
            raise ValueError("GraphedStep needs a GaLoreAdamW or FiraAdamW with per_layer=False")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
        self.optimizer = optimizer
        self.warmup_steps = warmup_steps
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self._warm = 0
        self._captured: List[Tensor] = []

    def __call__(self) -> None:
        """One optimizer step: eager when a refresh is due, a graph replay otherwise."""
        opt = self.optimizer
        if opt.refresh_due():
            opt.step()
        elif self.graph is not None:
            self.graph.replay()
            # The replay advanced the device counts; the host schedule follows by hand.
            opt.count_replayed_step(self._captured)
        elif self._warm < self.warmup_steps:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                opt.step()
            torch.cuda.current_stream().wait_stream(side)
            self._warm += 1
        else:
            self._captured = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
            self.graph = torch.cuda.CUDAGraph()
            # Capturing runs step() once on the host (the schedule advances) but not on the device:
            # the first replay is this step's device work.
            with torch.cuda.graph(self.graph):
                opt.step()
            self.graph.replay()
