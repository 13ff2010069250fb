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
   ``benchmarks/results/compile/sm<arch>.csv``; the process exits non-zero on any failure.

Usage: python .ci/gpu_check.py [--arch 90 80] [--jobs N] [--out DIR] [--filter SUBSTRING]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import multiprocessing as mp
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

os.environ.pop("TRITON_INTERPRET", None)  # the real compiler, never the interpreter
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # what a launch on a GPU compiles with
os.environ.pop("LOWRANK_KERNELS_AUTOTUNE", None)  # plan every candidate the autotuner can time

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

import lowrank_kernels as lk  # noqa: E402
from lowrank_kernels import backend as _backend  # noqa: E402
from lowrank_kernels.ops import _tiles  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


# ----------------------------------------------------------------------------------------------
# 1. Plan: record launches
# ----------------------------------------------------------------------------------------------
@dataclass
class Job:
    kernel: JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    num_warps: int
    num_stages: int
    scenarios: set = field(default_factory=set)
    variants: int = 1

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    def sig_text(self, with_tiles: bool = True) -> str:
        # ":16" marks what Triton's binder found divisible by 16 (pointers, integers)
        types = ",".join(v + (":16" if ["tt.divisibility", 16] in self.attrs.get((i,), []) else "")
                         for i, v in enumerate(self.signature.values()) if v != "constexpr")
        names = [(self.kernel.arg_names[p[0]], v) for p, v in sorted(self.constexprs.items())]
        consts = ",".join(f"{n}={_show(v)}" for n, v in names
                          if n.isupper() and (with_tiles or not n.startswith(("BLOCK", "GROUP"))))
        return f"{types} | {consts}"

    def config_text(self) -> str:
        blocks = ",".join(f"{self.kernel.arg_names[p[0]]}={v}" for p, v in sorted(self.constexprs.items())
                          if self.kernel.arg_names[p[0]].startswith(("BLOCK", "GROUP")))
        return f"{blocks},warps={self.num_warps},stages={self.num_stages}"


def _show(v) -> str:
    return str(v).replace("triton.language.", "")


class Recorder:
    """Intercepts JITFunction.run / Autotuner.run while the ops run on CPU tensors."""

    def __init__(self, arch: int):
        self.arch = arch
        self.backend = make_backend(GPUTarget("cuda", arch, 32))
        self.binders = {}
        self.jobs: dict = {}
        self.scenario = ""

    def record(self, jit: JITFunction, args, kwargs):
        binder = self.binders.get(jit)
        if binder is None:
            binder = self.binders[jit] = create_function_from_signature(jit.signature, jit.params, self.backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = jit._pack_args(self.backend, kwargs, bound, specialization, options)
        key = (jit, tuple(signature.items()), repr(sorted(constexprs.items())), repr(sorted(attrs.items())),
               options.num_warps, options.num_stages)
        job = self.jobs.get(key)
        if job is None:
            job = self.jobs[key] = Job(jit, signature, constexprs, attrs, options.num_warps, options.num_stages)
        job.scenarios.add(self.scenario)

    @contextlib.contextmanager
    def active(self):
        recorder = self

        def jit_run(self, *args, grid, warmup, **kwargs):
            recorder.record(self, args, kwargs)

        def tuner_run(self, *args, **kwargs):
            kwargs.pop("grid", None)
            kwargs.pop("warmup", None)
            self.nargs = dict(zip(self.arg_names, args))
            for config in self.prune_configs(kwargs):
                self.fn.run(*args, grid=None, warmup=True, **kwargs, **config.all_kwargs())
            self.nargs = None

        saved = JITFunction.run, Autotuner.run
        JITFunction.run, Autotuner.run = jit_run, tuner_run
        try:
            with _backend.planning_for(self.arch):
                yield self
        finally:
            JITFunction.run, Autotuner.run = saved


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
                            A, B = (None, None) if seeded else (_t(r, 1, d_min, dtype=adt), _t(d_max, n_b, r, dtype=adt))
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


def scenarios_projected_step(m=96, n=64, r=8):
    for dtype in DTYPES:
        for shape in ((m, n), (n, m)):
            for side in ("right", "left"):
                for fira in (False, True):
                    for wd in (0.0, 0.01):
                        def run(dtype=dtype, shape=shape, side=side, fira=fira, wd=wd):
                            w, g = _t(*shape, dtype=dtype), _t(*shape, dtype=dtype)
                            rows = shape[0] if side == "right" else shape[1]
                            proj = torch.linalg.qr(torch.randn(max(shape), r))[0]
                            proj = proj[: shape[1]].t().contiguous() if side == "right" else proj[: shape[0]].contiguous()
                            mom = [torch.zeros(rows, r) if side == "right" else torch.zeros(r, rows) for _ in range(2)]
                            lk.projected_adamw_step(w, g, proj, *mom, side=side, step=1, lr=1e-3, weight_decay=wd,
                                                    scale=0.25, fira=fira,
                                                    limiter_norm=torch.full((), -1.0) if fira else None,
                                                    backend="triton")
                        yield f"projected {dtype} {shape} {side} fira={fira} wd={wd}", run
        def plain(dtype=dtype):
            w, g = _t(m, n, dtype=dtype), _t(m, n, dtype=dtype)
            lk.adamw_step(w, g, torch.zeros(m, n), torch.zeros(m, n), step=1, lr=1e-3, weight_decay=0.01,
                          backend="triton")
        yield f"adamw {dtype}", plain


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


SCENARIOS = (scenarios_lora, scenarios_qlora, scenarios_dora, scenarios_random_basis, scenarios_sparse_lowrank, scenarios_projected_step,
             scenarios_multi_lora)


def plan(arch: int, only: str | None = None, every_variant: bool = False):
    """The compile jobs of every scenario (whose name contains ``only``) for ``arch``.

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
                if only and only not in name:
                    continue
                rec.scenario = name
                run()
    if every_variant:
        return list(rec.jobs.values())
    alike: dict = {}
    for job in rec.jobs.values():
        twin = repr((sorted(job.signature.items()), sorted(job.constexprs.items()), sorted(job.attrs.items())))
        twin = re.sub(r"\bfloat16", "bfloat16", twin.replace("fp16", "bf16"))
        key = (job.kernel, twin, job.num_warps, job.num_stages)
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


def _resources(cubin: bytes):
    """(registers, local bytes per thread) of the cubin's kernel, from cuobjdump -res-usage."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", text).group(1))
    local = int(re.search(r"LOCAL:(\d+)", text).group(1))
    stack = int(re.search(r"STACK:(\d+)", text).group(1))
    return regs, max(local, stack)


_JOBS: list = []


def compile_one(args):
    index, arch = args
    job = _JOBS[index]
    row = dict(kernel=job.name, signature=job.sig_text(), config=job.config_text(), shared_bytes="",
               registers="", spill_bytes="", dots="", status="ok", detail="")
    t0 = time.time()
    try:
        src = ASTSource(fn=job.kernel, signature=job.signature, constexprs=job.constexprs, attrs=job.attrs)
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": job.num_warps, "num_stages": job.num_stages})
        regs, spill = _resources(k.asm["cubin"])
        dots = _dot_lowerings(k.asm["ttgir"])
        row.update(shared_bytes=k.metadata.shared, registers=regs, spill_bytes=spill,
                   dots=" ".join(f"{e}:{kind}" for e, kind in dots))
        problems = []
        if k.metadata.shared > _tiles.SMEM_LIMITS[arch]:
            problems.append(f"shared {k.metadata.shared} B > {_tiles.SMEM_LIMITS[arch]} B")
        if spill:
            problems.append(f"spills {spill} B/thread")
        slow = [e for e, kind in dots if e in ("bf16", "f16") and kind == "fma"]
        if slow:
            problems.append(f"{len(slow)} 16-bit dot(s) on FMA")
        unread = len(re.findall(r"= (?:tt\.dot|ttng\.warp_group_dot) ", k.asm["ttgir"])) - len(dots)
        if unread:
            problems.append(f"{unread} dot(s) whose lowering could not be read from the ttgir")
        if problems:
            row.update(status="fail", detail="; ".join(problems))
    except Exception as e:  # noqa: BLE001 - any compiler error is a finding, reported per job
        msg = str(e).strip().splitlines()
        row.update(status="error", detail=(type(e).__name__ + ": " + (msg[-1] if msg else ""))[:300])
    row["seconds"] = round(time.time() - t0, 2)
    row["scenario"] = sorted(job.scenarios)[0]
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


FIELDS = ["kernel", "signature", "config", "shared_bytes", "registers", "spill_bytes", "dots", "status",
          "detail", "seconds", "variants", "scenario"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities (90 = sm_90a)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiler processes")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "compile"),
                    help="folder for sm<arch>.csv")
    ap.add_argument("--filter", default=None, help="only scenarios whose name contains this")
    ap.add_argument("--plan-only", action="store_true", help="list the jobs without compiling")
    ap.add_argument("--every-variant", action="store_true",
                    help="also compile the fp16 twins of bf16 kernels")
    a = ap.parse_args(argv)

    os.makedirs(a.out, exist_ok=True)
    failed = 0
    for arch in a.arch:
        t0 = time.time()
        jobs = plan(arch, a.filter, a.every_variant)
        _JOBS[:] = jobs
        kernels = {j.name for j in jobs}
        print(f"gpu-check sm_{arch}{'a' if arch == 90 else ''}: {len(jobs)} jobs over {len(kernels)} kernels, "
              f"standing for {sum(j.variants for j in jobs)} variants (planned in {time.time() - t0:.1f} s)", flush=True)
        if a.plan_only:
            for j in jobs:
                print(f"  {j.name:28s} {j.config_text():60s} {j.sig_text()[:150]}")
            continue
        rows = []
        with mp.get_context("fork").Pool(a.jobs) as pool:
            for row in pool.imap_unordered(compile_one, [(i, arch) for i in range(len(jobs))]):
                rows.append(row)
                if len(rows) % 100 == 0:
                    print(f"  {len(rows)}/{len(jobs)} compiled ({time.time() - t0:.0f} s)", flush=True)
        rows.sort(key=lambda r: (r["kernel"], r["signature"], r["config"]))
        path = os.path.join(a.out, f"sm{arch}.csv")
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        bad = [r for r in rows if r["status"] != "ok"]
        failed += len(bad)
        dots = [d for r in rows for d in r["dots"].split()]
        summary = ", ".join(f"{k} {dots.count(k)}" for k in sorted(set(dots)))
        print(f"gpu-check sm_{arch}: {len(rows) - len(bad)}/{len(rows)} ok in {time.time() - t0:.0f} s; "
              f"max shared {max((r['shared_bytes'] or 0) for r in rows)} B; dots: {summary}; -> {path}", flush=True)
        for name, variants, compiles, secs in first_step_costs(jobs, rows):
            print(f"  first step of {name!r}: {variants} kernel variants, {compiles} compiles with the autotune "
                  f"candidates, {secs:.0f} s of compile on this machine")
        for r in bad[:40]:
            print(f"  {r['status'].upper()} {r['kernel']} [{r['config']}] {r['detail']}\n      {r['signature'][:200]}")
        if len(bad) > 40:
            print(f"  ... and {len(bad) - 40} more in {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
