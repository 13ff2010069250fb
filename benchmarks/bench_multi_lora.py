"""Benchmark of the multi-adapter LoRA linear: y_m = x_m Wᵀ + s · (x_m A_aᵀ) B_aᵀ, a = adapter of token m,
n adapters in one batch, W frozen.

Providers: ``base`` (F.linear alone: the floor's reference), ``peft`` (PEFT's mixed-adapter batch,
``model(x, adapter_names=[...])``: a Python loop over the adapters; PEFT allows it in eval mode
only, so fwd rows only), ``sequential`` (plain per-adapter LoRA: the base GEMM on the whole batch,
then for each adapter its tokens' x_a A_aᵀ B_aᵀ added with index_add_, the loop a training
script without a fused op writes), ``reference`` / ``triton`` / ``cuda`` (multi_lora_linear with
that backend; ``triton`` and ``cuda`` on a GPU only).

Tokens are spread evenly over the n adapters (each sample of the batch is one adapter's), in a
random order, as a mixed serving batch or a multi-tenant training batch arrives.
Modes: decode shapes (M <= 128) run ``fwd`` under torch.no_grad; training shapes ``fwd``, ``bwd``
and ``fwd+bwd`` (gradients for x and every adapter).

Floor (per row): the base's flops and bytes plus the adapters': 2Mr(K + N) flops forward,
2Mr(2K + 2N) backward; bytes add every adapter's A and B (n·r(K + N)e) forward, backward reads x
again and the adapters and writes their gradients.

GPU shapes, bf16, K = N = 4096 (targets on H100: training with 16 adapters within 1.15x of the
base GEMM, decode with 64 adapters at M = 64 within 1.5x):
  --quick   M=8192 n=16 r=16 (fwd, bwd, fwd+bwd) and M=64 n=64 r=16 (decode)
  default   M in {2048, 16384} and {1, 64, 128} x n in {1, 4, 16, 64} at r=16, plus r in {8, 64} at the targets
  --full    every M in {2048, 8192, 16384, 1, 16, 64, 128} x n x r in {8, 16, 64}
CPU (no GPU): a few small fp32 shapes, labelled cpu.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from _common import (  # first: it puts this checkout on sys.path
    Bench,
    backend_of,
    bench_parser,
    device_cases,
    mode_fn,
    our_providers,
    peer_available,
    progress,
    shape_str,
)

import lowrank_kernels

TRAIN_TARGET = (8192, 4096, 4096, 16, 16)  # (M, K, N, n, r)
DECODE_TARGET = (64, 4096, 4096, 64, 16)
TARGET_RATIO = {TRAIN_TARGET: 1.15, DECODE_TARGET: 1.5}
DECODE_M = (1, 16, 64, 128)
CPU_CASES = ((512, 256, 256, 4, 8), (512, 256, 256, 16, 8), (64, 256, 256, 16, 8))
SMOKE_CASES = ((160, 32, 24, 3, 2), (4, 32, 24, 3, 2))  # --smoke: one training, one decode shape
TRAIN_MODES = ("fwd", "bwd", "fwd+bwd")


def is_training(M: int) -> bool:
    return M > 128


def gpu_cases(quick: bool, full: bool) -> list[tuple]:
    if quick:
        return [TRAIN_TARGET, DECODE_TARGET]
    ms = (2048, 8192, 16384) + DECODE_M if full else (2048, 16384, 1, 64, 128)
    ranks = (8, 16, 64) if full else (16,)
    cases = [TRAIN_TARGET, DECODE_TARGET] + [(M, 4096, 4096, n, r) for M in ms for n in (1, 4, 16, 64) for r in ranks]
    if not full:
        cases += [(M, K, N, n, r) for (M, K, N, n, _) in (TRAIN_TARGET, DECODE_TARGET) for r in (8, 64)]
    return list(dict.fromkeys(cases))


def cost(M, K, N, n, r, mode, lora, e):
    """(flops, bytes) the provider must do at least in ``mode`` (see the module docstring)."""
    flops = elems = 0
    adapters = n * r * (K + N)
    if mode in ("fwd", "fwd+bwd"):
        flops += 2 * M * K * N
        elems += M * K + N * K + M * N
        if lora:
            flops += 2 * M * r * (K + N)
            elems += adapters
    if mode in ("bwd", "fwd+bwd"):
        flops += 2 * M * K * N
        elems += M * N + N * K + M * K
        if lora:
            flops += 2 * M * r * (2 * K + 2 * N)
            elems += M * K + 2 * adapters
    return float(flops), float(elems * e)


class _OneLayer(torch.nn.Module):
    def __init__(self, proj: torch.nn.Linear):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def _peft_model(W, As, Bs, scaling):
    """PEFT's LoRA Linear around W with n adapters "a0".."a{n-1}" (values copied), in eval mode."""
    from peft import LoraConfig, get_peft_model

    N, K = W.shape
    holder = _OneLayer(torch.nn.Linear(K, N, bias=False, device=W.device, dtype=W.dtype))
    holder.proj.weight = torch.nn.Parameter(W, requires_grad=False)
    r = As[0].shape[0]
    cfg = lambda: LoraConfig(r=r, lora_alpha=scaling * r, target_modules=["proj"], lora_dropout=0.0)  # noqa: E731
    model = get_peft_model(holder, cfg(), adapter_name="a0", autocast_adapter_dtype=False)
    for i in range(1, len(As)):
        model.add_adapter(f"a{i}", cfg())
    layer = model.base_model.model.proj
    with torch.no_grad():
        for i, (A, B) in enumerate(zip(As, Bs)):
            layer.lora_A[f"a{i}"].to(W.dtype).weight.copy_(A)
            layer.lora_B[f"a{i}"].to(W.dtype).weight.copy_(B)
    return model.eval()


def _sequential(x, W, As, Bs, groups, scaling):
    """Plain per-adapter LoRA: the base GEMM, then each adapter's tokens through their adapter."""
    y = F.linear(x, W)
    for A, B, rows in zip(As, Bs, groups):
        y = y.index_add(0, rows, (x[rows] @ A.t()) @ B.t() * scaling)
    return y


def make_case(provider, mode, M, K, N, n, r, dtype, device):
    """The ``make_fn`` for Bench.run: fresh inputs (B non-zero), tokens spread over n adapters."""
    train = is_training(M)
    scaling = 2.0

    def make_fn():
        x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=train)
        W = torch.randn(N, K, device=device, dtype=dtype) / math.sqrt(K)
        A = (torch.randn(n, r, K, device=device, dtype=dtype) / math.sqrt(K)).requires_grad_(train)
        B = (torch.randn(n, N, r, device=device, dtype=dtype) / math.sqrt(r)).requires_grad_(train)
        index = (torch.arange(M, device=device) % n)[torch.randperm(M, device=device)]
        if provider == "base":
            fwd, params = (lambda: F.linear(x, W)), [x]
        elif provider == "peft":
            model = _peft_model(W, A.detach().unbind(0), B.detach().unbind(0), scaling)
            names = [f"a{i}" for i in index.tolist()]
            fwd, params = (lambda: model(x[:, None], adapter_names=names)), [x]
        elif provider == "sequential":
            groups = [(index == a).nonzero().squeeze(1) for a in range(n)]
            fwd = lambda: _sequential(x, W, A.unbind(0), B.unbind(0), groups, scaling)  # noqa: E731
            params = [x, A, B]
        else:
            fwd = lambda: lowrank_kernels.multi_lora_linear(x, W, A, B, index, scaling, backend=backend_of(provider))  # noqa: E731
            params = [x, A, B]
        return mode_fn(mode, fwd, params, torch.randn(M, N, device=device, dtype=dtype), inference=not train)

    return make_fn


def report_targets(rows) -> None:
    """The H100 targets against the measured ratios to the base (GPU runs only)."""
    for (M, K, N, n, r), target in TARGET_RATIO.items():
        shape = shape_str(M=M, K=K, N=N, n=n, r=r)
        for row in rows:
            if row["shape"] == shape and row["provider"] in ("triton", "cuda") and row["ratio_to_base"] is not None:
                print(f"[multi_lora] target {shape} {row['mode']} {row['provider']}: {row['ratio_to_base']:.3f}x "
                      f"the base (target <= {target}x): {'met' if row['ratio_to_base'] <= target else 'NOT met'}")


def build_parser():
    return bench_parser(__doc__)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    bench = Bench("multi_lora", out=args.out, smoke=args.smoke)
    device, dtype, e, cases = device_cases(bench, gpu_cases(args.quick, args.full), CPU_CASES, SMOKE_CASES)
    ours = our_providers(bench)
    peers = ["peft"] if peer_available(bench, "peft", "peft") else []
    for M, K, N, n, r in progress(cases, desc="multi_lora"):
        shape = shape_str(M=M, K=K, N=N, n=n, r=r)
        for mode in TRAIN_MODES if is_training(M) else ("fwd",):
            # PEFT takes adapter_names in eval mode only: its rows are forward rows
            provs = ["base", "sequential"] + (peers if mode == "fwd" else []) + ours
            for p in provs:  # base first: every later line carries its ratio to it
                flops, nbytes = cost(M, K, N, n, r, mode, p != "base", e)
                bench.run(p, mode, shape, dtype, make_case(p, mode, M, K, N, n, r, dtype, device), flops, nbytes)
    return bench.finish(report_targets)


if __name__ == "__main__":
    sys.exit(main())
