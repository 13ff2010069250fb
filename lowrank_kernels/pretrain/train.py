"""The pretraining run's training: one (method, learning rate) run at a time, and every method of
a run in order (each with its --lr sweep; lora fine-tuning the best adamw run's weights)."""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import lowrank_kernels as lk
from lowrank_kernels.pretrain.data import held_out_loss, lm_loss, random_batch
from lowrank_kernels.pretrain.memory import GradCounter, PeakMemory, optimizer_bytes, weight_bytes
from lowrank_kernels.pretrain.methods import DEFAULT_LR, build_model, convert_layers, lr_lambda, make_optimizer
from lowrank_kernels.pretrain.report import write_curve


def train_methods(args, data: dict, device, dtype, out: Path) -> tuple[list[dict], dict[str, dict]]:
    """Every method of ``args.methods`` at each learning rate (``args.lrs``, else its default);
    returns every run's record and per method its best one (lowest final held-out loss). The best
    adamw run's weights go to <out>/checkpoints/adamw.pt and, without --init-from, are what lora
    fine-tunes."""
    sweep = len(args.lrs) > 1
    runs, best, checkpoint = [], {}, None
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
    return runs, best


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
    write_curve(csv_path, rows)
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
    gen = torch.Generator().manual_seed(args.seed)
    inputs, targets = random_batch(data["train"], args.batch, args.seq, gen, device)
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
