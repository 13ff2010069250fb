"""Pretrain a LLaMA-style model on the standard library's bytes with every low-rank method.

    python -m lowrank_kernels.pretrain [--size tiny|60m|130m] [--method adamw,galore,...] [--peers]
                                       [--steps N] [--lr LR ...] [--backend B] [--out DIR] ...

The end-to-end run of the package: the same model and data trained with plain AdamW, with the
package's fused optimizers (GaLore, Fira) and with its layers (low-rank, SLTrain, LoRA), with the
held-out loss, tokens/s and memory of each. It uses only the public API (``convert``,
``GaLoreAdamW``, ``FiraAdamW``, ``nn.memory_report``, ``nn.num_parameters``), so it doubles as an
example of how to use the package.

The model: transformers' LlamaForCausalLM built from a config (RMSNorm, rotary attention,
SwiGLU), vocabulary 256 (one byte, one token), untied embeddings. ``--size tiny`` is hidden 128,
intermediate 344, 4 layers, 4 heads, sequence 128, batch 16 (minutes on 2 CPU cores); ``60m`` and
``130m`` are the GaLore paper's LLaMA-60M/130M shapes (hidden 512/768, 8/12 layers) for a GPU.

The data, which needs no download: the files ``*.py`` directly in the folder of the running
Python's ``os`` module, sorted by name and concatenated as bytes; the last 5% held out. Training
batches are windows of seq + 1 bytes at random positions from a generator seeded with ``--seed``;
the held-out loss is the mean over 20 batches at random held-out positions from a generator with
a fixed seed (the same batches for every run).

Methods:
  adamw     torch.optim.AdamW on every parameter.
  galore    lk.GaLoreAdamW: every 2-D weight of the decoder blocks projected (rank, update_proj_gap,
            scale, proj_type, refresh), the rest plain AdamW: galore-torch's param groups.
  fira      lk.FiraAdamW, the same groups with Fira's alpha = --scale.
  lowrank   every decoder projection a LowRankLinear(method="lowrank"), W = s·B·A, trained from
            scratch with AdamW, starting from the top-r SVD of the dense initial weight
            (--lowrank-init random: the method's own random factors);
            its rank is raised per layer so that its parameter count equals sltrain's (unless
            --lowrank-rank is given).
  sltrain   every decoder projection a LowRankLinear(method="sltrain"), W = s·B·A + S on a fixed
            random support (--density, --support), trained from scratch with AdamW.
  lora      LoRA on every decoder projection, fine-tuning the adamw run's final weights (or the
            checkpoint --init-from PATH) on new training batches; the rest frozen.
  --peers adds galore-torch (galore_torch.GaLoreAdamW) and fira-pkg (the fira package's
  FiraAdamW), with the same groups, where they are installed.

Every run: linear warm-up over the first 10% of the steps, then cosine decay to 10% of the lr
(GaLore's schedule); gradients clipped to a global norm of --clip (per parameter with
--per-layer, where no global norm exists); weight decay --weight-decay.

Writes, under --out:
  <method>[_lr<lr>].csv  one row per step: step, train_loss, val_loss (at every eval), tokens_per_s
                         (of that step), elapsed (seconds since the run began, evals included);
  summary.json           per method its best run (lowest final held-out loss over the --lr sweep):
                         lr, val_loss, tokens_per_s, peak_bytes, weight_bytes, grad_bytes,
                         optimizer_bytes, params; and the run's settings, data, device and commit;
  loss.png, memory.png   the loss curves of every method; memory per method as stacked bars;
and prints a table at the end. Memory: weight_bytes are the model's parameters and buffers;
grad_bytes the most gradient bytes held at once during a backward (hooks count the .grad
tensors; per-layer mode frees each gradient right after its step); optimizer_bytes the tensors in
the optimizer's state (moments, projectors, counters). peak_bytes: on a GPU
torch.cuda.max_memory_allocated over the run, less what was allocated before it; on a CPU the
growth of the process's peak resident set (VmHWM, reset before each run): allocator caching makes
that figure rough. tokens_per_s is batch·seq over the median time of a training step, the first
step (compilation, first-call allocations) and the evals left out: the median, because a shared
machine's other work lands on a few steps. On the CPU torch uses one thread unless --threads says
otherwise (as the kernel benchmarks do): more threads than free cores run many times slower.

``--backend triton`` on CPU tensors runs the Triton kernels under the Triton interpreter, which
must be on before triton is imported: from the command line the script restarts itself with
TRITON_INTERPRET=1; called as ``main([...])`` it raises an error saying so. ``--compare DIR``
prints, per method, how far this run's curves are from another run's summary (fidelity of a
backend, seed-to-seed noise).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import datetime
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import lowrank_kernels as lk

METHODS = ("adamw", "galore", "fira", "lowrank", "sltrain", "lora")
PEERS = {"galore-torch": "galore_torch", "fira-pkg": "fira"}  # method name -> module it needs
# The decoder projections of a LLaMA block: what the layer methods replace and what GaLore/Fira
# project (galore-torch's and fira's "attn" and "mlp" targets).
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SIZES = {
    # hidden, intermediate, layers, heads, seq, batch, rank, update_proj_gap, scale, steps
    "tiny": dict(hidden=128, intermediate=344, layers=4, heads=4, seq=128, batch=16,
                 rank=32, update_proj_gap=50, scale=0.25, steps=200),
    "60m": dict(hidden=512, intermediate=1376, layers=8, heads=8, seq=256, batch=64,
                rank=128, update_proj_gap=200, scale=0.25, steps=300),
    "130m": dict(hidden=768, intermediate=2048, layers=12, heads=12, seq=256, batch=64,
                 rank=256, update_proj_gap=200, scale=0.25, steps=300),
}
# Learning rate per method when --lr is not given.
DEFAULT_LR = {"adamw": 1e-3, "galore": 1e-2, "fira": 3e-3, "lowrank": 3e-3, "sltrain": 3e-3, "lora": 1e-3,
              "galore-torch": 1e-2, "fira-pkg": 3e-3}
VOCAB = 256
EVAL_SEED = 20240  # the held-out batches' generator: the same for every run
HELD_OUT = 0.05


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def stdlib_corpus() -> tuple[torch.Tensor, dict]:
    """The bytes of the ``*.py`` files directly in the ``os`` module's folder, sorted by name and
    concatenated (uint8, one byte one token), and a description of them."""
    folder = Path(os.__file__).parent
    files = sorted(folder.glob("*.py"), key=lambda p: p.name)
    raw = b"".join(p.read_bytes() for p in files)
    if len(raw) < 100_000:
        raise RuntimeError(f"only {len(raw)} bytes of *.py files in {folder}: not enough text to train on")
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    split = int(len(raw) * (1 - HELD_OUT))
    info = dict(source=f"{folder}/*.py (sorted by name, concatenated, one byte one token)", files=len(files),
                bytes=len(raw), train_bytes=split, held_out_bytes=len(raw) - split,
                python=sys.version.split()[0])
    return data, info


def random_batch(data: torch.Tensor, batch: int, seq: int, gen: torch.Generator, device) -> tuple:
    """``batch`` windows of seq + 1 bytes at random positions: (inputs, next-byte targets)."""
    starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=gen)
    windows = data[starts[:, None] + torch.arange(seq + 1)].long().to(device, non_blocking=True)
    return windows[:, :-1], windows[:, 1:]


def lm_loss(model, inputs, targets) -> torch.Tensor:
    # The loss is taken here, not by passing labels to transformers (which shifts them itself).
    logits = model(input_ids=inputs).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def held_out_loss(model, val: torch.Tensor, args, device) -> float:
    gen = torch.Generator().manual_seed(EVAL_SEED)
    was_training = model.training
    model.eval()
    total = 0.0
    for _ in range(args.eval_batches):
        total += lm_loss(model, *random_batch(val, args.batch, args.seq, gen, device)).item()
    model.train(was_training)
    return total / args.eval_batches


# ----------------------------------------------------------------------------------------------
# Model and methods
# ----------------------------------------------------------------------------------------------
def build_model(args, seed: int, device, dtype) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, max_position_embeddings=args.seq,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype)


def decoder_matrices(model) -> list:
    """The 2-D weights of the decoder blocks (attention and MLP projections)."""
    return [p for name, p in model.named_parameters()
            if p.dim() == 2 and p.requires_grad and any(f".{t}." in name for t in TARGETS)]


def projected_groups(model, args, scale_key: str) -> list[dict]:
    """galore-torch's / fira's param groups: decoder matrices projected, the rest plain AdamW."""
    mats = decoder_matrices(model)
    ids = {id(p) for p in mats}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    return [{"params": rest},
            {"params": mats, "rank": args.rank, "update_proj_gap": args.update_proj_gap,
             scale_key: args.scale, "proj_type": args.proj_type}]


def equal_param_ranks(model, args) -> dict[str, int]:
    """Per decoder projection, the rank at which W = s·B·A has as many parameters as SLTrain's
    s·B·A + S at --rank and --density: r + round(density·N·K / (N + K))."""
    ranks = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
            N, K = module.out_features, module.in_features
            extra = round(args.density * N * K / (N + K))
            ranks[name] = min(args.rank + extra, N, K)
    return ranks


def convert_layers(model, method: str, args) -> nn.Module:
    """Replace the decoder projections by LowRankLinear layers of ``method`` (lk.convert)."""
    if method == "sltrain":
        return lk.convert(model, method="sltrain", rank=args.rank, alpha=args.alpha, target_modules=TARGETS,
                          density=args.density, support=args.support, backend=args.backend)
    if method == "lora":
        return lk.convert(model, method="lora", rank=args.rank, alpha=args.alpha, target_modules=TARGETS,
                          backend=args.backend)
    # lowrank: one convert() per rank, each targeting the projections that get it.
    if args.lowrank_rank is not None:
        ranks = {name: args.lowrank_rank for name in equal_param_ranks(model, args)}
    else:
        ranks = equal_param_ranks(model, args)
    for rank in sorted(set(ranks.values())):
        names = {n for n, r in ranks.items() if r == rank}
        lk.convert(model, method="lowrank", rank=rank, alpha=args.alpha, init=args.lowrank_init,
                   target_modules=lambda name, module, names=names: name in names, backend=args.backend)
    return model


@contextlib.contextmanager
def _quiet_peers():
    # The peers' optimizers are copies of transformers' deprecated AdamW and warn on construction.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def make_optimizer(method: str, model, lr: float, args):
    common = dict(lr=lr, weight_decay=args.weight_decay)
    ours = dict(refresh=args.refresh, per_layer=args.per_layer, backend=args.backend,
                max_grad_norm=args.clip if args.per_layer and args.clip > 0 else None)
    if method == "galore":
        return lk.GaLoreAdamW(projected_groups(model, args, "scale"), **common, **ours)
    if method == "fira":
        return lk.FiraAdamW(projected_groups(model, args, "alpha"), **common, **ours)
    if method == "galore-torch":
        from galore_torch import GaLoreAdamW as PeerGaLore

        with _quiet_peers():
            return PeerGaLore(projected_groups(model, args, "scale"), **common)
    if method == "fira-pkg":
        from fira import FiraAdamW as PeerFira

        with _quiet_peers():
            return PeerFira(projected_groups(model, args, "alpha"), **common)
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **common)


def lr_lambda(steps: int):
    warmup = max(1, steps // 10)

    def factor(step: int) -> float:  # step: optimizer steps taken so far
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


# ----------------------------------------------------------------------------------------------
# Memory accounting
# ----------------------------------------------------------------------------------------------
def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def weight_bytes(model) -> int:
    return sum(tensor_bytes(p) for p in model.parameters()) + sum(tensor_bytes(b) for b in model.buffers())


def optimizer_bytes(opt) -> int:
    """Bytes of the tensors in the optimizer's state, including those held by objects in it
    (galore-torch's and fira's projector objects)."""
    seen, total = set(), 0

    def add(value, depth=0):
        nonlocal total
        if isinstance(value, torch.Tensor):
            key = (value.data_ptr(), value.numel(), value.dtype)
            if key not in seen:
                seen.add(key)
                total += tensor_bytes(value)
        elif isinstance(value, dict):
            for v in value.values():
                add(v, depth)
        elif isinstance(value, (list, tuple)):
            for v in value:
                add(v, depth)
        elif depth < 2 and hasattr(value, "__dict__"):
            add(vars(value), depth + 1)

    for state in opt.state.values():
        add(state)
    return total


class GradCounter:
    """Most bytes of .grad tensors held at once during a backward, from hooks on every trainable
    parameter. Registered before the optimizer, so in per-layer mode it sees each gradient before
    the optimizer's hook frees it."""

    def __init__(self, params):
        self.params = list(params)
        self.peak = 0
        self.handles = [p.register_post_accumulate_grad_hook(self._seen) for p in self.params]

    def _seen(self, _):
        self.peak = max(self.peak, sum(tensor_bytes(p.grad) for p in self.params if p.grad is not None))

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


class PeakMemory:
    """Peak memory over a run: CUDA's allocator counter, or the growth of the process's peak RSS."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    @staticmethod
    def _status(key: str) -> int | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def start(self):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed memory back, so runs start alike
        self.base = self._status("VmRSS")
        try:  # "5" resets the peak resident set (VmHWM) to the current one (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.base = None

    def peak(self) -> int | None:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        hwm = self._status("VmHWM")
        return None if self.base is None or hwm is None else max(0, hwm - self.base)


# ----------------------------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------------------------
def run_name(method: str, lr: float, sweep: bool) -> str:
    return f"{method}_lr{lr:g}" if sweep else method


def train_one(method: str, lr: float, args, data: dict, device, dtype, out: Path, name: str,
              init_state: dict | None = None) -> dict:
    """Train one (method, lr) run; write its CSV; return its record (with the final weights of an
    adamw run under "state" for LoRA's checkpoint)."""
    meter = PeakMemory(device)
    meter.start()
    seed = args.seed
    model = build_model(args, seed, device, dtype)
    if init_state is not None:
        model.load_state_dict(init_state)
    if method in ("lowrank", "sltrain", "lora"):
        torch.manual_seed(seed + 1)  # the new layers' initialisation
        model = convert_layers(model, method, args)
    trainable = [p for p in model.parameters() if p.requires_grad]
    counter = GradCounter(trainable)
    opt = make_optimizer(method, model, lr, args)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.steps))
    n_params = lk.nn.num_parameters(model, trainable_only=True)
    report = lk.nn.memory_report(model) if method in ("lowrank", "sltrain") else None
    step_model = torch.compile(model, backend=args.compile_backend) if args.compile else model
    if args.warmup:
        warm_up(model, opt, args, data, device, name)
    # LoRA fine-tunes on batches the checkpoint did not see at the same positions.
    gen = torch.Generator().manual_seed(seed + (1000 if method == "lora" else 0))
    tokens_per_step = args.batch * args.seq
    csv_path = out / f"{name}.csv"
    rows, step_times, window = [], [], []
    t_run = time.perf_counter()
    val_loss = float("nan")
    progress = _progress(args, desc=f"{name}")
    for step in range(1, args.steps + 1):
        inputs, targets = random_batch(data["train"], args.batch, args.seq, gen, device)
        t0 = time.perf_counter()
        loss = lm_loss(step_model, inputs, targets)
        loss.backward()
        if not args.per_layer and args.clip > 0:
            nn.utils.clip_grad_norm_(trainable, args.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        train_loss = loss.item()  # synchronises: the step's time is all in
        dt = time.perf_counter() - t0
        if step == 1:
            counter.remove()
        if step > 1 or args.steps == 1:
            step_times.append(dt)
        if not math.isfinite(train_loss):
            progress.close()
            raise FloatingPointError(f"{name}: training loss {train_loss} at step {step}")
        window = (window + [train_loss])[-20:]
        row = dict(step=step, train_loss=train_loss, val_loss="", tokens_per_s=tokens_per_step / dt, elapsed=0.0)
        if step % args.eval_every == 0 or step == args.steps:
            val_loss = held_out_loss(model, data["val"], args, device)
            row["val_loss"] = val_loss
            tok_s = f"{tokens_per_step / statistics.median(step_times):.0f}" if step_times else "-"
            _say(progress, f"[{name}] step {step}/{args.steps}  train {sum(window) / len(window):.4f}  "
                           f"held-out {val_loss:.4f}  {tok_s} tokens/s")
        row["elapsed"] = time.perf_counter() - t_run
        rows.append(row)
        progress.update(1)
        progress.set_postfix(loss=f"{sum(window) / len(window):.4f}", refresh=False)
    progress.close()
    _write_csv(csv_path, rows)
    record = dict(method=method, lr=lr, val_loss=val_loss, final_train_loss=sum(window) / len(window),
                  tokens_per_s=tokens_per_step / statistics.median(step_times) if step_times else None,
                  peak_bytes=meter.peak(), weight_bytes=weight_bytes(model), grad_bytes=counter.peak,
                  optimizer_bytes=optimizer_bytes(opt), params=n_params, csv=csv_path.name,
                  seconds=time.perf_counter() - t_run)
    record["total_bytes"] = record["weight_bytes"] + record["grad_bytes"] + record["optimizer_bytes"]
    if report is not None:
        record["vs_dense"] = report["ratio"]  # weights + grads + AdamW states vs the dense model
    if method == "adamw":
        record["state"] = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    del model, step_model, opt, sched
    return record


def warm_up(model, opt, args, data, device, name: str):
    """--warmup: compile the run's Triton kernels in parallel before its first step, on a batch of
    the run's shape (the training batches are not touched)."""
    inputs, targets = random_batch(data["train"], args.batch, args.seq, torch.Generator().manual_seed(args.seed), device)
    report = lk.warmup(model, {"input_ids": inputs}, optimizer=opt,
                       loss_fn=lambda out: F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten()))
    print(f"[{name}] {report}", flush=True)
    return report


class _NoBar:
    def update(self, n):
        pass

    def set_postfix(self, **kw):
        pass

    def close(self):
        pass


def _progress(args, desc):
    if args.quiet:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    # disable=None: a bar on a terminal, none in a log file (the eval lines are printed anyway).
    return tqdm(total=args.steps, desc=desc, leave=False, dynamic_ncols=True, disable=None)


def _say(progress, text):
    if hasattr(progress, "write") and not getattr(progress, "disable", True):
        progress.write(text)
    else:
        print(text, flush=True)


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "train_loss", "val_loss", "tokens_per_s", "elapsed"])
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def read_curve(path: Path) -> list[dict]:
    """A run's CSV as a list of dicts with floats (val_loss None where it was not evaluated)."""
    with Path(path).open(newline="") as f:
        return [{k: (float(v) if v != "" else None) for k, v in row.items()} for row in csv.DictReader(f)]


# ----------------------------------------------------------------------------------------------
# Outputs: summary, plots, table
# ----------------------------------------------------------------------------------------------
def _commit() -> str:
    root = Path(__file__).resolve().parent.parent

    def git(*a):
        return subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        if git("status", "--porcelain", "--untracked-files=no"):
            commit += "+dirty"
        return commit
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("LOWRANK_KERNELS_COMMIT", "unknown")


def _device_name(device) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


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
        smooth = [sum(losses[max(0, j - k + 1): j + 1]) / len(losses[max(0, j - k + 1): j + 1]) for j in range(len(losses))]
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
    for key, label in (("weight_bytes", "weights"), ("grad_bytes", "gradients"), ("optimizer_bytes", "optimizer state")):
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
    print(f"\ncompared with {other_dir} (backend {other['settings'].get('backend')}, seed {other['settings'].get('seed')}):")
    print(f"{'method':<14} {'|Δ final held-out|':>19} {'max |Δ held-out|':>17} {'max |Δ train|':>14} {'steps':>6}")
    for name, r in result.items():
        print(f"{name:<14} {r['final_val_diff']:>19.5f} {r['max_val_diff']:>17.5f} {r['max_train_diff']:>14.5f} {r['steps']:>6}")
    return result


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def _split(values, cast=str) -> list:
    out = []
    for v in values or []:
        out += [cast(x) for x in str(v).split(",") if x]
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m lowrank_kernels.pretrain",
        description="Pretrain a LLaMA-style model on the standard library's bytes with each method "
                    "(adamw, galore, fira, lowrank, sltrain, lora) and report held-out loss, tokens/s and memory.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="methods:\n" + "\n".join(
            __doc__.split("Methods:\n", 1)[1].split("\n\nEvery run", 1)[0].splitlines()))
    ap.add_argument("--method", action="append", metavar="M",
                    help=f"method(s), repeatable or comma-separated: {', '.join(METHODS)}, or 'all' "
                         f"(default: all); with --peers also {', '.join(PEERS)}")
    ap.add_argument("--peers", action="store_true",
                    help="add galore-torch and fira-pkg (the galore_torch and fira packages' optimizers) where installed")
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
    ap.add_argument("--out", type=Path, default=Path("pretrain_results"), help="output folder (default ./pretrain_results)")
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
    for key in ("hidden", "intermediate", "layers", "heads", "seq", "batch", "rank", "update_proj_gap", "scale", "steps"):
        if getattr(args, key) is None:
            setattr(args, key, size[key])
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


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def main(argv=None) -> int:
    """Run the methods and write the outputs (see the module docstring). ``argv=None`` reads the
    command line; then ``--backend triton`` on the CPU restarts the process with the Triton
    interpreter on. Returns the exit status."""
    args = resolve_args(argv)
    device = torch.device(args.device)
    if args.backend == "triton" and device.type == "cpu" and not _interpreter_on():
        if argv is None and getattr(sys, "orig_argv", None):
            print("--backend triton on the CPU: restarting with TRITON_INTERPRET=1 (the Triton interpreter)", flush=True)
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
    commit = _commit()  # now: the code this run imported, not what the checkout holds when it ends
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
          f"{', compiled' if args.compile else ''}; backend {args.backend or 'default'}; methods {', '.join(args.methods)}",
          flush=True)

    sweep = len(args.lrs) > 1
    runs, best, checkpoint = [], {}, None
    t_all = time.perf_counter()
    if "lora" in args.methods and args.init_from is not None:
        checkpoint = torch.load(args.init_from, map_location="cpu", weights_only=True)
    elif "lora" in args.methods and "adamw" not in args.methods:
        print("lora fine-tunes the adamw run's weights: training adamw first", flush=True)
        args.methods.insert(0, "adamw")
    for method in args.methods:
        for lr in (args.lrs or [DEFAULT_LR[method]]):
            name = run_name(method, lr, sweep)
            init = checkpoint if method == "lora" else None
            rec = train_one(method, lr, args, data, device, dtype, out, name, init_state=init)
            state = rec.pop("state", None)
            runs.append(rec)
            print(f"[{name}] held-out loss {rec['val_loss']:.4f}, {rec['tokens_per_s'] or 0:.0f} tokens/s, "
                  f"{rec['seconds']:.1f} s", flush=True)
            if method not in best or rec["val_loss"] < best[method]["val_loss"]:
                best[method] = rec
                if method == "adamw" and state is not None:
                    ckpt = out / "checkpoints" / "adamw.pt"
                    ckpt.parent.mkdir(exist_ok=True)
                    torch.save(state, ckpt)
                    if args.init_from is None:
                        checkpoint = state
    elapsed = time.perf_counter() - t_all

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("lr", "method")}
    summary = dict(
        device=_device_name(device), commit=commit, torch=torch.__version__,
        triton=getattr(sys.modules.get("triton"), "__version__", ""),
        timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command="python -m lowrank_kernels.pretrain " + " ".join(sys.argv[1:] if argv is None else argv),
        seconds=elapsed, data=data_info,
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
    if args.compare is not None:
        summary["compare"] = dict(dir=str(args.compare), methods=compare(summary, out, args.compare))
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    plots = plot(summary, out)
    print(f"\n{args.size} LLaMA, {args.steps} steps, {summary['device']}, commit {summary['commit']}, "
          f"{elapsed:.0f} s in all")
    print(table(summary))
    print(f"wrote {out / 'summary.json'}, {len(runs)} CSVs" + "".join(f", {p.name}" for p in plots))
    return 0


if __name__ == "__main__":
    sys.exit(main())
