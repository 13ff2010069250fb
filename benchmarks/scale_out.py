"""Computed estimate (not a measurement) of per-GPU memory and communication per step for LLaMA
pretraining on W GPUs: FSDP2 + FiraAdamW, FSDP2 + torch.optim.AdamW, DDP + galore-torch.

    python benchmarks/scale_out.py [--world-size 8] [--update-proj-gap 200]

Model shapes: LLaMA-1B (hidden 2048, FFN 5461, 24 layers) and LLaMA-7B (4096, 11008, 32 layers),
vocabulary 32000, untied embeddings; GaLore's ranks (512 and 1024) on every decoder matrix.
Everything fp32 (weights, gradients, optimizer states); activations, FSDP2's unsharded layer and
communication buffers are not counted. Rules (lowrank_kernels.optim.distributed):

- memory: FSDP2 shards weights, gradients and every row-sharded state by W. Fira's state for a
  matrix (m, n): side 'right' (m >= n) moments 2·m·r sharded by rows, projector r·n replicated;
  side 'left' (m < n) moments 2·r·n sharded by columns, projector m·r sharded by rows. AdamW: 2 moments per parameter,
  sharded. DDP + galore-torch: everything whole on every GPU (galore-torch's projected moments
  and projectors, AdamW moments for the rest).
- communication (payload of each collective, bytes per GPU and step): FSDP2 all-gathers the
  weights twice (forward, and backward after resharding) and reduce-scatters the gradients:
  3·4·P; DDP all-reduces the gradients: 4·P; Fira adds ``communication_bytes``' step bytes of each
  matrix and its refresh bytes / update_proj_gap. A ring moves about (W−1)/W of an all-gather's
  or reduce-scatter's payload per GPU and 2·(W−1)/W of an all-reduce's.
"""

from __future__ import annotations

import argparse

from lowrank_kernels.optim.distributed import communication_bytes

MODELS = {"LLaMA-1B": (2048, 5461, 24, 512), "LLaMA-7B": (4096, 11008, 32, 1024)}
VOCAB, F32 = 32000, 4


def matrices(hidden: int, ffn: int):
    """The decoder layer's projected matrices (out, in): q, k, v, o, gate, up, down."""
    return [(hidden, hidden)] * 4 + [(ffn, hidden)] * 2 + [(hidden, ffn)]


def estimate(hidden: int, ffn: int, layers: int, rank: int, world: int, gap: int) -> dict:
    """GB per GPU: {setup: (weights + grads + optimizer state, communication per step)}."""
    mats = matrices(hidden, ffn) * layers
    projected = sum(m * n for m, n in mats)
    rest = 2 * VOCAB * hidden + (2 * layers + 1) * hidden  # embeddings, LM head, norms
    params = projected + rest
    fira_sharded, fira_replicated, comm_fira = 2 * rest, 0, 0.0
    galore_state = 2 * rest
    for m, n in mats:
        if m >= n:  # side 'right'
            fira_sharded += 2 * m * rank
            fira_replicated += rank * n
            galore_state += 2 * m * rank + rank * n
        else:
            fira_sharded += m * rank + 2 * rank * n
            galore_state += 2 * rank * n + m * rank
        c = communication_bytes((m, n), rank, world, fira=True)
        comm_fira += c["step"] + c["refresh"] / gap
    gb = 1e9
    fsdp = 3 * F32 * params
    return {
        "FSDP2 + FiraAdamW (ours)": ((2 * params + fira_sharded) * F32 / world / gb + fira_replicated * F32 / gb,
                                     (fsdp + comm_fira) / gb),
        "FSDP2 + torch AdamW": (4 * params * F32 / world / gb, fsdp / gb),
        "DDP + galore-torch": ((2 * params + galore_state) * F32 / gb, F32 * params / gb),
        "params": params,
    }


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-size", type=int, default=8, help="GPUs W (default 8)")
    ap.add_argument("--update-proj-gap", type=int, default=200,
                    help="steps between Fira's projector refreshes, over which their bytes are spread (default 200)")
    return ap


def main(argv=None) -> None:
    """Print the estimate as a markdown table."""
    args = build_parser().parse_args(argv)
    print(f"Estimate, {args.world_size} GPUs, fp32, update_proj_gap {args.update_proj_gap} (computed, not measured)")
    print("| model | rank | setup | weights + grads + optimizer state per GPU (GB) "
          "| communication per GPU per step (GB, payload) |")
    print("|---|---|---|---|---|")
    for name, (hidden, ffn, layers, rank) in MODELS.items():
        est = estimate(hidden, ffn, layers, rank, args.world_size, args.update_proj_gap)
        params = est.pop("params")
        for setup, (mem, comm) in est.items():
            print(f"| {name} ({params / 1e9:.2f} B params) | {rank} | {setup} | {mem:.2f} | {comm:.2f} |")


if __name__ == "__main__":
    main()
