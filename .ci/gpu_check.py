"""`make gpu-check`: compile every Triton kernel the package can launch for sm_80 and sm_90a,
with the GPU compiler, on a machine without a GPU.

1. Plan. The package's own ops run on small CPU tensors inside ``backend.planning_for(arch)``,
   over scenarios covering every dtype and option an op accepts. Launches are intercepted, not
   run: each records the kernel, the argument types and specialisations exactly as Triton's
   binder computes them for that GPU, its constexprs, and every autotune config the autotuner
   could try there (after the package's own pruning).
2. Compile. Each distinct (kernel, specialisation, config) is compiled by ``triton.compile`` for
   the target, in parallel: ttgir, PTX and cubin.
3. Judge. A job fails on a compile error, shared memory over the target's per-block limit,
   register spills (from the cubin's resource usage), or a 16-bit ``tl.dot`` that did not lower to
   tensor cores (wgmma on sm_90a, mma.sync on sm_80). Every job is written to
   ``benchmarks/results/compile/sm<arch>.csv``. With ``--filter``, the jobs of the matching
   scenarios are compiled and only their rows rewritten: the other planned jobs keep their rows.
4. The oldest supported Triton (the lower bound in pyproject.toml, installed once under
   build/triton-<version>/): the same jobs, recorded here, compiled by that version in a
   subprocess with it first on PYTHONPATH: every job through the front end (ttir, ttgir: compile
   errors, 16-bit dots off tensor cores), a fixed sample (per kernel, its first and last job) in
   full. Rows in ``sm<arch>_triton<version>.csv``.
The process exits non-zero on any failure. Recording and compiling are lowrank_kernels.warmup's,
which ``lowrank_kernels.warmup()`` uses to compile a model's kernels before its first step.

Usage: python .ci/gpu_check.py [--arch 90 80] [--jobs N] [--out DIR] [--filter SUBSTRING] [--newest-only]
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing as mp
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # the real compiler, never the interpreter
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # what a launch on a GPU compiles with
os.environ.pop("LOWRANK_KERNELS_AUTOTUNE", None)  # plan every candidate the autotuner can time

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

import lowrank_kernels as lk  # noqa: E402
from lowrank_kernels.ops import tile_config  # noqa: E402
from lowrank_kernels.warmup import Job, Recorder, compile_job, cubin_resources, front_end  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------
# Scenarios: every dtype and option the ops accept, through the public API, forward + backward
# ----------------------------------------------------------------------------------------------
HALF = (torch.float16, torch.bfloat16)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _adapter_dtypes(dtype):
    return (dtype, torch.float32) if dtype in HALF else (dtype,)


def _t(*shape, dtype=torch.float32, grad=False):
    t = torch.randn(*shape).to(dtype)
    return t.requires_grad_(grad)


def _backward(y):
    y.backward(torch.randn_like(y))


def scenarios_lora(M=64, K=96, N=80, r=8):
    for dtype in DTYPES:
        for adt in _adapter_dtypes(dtype):
            for p in (0.0, 0.1):
                for bias in (False, True):
                    def run(dtype=dtype, adt=adt, p=p, bias=bias):
                        x = _t(M, K, dtype=dtype, grad=True)
                        w = _t(N, K, dtype=dtype)
                        a, b = _t(r, K, dtype=adt, grad=True), _t(N, r, dtype=adt, grad=True)
                        y = lk.lora_linear(x, w, a, b, 2.0, bias=_t(N, dtype=dtype) if bias else None,
                                           dropout_p=p, seed=7, backend="triton")
                        _backward(y)
                    yield f"lora {dtype} adapters={adt} p={p} bias={bias}", run


def scenarios_qlora(M=64, K=96, N=80, r=8):
    import bitsandbytes as bnb

    # The blocksize only changes a constexpr shift and nesting adds one gather: one 4-bit layout
    # per dropout setting covers what the compiler does differently, at half the jobs.
    quants = {0.0: ("fp4", 128, False), 0.1: ("nf4", 64, True)}
    for dtype in DTYPES:
        for adt in _adapter_dtypes(dtype):
            for p, (quant_type, blocksize, nested) in quants.items():
                def run(dtype=dtype, adt=adt, p=p, quant_type=quant_type, blocksize=blocksize, nested=nested):
                    w = bnb.nn.Params4bit(_t(N, K), requires_grad=False, quant_type=quant_type,
                                          blocksize=blocksize, compress_statistics=nested).to("cpu")
                    x = _t(M, K, dtype=dtype, grad=True)
                    a, b = _t(r, K, dtype=adt, grad=True), _t(N, r, dtype=adt, grad=True)
                    _backward(lk.lora_linear(x, w, a, b, 2.0, bias=_t(N, dtype=dtype), dropout_p=p, seed=7,
                                             backend="triton"))
                yield f"qlora {dtype} adapters={adt} p={p} {quant_type} blocksize={blocksize} nested={nested}", run


def scenarios_dora(M=64, K=96, N=80, r=8):
    for dtype in DTYPES:
        for adt in _adapter_dtypes(dtype):
            for p in (0.0, 0.1):
                def run(dtype=dtype, adt=adt, p=p):
                    x = _t(M, K, dtype=dtype, grad=True)
                    w = _t(N, K, dtype=dtype)
                    a, b = _t(r, K, dtype=adt, grad=True), _t(N, r, dtype=adt, grad=True)
                    m = (_t(N, dtype=adt).abs() + 1).requires_grad_(True)
                    _backward(lk.dora_linear(x, w, a, b, m, 2.0, bias=_t(N, dtype=dtype), dropout_p=p, seed=7,
                                             backend="triton"))
                yield f"dora {dtype} adapters={adt} p={p}", run
            def inference(dtype=dtype, adt=adt):
                with torch.no_grad():
                    lk.dora_linear(_t(M, K, dtype=dtype), _t(N, K, dtype=dtype), _t(r, K, dtype=adt),
                                   _t(N, r, dtype=adt), _t(N, dtype=adt).abs() + 1, 2.0, backend="triton")
            yield f"dora inference {dtype} adapters={adt}", inference
            def qlora_dora(dtype=dtype, adt=adt):
                # QLoRA + DoRA: W Aᵀ and the γ-epilogue forward on the 4-bit main loop, dx on it too.
                import bitsandbytes as bnb

                w = bnb.nn.Params4bit(_t(N, K), requires_grad=False, quant_type="nf4", blocksize=64,
                                      compress_statistics=True).to("cpu")
                x = _t(M, K, dtype=dtype, grad=True)
                a, b = _t(r, K, dtype=adt, grad=True), _t(N, r, dtype=adt, grad=True)
                m = (_t(N, dtype=adt).abs() + 1).requires_grad_(True)
                _backward(lk.dora_linear(x, w, a, b, m, 2.0, bias=_t(N, dtype=dtype), backend="triton"))
            yield f"dora 4bit {dtype} adapters={adt} nf4 blocksize=64 nested=True", qlora_dora


def scenarios_random_basis(M=64, K=96, N=80):
    for dtype in DTYPES:
        for adt in _adapter_dtypes(dtype):
            for seeded in (False, True):
                for p in (0.0, 0.1):
                    def vera(dtype=dtype, adt=adt, seeded=seeded, p=p, r=16):
                        x = _t(M, K, dtype=dtype, grad=True)
                        w = _t(N, K, dtype=dtype)
                        A, B = (None, None) if seeded else (_t(r, K, dtype=adt), _t(N, r, dtype=adt))
                        ld, lb = _t(r, dtype=adt, grad=True), _t(N, dtype=adt, grad=True)
                        _backward(lk.vera_linear(x, w, A, B, ld, lb, dropout_p=p, seed=3, backend="triton",
                                                 basis_seed=11 if seeded else None))
                    yield f"vera {dtype} adapters={adt} seeded={seeded} p={p}", vera

                    for n_out in (N, 2 * K):  # K > N and K < N pair A and B differently
                        def randlora(dtype=dtype, adt=adt, seeded=seeded, p=p, n_out=n_out, r=8):
                            x = _t(M, K, dtype=dtype, grad=True)
                            w = _t(n_out, K, dtype=dtype)
                            d_min, d_max = min(n_out, K), max(n_out, K)
                            n_b = lk.ops.random_basis.randlora_num_bases(K, n_out, r)
                            A, B = ((None, None) if seeded
                                    else (_t(r, 1, d_min, dtype=adt), _t(d_max, n_b, r, dtype=adt)))
                            lam, gam = _t(r, n_b, dtype=adt, grad=True), _t(n_b, d_min, dtype=adt, grad=True)
                            _backward(lk.randlora_linear(x, w, A, B, lam, gam, 20.0, dropout_p=p, seed=3,
                                                         backend="triton", basis_seed=5 if seeded else None))
                        yield f"randlora {dtype} adapters={adt} seeded={seeded} p={p} N={n_out}", randlora
            def nola(dtype=dtype, adt=adt):
                x = _t(M, K, dtype=dtype, grad=True)
                w = _t(N, K, dtype=dtype)
                al, be = _t(4, dtype=adt, grad=True), _t(4, dtype=adt, grad=True)
                _backward(lk.nola_linear(x, w, al, be, 8, 13, dropout_p=0.1, seed=2, backend="triton"))
            yield f"nola {dtype} adapters={adt}", nola


def scenarios_sparse_lowrank(M=64, K=128, N=96, r=8):
    for dtype in DTYPES:
        for adt in _adapter_dtypes(dtype):
            for kind, block in (("uniform", None), ("block", (16, 16)), ("block", (1, 16)), ("block", (16, 1))):
                def run(dtype=dtype, adt=adt, kind=kind, block=block):
                    x = _t(M, K, dtype=dtype, grad=True)
                    a, b = _t(r, K, dtype=adt, grad=True), _t(N, r, dtype=adt, grad=True)
                    g = torch.Generator().manual_seed(0)
                    support = lk.random_support((N, K), 0.1, kind, block=block or (16, 16), generator=g)
                    vals = _t(support.nnz, dtype=adt, grad=True)
                    _backward(lk.sparse_lowrank_linear(x, a, b, vals, support, 2.0, bias=_t(N, dtype=dtype),
                                                       backend="triton"))
                yield f"sltrain {dtype} adapters={adt} {kind} {block}", run
        def lowrank_only(dtype=dtype):
            x = _t(M, K, dtype=dtype, grad=True)
            a, b = _t(r, K, dtype=dtype, grad=True), _t(N, r, dtype=dtype, grad=True)
            _backward(lk.sparse_lowrank_linear(x, a, b, scaling=2.0, backend="triton"))
        yield f"lowrank {dtype}", lowrank_only


# Parameter shapes whose sizes and strides are not multiples of 16 (a vocabulary of 50257 rows, odd
# hidden sizes): Triton specialises their launches differently from the aligned shapes', and with
# rows·rank not a multiple of 4 (rank 1, odd rows) the slices of the batched workspace lose their
# 16-byte alignment: the kernels run with ALIGNED=False, on scalar loads. In fp32 and bf16 (fp16
# compiles as bf16's twin), at rank r and 1.
MISALIGNED_SHAPES = ((97, 64), (63, 97))


def _step_cases(m, n, r):
    """(dtypes, shape, ranks, aligned) of the optimizer-step scenarios: the aligned shapes, either
    way round, in every dtype at rank r, then the misaligned ones."""
    for shape in ((m, n), (n, m)):
        yield DTYPES, shape, (r,), True
    for shape in MISALIGNED_SHAPES:
        yield (torch.float32, torch.bfloat16), shape, (r, 1), False


def scenarios_projected_step(m=96, n=64, r=8):
    for dtypes, shape, ranks, _ in _step_cases(m, n, r):
        for dtype in dtypes:
            for rank in ranks:
                for side in ("right", "left"):
                    for fira in (False, True):
                        for wd in (0.0, 0.01):
                            def run(dtype=dtype, shape=shape, rank=rank, side=side, fira=fira, wd=wd):
                                w, g = _t(*shape, dtype=dtype), _t(*shape, dtype=dtype)
                                proj = torch.linalg.qr(torch.randn(max(shape), rank))[0]
                                proj = (proj[: shape[1]].t() if side == "right" else proj[: shape[0]]).contiguous()
                                rshape = lk.ops.projected_step.projected_shape(shape, rank, side)
                                mom = [torch.zeros(rshape) for _ in range(2)]
                                lk.projected_adamw_step(w, g, proj, *mom, side=side, step=1, lr=1e-3,
                                                        weight_decay=wd, scale=0.25, fira=fira,
                                                        limiter_norm=torch.full((), -1.0) if fira else None,
                                                        backend="triton")
                            yield f"projected {dtype} {shape} {side} fira={fira} wd={wd} r={rank}", run
    for dtype in DTYPES:
        def plain(dtype=dtype):
            w, g = _t(m, n, dtype=dtype), _t(m, n, dtype=dtype)
            lk.adamw_step(w, g, torch.zeros(m, n), torch.zeros(m, n), step=1, lr=1e-3, weight_decay=0.01,
                          backend="triton")
        yield f"adamw {dtype}", plain
    for dtype in (torch.float32, torch.bfloat16):
        for shape in MISALIGNED_SHAPES[1:]:  # an odd number of elements
            for offset in (0, 1):
                def misaligned(dtype=dtype, shape=shape, offset=offset):
                    # offset 1: parameters stored as views of one flat buffer (as FSDP stores them),
                    # at an element offset that leaves the weight off a 16-byte boundary.
                    numel = shape[0] * shape[1]
                    w = _t(offset + numel, dtype=dtype)[offset:].view(shape)
                    lk.adamw_step(w, _t(*shape, dtype=dtype), torch.zeros(shape), torch.zeros(shape), step=1,
                                  lr=1e-3, weight_decay=0.01, backend="triton")
                yield f"adamw {dtype} {shape} offset={offset}", misaligned


def scenarios_apollo(m=96, n=64, r=8):
    """APOLLO (channel-wise scaling) and APOLLO-Mini (tensor-wise), each at rank r and at rank 1
    (Triton specialises a rank of 1), both sides, aligned and misaligned shapes: the projection,
    moments and limiter kernels and the back kernel with RANK = 0 (its epilogue alone)."""
    from lowrank_kernels.optim.apollo import apollo_projection

    for dtypes, shape, _, aligned in _step_cases(m, n, r):
        for dtype in dtypes:
            for side in ("right", "left"):
                # APOLLO-Mini's tensor-wise scaling launches the channel-wise kernels: on the
                # misaligned shapes it makes no variant of its own.
                for tensor_wise in (False, True) if aligned else (False,):
                    for rank in (r, 1):
                        for wd in (0.0, 0.01):
                            def run(dtype=dtype, shape=shape, side=side, tensor_wise=tensor_wise, rank=rank, wd=wd):
                                w, g = _t(*shape, dtype=dtype), _t(*shape, dtype=dtype)
                                rshape = lk.ops.projected_step.projected_shape(shape, rank, side)
                                lk.ops.apollo_step.apollo_steps(
                                    [w], [g], [apollo_projection(shape, rank, side, 0, "cpu")], [torch.zeros(rshape)],
                                    [torch.zeros(rshape)], [torch.full((), -1.0)], side=side, steps=[torch.ones(())],
                                    lr=1e-3, weight_decay=wd, scale=128.0 if tensor_wise else 1.0,
                                    tensor_wise=tensor_wise, backend="triton")
                            scaling = "tensor-wise" if tensor_wise else "channel-wise"
                            yield f"apollo {dtype} {shape} {side} {scaling} r={rank} wd={wd}", run


def scenarios_multi_lora(M=64, K=96, N=80, n=3, r=8):
    for dtype in DTYPES:
        for adt in _adapter_dtypes(dtype):
            for p in (0.0, 0.1):
                for k in (1, 2):
                    def run(dtype=dtype, adt=adt, p=p, k=k, m=M):
                        x = _t(m, K, dtype=dtype, grad=True)
                        w = _t(N, K, dtype=dtype)
                        a, b = _t(n, r, K, dtype=adt, grad=True), _t(n, N, r, dtype=adt, grad=True)
                        idx = torch.randint(-1, n, (m, k))
                        mix = _t(m, k, dtype=adt, grad=True) if k > 1 else None
                        _backward(lk.multi_lora_linear(x, w, a, b, idx if k > 1 else idx[:, 0], 2.0,
                                                       bias=_t(N, dtype=dtype), dropout_p=p, seed=7,
                                                       backend="triton", adapter_weight=mix,
                                                       ranks=torch.tensor([r, 3, 5])))
                    yield f"multi_lora {dtype} adapters={adt} p={p} k={k}", run
            def decode(dtype=dtype, adt=adt):
                with torch.no_grad():
                    lk.multi_lora_linear(_t(8, K, dtype=dtype), _t(N, K, dtype=dtype), _t(n, r, K, dtype=adt),
                                         _t(n, N, r, dtype=adt), torch.randint(-1, n, (8,)), 2.0,
                                         dropout_p=0.1, seed=3, backend="triton")
            yield f"multi_lora decode {dtype} adapters={adt}", decode


SCENARIOS = (scenarios_lora, scenarios_qlora, scenarios_dora, scenarios_random_basis, scenarios_sparse_lowrank,
             scenarios_projected_step, scenarios_apollo, scenarios_multi_lora)


def plan(arch: int, every_variant: bool = False):
    """The compile jobs of every scenario for ``arch``.

    Unless ``every_variant``, an fp16 kernel and its bf16 twin (same tiles, same MMA instruction
    shapes and register use) are compiled once, as the bf16 one. Every other difference between
    launches is compiled on its own, alignment hints included: an unaligned stride turns vector
    loads into scalar ones with a pointer each, which can spill a tile that fits when aligned.
    Each job keeps the count of the variants it stands for.
    """
    torch.manual_seed(0)
    rec = Recorder(arch)
    with rec.active():
        for family in SCENARIOS:
            for name, run in family():
                rec.scenario = name
                run()
    if every_variant:
        return list(rec.jobs.values())
    alike: dict = {}
    for job in rec.jobs.values():
        twin = repr((sorted(job.signature.items()), sorted(job.constexprs.items()), sorted(job.attrs.items())))
        twin = re.sub(r"\bfloat16", "bfloat16", twin.replace("fp16", "bf16"))
        key = (job.kernel, twin, repr(sorted(job.options.items())))
        kept = alike.get(key)
        if kept is None or ("bf16" in job.sig_text() and "bf16" not in kept.sig_text()):
            if kept is not None:
                job.scenarios |= kept.scenarios
                job.variants += kept.variants
            alike[key] = job
        else:
            kept.scenarios |= job.scenarios
            kept.variants += 1
    return list(alike.values())


def selected(jobs, only: str | None) -> list:
    """The jobs launched by a scenario whose name contains ``only`` (all of them for None): the
    full plan's jobs, so that each keeps the scenarios and variant count a full run gives it."""
    return [j for j in jobs if only is None or any(only in s for s in j.scenarios)]


# ----------------------------------------------------------------------------------------------
# 2-3. Compile and judge
# ----------------------------------------------------------------------------------------------
# `%d = tt.dot %a, %b, %c : tensor<64x32xbf16, #...> * ... -> tensor<64x64xf32, #mma>`; wgmma's
# operands may be shared-memory descriptors (`!ttg.memdesc<64x128xbf16, ...>`) instead of tensors.
_DOT = re.compile(r"= (tt\.dot|ttng\.warp_group_dot) [^{:]*(?:\{[^}]*\})? ?: (?:tensor|!ttg\.memdesc)<[0-9x]*x(\w+), "
                  r".*?-> tensor<[^,]*, (#\w+)>")


def _dot_lowerings(ttgir: str):
    """[(operand dtype, 'wgmma' | 'mma' | 'fma')] for each dot in a ttgir module."""
    encodings = dict(re.findall(r"^(#\w+) = #ttg\.(\w+)", ttgir, re.M))
    out = []
    for op, elt, enc in _DOT.findall(ttgir):
        kind = encodings.get(enc, "")
        if op == "ttng.warp_group_dot":
            out.append((elt, "wgmma"))
        elif kind == "nvidia_mma":
            out.append((elt, "mma"))
        else:
            out.append((elt, "fma"))
    return out


_JOBS: list = []


def compile_one(args):
    """Compile job ``index`` for ``arch`` and judge it: in full (PTX, cubin: shared memory, spills,
    tensor cores) or, with ``full`` false, through Triton's front end alone (ttir, ttgir: compile
    errors and tensor cores)."""
    index, arch, full = args
    job = _JOBS[index]
    row = dict(identity(job), shared_bytes="", registers="", spill_bytes="", dots="", status="ok", detail="",
               stage="full" if full else "front-end")
    t0 = time.time()
    try:
        target = GPUTarget("cuda", arch, 32)
        problems = []
        if full:
            k = compile_job(job, target)
            ttgir = k.asm["ttgir"]
            regs, spill = cubin_resources(k.asm["cubin"])
            row.update(shared_bytes=k.metadata.shared, registers=regs, spill_bytes=spill)
            if k.metadata.shared > tile_config.SMEM_LIMITS[arch]:
                problems.append(f"shared {k.metadata.shared} B > {tile_config.SMEM_LIMITS[arch]} B")
            if spill:
                problems.append(f"spills {spill} B/thread")
        else:
            ttgir = front_end(job, target)
        dots = _dot_lowerings(ttgir)
        row["dots"] = " ".join(f"{e}:{kind}" for e, kind in dots)
        slow = [e for e, kind in dots if e in ("bf16", "f16") and kind == "fma"]
        if slow:
            problems.append(f"{len(slow)} 16-bit dot(s) on FMA")
        unread = len(re.findall(r"= (?:tt\.dot|ttng\.warp_group_dot) ", ttgir)) - len(dots)
        if unread:
            problems.append(f"{unread} dot(s) whose lowering could not be read from the ttgir")
        if problems:
            row.update(status="fail", detail="; ".join(problems))
    except Exception as e:  # noqa: BLE001 - any compiler error is a finding, reported per job
        msg = str(e).strip().splitlines()
        row.update(status="error", detail=(type(e).__name__ + ": " + (msg[-1] if msg else ""))[:300])
    row["seconds"] = round(time.time() - t0, 2)
    row["index"] = index
    row["variants"] = job.variants
    return row


# First training steps whose compile cost the summary reports: every kernel variant and autotune
# candidate such a step compiles on its first call.
FIRST_STEPS = ("lora torch.bfloat16 adapters=torch.float32 p=0.1 bias=False",
               "lora torch.bfloat16 adapters=torch.bfloat16 p=0.0 bias=False",
               "vera torch.bfloat16 adapters=torch.float32 seeded=False p=0.0",
               "sltrain torch.bfloat16 adapters=torch.bfloat16 block (16, 16)",
               "projected torch.bfloat16 (96, 64) right fira=True wd=0.0")


def first_step_costs(jobs, rows):
    seconds = {r["index"]: r["seconds"] for r in rows}
    for name in FIRST_STEPS:
        mine = [i for i, j in enumerate(jobs) if name in j.scenarios]
        if mine:
            variants = {(jobs[i].name, jobs[i].sig_text(with_tiles=False)) for i in mine}
            yield name, len(variants), len(mine), sum(seconds[i] for i in mine)


FIELDS = ["kernel", "signature", "config", "stage", "shared_bytes", "registers", "spill_bytes", "dots", "status",
          "detail", "seconds", "variants", "scenario"]
# What tells a table's rows apart: two jobs may differ only in what the signature text leaves out
# (hints on arguments it does not mark), and then in their first scenario.
KEY = ("kernel", "signature", "config", "scenario")


def identity(job) -> dict:
    """The KEY columns of ``job``'s row."""
    return dict(kernel=job.name, signature=job.sig_text(), config=job.config_text(), scenario=sorted(job.scenarios)[0])


def row_key(row: dict) -> tuple:
    return tuple(row[k] for k in KEY)


def read_table(path) -> list:
    """The rows of the table at ``path`` (none where there is none)."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_table(path, rows, every=None) -> None:
    """Write ``rows`` to the table at ``path``. A filtered run passes ``every``, the keys of every
    job of the full plan: the table's rows of the planned jobs outside the filter are kept as they
    are, rows of jobs no longer planned are dropped, as a full run would, and planned jobs with no
    row are reported."""
    table = list(rows)
    if every is not None:
        done = {row_key(r) for r in rows}
        table += [r for r in read_table(path) if row_key(r) in every and row_key(r) not in done]
        lacking = len(every) - len(table)
        print(f"  {path}: {len(rows)} rows written, {len(table) - len(rows)} kept from the table"
              + (f"; {lacking} planned jobs outside the filter have no row: run without --filter" if lacking else ""))
    table.sort(key=row_key)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(table)


def compile_and_judge(jobs, arch, full, processes, path, t0, every=None):
    """Compile ``jobs`` for ``arch`` (job i in full where ``full[i]``, else its front end alone),
    write their rows to ``path`` (``every`` as in write_table), print the summary; the rows."""
    _JOBS[:] = jobs
    rows = []
    with mp.get_context("fork").Pool(processes) as pool:
        for row in pool.imap_unordered(compile_one, [(i, arch, full[i]) for i in range(len(jobs))]):
            rows.append(row)
            if len(rows) % 100 == 0:
                print(f"  {len(rows)}/{len(jobs)} compiled ({time.time() - t0:.0f} s)", flush=True)
    rows.sort(key=lambda r: (r["kernel"], r["signature"], r["config"]))
    bad = [r for r in rows if r["status"] != "ok"]
    dots = [d for r in rows for d in r["dots"].split()]
    summary = ", ".join(f"{k} {dots.count(k)}" for k in sorted(set(dots)))
    n_full = sum(1 for r in rows if r["stage"] == "full")
    shared = max((r["shared_bytes"] or 0 for r in rows), default=0)
    print(f"gpu-check sm_{arch} triton {triton.__version__}: {len(rows) - len(bad)}/{len(rows)} ok "
          f"({n_full} in full, {len(rows) - n_full} front end only) in {time.time() - t0:.0f} s; "
          f"max shared {shared} B; dots: {summary}; -> {path}", flush=True)
    for r in bad[:40]:
        print(f"  {r['status'].upper()} {r['kernel']} [{r['config']}] {r['detail']}\n      {r['signature'][:200]}")
    if len(bad) > 40:
        print(f"  ... and {len(bad) - 40} more in {path}")
    write_table(path, rows, every)
    return rows


# ----------------------------------------------------------------------------------------------
# The oldest supported Triton: the jobs recorded here, compiled by that version in a subprocess
# ----------------------------------------------------------------------------------------------
def oldest_triton() -> str:
    """The lowest Triton version pyproject.toml accepts."""
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        return re.search(r'"triton>=([0-9.]+)', f.read()).group(1)


def install_triton(version: str) -> "str | None":
    """A folder holding triton==``version`` alone (installed once under build/), for PYTHONPATH;
    None where it cannot be installed (no network)."""
    path = os.path.join(ROOT, "build", f"triton-{version}")
    if not os.path.isfile(os.path.join(path, "triton", "__init__.py")):
        cmd = [sys.executable, "-m", "pip", "install", "-qq", "--disable-pip-version-check", "--no-deps",
               "--target", path, f"triton=={version}"]
        if subprocess.run(cmd).returncode != 0:
            return None
    return path


def sample(jobs, every: bool = False) -> list:
    """Which jobs the older Triton compiles in full: per kernel, the first and the last of its
    jobs in (signature, config) order, a fixed choice that spans its dtypes and tile sizes (all of
    them with ``every``)."""
    if every:
        return [True] * len(jobs)
    first, last = {}, {}
    for i in sorted(range(len(jobs)), key=lambda i: (jobs[i].name, jobs[i].sig_text(), jobs[i].config_text())):
        first.setdefault(jobs[i].name, i)
        last[jobs[i].name] = i
    chosen = set(first.values()) | set(last.values())
    return [i in chosen for i in range(len(jobs))]


def check_oldest(planned: dict, a) -> int:
    """Compile ``planned`` ({arch: (the full plan's jobs, the selected ones)}) with the oldest
    supported Triton: the front end of every selected job, those of a fixed sample of the full
    plan in full; in a filtered run, also the jobs outside the filter whose row the sample now
    wants at the other stage. The number of failed jobs."""
    version = oldest_triton()
    if version == triton.__version__:
        print(f"gpu-check: triton {version} is both the newest here and the oldest supported: one pass")
        return 0
    path = install_triton(version)
    if path is None:
        print(f"gpu-check: FAIL: triton {version} (the oldest supported) could not be installed under build/")
        return 1
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        specs = {}
        for arch, (every, jobs) in planned.items():
            full = {id(j): chosen for j, chosen in zip(every, sample(every, a.oldest_in_full))}
            if a.filter:
                had = {row_key(r): r["stage"] == "full"
                       for r in read_table(os.path.join(a.out, f"sm{arch}_triton{version}.csv"))}
                picked = {id(j) for j in jobs}
                jobs = [j for j in every
                        if id(j) in picked or had.get(row_key(identity(j)), full[id(j)]) != full[id(j)]]
            specs[str(arch)] = dict(jobs=[dict(j.spec(), full=full[id(j)]) for j in jobs],
                                    every=[row_key(identity(j)) for j in every] if a.filter else None)
        json.dump(specs, f)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([path] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    cmd = [sys.executable, os.path.abspath(__file__), "--specs", f.name, "--jobs", str(a.jobs), "--out", a.out]
    try:
        return subprocess.run(cmd, env=env).returncode
    finally:
        os.unlink(f.name)


def compile_specs(a) -> int:
    """The subprocess's side of check_oldest: compile the jobs written by a newer Triton."""
    with open(a.specs) as f:
        specs = json.load(f)
    failed = 0
    for arch, spec in specs.items():
        t0 = time.time()
        jobs = [Job.from_spec(s) for s in spec["jobs"]]
        path = os.path.join(a.out, f"sm{arch}_triton{triton.__version__}.csv")
        every = None if spec["every"] is None else {tuple(k) for k in spec["every"]}
        rows = compile_and_judge(jobs, int(arch), [s["full"] for s in spec["jobs"]], a.jobs, path, t0, every)
        failed += sum(r["status"] != "ok" for r in rows)
    return 1 if failed else 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities (90 = sm_90a)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiler processes")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "compile"),
                    help="folder for sm<arch>.csv and sm<arch>_triton<oldest>.csv")
    ap.add_argument("--filter", default=None, help="only scenarios whose name contains this")
    ap.add_argument("--plan-only", action="store_true", help="list the jobs without compiling")
    ap.add_argument("--every-variant", action="store_true",
                    help="also compile the fp16 twins of bf16 kernels")
    ap.add_argument("--newest-only", action="store_true",
                    help="skip the pass with the oldest supported Triton")
    ap.add_argument("--oldest-in-full", action="store_true",
                    help="compile every job in full with the oldest supported Triton, not a sample")
    ap.add_argument("--specs", help=argparse.SUPPRESS)  # check_oldest's subprocess: jobs to compile
    a = ap.parse_args(argv)

    os.makedirs(a.out, exist_ok=True)
    if a.specs:
        return compile_specs(a)
    failed = 0
    planned = {}
    for arch in a.arch:
        t0 = time.time()
        every = plan(arch, a.every_variant)
        jobs = selected(every, a.filter)
        planned[arch] = every, jobs
        kernels = {j.name for j in jobs}
        print(f"gpu-check sm_{arch}{'a' if arch == 90 else ''}: {len(jobs)} jobs over {len(kernels)} kernels, "
              f"standing for {sum(j.variants for j in jobs)} variants (planned in {time.time() - t0:.1f} s)",
              flush=True)
        if a.plan_only:
            for j in jobs:
                print(f"  {j.name:28s} {j.config_text():60s} {j.sig_text()[:150]}")
            continue
        rows = compile_and_judge(jobs, arch, [True] * len(jobs), a.jobs, os.path.join(a.out, f"sm{arch}.csv"), t0,
                                 {row_key(identity(j)) for j in every} if a.filter else None)
        failed += sum(r["status"] != "ok" for r in rows)
        for name, variants, compiles, secs in first_step_costs(jobs, rows):
            print(f"  first step of {name!r}: {variants} kernel variants, {compiles} compiles with the autotune "
                  f"candidates, {secs:.0f} s of compile on this machine")
    if not a.plan_only and not a.newest_only:
        failed += check_oldest(planned, a)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
