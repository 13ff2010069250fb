"""Benchmark of the fused GaLore / Fira projected AdamW step.

Providers, mode ``step`` (one optimizer step of one (m, n) matrix, no refresh inside the timed
call: the projector is built before timing and update_proj_gap is never reached):
  ``base``          torch.optim.AdamW(fused=True) on the full matrix (the base)
  ``galore-torch``  galore_torch.GaLoreAdamW            (method=galore)
  ``fira``          fira.FiraAdamW                      (method=fira)
  ``apollo-torch``  apollo_torch.APOLLOAdamW            (method=apollo: rank r, channel-wise;
                    method=apollo_mini: rank 1, tensor-wise, scale 128)
  ``reference`` / ``triton`` / ``cuda``   lowrank_kernels GaLoreAdamW / FiraAdamW with that backend
                    (``triton`` on a GPU only: the interpreter is not a performance path; ``cuda``
                    only where the extension is built; APOLLO has none)
Each (m, n, r) also prints the optimizer state bytes of one projected parameter after a step
(every tensor in the optimizer's state) for GaLore, Fira, APOLLO and APOLLO-Mini.
Mode ``refresh`` (one projector refresh of one matrix, no base row): ``reference`` with
refresh=svd (torch.linalg.svd of the fp32 gradient, what the peers run every T steps),
refresh=randomized and refresh=dct (the top-r selection; P is rebuilt from the indices).

Cost of a step, e = element size of W and G: the floor reads G twice and reads and
writes W once, 4·m·n·e bytes, and does the projection GEMMs, 4·m·n·r flops. Base AdamW reads G,
W and two fp32 moments and writes W and the moments: (3e + 16)·m·n bytes.

GPU: bf16 weights and gradients, (m, n) ∈ {(4096, 4096), (4096, 11008), (11008, 4096)},
r ∈ {128, 256, 512} (--quick: (4096, 4096) at r = 256 only). CPU: small fp32 shapes, labelled cpu.
"""

from __future__ import annotations

import sys
import warnings

import torch
from _common import (  # first: it puts this checkout on sys.path
    Bench,
    backend_of,
    bench_parser,
    device_cases,
    headline_cases,
    our_providers,
    progress,
    shape_str,
)

from lowrank_kernels import ApolloAdamW, FiraAdamW, GaLoreAdamW
from lowrank_kernels.optim import projection_side
from lowrank_kernels.optim import refresh as rf
from lowrank_kernels.optim.apollo import state_bytes

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
GPU_SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))
GPU_RANKS = (128, 256, 512)
CPU_CASES = ((512, 512, 64), (512, 1376, 64))
SMOKE_CASES = ((48, 40, 4),)  # --smoke
HEADLINE = (4096, 11008, 256)  # --headline (m, n, r), method=fira
NEVER = 10**9  # update_proj_gap that no benchmark reaches


def _peer(name):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if name == "galore-torch":
                import galore_torch

                return galore_torch.GaLoreAdamW
            if name == "apollo-torch":
                import apollo_torch

                return apollo_torch.APOLLOAdamW
            import fira

            return fira.FiraAdamW
    except ImportError:
        return None


# APOLLO's param groups (the official settings, update_proj_gap never reached)
APOLLO_GROUPS = {"apollo": {"scale_type": "channel", "scale": 1.0},
                 "apollo_mini": {"scale_type": "tensor", "scale": 128.0}}


def step_maker(cls, method, m, n, r, dtype, **kwargs):
    """make_fn for one optimizer step of an (m, n) matrix after a first step that builds P."""

    def make():
        w = torch.nn.Parameter(torch.randn(m, n, device=DEVICE, dtype=dtype) * 0.02)
        w.grad = torch.randn(m, n, device=DEVICE, dtype=dtype)
        if cls is torch.optim.AdamW:
            opt = cls([w], lr=1e-3, fused=True)
        elif method in APOLLO_GROUPS:
            group = {"params": [w], "rank": r, "update_proj_gap": NEVER, "proj": "random", "proj_type": "std",
                     **APOLLO_GROUPS[method]}
            opt = cls([group], lr=1e-3, **kwargs)
        else:
            key = "alpha" if method == "fira" else "scale"
            group = {"params": [w], "rank": r, "update_proj_gap": NEVER, key: 0.25, "proj_type": "std"}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt = cls([group], lr=1e-3, **kwargs)
        opt.step()  # the refresh happens here, outside the timed calls
        return opt.step

    return make


def refresh_maker(kind, m, n, r, dtype):
    def make():
        g = torch.randn(m, n, device=DEVICE, dtype=dtype)
        side = projection_side("std", (m, n))
        if kind == "svd":
            return lambda: rf.svd_projector(g, r, side)
        if kind == "randomized":
            return lambda: rf.randomized_projector(g, r, side, seed=0)
        return lambda: rf.dct_select(g, r, side)

    return make


def build_parser():
    return bench_parser(__doc__)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    bench = Bench("projected_step", out=args.out, smoke=args.smoke, warmup=args.warmup)
    gpu_cases = [(4096, 4096, 256)] if args.quick else [(m, n, r) for m, n in GPU_SHAPES for r in GPU_RANKS]
    _, dtype, e, cases = device_cases(bench, gpu_cases, CPU_CASES, SMOKE_CASES)
    if args.headline:  # Fira's step at 4096 x 11008, r = 256, against fira and torch's AdamW
        cases = headline_cases(bench, HEADLINE, cases)
    ours = our_providers(bench)
    for m, n, r in progress(cases, desc="projected_step"):
        base_bytes = (3 * e + 16) * m * n
        floor_bytes, floor_flops = 4 * m * n * e, 4 * m * n * r
        methods = (("galore", GaLoreAdamW, "galore-torch"), ("fira", FiraAdamW, "fira"))
        for method, ours_cls, peer in methods[args.headline:]:
            shape = shape_str(m=m, n=n, r=r, method=method)
            bench.run("base", "step", shape, dtype, step_maker(torch.optim.AdamW, method, m, n, r, dtype),
                      flops=0, nbytes=base_bytes)
            peer_cls = _peer(peer)
            if peer_cls is None:
                bench.skip(peer, "not installed")
            else:
                bench.run(peer, "step", shape, dtype, step_maker(peer_cls, method, m, n, r, dtype),
                          flops=floor_flops, nbytes=floor_bytes)
            for backend in ours:
                bench.run(backend, "step", shape, dtype,
                          step_maker(ours_cls, method, m, n, r, dtype, backend=backend_of(backend)),
                          flops=floor_flops, nbytes=floor_bytes)
        if args.headline:
            continue
        # APOLLO projects once and never back-projects: 2·m·n·r flops; the bytes are GaLore's.
        states = {}
        for method in ("galore", "fira"):
            cls = GaLoreAdamW if method == "galore" else FiraAdamW
            opt = step_maker(cls, method, m, n, r, dtype)().__self__
            states[method] = state_bytes(opt)
        for method, rank in (("apollo", r), ("apollo_mini", 1)):
            shape = shape_str(m=m, n=n, r=rank, method=method)
            bench.run("base", "step", shape, dtype, step_maker(torch.optim.AdamW, method, m, n, rank, dtype), flops=0,
                      nbytes=base_bytes)
            peer_cls = _peer("apollo-torch")
            if peer_cls is None:
                bench.skip("apollo-torch", "not installed")
            else:
                bench.run("apollo-torch", "step", shape, dtype, step_maker(peer_cls, method, m, n, rank, dtype),
                          flops=2 * m * n * rank, nbytes=floor_bytes)
            for backend in ours:
                if backend == "cuda":
                    continue
                bench.run(backend, "step", shape, dtype,
                          step_maker(ApolloAdamW, method, m, n, rank, dtype, backend=backend_of(backend)),
                          flops=2 * m * n * rank, nbytes=floor_bytes)
            states[method] = state_bytes(step_maker(ApolloAdamW, method, m, n, rank, dtype)().__self__)
        print(f"optimizer state bytes, m={m} n={n} r={r}: "
              + ", ".join(f"{k} {v}" for k, v in states.items()), flush=True)
        # Refresh rows have no base row (ratio_to_base stays empty): refresh=svd is the exact SVD
        # the peers run, the others are compared with it in the printed table.
        for kind in rf.KINDS:
            shape = shape_str(m=m, n=n, r=r, refresh=kind)
            bench.run("reference", "refresh", shape, dtype, refresh_maker(kind, m, n, r, dtype),
                      flops=0, nbytes=m * n * e)
    return bench.finish()


if __name__ == "__main__":
    sys.exit(main())
