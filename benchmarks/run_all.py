"""Run the pretraining run, then every kernel benchmark, then draw the plots: what `make bench` calls.

    python benchmarks/run_all.py [--out DIR] [--quick | --full | --smoke] [--headline] [--warmup] [--timeout S]
                                 [--skip OP]... [OP ...] [--pretrain-args "ARGS"]

First ``pretrain`` (benchmarks/pretrain.py, the same code as ``python -m lowrank_kernels.pretrain``):
``--size tiny --peers`` with every method, a few minutes on a CPU, into
DIR/<gpu>/pretrain/ (summary.json, one CSV per run, loss.png, memory.png); ``--pretrain-args``
adds options to it (e.g. "--steps 600"), ``--skip pretrain`` leaves it out. Then the kernel
benchmarks.

Contract for a benchmark script, benchmarks/bench_<op>.py (found by that name pattern):
- it runs as a script (``python benchmarks/bench_<op>.py``) and imports ``_common`` for timing,
  floors and CSV rows (see benchmarks/_common.py), so its rows follow the README's format (Benchmarks);
- it accepts ``--out DIR`` (results root; rows go to DIR/<gpu>/<op>.csv) and ``--quick`` (a few
  shapes, the op's target shape first), ``--full`` (the op's whole grid) and ``--smoke`` (tiny
  shapes, the shortest timings, every row family), through ``_common.bench_parser``; with none it
  runs its default set;
- it picks GPU or CPU shapes itself (small fp32 shapes on a machine without a GPU) and skips,
  with a printed note, providers that cannot run here;
- it exits non-zero if any row failed, after measuring the rest.

Each script runs in its own process (a crash or a hang in one cannot take the others down) under
a time limit; without a GPU every script gets --quick, so `make bench` stays short on the CPU.
A failing or timed-out script is reported and makes the exit status 1; the others still run.

Then plot.py draws the plots (when a benchmark ran), and every stage's files are checked: the pretraining run's
summary.json, one CSV per method (columns ``PRETRAIN_COLUMNS``), loss.png and memory.png; each
benchmark's rows of this run in DIR/<gpu>/<op>.csv (the columns of _common.COLUMNS, one of its
modes, a positive median) with its floors in floors.csv, and its plot. A missing or malformed file
makes the exit status 1.

``--headline``: the four headline rows alone (``HEADLINE_OPS``, no pretraining run unless named),
each script with --headline: its target shape, one mode, against the base and the peer.
``--warmup``: time nothing; the chosen scripts run at once, each with --warmup (records the Triton
kernels its rows launch and compiles them on every core into Triton's cache, where a timed run
then finds them); no plot and no file checks. benchmarks/gpu_suite.sh runs ``--headline --warmup``
then ``--headline``.

``--smoke`` (`make bench-smoke`, run by CI) runs the same stages on tiny settings: the pretraining
run at toy size for 2 steps (``SMOKE_PRETRAIN``), each benchmark with --smoke (tiny shapes, the
shortest timings), into a fresh temporary folder unless --out is given (the committed results stay
untouched; the folder is removed when every check passes). It proves in a few minutes on a CPU
that `make bench` works end to end; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import COLUMNS, FLOOR_COLUMNS, MODES, RESULTS_DIR, csv_header, device_dir_name, progress, read_csv

HERE = Path(__file__).resolve().parent


PRETRAIN = "pretrain"
# --headline: the four rows a GPU run must return first (each script's --headline row).
HEADLINE_OPS = ("lora", "random_basis", "sparse_lowrank", "projected_step")
# The columns of the pretraining run's per-method CSVs (lowrank_kernels/pretrain.py writes them).
PRETRAIN_COLUMNS = ("step", "train_loss", "val_loss", "tokens_per_s", "elapsed")
# --smoke: the pretraining run at toy size (a one-layer model, two steps), every method and peer.
SMOKE_PRETRAIN = ["--hidden", "32", "--intermediate", "64", "--layers", "1", "--heads", "2", "--seq", "16",
                  "--batch", "2", "--rank", "4", "--update-proj-gap", "2", "--steps", "2", "--eval-batches", "1",
                  "--quiet"]


def discover() -> dict[str, Path]:
    """The runs, in order: the pretraining run first, then benchmarks/bench_<op>.py by name."""
    benches = {p.stem.removeprefix("bench_"): p for p in sorted(HERE.glob("bench_*.py"))}
    return {PRETRAIN: HERE / "pretrain.py", **benches}


def command(name: str, script: Path, args, size_flag: list[str]) -> list[str]:
    if name == PRETRAIN:
        out = Path(args.out) / device_dir_name() / PRETRAIN
        return [sys.executable, str(script), "--size", "tiny", "--peers", "--out", str(out),
                *(SMOKE_PRETRAIN if args.smoke else []), *shlex.split(args.pretrain_args)]
    return [sys.executable, str(script), "--out", str(args.out), *size_flag,
            *(["--headline"] if args.headline else []), *(["--warmup"] if args.warmup else [])]


def _positive(values) -> bool:
    """Whether there are values and each is a positive number (CSV strings)."""
    try:
        floats = [float(v) for v in values]
    except ValueError:
        return False
    return bool(floats) and all(v > 0 for v in floats)


def check_pretrain(folder: Path) -> list[str]:
    """What is missing or malformed in a pretraining run's folder (empty: nothing)."""
    try:
        summary = json.loads((folder / "summary.json").read_text())
        methods = summary["methods"]
    except (OSError, ValueError, KeyError) as err:
        return [f"pretrain: no readable summary.json with 'methods' in {folder} ({type(err).__name__}: {err})"]
    problems = [f"pretrain: {folder / png} missing or empty" for png in ("loss.png", "memory.png")
                if not (folder / png).is_file() or (folder / png).stat().st_size == 0]
    for name, rec in methods.items():
        path = folder / rec.get("csv", f"{name}.csv")
        if not path.is_file():
            problems.append(f"pretrain: {name}: {path} missing")
        elif csv_header(path) != PRETRAIN_COLUMNS:
            problems.append(f"pretrain: {path} has columns {csv_header(path)}, expected {PRETRAIN_COLUMNS}")
        elif not _positive(r["train_loss"] for r in read_csv(path)):
            problems.append(f"pretrain: {path} has no rows, or a train_loss that is not a positive number")
    return problems


def check_benchmark(device_dir: Path, op: str, since: str) -> list[str]:
    """What is missing or malformed in the rows benchmark ``op`` wrote at or after ``since`` (an
    ISO timestamp, UTC, as the rows carry it), its floors and its plot (empty: nothing)."""
    path = device_dir / f"{op}.csv"
    if not path.is_file():
        return [f"{op}: {path} missing"]
    if csv_header(path) != COLUMNS:
        return [f"{op}: {path} has columns {csv_header(path)}, expected {COLUMNS}"]
    rows = [r for r in read_csv(path) if r["timestamp"] >= since]
    if not rows:
        return [f"{op}: no row of this run in {path}"]
    problems = []
    for r in rows:
        if not (r["op"] == op and r["mode"] in MODES and r["provider"] and _positive([r["median_ms"]])):
            problems.append(f"{op}: malformed row in {path}: {r}")
            break
    floors = device_dir / "floors.csv"
    if not floors.is_file() or csv_header(floors) != FLOOR_COLUMNS:
        problems.append(f"{op}: {floors} missing or without the columns {FLOOR_COLUMNS}")
    elif not any(f["op"] == op and f["timestamp"] >= since for f in read_csv(floors)):
        problems.append(f"{op}: no floor rates of this run in {floors}")
    png = path.with_suffix(".png")
    if not png.is_file() or png.stat().st_mtime < datetime.datetime.fromisoformat(since).timestamp():
        problems.append(f"{op}: {png} not drawn by this run")
    return problems


def warm_up(chosen: list[str], scripts: dict, args, size_flag: list[str]) -> int:
    """--warmup: every chosen script at once with --warmup (each compiles on every core; the
    recording is cheap, so the compiles of all of them overlap). 1 if one failed or timed out."""
    t0 = time.monotonic()
    procs = {}
    for op in chosen:
        cmd = command(op, scripts[op], args, size_flag)
        print(f"=== {op}: {' '.join(cmd)}", flush=True)
        procs[op] = subprocess.Popen(cmd)
    results = []
    for op, proc in procs.items():
        left = None if args.timeout is None else max(1.0, args.timeout - (time.monotonic() - t0))
        try:
            rc = proc.wait(timeout=left)
            status = "ok" if rc == 0 else f"FAILED (exit {rc})"
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            status = f"TIMEOUT after {args.timeout:.0f} s (what compiled is cached)"
        results.append((op, status, time.monotonic() - t0))
    print("\nrun_all --warmup summary")
    for name, status, secs in results:
        print(f"  {name:<20} {secs:7.1f} s  {status}")
    ok = all(status == "ok" for _, status, _ in results)
    print(f"run_all --warmup: {'every run compiled its kernels' if ok else 'FAILED'}")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ops", nargs="*",
                    help="runs: 'pretrain' and ops (default: pretrain, then every benchmarks/bench_<op>.py)")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"results root passed to each script (default {RESULTS_DIR}; "
                         "with --smoke a new temporary folder)")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="each script's few GPU shapes, target first "
                                                           "(always on a machine without a GPU)")
    size.add_argument("--full", action="store_true", help="each script's whole GPU shape grid")
    size.add_argument("--smoke", action="store_true",
                      help="every stage on tiny settings into a temporary folder (unless --out), then the checks: "
                           "proves that `make bench` works, in minutes on a CPU (CI runs it)")
    ap.add_argument("--headline", action="store_true",
                    help=f"the headline rows alone: {', '.join(HEADLINE_OPS)} (default runs) with --headline")
    ap.add_argument("--warmup", action="store_true",
                    help="compile the Triton kernels the runs would launch, all runs at once on every core, "
                         "timing nothing (no plot, no file checks)")
    ap.add_argument("--skip", action="append", default=[], metavar="OP", help="leave this op out (repeatable)")
    ap.add_argument("--timeout", type=float, default=None, metavar="S", help="time limit per script, seconds")
    ap.add_argument("--pretrain-args", default="", metavar="ARGS",
                    help="extra options for the pretraining run, one quoted string (e.g. \"--steps 600\")")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)

    scripts = discover()
    unknown = [op for op in args.ops + args.skip if op not in scripts]
    if unknown:
        ap.error(f"no benchmarks/bench_<op>.py for {unknown}; found {sorted(scripts)}")
    chosen = [op for op in (args.ops or (HEADLINE_OPS if args.headline else scripts)) if op not in args.skip]
    if args.warmup and PRETRAIN in chosen:
        if args.ops:
            ap.error("--warmup compiles the benchmarks' kernels; the pretraining run has its own --warmup")
        chosen.remove(PRETRAIN)
    temporary = args.smoke and args.out is None
    if temporary:
        args.out = Path(tempfile.mkdtemp(prefix="lowrank_kernels_bench_smoke_"))
    elif args.out is None:
        args.out = RESULTS_DIR
    if args.smoke:
        size_flag = ["--smoke"]
        print(f"run_all --smoke: every stage on tiny settings into {args.out}; the numbers mean nothing")
    else:
        size_flag = ["--full"] if args.full else ["--quick"] if args.quick or not torch.cuda.is_available() else []
        if not torch.cuda.is_available():
            print("run_all: no GPU; every benchmark runs its small CPU shapes (--quick), timings labelled cpu")

    # Rows carry their script's start time, to the second: rows and plots of this run are at or after it.
    since = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    if args.warmup:
        return warm_up(chosen, scripts, args, size_flag)
    results = []
    for op in progress(chosen, desc="benchmarks"):
        cmd = command(op, scripts[op], args, size_flag)
        print(f"\n=== {op}: {' '.join(cmd)}", flush=True)
        t0 = time.monotonic()
        try:
            rc = subprocess.run(cmd, timeout=args.timeout).returncode
            status = "ok" if rc == 0 else f"FAILED (exit {rc})"
        except subprocess.TimeoutExpired:
            status = f"TIMEOUT after {args.timeout:.0f} s (rows measured so far are kept)"
        results.append((op, status, time.monotonic() - t0))

    if any(op != PRETRAIN for op in chosen):  # the pretraining run draws its own plots
        t0 = time.monotonic()
        rc = subprocess.run([sys.executable, str(HERE / "plot.py"), str(args.out)]).returncode
        results.append(("plot", "ok" if rc == 0 else f"FAILED (exit {rc})", time.monotonic() - t0))

    device_dir = Path(args.out) / device_dir_name()
    problems = [p for op in chosen
                for p in (check_pretrain(device_dir / PRETRAIN) if op == PRETRAIN
                          else check_benchmark(device_dir, op, since))]
    print("\nrun_all summary")
    for name, status, secs in results:
        print(f"  {name:<20} {secs:7.1f} s  {status}")
    for p in problems:
        print(f"  CHECK FAILED: {p}")
    ok = not problems and all(status == "ok" for _, status, _ in results)
    print(f"run_all: {'every stage ran and wrote its files' if ok else 'FAILED'} ({args.out})")
    if ok and temporary:
        shutil.rmtree(args.out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
