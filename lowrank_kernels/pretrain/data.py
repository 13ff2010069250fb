"""The pretraining run's data: the standard library's bytes, training batches and the held-out loss.

The files ``*.py`` directly in the folder of the running Python's ``os`` module, sorted by name and
concatenated as bytes (one byte one token, so the vocabulary is 256); the last 5% held out.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

VOCAB = 256
EVAL_SEED = 20240  # the held-out batches' generator: the same for every run
HELD_OUT = 0.05


def stdlib_corpus() -> tuple[torch.Tensor, dict]:
    """The bytes of the ``*.py`` files directly in the ``os`` module's folder, sorted by name and
    concatenated (uint8, one byte one token), and a description of them."""
    folder = Path(os.__file__).parent
    files = sorted(folder.glob("*.py"), key=lambda p: p.name)
    raw = b"".join(p.read_bytes() for p in files)
    if len(raw) < 100_000:
        raise RuntimeError(f"only {len(raw)} bytes of *.py files in {folder}: not enough text to train on")
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    split = int(len(raw) * (1 - HELD_OUT))
    info = dict(source=f"{folder}/*.py (sorted by name, concatenated, one byte one token)", files=len(files),
                bytes=len(raw), train_bytes=split, held_out_bytes=len(raw) - split,
                python=sys.version.split()[0])
    return data, info


def random_batch(data: torch.Tensor, batch: int, seq: int, gen: torch.Generator, device) -> tuple:
    """``batch`` windows of seq + 1 bytes at random positions: (inputs, next-byte targets)."""
    starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=gen)
    windows = data[starts[:, None] + torch.arange(seq + 1)].long().to(device, non_blocking=True)
    return windows[:, :-1], windows[:, 1:]


def lm_loss(model, inputs, targets) -> torch.Tensor:
    # The loss is taken here, not by passing labels to transformers (which shifts them itself).
    logits = model(input_ids=inputs).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def held_out_loss(model, val: torch.Tensor, args, device) -> float:
    gen = torch.Generator().manual_seed(EVAL_SEED)
    was_training = model.training
    model.eval()
    total = 0.0
    for _ in range(args.eval_batches):
        total += lm_loss(model, *random_batch(val, args.batch, args.seq, gen, device)).item()
    model.train(was_training)
    return total / args.eval_batches
