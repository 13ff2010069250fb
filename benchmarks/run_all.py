"""Run the pretraining run, then every kernel benchmark, then draw the plots: what `make bench` calls.

    python benchmarks/run_all.py [--out DIR] [--quick | --full] [--timeout S] [--skip OP]... [OP ...]
                                 [--pretrain-args "ARGS"]

First ``pretrain`` (benchmarks/pretrain.py, the same code as ``python -m lowrank_kernels.pretrain``):
``--size tiny --peers`` with every method, a few minutes on a CPU, into
DIR/<gpu>/pretrain/ (summary.json, one CSV per run, loss.png, memory.png); ``--pretrain-args``
adds options to it (e.g. "--steps 600"), ``--skip pretrain`` leaves it out. Then the kernel
benchmarks.

Contract for a benchmark script, benchmarks/bench_<op>.py (found by that name pattern):
- it runs as a script (``python benchmarks/bench_<op>.py``) and imports ``_common`` for timing,
  floors and CSV rows (see benchmarks/_common.py), so its rows follow DESIGN.md's format;
- it accepts ``--out DIR`` (results root; rows go to DIR/<gpu>/<op>.csv) and ``--quick`` (a few
  shapes, the op's target shape first) and ``--full`` (the op's whole grid), through
  ``_common.parse_args``; with neither it runs its default set;
- it picks GPU or CPU shapes itself (small fp32 shapes on a machine without a GPU) and skips,
  with a printed note, providers that cannot run here;
- it exits non-zero if any row failed, after measuring the rest.

Each script runs in its own process (a crash or a hang in one cannot take the others down) under
a time limit; without a GPU every script gets --quick, so `make bench` stays short on the CPU.
A failing or timed-out script is reported and makes the exit status 1; the others still run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch
import shlex

from _common import RESULTS_DIR, device_dir_name, progress

HERE = Path(__file__).resolve().parent


PRETRAIN = "pretrain"


def discover() -> dict[str, Path]:
    """The runs, in order: the pretraining run first, then benchmarks/bench_<op>.py by name."""
    return {PRETRAIN: HERE / "pretrain.py", **{p.stem.removeprefix("bench_"): p for p in sorted(HERE.glob("bench_*.py"))}}


def command(name: str, script: Path, args, size_flag: list[str]) -> list[str]:
    if name == PRETRAIN:
        out = Path(args.out) / device_dir_name() / PRETRAIN
        return [sys.executable, str(script), "--size", "tiny", "--peers", "--out", str(out),
                *shlex.split(args.pretrain_args)]
    return [sys.executable, str(script), "--out", str(args.out), *size_flag]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ops", nargs="*", help="runs: 'pretrain' and ops (default: pretrain, then every benchmarks/bench_<op>.py)")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR, help="results root passed to each script")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="each script's few GPU shapes, target first "
                                                           "(always on a machine without a GPU)")
    size.add_argument("--full", action="store_true", help="each script's whole GPU shape grid")
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
    chosen = [op for op in (args.ops or scripts) if op not in args.skip]
    size_flag = ["--full"] if args.full else ["--quick"] if args.quick or not torch.cuda.is_available() else []
    if not torch.cuda.is_available():
        print("run_all: no GPU; every benchmark runs its small CPU shapes (--quick), timings labelled cpu")

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

    t0 = time.monotonic()
    rc = subprocess.run([sys.executable, str(HERE / "plot.py"), str(args.out)]).returncode
    results.append(("plot", "ok" if rc == 0 else f"FAILED (exit {rc})", time.monotonic() - t0))

    print("\nrun_all summary")
    for name, status, secs in results:
        print(f"  {name:<20} {secs:7.1f} s  {status}")
    return 0 if all(status == "ok" for _, status, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
