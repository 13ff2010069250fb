"""Refresh report: time and captured gradient energy of each refresh kind, on real gradients.

A small LlamaForCausalLM is built from a config (no download) and trained a few dozen steps with
AdamW on byte-level data read from local text files (the Python standard library's .py files). At
a few steps the gradients of every 2-D projection matrix are kept; for
each matrix, rank r and refresh kind ('svd', 'randomized', 'dct') the script measures

- the time of one refresh (median over repeats; CPU timings on one thread where there is no GPU),
- the captured energy ‖R‖² / ‖G‖² and its ratio to exact SVD's (the best any rank-r projector
  can do),
- the refresh's peak extra memory: measured with the CUDA allocator on a GPU; on the CPU, where
  torch has no allocation counter, the sizes of the tensors each kind allocates (stated as such).

It also measures the gradient memory that per-layer mode saves on the same model: the peak of
simultaneously held parameter gradients during one backward, with and without per_layer=True.

    python benchmarks/refresh_energy.py [--steps 40] [--ranks 8 16 32] [--out DIR]

Results: printed table and <out>/<gpu>/refresh_energy.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from _common import RESULTS_DIR, byte_corpus, device_dir_name, progress  # first: it puts this checkout on sys.path

from lowrank_kernels import GaLoreAdamW
from lowrank_kernels.optim import projection_side
from lowrank_kernels.optim import refresh as rf

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def tiny_llama(hidden: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=256, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3 // 8 * 8),
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=512, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(DEVICE)


def batch(data: torch.Tensor, gen: torch.Generator, bs: int, seq: int) -> torch.Tensor:
    starts = torch.randint(0, data.numel() - seq - 1, (bs,), generator=gen)
    return torch.stack([data[s:s + seq] for s in starts.tolist()]).to(DEVICE)


def projected_matrices(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n and "lm_head" not in n}


def collect_gradients(model, data, steps: int, keep_at, bs: int, seq: int):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    kept, losses = [], []
    mats = projected_matrices(model)
    for step in progress(range(1, steps + 1), desc="training"):
        ids = batch(data, gen, bs, seq)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        losses.append(loss.item())
        if step in keep_at:
            kept.append((step, {n: p.grad.detach().float().clone() for n, p in mats.items()}))
        opt.step()
    return kept, losses


def timed(fn, repeats: int):
    times = []
    for _ in range(repeats):
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return out, statistics.median(times)


def peak_extra_bytes(fn, m, n, r, kind, side, oversampling=8) -> tuple[int, str]:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, "measured"
    k = min(m, n)
    if kind == "svd":  # U (m, k), S (k), Vh (k, n), fp32 (LAPACK workspace not counted)
        return 4 * (m * k + k + k * n), "tensor sizes"
    if kind == "randomized":  # Ω (m, l) int64 hash + fp32, Y and Q (n, l) twice, G Q (m, l), small SVD
        ell = min(r + oversampling, k)
        return 8 * m * ell + 4 * (m * ell + 3 * n * ell + m * ell + 2 * ell * ell), "tensor sizes"
    rows, cols = (m, n) if side == "right" else (n, m)
    rows = min(rows, 1024)  # dct: one row chunk: real copy, complex FFT, twiddled product, energies
    return 4 * rows * cols + 2 * 8 * rows * cols + 4 * rows * cols + 8 * cols, "tensor sizes"


def refresh_table(kept, ranks, repeats: int):
    rows = []
    for step, grads in progress(kept, desc="refresh kinds"):
        for name, g in grads.items():
            m, n = g.shape
            side = projection_side("std", (m, n))
            for r in ranks:
                if r > min(m, n):
                    continue
                kinds = {
                    "svd": lambda: rf.svd_projector(g, r, side),
                    "randomized": lambda: rf.randomized_projector(g, r, side, seed=step),
                    "dct": lambda: rf.dct_projector(rf.dct_select(g, r, side), n if side == "right" else m, side),
                }
                energies = {}
                for kind, fn in kinds.items():
                    P, ms = timed(fn, repeats)
                    energies[kind] = rf.captured_energy(g, P, side)
                    peak, how = peak_extra_bytes(fn, m, n, r, kind, side)
                    rows.append(dict(step=step, matrix=name, m=m, n=n, r=r, kind=kind, ms=ms,
                                     energy=energies[kind], peak_bytes=peak, peak_how=how))
                for row in rows[-3:]:
                    row["energy_vs_svd"] = row["energy"] / energies["svd"]
    return rows


def grad_memory(model, data, bs: int, seq: int) -> dict:
    """Peak bytes of parameter gradients held at once during one backward, both modes."""
    out = {}
    for per_layer in (False, True):
        mats = list(projected_matrices(model).values())
        ids = {id(p) for p in mats}
        others = [p for p in model.parameters() if id(p) not in ids]
        opt = GaLoreAdamW([{"params": others}, {"params": mats, "rank": 8, "update_proj_gap": 50, "scale": 0.25}],
                          lr=1e-3, per_layer=per_layer)
        live, peak, handles = [0], [0], []

        def produced(p):
            def hook(grad):
                if p.grad is None:
                    live[0] += p.numel() * p.element_size()
                    peak[0] = max(peak[0], live[0])
            return hook

        def consumed(p):
            if p.grad is None:
                live[0] -= p.numel() * p.element_size()

        for p in model.parameters():
            handles.append(p.register_hook(produced(p)))
            handles.append(p.register_post_accumulate_grad_hook(consumed))
        gen = torch.Generator().manual_seed(1)
        model.zero_grad(set_to_none=True)
        ids = batch(data, gen, bs, seq)  # one window as input and labels (transformers shifts them)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        for h in handles:
            h.remove()
        opt.remove_hooks()
        model.zero_grad(set_to_none=True)
        out["per_layer" if per_layer else "global"] = peak[0]
    out["all_params_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40, help="AdamW training steps before the gradients are kept "
                                                          "(kept at 1/4, 1/2 and all of them; default 40)")
    ap.add_argument("--hidden", type=int, default=256 if DEVICE.type == "cpu" else 1024,
                    help="hidden size of the LLaMA model (default 256 on the CPU, 1024 on a GPU)")
    ap.add_argument("--layers", type=int, default=2 if DEVICE.type == "cpu" else 4,
                    help="decoder layers (default 2 on the CPU, 4 on a GPU)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 32, 64],
                    help="projection ranks r to refresh at (default 8 32 64)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per refresh, median reported (default 5)")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR,
                    help=f"results root; writes OUT/<gpu>/refresh_energy.json (default {RESULTS_DIR})")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if DEVICE.type == "cpu":
        torch.set_num_threads(1)

    data = byte_corpus(4 << 20)
    model = tiny_llama(args.hidden, args.layers)
    keep_at = {args.steps // 4, args.steps // 2, args.steps}
    t0 = time.perf_counter()
    kept, losses = collect_gradients(model, data, args.steps, keep_at, bs=8, seq=128)
    print(f"trained {args.steps} steps on {data.numel() / 2**20:.1f} MiB of local text "
          f"in {time.perf_counter() - t0:.0f} s: "
          f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    rows = refresh_table(kept, args.ranks, args.repeats)

    print(f"\n{'kind':<11} {'r':>4} {'matrices':>8} {'median ms':>10} {'x svd time':>10} "
          f"{'energy':>8} {'vs svd':>8} {'min vs svd':>10} {'peak KiB':>9}")
    summary = []
    for r in args.ranks:
        svd_ms = statistics.median(x["ms"] for x in rows if x["r"] == r and x["kind"] == "svd")
        for kind in rf.KINDS:
            sel = [x for x in rows if x["r"] == r and x["kind"] == kind]
            if not sel:
                continue
            s = dict(kind=kind, r=r, matrices=len(sel), median_ms=statistics.median(x["ms"] for x in sel),
                     mean_energy=statistics.mean(x["energy"] for x in sel),
                     mean_vs_svd=statistics.mean(x["energy_vs_svd"] for x in sel),
                     min_vs_svd=min(x["energy_vs_svd"] for x in sel),
                     max_peak_bytes=max(x["peak_bytes"] for x in sel), peak_how=sel[0]["peak_how"])
            s["speedup_vs_svd"] = svd_ms / s["median_ms"]
            summary.append(s)
            print(f"{kind:<11} {r:>4} {len(sel):>8} {s['median_ms']:>10.3f} {1 / s['speedup_vs_svd']:>10.3f} "
                  f"{s['mean_energy']:>8.4f} {s['mean_vs_svd']:>8.4f} {s['min_vs_svd']:>10.4f} "
                  f"{s['max_peak_bytes'] / 1024:>9.0f}")
    mem = grad_memory(model, data, bs=8, seq=128)
    print(f"\nparameter-gradient peak during backward: global {mem['global'] / 2**20:.2f} MiB, "
          f"per_layer {mem['per_layer'] / 2**20:.2f} MiB (all parameters {mem['all_params_bytes'] / 2**20:.2f} MiB)")

    out_dir = Path(args.out) / device_dir_name()
    out_dir.mkdir(parents=True, exist_ok=True)
    report = dict(device=torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu", torch=torch.__version__,
                  model=dict(hidden=args.hidden, layers=args.layers, steps=args.steps,
                             loss_first=losses[0], loss_last=losses[-1]),
                  summary=summary, rows=rows, grad_memory=mem)
    (out_dir / "refresh_energy.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out_dir / 'refresh_energy.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
