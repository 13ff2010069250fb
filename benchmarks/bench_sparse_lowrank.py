"""Benchmark of the sparse-plus-low-rank linear (SLTrain): y = s · (x Aᵀ) Bᵀ + x Sᵀ.

Providers: ``base`` (a dense nn.Linear trained: W requires grad, the floor's reference),
``sltrain-dense`` (SLTrain's own approach, written here from the math: W = s·BA + S built densely
with a scatter, then F.linear; autograd gives dA, dB and d sp_values through the dense dW),
``reference`` / ``triton`` / ``cuda`` (lowrank_kernels.sparse_lowrank_linear with that backend;
``triton`` and ``cuda`` on a GPU only). Each provider but the base runs with a uniform and a
block (16×16) support (shape key ``support=``) and as the low-rank-only op (``method=lowrank``).

Modes: ``fwd`` (autograd recording), ``bwd`` (the backward of one forward), ``fwd+bwd``.
Gradients: x and every trainable tensor (base: x, W; ours: x, A, B, sp_values).

Cost (e = element size, nnz = δ·N·K, index bytes 8 per entry):
  base       fwd 2MKN flops, (MK + NK + MN)e bytes;  bwd 4MKN flops (dx, dW), (2MN + 2MK + 2NK)e
  ours       fwd 2Mr(K + N) + 2·M·nnz flops;  bwd 4Mr(K + N) + 4·M·nnz flops (SpMM + SDDMM);
             bytes as the base's with r(K + N) + nnz parameters in place of NK, plus the index
The floor of each part (low-rank GEMMs, sparse products) is printed for the target shape.

GPU shapes, bf16, M = 8192 tokens, r = d/4: d in {2048, 4096}, (K, N) in {(d, d), (d, FFN)} with
FFN 5461 for d = 2048 and 11008 for d = 4096, δ in {0.01, 0.03, 0.05}. --quick: the target alone
(d = 4096, r = 1024, δ = 0.03, K = N = 4096). CPU: one small fp32 shape, labelled cpu.
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
    floor_ms,
    headline_cases,
    mode_fn,
    our_providers,
    progress,
    shape_str,
)

import lowrank_kernels as lk

MODES = ("fwd", "bwd", "fwd+bwd")
TARGET = (8192, 4096, 4096, 1024, 0.03)  # M, K, N, r, density
FFN = {2048: 5461, 4096: 11008}
CPU_CASES = ((256, 256, 256, 64, 0.03),)
SMOKE_CASES = ((16, 32, 48, 4, 0.1),)  # --smoke: blocks of 16 fit
SUPPORTS = (("uniform", None), ("block", (16, 16)))


def gpu_cases(quick: bool, full: bool):
    if quick:
        return [TARGET]
    cases = [TARGET]
    for d in (2048, 4096):
        for K, N in ((d, d), (d, FFN[d])):
            for density in (0.01, 0.03, 0.05):
                cases.append((8192, K, N, d // 4, density))
    return list(dict.fromkeys(cases))


def cost(provider, mode, M, K, N, r, nnz, e):
    """(flops, bytes) the provider must do at least in ``mode`` (each input read once, each
    output written once)."""
    flops = elems = idx = 0
    dense = provider == "base"
    if mode in ("fwd", "fwd+bwd"):
        if dense:
            flops += 2 * M * K * N
            elems += M * K + N * K + M * N
        else:
            flops += 2 * M * r * (K + N) + 2 * M * nnz
            elems += M * K + M * N + r * (K + N) + nnz
            idx += 8 * nnz
    if mode in ("bwd", "fwd+bwd"):
        if dense:
            flops += 4 * M * K * N
            elems += 2 * M * N + 2 * M * K + 2 * N * K  # dy twice, x, W, write dx and dW
        else:
            flops += 4 * M * r * (K + N) + 4 * M * nnz
            elems += 2 * M * N + 2 * M * K + 2 * (r * (K + N) + nnz)
            idx += 8 * nnz
    return float(flops), float(elems * e + idx)


def make_case(provider, mode, M, K, N, r, support, dtype, device):
    scaling = 0.25

    def make_fn():
        x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
        if provider == "base":
            W = (torch.randn(N, K, device=device, dtype=dtype) / math.sqrt(K)).requires_grad_(True)
            fwd, params = (lambda: F.linear(x, W)), [x, W]
        else:
            A = (torch.randn(r, K, device=device, dtype=dtype) / math.sqrt(K)).requires_grad_(True)
            B = (torch.randn(N, r, device=device, dtype=dtype) / math.sqrt(r)).requires_grad_(True)
            v = None
            if support is not None:
                v = (torch.randn(support.nnz, device=device, dtype=dtype) * 0.02).requires_grad_(True)
            params = [x, A, B] + ([v] if v is not None else [])
            if provider == "sltrain-dense":
                def fwd():
                    W = scaling * (B @ A)
                    if v is not None:
                        W = W.flatten().index_add(0, support.index, v).view(N, K)
                    return F.linear(x, W)
            else:
                def fwd():
                    return lk.sparse_lowrank_linear(x, A, B, v, support, scaling, backend=backend_of(provider))
        return mode_fn(mode, fwd, params, torch.randn(M, N, device=device, dtype=dtype))

    return make_fn


def providers(bench: Bench) -> list[str]:
    return ["sltrain-dense"] + our_providers(bench)


def print_part_floors(M, K, N, r, nnz, dtype, e, smoke):
    """The floor of each part at one shape: what the low-rank GEMMs and the sparse products
    cost at the measured matmul rate and copy bandwidth."""
    lr_f = 6 * M * r * (K + N)                         # fwd + bwd low-rank GEMMs
    lr_b = (3 * M * K + 3 * M * N + 4 * M * r) * e     # x, dy, dx and the (M, r) intermediates
    sp_f = 6 * M * nnz                                 # SpMM fwd, SpMM bwd, SDDMM
    sp_b = 3 * nnz * (e + 8)
    dense_f = 6 * M * K * N
    print(f"\nFloors at M={M} K={K} N={N} r={r} nnz={nnz} (fwd+bwd, tensor-core rate for every flop):")
    print(f"  dense layer      {floor_ms(dense_f, (3 * M * K + 3 * M * N + 3 * N * K) * e, dtype, smoke):9.4f} ms")
    print(f"  low-rank GEMMs   {floor_ms(lr_f, lr_b, dtype, smoke):9.4f} ms")
    print(f"  sparse products  {floor_ms(sp_f, sp_b, dtype, smoke):9.4f} ms (a uniform support runs its "
          f"{sp_f / 1e9:.3g} GFLOP as gathers on CUDA cores, far below this)")


def build_parser():
    return bench_parser(__doc__)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    bench = Bench("sparse_lowrank", out=args.out, smoke=args.smoke, warmup=args.warmup)
    device, dtype, e, cases = device_cases(bench, gpu_cases(args.quick, args.full), CPU_CASES, SMOKE_CASES)
    if args.headline:  # the target with the block support, fwd+bwd, against the dense construction
        cases = headline_cases(bench, TARGET, cases)
    provs = providers(bench)
    gen = torch.Generator().manual_seed(0)
    for M, K, N, r, density in progress(cases, desc="sparse_lowrank"):
        variants = [(f"method=sltrain;density={density};support={kind}",
                     lk.random_support((N, K), density, kind, block=block or (16, 16), generator=gen, device=device))
                    for kind, block in SUPPORTS if not args.headline or kind == "block"]
        if not args.headline:
            variants.append(("method=lowrank", None))
        for tag, support in variants:
            shape = shape_str(M=M, K=K, N=N, r=r) + ";" + tag
            nnz = support.nnz if support is not None else 0
            for mode in ("fwd+bwd",) if args.headline else MODES:
                for p in ["base"] + provs:  # base first: every later line carries its ratio to it
                    flops, nbytes = cost(p, mode, M, K, N, r, nnz, e)
                    bench.run(p, mode, shape, dtype, make_case(p, mode, M, K, N, r, support, dtype, device),
                              flops, nbytes)
        if not args.warmup:
            print_part_floors(M, K, N, r, int(round(density * N * K)), dtype, e, bench.smoke)
    return bench.finish()


if __name__ == "__main__":
    sys.exit(main())
