"""Shared plumbing for the benchmark scripts: timing, floors, CSV rows, the summary table.

A benchmark script (benchmarks/bench_<op>.py, run as a script so this module imports as
``_common``) does::

    from _common import Bench, parse_args, shape_str

    args = parse_args("LoRA linear")                  # --quick, --full, --out DIR
    bench = Bench("lora", out=args.out)
    shape = shape_str(M=8192, K=4096, N=4096, r=16)   # "M=8192;K=4096;N=4096;r=16"
    bench.run("base", "fwd", shape, torch.bfloat16, make_fn, flops=..., nbytes=...)
    bench.skip("cuda", "extension not built")
    sys.exit(bench.finish())                          # summary table; 1 if a row failed

``make_fn()`` builds fresh inputs and returns a zero-argument callable that runs the op once in
the given mode (see ``Bench.run``). Measure the ``base`` provider of each (mode, shape) first:
a row's ratio_to_base and extra_peak_bytes are computed against it when the row is written.

Rows are appended as they are measured (a run cut short keeps what it measured) to
``<out>/<gpu>/<op>.csv`` (default out: benchmarks/results; ``<gpu>``: torch.cuda.get_device_name()
with spaces as '-', or ``cpu``) with the columns the README gives (Benchmarks)
(``COLUMNS``). The run's measured matmul rate and copy bandwidth go to ``<out>/<gpu>/floors.csv``
(``FLOOR_COLUMNS``, same op and timestamp): a row's floor follows from its tflops and gbps
columns and those rates (``ratio_to_floor``), so plots show it without another CSV column.

Timing: on a GPU ``triton.testing.do_bench`` (median, p20, p80; it clears L2 before every timed
call) with input rotation when the inputs fit in L2; on the CPU ``torch.utils.benchmark`` with one
thread, labelled ``cpu``. Extra peak memory is a ``torch.cuda.max_memory_allocated`` delta on a
GPU and left empty on the CPU, where there is no equivalent counter.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import functools
import itertools
import math
import os
import sys
import sysconfig
import traceback
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch

# The compile option a Triton launch is cached under: the same as the tests' (tests/conftest.py),
# so that a warm-up, the tests and the benchmarks share one Triton cache (triton 3.9 warns when
# it is left unset).
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

COLUMNS = (
    "op", "provider", "mode", "shape", "dtype", "median_ms", "p20_ms", "p80_ms", "tflops", "gbps",
    "ratio_to_base", "extra_peak_bytes", "device", "torch", "triton", "commit", "timestamp",
)
FLOOR_COLUMNS = ("op", "dtype", "matmul_tflops", "copy_gbps", "device", "torch", "triton", "commit", "timestamp")
MODES = ("fwd", "bwd", "fwd+bwd", "step", "refresh")  # the order tables and plots use
REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"
# Benchmarks measure this checkout's package, whether or not (and wherever) it is installed; so
# bench scripts import this module before lowrank_kernels.
sys.path.insert(0, str(REPO))
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# GPU timing windows (ms of warm-up and of timed repeats, as do_bench takes them).
_WARMUP_MS, _REP_MS = 25, 100
# CPU timing: seconds per measurement; kept short because the CPU is shared.
_CPU_MIN_RUN_S = 0.4
# --smoke: the shortest windows that still time each callable (its numbers mean nothing).
_SMOKE_WARMUP_MS, _SMOKE_REP_MS, _SMOKE_CPU_MIN_RUN_S = 1, 5, 0.001


def bench_parser(description: str) -> argparse.ArgumentParser:
    """The options every bench script takes: --quick, --full, --smoke (exclusive) and --out DIR."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a few GPU shapes, the op's target shape first")
    size.add_argument("--full", action="store_true", help="the op's whole GPU shape grid")
    size.add_argument("--smoke", action="store_true",
                      help="tiny shapes and the shortest timings, every row family once: checks in seconds that "
                           "the script runs and writes its rows (the numbers mean nothing)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR,
                   help=f"results root; rows go to OUT/<gpu>/<op>.csv (default {RESULTS_DIR})")
    p.add_argument("--headline", action="store_true",
                   help="only the op's headline row: its target shape (with --smoke: the tiny shape), the headline "
                        "mode and row family, against the base and the peer")
    p.add_argument("--warmup", action="store_true",
                   help="time nothing: record every Triton kernel the chosen rows launch and compile them into "
                        "Triton's cache on every core, for a timed run to reuse (without a GPU: for sm_90a)")
    return p


def parse_args(description: str, argv=None) -> argparse.Namespace:
    """``bench_parser(description)``'s arguments, parsed."""
    return bench_parser(description).parse_args(argv)


def progress(iterable, desc: str, total: Optional[int] = None):
    """``iterable`` with a tqdm progress bar on stderr (tqdm is in the bench extra); the plain
    iterable where tqdm is not installed."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, total=total, file=sys.stderr, dynamic_ncols=True)


def shape_str(**dims) -> str:
    """``shape_str(M=8192, K=4096, method="vera")`` -> ``"M=8192;K=4096;method=vera"`` (order kept)."""
    return ";".join(f"{k}={v}" for k, v in dims.items())


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def device_dir_name() -> str:
    """The results sub-folder for this machine: the GPU's name with spaces as '-', or 'cpu'."""
    return torch.cuda.get_device_name().replace(" ", "-") if torch.cuda.is_available() else "cpu"


class Timing(NamedTuple):
    median_ms: float
    p20_ms: float
    p80_ms: float
    peak_bytes: Optional[int]  # peak allocation during one call, over what was allocated before; None on CPU


@functools.lru_cache(maxsize=1)
def _versions() -> tuple[str, str, str]:
    """(torch, triton, commit). The commit gets '+dirty' when tracked files differ from it; where
    there is no git checkout (a copied tree on a device machine) LOWRANK_KERNELS_COMMIT names it."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""

    from lowrank_kernels.pretrain import source_commit

    return torch.__version__, triton_version, source_commit()


def _time_gpu(fns: list[Callable[[], object]], smoke: bool = False) -> tuple[float, float, float]:
    import triton.testing

    calls = itertools.cycle(fns)
    warmup, rep = (_SMOKE_WARMUP_MS, _SMOKE_REP_MS) if smoke else (_WARMUP_MS, _REP_MS)
    med, p20, p80 = triton.testing.do_bench(lambda: next(calls)(), warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
    return med, p20, p80


def _time_cpu(fn: Callable[[], object], smoke: bool = False) -> tuple[float, float, float]:
    from torch.utils import benchmark

    min_run_time = _SMOKE_CPU_MIN_RUN_S if smoke else _CPU_MIN_RUN_S
    m = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=1).blocked_autorange(min_run_time=min_run_time)
    med, p20, p80 = np.quantile(np.asarray(m.times) * 1e3, [0.5, 0.2, 0.8])
    return float(med), float(p20), float(p80)


@functools.lru_cache(maxsize=None)
def device_rates(dtype: torch.dtype, smoke: bool = False) -> tuple[float, float]:
    """(matmul FLOP/s in ``dtype``, copy bytes/s) measured on this device, once per process.

    GPU: an 8192³ product through torch (cuBLAS) and a 1 GiB device-to-device copy counted as
    bytes read plus written. CPU: a 1024³ product and a 32 MiB copy, on one thread like the rows.
    Random data, never zeros (a product of zeros can run faster than real data). The rates come
    from the 20th-percentile times: a ceiling is what the device reaches, and on a shared CPU the
    median would fold other processes' load into the floor. ``smoke``: a 256³ product and a
    256 KiB copy in the shortest windows (--smoke runs, whose numbers mean nothing).
    """
    gpu = torch.cuda.is_available()
    dev = "cuda" if gpu else "cpu"
    n = 256 if smoke else 8192 if gpu else 1024
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    src = torch.randn((1 << 16) if smoke else (1 << 28) if gpu else (1 << 23), device=dev)
    dst = torch.empty_like(src)
    time = (lambda fn: _time_gpu([fn], smoke)[1]) if gpu else (lambda fn: _time_cpu(fn, smoke)[1])
    mm_ms = time(lambda: torch.mm(a, b))
    copy_ms = time(lambda: dst.copy_(src))
    return 2 * n**3 / (mm_ms * 1e-3), 2 * src.numel() * src.element_size() / (copy_ms * 1e-3)


def floor_ms(flops: float, nbytes: float, dtype: Optional[torch.dtype] = None, smoke: bool = False) -> float:
    """max(flops / matmul rate, bytes / copy bandwidth) in ms, with this device's measured rates
    (for ``dtype``; default bf16 on a GPU, fp32 on the CPU; ``smoke``: device_rates' smoke rates)."""
    if dtype is None:
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    rate, bw = device_rates(dtype, smoke)
    return max(flops / rate, nbytes / bw) * 1e3


def ratio_to_floor(row: dict, matmul_tflops: float, copy_gbps: float) -> float:
    """median / floor for a CSV row, given its run's rates (floors.csv). The row's flops and bytes
    are its tflops and gbps times its median, so the ratio is 1 / max(tflops / rate, gbps / bw)."""
    return 1.0 / max(float(row["tflops"]) / matmul_tflops, float(row["gbps"]) / copy_gbps)


def _fmt(v) -> str:
    return "" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v))


class Bench:
    """One run of one op's benchmark: ``run()`` measures and appends rows, ``finish()`` summarises.
    ``smoke`` (a --smoke run): the shortest timing windows, and ``device_cases`` gives the tiny cases."""

    def __init__(self, op: str, out: Path = RESULTS_DIR, smoke: bool = False, warmup: bool = False):
        self.op = op
        self.smoke = smoke
        # --warmup: run() records the Triton launches of the "triton" rows, finish() compiles them.
        self.recorder = None
        if warmup:
            from lowrank_kernels.warmup import Recorder

            self.recorder = Recorder(None if torch.cuda.is_available() else 90)
        self.on_gpu = torch.cuda.is_available()
        self.device = torch.cuda.get_device_name() if self.on_gpu else "cpu"
        self.out_dir = Path(out) / device_dir_name()
        self.timestamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.rows: list[dict] = []
        self.failures: list[str] = []
        self._floors_written: set[torch.dtype] = set()
        self._l2_bytes = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20) if self.on_gpu else 0
        how = "triton.testing.do_bench" if self.on_gpu else "torch.utils.benchmark, 1 thread, labelled cpu"
        print(f"[{op}] device: {self.device} ({how}); results -> {self.out_dir / (op + '.csv')}", flush=True)

    def _copies(self, nbytes: float) -> int:
        """Input sets to rotate through: enough to cover L2 four times when one set fits in it."""
        if not self.on_gpu or nbytes >= self._l2_bytes:
            return 1
        return min(8, math.ceil(4 * self._l2_bytes / max(nbytes, 1)))

    def measure(self, make_fn: Callable[[], Callable[[], object]], nbytes: float = 0) -> Timing:
        """Time the callables ``make_fn()`` returns (see the module docstring)."""
        if not self.on_gpu:
            fn = make_fn()
            fn()  # warm-up: first-call allocations and lazy imports stay out of the numbers
            return Timing(*_time_cpu(fn, self.smoke), peak_bytes=None)
        fns = [make_fn() for _ in range(self._copies(nbytes))]
        fns[0]()  # compile / autotune before the memory probe, so tuning buffers don't count
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fns[0]()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        return Timing(*_time_gpu(fns, self.smoke), peak_bytes=peak)

    def _base_of(self, row: dict) -> Optional[dict]:
        for r in self.rows:
            same_case = (r["mode"], r["shape"], r["dtype"]) == (row["mode"], row["shape"], row["dtype"])
            if r["provider"] == "base" and same_case:
                return r
        return None

    def run(self, provider: str, mode: str, shape: str, dtype: torch.dtype,
            make_fn: Callable[[], Callable[[], object]], flops: float, nbytes: float) -> Optional[dict]:
        """Measure one (provider, mode, shape) row, append it to the CSV and print it.

        ``flops`` and ``nbytes`` are what this provider must do at least (each input read once,
        each output written once): they give TFLOP/s, GB/s and the floor. The callable runs one
        step of ``mode`` (fwd: the forward as the caller would run it, under no_grad for
        inference; bwd: the backward of a forward done in ``make_fn``; fwd+bwd: both) and must not
        accumulate into ``.grad`` (use torch.autograd.grad). Rows are written one by one, so a
        run cut short by a time limit keeps what it measured; ratio_to_base and extra_peak_bytes
        need the base of the same mode and shape measured earlier in the run. A failure is
        printed and counted, and the run goes on; it makes ``finish()`` return 1.
        """
        if self.recorder is not None:
            return self._record(provider, mode, shape, make_fn)
        try:
            t = self.measure(make_fn, nbytes)
            floor = floor_ms(flops, nbytes, dtype, self.smoke)
        except Exception as e:  # one broken provider must not hide the others' rows
            self.failures.append(f"{provider} {mode} {shape}: {type(e).__name__}: {e}")
            print(f"[{self.op}] FAILED {provider:<10} {mode:<8} {shape}: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc()
            if self.on_gpu:
                torch.cuda.empty_cache()
            return None
        torch_v, triton_v, commit = _versions()
        s = t.median_ms * 1e-3
        row = dict(
            op=self.op, provider=provider, mode=mode, shape=shape, dtype=dtype_name(dtype),
            median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms,
            tflops=flops / s / 1e12, gbps=nbytes / s / 1e9, ratio_to_base=None, extra_peak_bytes=None,
            device=self.device, torch=torch_v, triton=triton_v, commit=commit, timestamp=self.timestamp,
            _peak=t.peak_bytes, _floor_ms=floor,
        )
        base = row if provider == "base" else self._base_of(row)
        if base is not None:
            row["ratio_to_base"] = row["median_ms"] / base["median_ms"]
            if row["_peak"] is not None and base["_peak"] is not None:
                row["extra_peak_bytes"] = row["_peak"] - base["_peak"]
        self.rows.append(row)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if dtype not in self._floors_written:
            self._floors_written.add(dtype)
            rate, bw = device_rates(dtype, self.smoke)
            _append_csv(self.out_dir / "floors.csv", FLOOR_COLUMNS, [dict(
                op=self.op, dtype=dtype_name(dtype), matmul_tflops=rate / 1e12, copy_gbps=bw / 1e9,
                device=self.device, torch=torch_v, triton=triton_v, commit=commit, timestamp=self.timestamp)])
        _append_csv(self.out_dir / f"{self.op}.csv", COLUMNS, [row])
        print(f"[{self.op}] {self._line(row)}", flush=True)
        return row

    def _record(self, provider: str, mode: str, shape: str, make_fn: Callable[[], Callable[[], object]]) -> None:
        """--warmup: one call of a ``triton`` row with its Triton launches recorded, not run (the
        other providers launch no Triton kernel of the package; ``ours-auto`` times the same ones)."""
        if provider != "triton":
            return None
        self.recorder.scenario = f"{mode} {shape}"
        try:
            with self.recorder.active():
                make_fn()()
        except Exception as e:  # noqa: BLE001 - reported like a failed row
            self.failures.append(f"{provider} {mode} {shape}: {type(e).__name__}: {e}")
            print(f"[{self.op}] FAILED to record {mode} {shape}: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc()
        return None

    def _compile_recorded(self) -> int:
        """--warmup: compile the recorded launches that Triton's cache lacks, on every core."""
        from lowrank_kernels.warmup import compile_parallel, is_cached

        jobs = list(self.recorder.jobs.values())
        todo = [j for j in jobs if not is_cached(j, self.recorder.target)]
        processes = os.cpu_count() or 1
        t0 = datetime.datetime.now()
        results = compile_parallel(todo, self.recorder.target, processes)
        errors = [f"{todo[i].name}: {err}" for i, _, err in results if err is not None]
        wall = (datetime.datetime.now() - t0).total_seconds()
        serial = sum(secs for _, secs, _ in results)
        print(f"[{self.op}] warmup (sm_{self.recorder.target.arch}): {len(jobs)} compiles of "
              f"{len({j.name for j in jobs})} kernels, {len(jobs) - len(todo)} already cached, "
              f"{len(todo) - len(errors)} compiled on {processes} processes in {wall:.1f} s "
              f"({serial:.1f} s one after another)", flush=True)
        for e in errors + self.failures:
            print(f"FAILED: {e}")
        return 1 if errors or self.failures or not jobs else 0

    def skip(self, provider: str, reason: str) -> None:
        print(f"[{self.op}] skipping {provider}: {reason}", flush=True)

    def _print_auto_choices(self) -> None:
        """What the ``ours-auto`` rows ran: the backend auto mode kept per op and call key, and
        the candidates' times it measured (also in the package's cache, `python -m lowrank_kernels`)."""
        if not any(r["provider"] == AUTO_PROVIDER for r in self.rows):
            return
        from lowrank_kernels import auto_backend

        print(f"[{self.op}] {AUTO_PROVIDER} ran:")
        for r in auto_backend.records():
            timed = ", ".join(f"{b} {ms:.4g} ms" for b, ms in r["ms"].items()) or "the only candidate"
            print(f"  {r['op']:<22} {r['backend']:<10} {r['key']}  ({timed})")

    def _line(self, r: dict) -> str:
        xb = "" if r["ratio_to_base"] is None else f"{r['ratio_to_base']:.3f}"
        mem = "" if r["extra_peak_bytes"] is None else f"{r['extra_peak_bytes'] / 2**20:.1f}"
        return (
            f"{r['mode']:<8} {r['shape']:<32} {r['provider']:<10} {r['dtype']:<5} {r['median_ms']:>10.4f} "
            f"{r['p20_ms']:>9.4f}-{r['p80_ms']:<9.4f} {r['tflops']:>8.3g} {r['gbps']:>8.4g} "
            f"{r['_floor_ms']:>9.4f} {r['median_ms'] / r['_floor_ms']:>7.3f} {xb:>7} {mem:>9}"
        )

    def finish(self, report: Optional[Callable[[list], None]] = None) -> int:
        """Print the run's summary table (rows by mode, floors, failures), then, on a GPU, ``report``
        of the rows (a script's targets, stated for its GPU shapes).
        Returns 1 if any row failed (the bench script's exit status), else 0. --warmup: compiles
        what was recorded; 1 if a row or a compile failed, or nothing was recorded."""
        if self.recorder is not None:
            return self._compile_recorded()
        torch_v, triton_v, commit = _versions()
        print(f"\n== {self.op} on {self.device} (torch {torch_v}, triton {triton_v}, commit {commit}) ==")
        for dt in self._floors_written:
            rate, bw = device_rates(dt, self.smoke)
            print(f"   {dtype_name(dt)} floor rates: matmul {rate / 1e12:.3g} TFLOP/s, copy {bw / 1e9:.4g} GB/s")
        print(f"{'mode':<8} {'shape':<32} {'provider':<10} {'dtype':<5} {'median_ms':>10} {'p20-p80 ms':^19} "
              f"{'TFLOP/s':>8} {'GB/s':>8} {'floor_ms':>9} {'x floor':>7} {'x base':>7} {'extra MiB':>9}")
        for r in sorted(self.rows, key=lambda r: MODES.index(r["mode"]) if r["mode"] in MODES else len(MODES)):
            print(self._line(r))
        for f in self.failures:
            print(f"FAILED: {f}")
        self._print_auto_choices()
        print(f"[{self.op}] {len(self.rows)} rows appended to {self.out_dir / (self.op + '.csv')}", flush=True)
        if report is not None and self.on_gpu:
            report(self.rows)
        return 1 if self.failures else 0


def byte_corpus(limit: int) -> torch.Tensor:
    """Up to ``limit`` bytes (int64 values 0..255) of local text: the standard library's .py files
    in sorted path order, tests excluded. Byte-level training data that needs no download and is
    the same on every machine with the same Python."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        chunks.append(path.read_bytes())
        total += len(chunks[-1])
        if total >= limit:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8).long()


def device_cases(bench: "Bench", gpu_cases, cpu_cases, smoke_cases) -> tuple[str, torch.dtype, int, list]:
    """(device, dtype, element bytes, cases) of a run: bf16 and ``gpu_cases`` on a GPU; otherwise
    fp32 and the small ``cpu_cases``, saying so. A --smoke run (``bench.smoke``) takes the tiny
    ``smoke_cases`` instead, on either device."""
    if bench.smoke:
        print(f"[{bench.op}] --smoke: tiny shapes, shortest timings; the numbers mean nothing")
    if bench.on_gpu:
        return "cuda", torch.bfloat16, 2, list(smoke_cases if bench.smoke else gpu_cases)
    if not bench.smoke:
        print(f"[{bench.op}] no GPU: small fp32 shapes on the CPU (--quick/--full do not apply)")
    return "cpu", torch.float32, 4, list(smoke_cases if bench.smoke else cpu_cases)


def headline_cases(bench: "Bench", target, cases, keep: Callable[[tuple], bool] = lambda case: True) -> list:
    """--headline's cases: the op's ``target`` case on a GPU; otherwise (--smoke, or small CPU
    shapes) the first of ``cases`` (device_cases' list) that ``keep`` accepts."""
    if bench.on_gpu and not bench.smoke:
        return [target]
    return [c for c in cases if keep(c)][:1]


# The package's default on CUDA tensors (backend=None: "auto", the fastest backend per op and
# shape, timed on its first call): the row that says what a user gets without choosing a backend.
AUTO_PROVIDER = "ours-auto"


def backend_of(provider: str) -> Optional[str]:
    """The ``backend=`` argument of one of ``our_providers``: None (auto) for ``ours-auto``."""
    return None if provider == AUTO_PROVIDER else provider


def our_providers(bench: "Bench", cuda_kernels: bool = True) -> list[str]:
    """The package's providers that can be timed here: reference always; triton, cuda and
    ``ours-auto`` on a GPU (cuda where the op has CUDA kernels and the extension is built). Pass
    ``backend=backend_of(provider)`` to the op. Skips are noted on ``bench``."""
    from lowrank_kernels.backend import cuda_extension

    if bench.recorder is not None:
        return ["triton"]  # --warmup records the Triton rows alone (planned for sm_90a without a GPU)
    out = ["reference"]
    if not bench.on_gpu:
        bench.skip("triton", "no GPU: the Triton interpreter is not a performance path")
        bench.skip("cuda", "no GPU")
        return out
    out.append("triton")
    if not cuda_kernels:
        bench.skip("cuda", f"{bench.op} has no CUDA kernels")
    elif cuda_extension() is None:
        bench.skip("cuda", "the CUDA extension lowrank_kernels._C is not built")
    else:
        out.append("cuda")
    return out + [AUTO_PROVIDER]


def peer_available(bench: "Bench", provider: str, module: str) -> bool:
    """Whether a peer package imports; notes a skip on ``bench`` where it does not."""
    try:
        __import__(module)
    except ImportError:
        bench.skip(provider, f"{module} is not installed")
        return False
    return True


def mode_fn(mode: str, fwd: Callable[[], torch.Tensor], params: list, dy: torch.Tensor,
            inference: bool = False) -> Callable[[], object]:
    """The callable a row of ``mode`` times: the forward (``inference``: under torch.no_grad, as a
    model serves); the backward of one recorded forward (graph retained); or both. Gradients come
    back from autograd.grad, never accumulate in .grad."""
    if inference and mode != "fwd":
        raise ValueError(f"inference: only a fwd row runs under no_grad, got mode={mode!r}")
    if mode == "fwd":
        if not inference:
            return fwd

        def infer():
            with torch.no_grad():
                return fwd()
        return infer
    if mode == "bwd":
        y = fwd()
        return lambda: torch.autograd.grad(y, params, dy, retain_graph=True)
    return lambda: torch.autograd.grad(fwd(), params, dy)


def _append_csv(path: Path, columns, rows) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(columns)
        for r in rows:
            w.writerow([_fmt(r[c]) for c in columns])


def read_csv(path: Path) -> list[dict]:
    """Rows of a results CSV as dicts of strings (empty fields stay '')."""
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


def csv_header(path: Path) -> tuple:
    """The column names of a CSV file (its first row; () for an empty file)."""
    with Path(path).open(newline="") as f:
        return tuple(next(csv.reader(f), ()))
