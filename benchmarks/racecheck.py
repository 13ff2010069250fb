"""One small step of one op family on its fused kernels, for ``compute-sanitizer --tool racecheck``.

    compute-sanitizer --tool racecheck --error-exitcode 1 python benchmarks/racecheck.py FAMILY

FAMILY: ``lora``, ``randlora``, ``sltrain`` (a LowRankLinear's forward and backward) or ``fira``
(one FiraAdamW step). The linear families run M = 4096 tokens (64 without a GPU) over K = N = 64 at rank 16: one
tile of (R, K) per split, so on a GPU the backward's reduction over M (dA, dB, the scales, the
sparse values: ``gemm.outer_reduce`` and its kin) is split across many programs whose partial
sums are then reduced; the script checks that the split is on. The projected step has no split
reduction; its projection, moment, limiter and back-projection kernels run once.

Each backend with kernels here runs (triton; cuda where the extension is built and the family has
CUDA kernels) and is compared with the reference backend on the same parameters; a relative error
over the tolerance exits 1. Without a GPU the Triton kernels run under the interpreter in fp32
(what benchmarks/gpu_suite.sh --rehearse uses to check that the script runs).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

GPU = torch.cuda.is_available()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

from _common import REPO  # noqa: E402,F401  (puts this checkout on sys.path)

import lowrank_kernels as lk  # noqa: E402
from lowrank_kernels.backend import cuda_extension  # noqa: E402
from lowrank_kernels.ops import tile_config  # noqa: E402

FAMILIES = {"lora": {}, "randlora": {}, "sltrain": {"density": 0.05}, "fira": {}}
CUDA_FAMILIES = ("lora", "sltrain", "fira")
D, RANK = 64, 16
M = 4096 if GPU else 64  # the interpreter is slow, and splits nothing: a CPU run only proves the script runs
DEVICE = torch.device("cuda" if GPU else "cpu")
DTYPE = torch.bfloat16 if GPU else torch.float32
TOL = 2e-2 if GPU else 1e-4


def rel_err(out, ref) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def linear_step(family: str, backend: str) -> list[tuple[str, float]]:
    """Forward and backward of the family's layer on ``backend`` against the reference backend."""
    torch.manual_seed(0)
    layer = lk.LowRankLinear(D, D, rank=RANK, method=family, bias=False, device=DEVICE, dtype=DTYPE, backend=backend,
                             **FAMILIES[family])
    with torch.no_grad():  # adapters away from their zero initialisation, so every gradient is non-trivial
        for p in layer.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    ref = copy.deepcopy(layer)
    ref.backend = "reference"
    x = torch.randn(M, D, device=DEVICE, dtype=DTYPE)
    dy = torch.randn(M, D, device=DEVICE, dtype=DTYPE)
    out = []
    for name, mod in (("ours", layer), ("ref", ref)):
        xi = x.clone().requires_grad_(True)
        params = [p for p in mod.parameters() if p.requires_grad]
        y = mod(xi)
        out.append([y, *torch.autograd.grad(y, [xi, *params], dy)])
    names = ["y", "dx"] + [n for n, p in layer.named_parameters() if p.requires_grad]
    return [(n, rel_err(a, b)) for n, a, b in zip(names, *out)]


def fira_step(backend: str) -> list[tuple[str, float]]:
    """One FiraAdamW step (projector built on the first step) on ``backend`` against the reference."""
    torch.manual_seed(0)
    w = torch.randn(4 * D, 8 * D, device=DEVICE, dtype=DTYPE)
    g = torch.randn_like(w)
    weights = []
    for b in (backend, "reference"):
        p = torch.nn.Parameter(w.clone())
        opt = lk.FiraAdamW([{"params": [p], "rank": RANK, "update_proj_gap": 10**9}], lr=1e-2, backend=b)
        p.grad = g.clone()
        opt.step()
        weights.append(p.detach())
    return [("weight", rel_err(weights[0] - w, weights[1] - w))]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("family", choices=tuple(FAMILIES), help="the op family whose kernels run once")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if GPU and args.family != "fira":
        splits, _ = tile_config.m_splits(M, 1, 64, DEVICE)
        if splits < 2:
            print(f"racecheck {args.family}: the reduction over M={M} is not split ({splits}); nothing to check")
            return 1
        print(f"racecheck {args.family}: the reduction over M={M} runs in about {splits} splits")
    backends = ["triton"]
    if GPU and args.family in CUDA_FAMILIES and cuda_extension() is not None:
        backends.append("cuda")
    bad = 0
    for backend in backends:
        errs = fira_step(backend) if args.family == "fira" else linear_step(args.family, backend)
        if GPU:
            torch.cuda.synchronize()
        for name, err in errs:
            ok = err <= TOL
            bad += not ok
            print(f"racecheck {args.family} {backend:<7} {name:<12} rel err {err:.2e} {'ok' if ok else f'> {TOL:.0e}'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
