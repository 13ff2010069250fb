"""The package's one counter-based random number generator.

Every random draw (dropout masks, seeded random bases) is a pure function of
(seed, row, col), computed with 32-bit integer arithmetic only, so the reference path
(torch int64 ops), the Triton kernels (interpreted or compiled) and the CUDA kernels
agree bit for bit:

    k0 = seed & 0x7FFFFFFF,  k1 = (seed >> 31) & 0x7FFFFFFF
    h  = mix32(k0 ^ mix32(row + mix32(col ^ k1)))          (all mod 2**32)

with ``mix32`` the "lowbias32" integer finaliser (a bijection of uint32). For a fixed row the
map col -> h is a bijection, so no two entries of one row share a draw.

Maps from h, all exact:
- dropout keep:  (h >> 8) >= round(p * 2**24)                (keep probability 1 - p)
- uniform [0,1): (h >> 8) * 2**-24                           (24 bits, exact in fp32)
- sign:          1 - 2 * (h >> 31)                           (+1 or -1)
"""

from __future__ import annotations

import torch

from lowrank_kernels.backend import triton_available

MASK32 = 0xFFFFFFFF
C1 = 0x7FEB352D
C2 = 0x846CA68B
SEED_BITS = 62


def split_seed(seed: int) -> tuple[int, int]:
    """Two 31-bit keys from a seed in [0, 2**62); both fit a signed int32 kernel argument."""
    return seed & 0x7FFFFFFF, (seed >> 31) & 0x7FFFFFFF


def draw_seed() -> int:
    """One seed from torch's default generator (so torch.manual_seed makes it reproducible)."""
    return int(torch.randint(0, 2**SEED_BITS, (), dtype=torch.int64).item())


def seed_tensor(seed: int | None) -> torch.Tensor:
    """A launcher's dropout seed as an int64 0-d tensor; None draws one from torch's default
    generator, as a tensor (no .item()) so that compiled graphs keep the draw inside."""
    if seed is None:
        return torch.randint(0, 2**SEED_BITS, (), dtype=torch.int64)
    return torch.tensor(seed, dtype=torch.int64)


def seed_value(seed: torch.Tensor | None) -> int | None:
    """The int of a ``seed_tensor`` (None for None), as the ops' implementations read it: a CPU
    tensor, so torch.compile traces its draw without a graph break and reading it costs no device
    synchronisation."""
    return None if seed is None else int(seed.item())


def dropout_seed(dropout_p: float, training: bool, seed: int | None) -> tuple:
    """(p, seed) as an op's entry point passes them on: the dropout probability in effect (0 unless
    ``training``) and, where it is active, the seed as ``seed_tensor`` makes it (None otherwise)."""
    p = float(dropout_p) if training else 0.0
    return p, (seed_tensor(seed) if p > 0.0 else None)


def dropout_threshold(p: float) -> int:
    """Integer threshold on the top 24 bits of the hash: an element is kept iff bits >= it."""
    return int(round(p * (1 << 24)))


# ----------------------------------------------------------------------------------------------
# Reference: torch int64 tensors holding uint32 values
# ----------------------------------------------------------------------------------------------
def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x * c) mod 2**32 without overflowing int64: split x into 16-bit halves.
    lo = x & 0xFFFF
    hi = x >> 16
    return ((((hi * c) & 0xFFFF) << 16) + lo * c) & MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, C1)
    x = x ^ (x >> 15)
    x = _mul32(x, C2)
    return x ^ (x >> 16)


def hash32(seed: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The draw for each (row, col) pair (broadcast), as int64 values in [0, 2**32)."""
    k0, k1 = split_seed(seed)
    rows = rows.to(torch.int64) & MASK32
    cols = cols.to(torch.int64) & MASK32
    inner = _mix32(cols ^ k1)
    return _mix32(k0 ^ _mix32((rows + inner) & MASK32))


def grid_hash(seed: int, n_rows: int, n_cols: int, device=None) -> torch.Tensor:
    rows = torch.arange(n_rows, device=device, dtype=torch.int64)[:, None]
    cols = torch.arange(n_cols, device=device, dtype=torch.int64)[None, :]
    return hash32(seed, rows, cols)


def dropout_keep(seed: int, p: float, n_rows: int, n_cols: int, device=None) -> torch.Tensor:
    """Boolean keep-mask of shape (n_rows, n_cols) for dropout probability p."""
    return (grid_hash(seed, n_rows, n_cols, device) >> 8) >= dropout_threshold(p)


def keep_mask(seed: int | None, p: float, n_rows: int, n_cols: int, device=None) -> torch.Tensor | None:
    """The reference paths' dropout mask: None when nothing is dropped (p = 0 or no seed)."""
    if p == 0.0 or seed is None:
        return None
    return dropout_keep(seed, p, n_rows, n_cols, device)


def dropped(x: torch.Tensor, keep: torch.Tensor | None, p: float, dtype: torch.dtype) -> torch.Tensor:
    """x in ``dtype`` with the dropout of ``keep`` (inverted scaling 1 / (1 - p)) applied."""
    x = x.to(dtype)
    return x if keep is None else x * keep / (1.0 - p)


def uniform(seed: int, n_rows: int, n_cols: int, device=None) -> torch.Tensor:
    """fp32 values in [0, 1), exactly (h >> 8) * 2**-24."""
    return (grid_hash(seed, n_rows, n_cols, device) >> 8).to(torch.float32) * (2.0**-24)


def sign(seed: int, n_rows: int, n_cols: int, device=None) -> torch.Tensor:
    """fp32 values in {-1, +1}."""
    return 1.0 - 2.0 * (grid_hash(seed, n_rows, n_cols, device) >> 31).to(torch.float32)


# ----------------------------------------------------------------------------------------------
# Triton: the same function on uint32 tensors, for use inside kernels
# ----------------------------------------------------------------------------------------------
if triton_available():
    import triton
    import triton.language as tl

    # A @triton.jit function compiled for a GPU may read module globals only as tl.constexpr
    # (the interpreter accepts plain ints; the GPU compiler raises NameError).
    TL_C1 = tl.constexpr(C1)
    TL_C2 = tl.constexpr(C2)

    @triton.jit
    def tl_mix32(x):
        x = x ^ (x >> 16)
        x = x * tl.full((), TL_C1, tl.uint32)
        x = x ^ (x >> 15)
        x = x * tl.full((), TL_C2, tl.uint32)
        return x ^ (x >> 16)

    @triton.jit
    def tl_hash32(k0, k1, rows, cols):
        """rows, cols: integer tensors (broadcastable); k0, k1: the keys from split_seed."""
        k0 = k0.to(tl.uint32)
        k1 = k1.to(tl.uint32)
        inner = tl_mix32(cols.to(tl.uint32) ^ k1)
        return tl_mix32(k0 ^ tl_mix32(rows.to(tl.uint32) + inner))

    @triton.jit
    def tl_dropout_keep(k0, k1, threshold, rows, cols):
        return (tl_hash32(k0, k1, rows, cols) >> 8) >= threshold.to(tl.uint32)

    @triton.jit
    def tl_uniform(k0, k1, rows, cols):
        return (tl_hash32(k0, k1, rows, cols) >> 8).to(tl.float32) * (1.0 / 16777216.0)

    @triton.jit
    def tl_sign(k0, k1, rows, cols):
        return 1.0 - 2.0 * (tl_hash32(k0, k1, rows, cols) >> 31).to(tl.float32)
