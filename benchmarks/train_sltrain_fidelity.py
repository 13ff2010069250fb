"""Training fidelity of the block support: does a small LLaMA pretrained with SLTrain
layers on a block-structured random support reach the loss of the uniform support (SLTrain's)?

    python benchmarks/train_sltrain_fidelity.py [--steps N] [--seeds S ...] [--out DIR]

A LlamaForCausalLM built from a config (no weights are downloaded), byte-level tokens (vocab 256)
from local text: the Python standard library's .py files, read in sorted order. Every run sees the
same batches; runs differ only in the support and in the seed of the model's initialisation and
support draw. The attention and MLP projections become SLTrain layers (lowrank_kernels.convert);
embeddings, norms and the LM head stay dense and trainable, as in SLTrain. A dense model (every
layer full rank) runs once as the reference curve.

Prints each run's training loss (mean over a window) and final validation loss, and the spread
between seeds of one support next to the gap between supports; writes every curve to
<out>/<device>/sltrain_fidelity.json. On a CPU the defaults are tiny (a few minutes); on a GPU
pass a larger --hidden/--layers/--steps.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from _common import RESULTS_DIR, byte_corpus, device_dir_name, progress  # first: it puts this checkout on sys.path

import lowrank_kernels as lk

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(args, method, support, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=args.ffn,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, max_position_embeddings=args.seq, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    if method == "sltrain":
        lk.convert(model, method="sltrain", rank=args.rank, alpha=args.alpha, density=args.density,
                   support=support, block=tuple(args.block), target_modules=TARGETS, backend=args.backend)
    return model.to(args.device)


def batches(data, args, gen):
    starts = torch.randint(0, data.numel() - args.seq - 1, (args.batch,), generator=gen)
    return torch.stack([data[s: s + args.seq + 1] for s in starts.tolist()])


@torch.no_grad()
def evaluate(model, val, args):
    model.eval()
    gen = torch.Generator().manual_seed(1234)
    # transformers shifts the labels itself: the window is both the input and the labels
    losses = [model(input_ids=(b := batches(val, args, gen).to(args.device)), labels=b).loss.item()
              for _ in range(args.eval_batches)]
    model.train()
    return sum(losses) / len(losses)


def train(model, train_data, val, args):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
    gen = torch.Generator().manual_seed(0)  # the same batches for every run
    curve, window = [], []
    for step in progress(range(args.steps), desc="training"):
        b = batches(train_data, args, gen).to(args.device)
        # Labels are the next bytes; transformers shifts labels itself, so pass inputs as labels
        # of the full window and let it shift.
        loss = model(input_ids=b, labels=b).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        window.append(loss.item())
        if (step + 1) % args.log_every == 0:
            curve.append((step + 1, sum(window) / len(window)))
            window = []
    return curve, evaluate(model, val, args)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="training steps per run (default 300)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                    help="seeds of the model initialisation and support draw, one run each per support "
                         "(default 0 1)")
    ap.add_argument("--hidden", type=int, default=128, help="hidden size of the LLaMA model (default 128)")
    ap.add_argument("--ffn", type=int, default=344, help="MLP intermediate size (default 344)")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    ap.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    ap.add_argument("--seq", type=int, default=128, help="tokens (bytes) per sequence (default 128)")
    ap.add_argument("--batch", type=int, default=16, help="sequences per batch (default 16)")
    ap.add_argument("--rank", type=int, default=32, help="SLTrain rank r of every projection (default 32)")
    ap.add_argument("--alpha", type=float, default=32.0, help="SLTrain alpha, s = alpha / r (default 32)")
    ap.add_argument("--density", type=float, default=0.1, help="sparse density of every projection (default 0.1)")
    ap.add_argument("--block", type=int, nargs=2, default=[16, 16], metavar=("BH", "BW"),
                    help="block shape of the block support (default 16 16)")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate, warm-up then cosine "
                                                            "(default 3e-3, SLTrain's)")
    ap.add_argument("--log-every", type=int, default=25, help="steps per training-loss window (default 25)")
    ap.add_argument("--eval-batches", type=int, default=8, help="validation batches at the end (default 8)")
    ap.add_argument("--data-bytes", type=int, default=4 << 20, help="bytes of local text to read (default 4 MiB)")
    ap.add_argument("--backend", default=None, help="sparse_lowrank_linear backend (default: per device)")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense reference run")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR,
                    help=f"results root; writes OUT/<device>/sltrain_fidelity.json (default {RESULTS_DIR})")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(max(1, torch.get_num_threads()))

    data = byte_corpus(args.data_bytes)
    split = int(0.95 * data.numel())
    train_data, val = data[:split], data[split:]
    print(f"data: {data.numel()} bytes of stdlib .py files; model d={args.hidden} ffn={args.ffn} "
          f"layers={args.layers}; SLTrain r={args.rank} alpha={args.alpha} density={args.density} "
          f"block={tuple(args.block)}; {args.steps} steps of {args.batch}x{args.seq} on {args.device}", flush=True)

    runs = [("dense", None, args.seeds[0])] if not args.no_dense else []
    runs += [("sltrain", support, seed) for support in ("uniform", "block") for seed in args.seeds]
    results = []
    for method, support, seed in runs:
        model = build_model(args, method, support, seed)
        n_params = lk.nn.num_parameters(model, trainable_only=True)
        curve, val_loss = train(model, train_data, val, args)
        name = method if support is None else f"{method}-{support}"
        results.append(dict(run=name, seed=seed, params=n_params, curve=curve, val_loss=val_loss))
        print(f"{name:<16} seed {seed}  params {n_params:>8}  val loss {val_loss:.4f}  train curve "
              + " ".join(f"{step}:{loss:.3f}" for step, loss in curve), flush=True)

    def vals(name):
        return [r["val_loss"] for r in results if r["run"] == name]

    uni, blk = vals("sltrain-uniform"), vals("sltrain-block")
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    spread = max(max(uni) - min(uni), max(blk) - min(blk))
    print(f"\nval loss: uniform {mean(uni):.4f} (seeds {', '.join(f'{v:.4f}' for v in uni)}), "
          f"block {mean(blk):.4f} (seeds {', '.join(f'{v:.4f}' for v in blk)})")
    print(f"gap between supports {abs(mean(uni) - mean(blk)):.4f}; spread between seeds {spread:.4f}")
    out = Path(args.out) / device_dir_name()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "sltrain_fidelity.json"
    path.write_text(json.dumps(dict(args={k: str(v) for k, v in vars(args).items()}, runs=results), indent=1))
    print(f"curves written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
