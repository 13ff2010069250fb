"""Benchmark of the diagonal-scaled random-basis products: fused VeRA and RandLoRA, W frozen.

Providers: ``base`` (F.linear alone, W frozen), ``peft`` (PEFT's VeRA / RandLoRA Linear layer),
``reference`` / ``triton`` (lowrank_kernels.vera_linear / randlora_linear with that backend;
``triton`` on a GPU only: the interpreter is not a performance path), and ``lora`` (our fused
LoRA at the same shape and rank, for comparison: triton on a GPU, reference on the CPU). The op
has no CUDA kernels yet, so there is no ``cuda`` row. Seeded bases (generated inside the kernels)
run as ``triton`` rows whose shape carries ``bases=seeded``; stored bases are the default.
SVFit and LoLDU (``method=svfit`` / ``method=loldu``: frozen SVD / LDU factor bases with a trainable
diagonal, lowrank_kernels.nn.spectral) are the VeRA product behind ``LowRankLinear`` (the
factorisation runs when the layer is built, outside the timed calls); PEFT has neither. KaSA
(``method=kasa``: truncated W plus a LoRA with a trainable diagonal) runs on the LoRA kernel and is
costed as LoRA; its row sits here with the other factor-basis methods.

Modes: ``fwd`` (autograd recording), ``bwd`` (the backward of one forward), ``fwd+bwd``.
Gradients: x and the trainable scales (VeRA λ_d, λ_b; RandLoRA λ, γ). No dropout, no bias;
everything in the base dtype.

Cost (R = r for VeRA, r·n_b ≈ min(K, N) for RandLoRA, e = element size):
  base   fwd 2MKN flops, (MK + NK + MN)e bytes; bwd 2MKN flops, (MN + NK + MK)e bytes
  VeRA   adds 2Mr(K + N) flops forward and 2Mr(K + 2N) backward (= 2Mr(2K + 3N) in all)
  RandLoRA adds 2MR(K + N) forward and 2MR(K + N + min(K, N)) backward (≈ 7 base GEMMs in all
         at full rank)
  bytes add the stored bases (rK + Nr, or r·d_min + d_max·R) each pass, h (M·R fp32) written
  forward and read backward, and one more read of x (or dy) for the scales' gradients.

GPU shapes, bf16, M=8192 K=N=4096 (the targets): VeRA r in {256, 1024}, RandLoRA
r in {8, 32} with n_b = ceil(4096 / r) (full rank); --quick keeps VeRA r=256 and RandLoRA r=32.
CPU (no GPU): small fp32 shapes whatever the flags, labelled cpu.
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
    headline_cases,
    mode_fn,
    our_providers,
    peer_available,
    progress,
    shape_str,
)

import lowrank_kernels
from lowrank_kernels.ops.random_basis import randlora_num_bases

MODES = ("fwd", "bwd", "fwd+bwd")
GPU_M, GPU_D = 8192, 4096
CPU_CASES = (("vera", 256, 256, 256, 32), ("randlora", 256, 256, 256, 8), ("vera", 512, 512, 1376, 64),
             ("randlora", 512, 1376, 512, 16), ("svfit", 256, 256, 256, 32), ("loldu", 256, 256, 256, 32),
             ("kasa", 256, 256, 256, 32))
SMOKE_CASES = tuple((method, 16, 32, 24, 4) for method in ("vera", "randlora", "svfit", "loldu", "kasa"))  # --smoke
SPECTRAL = ("svfit", "loldu")  # VeRA's product with factor bases of W
LAYERS = SPECTRAL + ("kasa",)  # run through LowRankLinear
HEADLINE = ("randlora", GPU_M, GPU_D, GPU_D, 32)  # --headline (method, M, K, N, r)
TARGETS = {("vera", 256): ("fwd+bwd", 1.05), ("randlora", 32): ("fwd+bwd", 1.1)}  # x floor, H100 bf16


def gpu_cases(quick: bool):
    ranks = {"vera": (256,) if quick else (256, 1024), "randlora": (32,) if quick else (8, 32)}
    return ([(m, GPU_M, GPU_D, GPU_D, r) for m in ("vera", "randlora") for r in ranks[m]]
            + [(m, GPU_M, GPU_D, GPU_D, 256) for m in SPECTRAL] + [("kasa", GPU_M, GPU_D, GPU_D, 16)])


def rank_dim(method, K, N, r):
    return r if method in ("vera",) + SPECTRAL else r * randlora_num_bases(K, N, r)


def cost(method, M, K, N, r, mode, provider, e):
    """(flops, bytes) the provider must do at least in ``mode`` (module docstring)."""
    if method in SPECTRAL:
        method = "vera"
    if provider == "lora" or method == "kasa":
        # LoRA at rank r: 2Mr(K + N) forward, 2Mr(2K + 2N) backward, its A and B as the "bases".
        method, R = "lora", r
    else:
        R = rank_dim(method, K, N, r)
    extra = provider != "base"
    basis = (r * K + N * r) if method in ("vera", "lora") else (r * min(K, N) + max(K, N) * R)
    flops = elems = 0
    if mode in ("fwd", "fwd+bwd"):
        flops += 2 * M * K * N + (2 * M * R * (K + N) if extra else 0)
        elems += M * K + N * K + M * N + ((basis + 2 * M * R) if extra else 0)
    if mode in ("bwd", "fwd+bwd"):
        flops += 2 * M * K * N
        elems += M * N + N * K + M * K
        if extra:
            flops += {"vera": 2 * M * r * (K + 2 * N), "lora": 4 * M * r * (K + N)}.get(
                method, 2 * M * R * (K + N + min(K, N)))
            elems += basis + 2 * M * R + M * max(K, N)
    return float(flops), float(elems * e)


class _OneLayer(torch.nn.Module):
    def __init__(self, proj: torch.nn.Linear):
        super().__init__()
        self.proj = proj


def _peft_layer(method, W, r):
    """PEFT's VeRA / RandLoRA Linear around W, trainable scales moved off their (zero) init."""
    from peft import RandLoraConfig, VeraConfig, get_peft_model

    N, K = W.shape
    lin = torch.nn.Linear(K, N, bias=False, device=W.device, dtype=W.dtype)
    lin.weight = torch.nn.Parameter(W, requires_grad=False)
    cfg = (VeraConfig(r=r, target_modules=["proj"]) if method == "vera"
           else RandLoraConfig(r=r, target_modules=["proj"], randlora_alpha=2 * r))
    layer = get_peft_model(_OneLayer(lin), cfg, autocast_adapter_dtype=False).base_model.model.proj
    layer.to(W.device, W.dtype)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    return layer, [p for p in layer.parameters() if p.requires_grad]


def _ours(method, provider, M, K, N, r, dtype, device, seeded):
    """(forward callable, trainable tensors) of our op with random bases and scales."""
    backend = backend_of(provider)
    if method in LAYERS:
        layer = lowrank_kernels.LowRankLinear.from_linear(
            torch.nn.Linear(K, N, bias=False, device=device, dtype=dtype), method=method, rank=r, backend=backend)
        return (lambda x, W: layer(x)), [p for p in layer.parameters() if p.requires_grad]
    if method == "vera":
        A = None if seeded else torch.randn(r, K, device=device, dtype=dtype) / math.sqrt(K)
        B = None if seeded else torch.randn(N, r, device=device, dtype=dtype) / math.sqrt(r)
        ld = torch.randn(r, device=device, dtype=dtype).requires_grad_(True)
        lb = (torch.randn(N, device=device, dtype=dtype) * 0.1).requires_grad_(True)
        kw = dict(basis_seed=1, basis_scale=6.0 / math.sqrt(K * r)) if seeded else {}
        return (lambda x, W: lowrank_kernels.vera_linear(x, W, A, B, ld, lb, backend=backend, **kw)), [ld, lb]
    n_b = randlora_num_bases(K, N, r)
    d_min, d_max = min(K, N), max(K, N)
    A = None if seeded else torch.randn(r, 1, d_min, device=device, dtype=dtype)
    B = None if seeded else torch.randn(d_max, n_b, r, device=device, dtype=dtype)
    lam = (torch.randn(r, n_b, device=device, dtype=dtype) * 0.1).requires_grad_(True)
    gam = (torch.randn(n_b, d_min, device=device, dtype=dtype) / d_min).requires_grad_(True)
    kw = dict(basis_seed=1) if seeded else {}
    return (lambda x, W: lowrank_kernels.randlora_linear(x, W, A, B, lam, gam, 2.0, backend=backend, **kw)), [lam, gam]


def make_case(method, provider, mode, M, K, N, r, dtype, device, seeded=False):
    def make_fn():
        x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
        W = torch.randn(N, K, device=device, dtype=dtype) / math.sqrt(K)
        if provider == "base":
            fwd, params = (lambda: F.linear(x, W)), [x]
        elif provider == "peft":
            layer, trainable = _peft_layer(method, W, r)
            fwd, params = (lambda: layer(x)), [x] + trainable
        elif provider == "lora":
            A = (torch.randn(r, K, device=device, dtype=dtype) / math.sqrt(K)).requires_grad_(True)
            B = (torch.randn(N, r, device=device, dtype=dtype) / math.sqrt(r)).requires_grad_(True)
            backend = "triton" if device == "cuda" else "reference"
            fwd = lambda: lowrank_kernels.lora_linear(x, W, A, B, 1.0, backend=backend)  # noqa: E731
            params = [x, A, B]
        else:
            op, trainable = _ours(method, provider, M, K, N, r, dtype, device, seeded)
            fwd, params = (lambda: op(x, W)), [x] + trainable
        return mode_fn(mode, fwd, params, torch.randn(M, N, device=device, dtype=dtype))

    return make_fn


def providers(bench: Bench) -> list[str]:
    peft = ["peft"] if peer_available(bench, "peft", "peft") else []
    # "lora": our LoRA op at the same shape, for comparison.
    return ["base"] + peft + ["lora"] + our_providers(bench, cuda_kernels=False)


def report_targets(rows: list[dict]) -> None:
    print("\nTargets (H100 bf16, M=8192 K=N=4096), as measured in this run:")
    for r in rows:
        for (method, rank), (mode, goal) in TARGETS.items():
            shape = shape_str(M=GPU_M, K=GPU_D, N=GPU_D, r=rank, method=method)
            if r["shape"] == shape and r["mode"] == mode and r["provider"] == "triton":
                ratio = r["median_ms"] / r["_floor_ms"]
                print(f"  {method} r={rank} {mode}: {ratio:.3f}x floor (target <= {goal}x): "
                      f"{'met' if ratio <= goal else 'MISSED'}")


def build_parser():
    return bench_parser(__doc__)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    bench = Bench("random_basis", out=args.out, smoke=args.smoke, warmup=args.warmup)
    device, dtype, e, cases = device_cases(bench, gpu_cases(args.quick), CPU_CASES, SMOKE_CASES)
    provs = providers(bench)
    if args.headline:  # RandLoRA at r = 32, fwd+bwd, stored bases, against the base and PEFT
        cases = headline_cases(bench, HEADLINE, cases, lambda c: c[0] == HEADLINE[0])
        provs = [p for p in provs if p != "lora"]
    for method, M, K, N, r in progress(cases, desc="random_basis"):
        shape = shape_str(M=M, K=K, N=N, r=r, method=method)
        for mode in ("fwd+bwd",) if args.headline else MODES:
            for p in provs:  # base first: every later line carries its ratio to it
                if p == "peft" and method in LAYERS:
                    continue
                flops, nbytes = cost(method, M, K, N, r, mode, p, e)
                bench.run(p, mode, shape, dtype, make_case(method, p, mode, M, K, N, r, dtype, device), flops, nbytes)
            if bench.on_gpu and method not in LAYERS and not args.headline:
                seeded = shape_str(M=M, K=K, N=N, r=r, method=method, bases="seeded")
                flops, nbytes = cost(method, M, K, N, r, mode, "triton", e)
                bench.run("base", mode, seeded, dtype, make_case(method, "base", mode, M, K, N, r, dtype, device),
                          *cost(method, M, K, N, r, mode, "base", e))
                bench.run("triton", mode, seeded, dtype,
                          make_case(method, "triton", mode, M, K, N, r, dtype, device, seeded=True), flops, nbytes)
    return bench.finish(report_targets)


if __name__ == "__main__":
    sys.exit(main())
