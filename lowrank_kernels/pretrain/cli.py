"""The pretraining run's command line, ``python -m lowrank_kernels.pretrain`` (the run, its options
and outputs: the package docstring): the options, their checks and defaults, and ``main``."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from lowrank_kernels import backend
from lowrank_kernels.pretrain.data import HELD_OUT, stdlib_corpus
from lowrank_kernels.pretrain.methods import DEFAULT_LR, METHODS, PEERS, SIZES
from lowrank_kernels.pretrain.report import compare, plot, source_commit, summarize, table
from lowrank_kernels.pretrain.train import train_methods


def _split(values, cast=str) -> list:
    out = []
    for v in values or []:
        out += [cast(x) for x in str(v).split(",") if x]
    return out


def parser() -> argparse.ArgumentParser:
    # The epilog: the package docstring's list of methods.
    doc = sys.modules[__package__].__doc__
    ap = argparse.ArgumentParser(
        prog="python -m lowrank_kernels.pretrain",
        description="Pretrain a LLaMA-style model on the standard library's bytes with each method "
                    "(adamw, galore, fira, lowrank, sltrain, lora) and report held-out loss, tokens/s and memory.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="methods:\n" + "\n".join(
            doc.split("Methods:\n", 1)[1].split("\n\nEvery run", 1)[0].splitlines()))
    ap.add_argument("--method", action="append", metavar="M",
                    help=f"method(s), repeatable or comma-separated: {', '.join(METHODS)}, or 'all' "
                         f"(default: all); with --peers also {', '.join(PEERS)}")
    ap.add_argument("--peers", action="store_true",
                    help="add galore-torch and fira-pkg (the galore_torch and fira packages' optimizers) "
                         "where installed")
    ap.add_argument("--size", choices=list(SIZES), default="tiny", help="model shape and defaults (default tiny)")
    ap.add_argument("--hidden", type=int, help="override the size's hidden width")
    ap.add_argument("--layers", type=int, help="override the number of decoder layers")
    ap.add_argument("--heads", type=int, help="override the number of attention heads")
    ap.add_argument("--intermediate", type=int, help="override the MLP width")
    ap.add_argument("--steps", type=int, help="optimizer steps per run (default per size: tiny 200, 60m/130m 300)")
    ap.add_argument("--lr", action="append", metavar="LR",
                    help="learning rate, repeatable or comma-separated for a sweep (the best held-out loss per "
                         f"method is reported); default per method: {DEFAULT_LR}")
    ap.add_argument("--batch", type=int, help="sequences per step (default per size)")
    ap.add_argument("--seq", type=int, help="tokens per sequence (default per size)")
    ap.add_argument("--seed", type=int, default=0, help="initialisation and training-batch seed (default 0)")
    ap.add_argument("--rank", type=int, help="rank of every method (default per size: 32 / 128 / 256)")
    ap.add_argument("--update-proj-gap", type=int, help="GaLore/Fira projector refresh interval (default per size)")
    ap.add_argument("--scale", type=float, help="GaLore's scale and Fira's alpha (default 0.25)")
    ap.add_argument("--proj-type", default="std", choices=["std", "reverse_std", "left", "right"])
    ap.add_argument("--refresh", default="svd", choices=["svd", "randomized", "dct"],
                    help="how our GaLore/Fira refresh the projector (the peers always use svd)")
    ap.add_argument("--per-layer", action="store_true",
                    help="our GaLore/Fira step each parameter inside backward (clipping becomes per parameter)")
    ap.add_argument("--alpha", type=float, default=None,
                    help="scaling numerator of the layer methods (default: each method's own)")
    ap.add_argument("--density", type=float, default=0.03, help="sltrain's sparse density (default 0.03)")
    ap.add_argument("--support", default="uniform", choices=["uniform", "block"], help="sltrain's support")
    ap.add_argument("--lowrank-rank", type=int, default=None,
                    help="lowrank's rank (default: per layer, sltrain's parameter count at --rank and --density)")
    ap.add_argument("--lowrank-init", choices=["svd", "random"], default="svd",
                    help="lowrank's start: 'svd' (default), the top-rank SVD of the model's dense initial weight; "
                         "'random', the method's random factors (s·B·A with nn.Linear's init variance)")
    ap.add_argument("--init-from", type=Path, help="checkpoint (a state_dict of the adamw model) that lora fine-tunes")
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping (0: none)")
    ap.add_argument("--eval-every", type=int, help="held-out evaluation interval in steps (default steps // 5)")
    ap.add_argument("--eval-batches", type=int, default=20, help="held-out batches per evaluation (default 20)")
    ap.add_argument("--backend", choices=["reference", "triton", "cuda"], default=None,
                    help="the package's kernels (default: per device; triton on the CPU runs under the interpreter)")
    ap.add_argument("--compile", action="store_true", help="torch.compile(model) for every method")
    ap.add_argument("--compile-backend", default="inductor",
                    help="torch.compile's backend with --compile (default inductor; aot_eager traces without codegen)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for torch (default 1: on a shared machine more threads than free cores "
                         "run many times slower)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                    help="model dtype (default: bf16 on a GPU, fp32 on the CPU)")
    ap.add_argument("--out", type=Path, default=Path("pretrain_results"),
                    help="output folder (default ./pretrain_results)")
    ap.add_argument("--compare", type=Path, metavar="DIR", help="compare the curves with another run's folder")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--warmup", action="store_true",
                    help="before each run's first step, compile its Triton kernels in parallel on every core "
                         "(lowrank_kernels.warmup; on a GPU) and print the compile seconds saved")
    return ap


def resolve_args(argv=None) -> argparse.Namespace:
    ap = parser()
    args = ap.parse_args(argv)
    size = SIZES[args.size]
    for key, default in size.items():
        if getattr(args, key) is None:
            setattr(args, key, default)
    methods = _split(args.method) or ["all"]
    if "all" in methods:
        methods = [m for m in methods if m != "all"] + [m for m in METHODS if m not in methods]
    if args.peers:
        for peer, module in PEERS.items():
            try:
                __import__(module)
            except ImportError:
                print(f"--peers: {module} is not installed; {peer} left out")
                continue
            if peer not in methods:
                methods.append(peer)
    bad = [m for m in methods if m not in METHODS and m not in PEERS]
    if bad:
        ap.error(f"unknown method(s) {bad}; choose from {list(METHODS) + list(PEERS)}")
    # adamw first: lora fine-tunes its checkpoint.
    args.methods = sorted(dict.fromkeys(methods), key=lambda m: (m != "adamw", m == "lora"))
    try:
        args.lrs = _split(args.lr, float)
    except ValueError as err:
        ap.error(f"--lr: {err}")
    for key in ("steps", "batch", "seq", "rank", "update_proj_gap", "hidden", "intermediate", "layers", "heads",
                "eval_batches", "threads"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            ap.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.hidden % args.heads:
        ap.error(f"--hidden {args.hidden} is not a multiple of --heads {args.heads}")
    if args.rank > min(args.hidden, args.intermediate):
        ap.error(f"--rank {args.rank} exceeds the smallest projection dimension {min(args.hidden, args.intermediate)}")
    if not 0 < args.density < 1:
        ap.error(f"--density must be in (0, 1), got {args.density}")
    if any(lr <= 0 or not math.isfinite(lr) for lr in args.lrs):
        ap.error(f"--lr values must be positive, got {args.lrs}")
    args.eval_every = args.eval_every or max(1, args.steps // 5)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.dtype is None:
        args.dtype = "bf16" if torch.device(args.device).type == "cuda" else "fp32"
    if args.init_from is not None and not args.init_from.is_file():
        ap.error(f"--init-from {args.init_from}: no such file")
    return args


def main(argv=None) -> int:
    """Run the methods and write the outputs (see the module docstring). ``argv=None`` reads the
    command line; then ``--backend triton`` on the CPU restarts the process with the Triton
    interpreter on. Returns the exit status."""
    args = resolve_args(argv)
    device = torch.device(args.device)
    if args.backend == "triton" and device.type == "cpu" and not backend.interpreter_enabled():
        if argv is None and getattr(sys, "orig_argv", None):
            print("--backend triton on the CPU: restarting with TRITON_INTERPRET=1 (the Triton interpreter)",
                  flush=True)
            sys.stdout.flush()
            os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, "TRITON_INTERPRET": "1"})
        raise SystemExit("--backend triton on CPU tensors needs the Triton interpreter, switched on before triton "
                         "is imported: run with TRITON_INTERPRET=1 in the environment")
    if args.backend == "cuda" and device.type != "cuda":
        raise SystemExit("--backend cuda needs a CUDA device (--device cuda)")
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads or (1 if device.type == "cpu" else threads_before))
    try:
        return _run(args, argv, device)
    finally:
        torch.set_num_threads(threads_before)


def _run(args, argv, device) -> int:
    commit = source_commit()  # now: the code this run imported, not what the checkout holds when it ends
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    corpus, data_info = stdlib_corpus()
    split = data_info["train_bytes"]
    data = {"train": corpus[:split], "val": corpus[split:]}
    print(f"data: {data_info['bytes']} bytes from {data_info['files']} files, {data_info['source']}; "
          f"last {HELD_OUT:.0%} ({data_info['held_out_bytes']} bytes) held out", flush=True)
    print(f"model: LLaMA {args.size} (hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
          f"{args.heads} heads), {args.steps} steps of {args.batch}x{args.seq} tokens, {args.dtype} on {device}"
          f"{f' ({torch.get_num_threads()} threads)' if device.type == 'cpu' else ''}"
          f"{', compiled' if args.compile else ''}; backend {args.backend or 'default'}; "
          f"methods {', '.join(args.methods)}", flush=True)

    t_all = time.perf_counter()
    runs, best = train_methods(args, data, device, dtype, out)
    elapsed = time.perf_counter() - t_all

    summary = summarize(args, argv, device, commit, elapsed, data_info, runs, best)
    if args.compare is not None:
        summary["compare"] = dict(dir=str(args.compare), methods=compare(summary, out, args.compare))
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    plots = plot(summary, out)
    print(f"\n{args.size} LLaMA, {args.steps} steps, {summary['device']}, commit {summary['commit']}, "
          f"{elapsed:.0f} s in all")
    print(table(summary))
    print(f"wrote {out / 'summary.json'}, {len(runs)} CSVs" + "".join(f", {p.name}" for p in plots))
    return 0
