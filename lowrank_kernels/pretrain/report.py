"""The pretraining run's outputs: the per-run CSV curves, summary.json, the plots (loss.png,
memory.png), the printed table, and the comparison with another run's folder."""

from __future__ import annotations

import csv
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from lowrank_kernels.pretrain.data import VOCAB
from lowrank_kernels.pretrain.methods import PEERS

# The columns of a run's CSV, one row per step (val_loss empty where it was not evaluated).
CURVE_COLUMNS = ["step", "train_loss", "val_loss", "tokens_per_s", "elapsed"]


def write_curve(path: Path, rows: list[dict]) -> None:
    """A run's rows (dicts with the keys of ``CURVE_COLUMNS``) as its CSV, floats to 6 digits."""
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CURVE_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def read_curve(path: Path) -> list[dict]:
    """A run's CSV as a list of dicts with floats (val_loss None where it was not evaluated)."""
    with Path(path).open(newline="") as f:
        return [{k: (float(v) if v != "" else None) for k, v in row.items()} for row in csv.DictReader(f)]



def source_commit() -> str:
    """The commit of the checkout this package was imported from (12 hex digits, '+dirty' when
    tracked files differ from it); where there is no git checkout (a copied tree on a device
    machine), LOWRANK_KERNELS_COMMIT, else 'unknown'."""
    root = Path(__file__).resolve().parents[2]

    def git(*a):
        return subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        if git("status", "--porcelain", "--untracked-files=no"):
            commit += "+dirty"
        return commit
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("LOWRANK_KERNELS_COMMIT", "unknown")


def device_name(device) -> str:
    """The GPU's name, or 'cpu'."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def summarize(args, argv, device, commit: str, seconds: float, data_info: dict, runs: list[dict],
              best: dict) -> dict:
    """summary.json's content: the device, versions and command; the data, model and settings; what
    the memory columns count; per method its best run (``best``) and every run (``runs``)."""
    device = torch.device(device)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("lr", "method")}
    return dict(
        device=device_name(device), commit=commit, torch=torch.__version__,
        triton=getattr(sys.modules.get("triton"), "__version__", ""),
        timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command="python -m lowrank_kernels.pretrain " + " ".join(sys.argv[1:] if argv is None else argv),
        seconds=seconds, data=data_info,
        model=dict(size=args.size, hidden=args.hidden, intermediate=args.intermediate, layers=args.layers,
                   heads=args.heads, vocab=VOCAB, seq=args.seq, batch=args.batch, dtype=args.dtype),
        settings=settings,
        memory_notes=dict(
            weight_bytes="parameters and buffers of the model",
            grad_bytes="most .grad bytes held at once during a backward",
            optimizer_bytes="tensors in the optimizer state",
            total_bytes="weight_bytes + grad_bytes + optimizer_bytes (activations not counted)",
            peak_bytes=("torch.cuda.max_memory_allocated over the run" if device.type == "cuda"
                        else "growth of the process's peak RSS over the run (VmHWM reset at its start)")),
        methods={m: best[m] for m in args.methods if m in best},
        runs=runs,
    )


def plot(summary: dict, out: Path) -> list[Path]:
    """loss.png (train loss, smoothed, and held-out loss per method) and memory.png (stacked
    weight / gradient / optimizer bytes per method, peak marked). Returns the files written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots")
        return []
    methods = summary["methods"]
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (name, rec) in enumerate(methods.items()):
        curve = read_curve(out / rec["csv"])
        color = f"C{i % 10}"
        steps = [r["step"] for r in curve]
        losses = [r["train_loss"] for r in curve]
        k = max(1, len(losses) // 30)
        windows = [losses[max(0, j - k + 1): j + 1] for j in range(len(losses))]
        smooth = [sum(w) / len(w) for w in windows]
        ax.plot(steps, smooth, color=color, alpha=0.35, lw=1)
        vals = [(r["step"], r["val_loss"]) for r in curve if r["val_loss"] is not None]
        # Peers dashed with open markers: where they match ours the two curves lie on each other.
        peer = name in PEERS
        ax.plot([s for s, _ in vals], [v for _, v in vals], "s--" if peer else "o-", color=color,
                ms=6 if peer else 3, mfc="none" if peer else color,
                label=f"{name} (lr {rec['lr']:g}): {rec['val_loss']:.3f}")
    finals = [rec["val_loss"] for rec in methods.values()]
    ax.set_ylim(min(finals) - 0.3, max(finals) + 1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per byte); faint: train, smoothed; dots: held-out")
    ax.set_title(f"{summary['model']['size']} LLaMA on stdlib bytes, {summary['device']}, commit {summary['commit']}",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths = [out / "loss.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    # Two panels: the counted tensors, and the measured peak (activations and allocator caches
    # included), which would dwarf the first on a shared axis.
    fig, (ax, ax_peak) = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    names = list(methods)
    mib = lambda v: (v or 0) / 2**20  # noqa: E731
    bottom = [0.0] * len(names)
    parts = (("weight_bytes", "weights"), ("grad_bytes", "gradients"), ("optimizer_bytes", "optimizer state"))
    for key, label in parts:
        vals = [mib(methods[n][key]) for n in names]
        ax.bar(names, vals, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("MiB")
    ax.set_title(f"weights, gradients, optimizer state (counted), {summary['device']}", fontsize=9)
    ax.legend(fontsize=8)
    kind = "torch.cuda.max_memory_allocated" if summary["device"] != "cpu" else "peak RSS growth (rough)"
    ax_peak.bar(names, [mib(methods[n]["peak_bytes"]) for n in names], color="0.5")
    ax_peak.set_ylabel("MiB")
    ax_peak.set_title(f"peak over the run: {kind}", fontsize=9)
    for a in (ax, ax_peak):
        plt.setp(a.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    paths.append(out / "memory.png")
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths


def table(summary: dict) -> str:
    mib = lambda v: "" if v is None else f"{v / 2**20:.2f}"  # noqa: E731
    lines = [f"{'method':<14} {'lr':>8} {'held-out':>9} {'tokens/s':>9} {'params':>9} {'weights':>8} "
             f"{'grads':>8} {'optim':>8} {'total':>8} {'peak':>8}   (MiB)"]
    for name, r in summary["methods"].items():
        tok = "" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.0f}"
        lines.append(f"{name:<14} {r['lr']:>8g} {r['val_loss']:>9.4f} {tok:>9} {r['params']:>9} "
                     f"{mib(r['weight_bytes']):>8} {mib(r['grad_bytes']):>8} {mib(r['optimizer_bytes']):>8} "
                     f"{mib(r['total_bytes']):>8} {mib(r['peak_bytes']):>8}")
    return "\n".join(lines)


def compare(summary: dict, out: Path, other_dir: Path) -> dict:
    """Per method in both runs: |Δ final held-out loss| and the largest |Δ train loss| and
    |Δ held-out loss| over the steps both curves have."""
    other = json.loads((Path(other_dir) / "summary.json").read_text())
    result = {}
    for name, rec in summary["methods"].items():
        if name not in other["methods"]:
            continue
        a = {r["step"]: r for r in read_curve(out / rec["csv"])}
        b = {r["step"]: r for r in read_curve(Path(other_dir) / other["methods"][name]["csv"])}
        common = sorted(set(a) & set(b))
        d_train = max((abs(a[s]["train_loss"] - b[s]["train_loss"]) for s in common), default=float("nan"))
        d_val = max((abs(a[s]["val_loss"] - b[s]["val_loss"]) for s in common
                     if a[s]["val_loss"] is not None and b[s]["val_loss"] is not None), default=float("nan"))
        result[name] = dict(final_val_diff=abs(rec["val_loss"] - other["methods"][name]["val_loss"]),
                            max_train_diff=d_train, max_val_diff=d_val, steps=len(common))
    print(f"\ncompared with {other_dir} (backend {other['settings'].get('backend')}, "
          f"seed {other['settings'].get('seed')}):")
    print(f"{'method':<14} {'|Δ final held-out|':>19} {'max |Δ held-out|':>17} {'max |Δ train|':>14} {'steps':>6}")
    for name, r in result.items():
        print(f"{name:<14} {r['final_val_diff']:>19.5f} {r['max_val_diff']:>17.5f} {r['max_train_diff']:>14.5f} "
              f"{r['steps']:>6}")
    return result


