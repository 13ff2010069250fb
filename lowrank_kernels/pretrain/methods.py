"""The pretraining run's model and methods: the LLaMA shapes, and per method its layers, its
optimizer and the learning-rate schedule every run shares (see the package docstring)."""

from __future__ import annotations

import contextlib
import math
import warnings

import torch
from torch import nn

import lowrank_kernels as lk
from lowrank_kernels.pretrain.data import VOCAB

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
