"""Inputs the optimizers cannot step, refused with a ValueError / TypeError that names the
parameter or the argument: sparse gradients, the meta device, a save inside an accumulation."""

import pytest
import torch
from torch import nn

from lowrank_kernels.optim import ApolloAdamW, FiraAdamW, GaLoreAdamW
from lowrank_kernels.optim import distributed as lkd

PROJECTED = {"galore": GaLoreAdamW, "fira": FiraAdamW}
# (optimizer, per_layer): ApolloAdamW has no per-layer mode.
MODES = [("galore", False), ("galore", True), ("fira", False), ("fira", True), ("apollo", False)]


def _embedding_groups(emb, projected):
    return [{"params": [emb.weight], "rank": 2}] if projected else [{"params": [emb.weight]}]


@pytest.mark.parametrize("kind, per_layer", MODES)
@pytest.mark.parametrize("projected", [False, True])
def test_sparse_embedding_gradient(kind, per_layer, projected):
    """nn.Embedding(sparse=True) gives a sparse gradient: a TypeError naming the parameter and the
    way out, from step() and from the per-layer hook."""
    emb = nn.Embedding(10, 6, sparse=True)
    groups = _embedding_groups(emb, projected)
    opt = ApolloAdamW(groups) if kind == "apollo" else PROJECTED[kind](groups, per_layer=per_layer)
    name = type(opt).__name__
    with pytest.raises(TypeError, match=rf"{name}: param group 0, params\[0\].* of shape \(10, 6\) has a sparse "
                                        r"gradient .*nn.Embedding\(sparse=True\).*sparse=False"):
        emb(torch.tensor([1, 2, 2])).sum().backward()
        opt.step()


@pytest.mark.parametrize("kind, per_layer", MODES)
def test_parameter_on_the_meta_device(kind, per_layer):
    """A model built on the meta device and never materialised: a ValueError naming the parameter
    at its first step (an optimizer may be built before to_empty(), which keeps the parameters)."""
    lin = nn.Linear(8, 6, device="meta")
    groups = [{"params": [lin.bias]}, {"params": [lin.weight], "rank": 2}]
    opt = ApolloAdamW(groups) if kind == "apollo" else PROJECTED[kind](groups, per_layer=per_layer)
    with pytest.raises(ValueError, match=r"param group \d, params\[0\] of shape \([0-9, ]+\) is on the meta "
                                         r"device; materialise the model"):
        lin(torch.randn(3, 8, device="meta")).sum().backward()
        opt.step()


@pytest.mark.parametrize("cls", [GaLoreAdamW, FiraAdamW, ApolloAdamW])
def test_lr_on_the_meta_device(cls):
    lin = nn.Linear(8, 6)
    with pytest.raises(ValueError, match=r"param group 0: 'lr' must be .* on the parameters' device \(cpu\), got a "
                                         r"torch.float32 tensor of shape \(\) on meta"):
        cls([{"params": [lin.weight], "rank": 2}], lr=torch.tensor(1e-3, device="meta"))


def test_distributed_save_inside_an_accumulation_is_refused():
    """torch.distributed.checkpoint's load rebuilds the state's layout from the parameters, which has no
    slot for pending micro-batches: lowrank_kernels.optim.distributed.save refuses them."""
    lin = nn.Linear(8, 6)
    opt = FiraAdamW([{"params": [lin.bias]}, {"params": [lin.weight], "rank": 2}], per_layer=True,
                    accumulation_steps=2)
    for _ in range(3):
        lin(torch.randn(3, 8)).square().sum().backward()
    with pytest.raises(ValueError, match="1 of 2 micro-batches of a gradient accumulation are pending"):
        lkd.save(lin, opt, "unused")
