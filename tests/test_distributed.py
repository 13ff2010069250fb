"""GaLoreAdamW / FiraAdamW and LowRankLinear under DDP and FSDP2, DCP checkpoints across world
sizes, and the optimizer's communication (lowrank_kernels.optim.distributed).

Processes are spawned by the tests (gloo on the CPU), two groups in all: world size 2 runs every
configuration and saves a checkpoint half way, then world size 4 runs them again and resumes that
checkpoint; the single-process runs and the resume on one process (no process group) run here.
Rendezvous through a file in a fresh temporary folder (no port, so parallel runs cannot
collide); results come back as numpy files. Every configuration is compared with the
single-process run of the same optimizer settings, losses and parameters after 20 steps, with
refreshes at steps 0, 7 and 14, for each refresh kind ('randomized', and 'svd' and 'dct', which
gather on refresh steps). The workers run the reference backend (plain torch): the
sharded step does, and the Triton interpreter would only slow the runs.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import tempfile
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.tensor import DTensor, Shard

import lowrank_kernels as lk
from lowrank_kernels.optim import distributed as lkd

STEPS, CKPT_STEP, BATCH, D_IN, D_HID, D_OUT = 20, 10, 8, 24, 37, 13
# (37, 24) steps from the right, (13, 37) from the left; 37 and 13 rows split unevenly on 2 and 4
# ranks (13 on 4: 4, 4, 4, 1 rows, fewer than the rank on the last one).
GAP, RANK = 7, 4
TIMEOUT = timedelta(minutes=30)

pytestmark = pytest.mark.slow


def _data():
    g = torch.Generator().manual_seed(123)
    return torch.randn(STEPS, BATCH, D_IN, generator=g), torch.randn(STEPS, BATCH, D_OUT, generator=g)


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(D_IN, D_HID), nn.Tanh(), nn.Linear(D_HID, D_OUT))
    opts = dict(density=0.2) if kind == "sltrain" else {}
    layers = [lk.LowRankLinear(D_IN, D_HID, rank=5, method=kind, backend="reference", **opts), nn.Tanh(),
              lk.LowRankLinear(D_HID, D_OUT, rank=5, method=kind, backend="reference", **opts)]
    if kind == "lora":  # LoRA's B starts at zero: start it elsewhere, so that A gets gradients too
        for layer in layers[::2]:
            nn.init.normal_(layer.lora_B, std=0.3)
    return nn.Sequential(*layers)


# name -> (model, optimizer, per_layer, refresh)
CONFIGS = {
    "galore": ("mlp", "galore", False, "randomized"), "fira": ("mlp", "fira", False, "randomized"),
    "galore-per-layer": ("mlp", "galore", True, "randomized"), "fira-per-layer": ("mlp", "fira", True, "randomized"),
    "lora-galore": ("lora", "galore", False, "randomized"), "sltrain-fira": ("sltrain", "fira", False, "randomized"),
    # The peers' refresh and the DCT: the gradient (or, for a DCT of rows, the energies) gathered on refresh steps.
    "galore-svd": ("mlp", "galore", False, "svd"), "fira-svd-per-layer": ("mlp", "fira", True, "svd"),
    "fira-dct": ("mlp", "fira", False, "dct"),
}


# World size 4 runs each configuration under one of the wrappers (2 runs them all under both).
WORLD4 = {"fsdp2": ("galore", "fira-per-layer", "sltrain-fira", "galore-svd", "fira-svd-per-layer", "fira-dct"),
          "ddp": ("fira", "galore-per-layer", "lora-galore")}


def _runs(world: int):
    """The (wrapper, configuration) pairs run at ``world`` ranks."""
    if world == 2:
        return [(how, name) for name in CONFIGS for how in ("ddp", "fsdp2")]
    return [(how, name) for how, names in WORLD4.items() for name in names]


def _optimizer(model: nn.Module, opt: str, per_layer: bool, refresh: str = "randomized"):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    matrices = [p for n, p in named if p.dim() == 2]
    rest = [p for n, p in named if p.dim() != 2]
    cls, key = (lk.GaLoreAdamW, "scale") if opt == "galore" else (lk.FiraAdamW, "alpha")
    groups = [{"params": rest}, {"params": matrices, "rank": RANK, "update_proj_gap": GAP,
                                 key: 0.5}]
    return cls(groups, lr=1e-2, weight_decay=0.01, refresh=refresh, power_iters=1, per_layer=per_layer,
               backend="reference")


def _full(t) -> np.ndarray:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().numpy().copy()


def _train(model, opt, steps, rank: int = 0, world: int = 1):
    """Steps over this rank's rows of each global batch; returns the global mean losses."""
    x, y = _data()
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    losses = []
    for t in steps:
        loss = nn.functional.mse_loss(model(x[t, rows]), y[t, rows])
        loss.backward()
        opt.step()
        opt.zero_grad()
        value = loss.detach().reshape(1)
        if world > 1:
            dist.all_reduce(value)
        losses.append(value.item() / world)
    return losses


def _wrap(model, how: str, opt_name: str, per_layer: bool, refresh: str = "randomized"):
    """The model under DDP or FSDP2 (per-layer mode: each layer with parameters, then the root, so
    that the hooks step each layer after its own reduce-scatter; else the root alone), and its
    optimizer."""
    if how == "ddp":
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = _optimizer(model, opt_name, per_layer, refresh)
        if per_layer:
            lkd.ddp_per_layer(ddp, opt)
        return ddp, opt
    from torch.distributed.fsdp import fully_shard

    for layer in model if per_layer else ():
        if any(True for _ in layer.parameters()):
            fully_shard(layer)
    fully_shard(model)
    return model, _optimizer(model, opt_name, per_layer, refresh)


def _support_shards(model, world: int) -> np.ndarray:
    """Per SLTrain layer after training under FSDP2: nnz, every rank's number of sp_index and of
    sp_values entries, whether the index is a Shard(0) DTensor placed like the values, and the
    largest kernel-format buffer left on the layer (per-row formats only)."""
    rows = []
    for layer in (model[0], model[2]):
        index, values = layer.sp_index, layer.sp_values
        sizes = torch.tensor([index.to_local().numel(), values.to_local().numel()])
        every = [torch.zeros_like(sizes) for _ in range(world)]
        dist.all_gather(every, sizes)
        sharded = isinstance(index, DTensor) and index.placements == values.placements == (Shard(0),)
        largest = max(b.numel() for n, b in layer.named_buffers() if n.startswith("_sp_"))
        rows.append([index.numel(), *torch.stack(every).T.flatten().tolist(), int(sharded), largest])
    return np.array(rows)


def _params(model) -> dict:
    return {n.replace("module.", ""): _full(p) for n, p in model.named_parameters()}


def _count(opt, fn):
    """Bytes of every collective the optimizer issues while fn() runs, counted at torch.distributed:
    the reduced or broadcast tensor, an all-gather's output, a reduce-scatter's input."""
    counted = []
    names = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast")
    real = {name: getattr(dist, name) for name in names}

    def counting(name):
        def call(*args, **kwargs):
            t = args[1] if name == "reduce_scatter_tensor" else args[0]
            counted.append(t.numel() * t.element_size())
            return real[name](*args, **kwargs)
        return call

    for name in real:
        setattr(dist, name, counting(name))
    try:
        fn()
    finally:
        for name, f in real.items():
            setattr(dist, name, f)
    return sum(counted)


# (optimizer, refresh) whose communication is counted.
COMMUNICATION = [("galore", "randomized"), ("fira", "randomized"), ("galore", "svd"), ("fira", "dct")]


def _communication(world: int) -> dict:
    """Counted and predicted bytes of a first step (seed + refresh + step), a plain step and a
    second refresh, for FSDP2 GaLore and Fira with clipping on one left and one right weight."""
    from torch.distributed.fsdp import fully_shard

    out = {}
    for opt_name, refresh in COMMUNICATION:
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(30, 50, bias=False), nn.Linear(50, 17, bias=False))
        fully_shard(model)
        cls, key = (lk.GaLoreAdamW, "scale") if opt_name == "galore" else (lk.FiraAdamW, "alpha")
        opt = cls([{"params": list(model.parameters()), "rank": 6, "update_proj_gap": 2, key: 0.5}], lr=1e-3,
                  refresh=refresh, max_grad_norm=1.0, oversampling=3, power_iters=1, backend="reference")
        counted = []
        for _ in range(3):
            model(torch.randn(4, 30)).square().mean().backward()
            counted.append(_count(opt, opt.step))
            opt.zero_grad()
        pred = [lkd.communication_bytes(p.shape, 6, world, fira=opt_name == "fira", oversampling=3, power_iters=1,
                                        clip=True, refresh=refresh) for p in model.parameters()]
        out[f"{opt_name}-{refresh}"] = (counted, [sum(c["step"] + c["refresh"] + c["seed"] for c in pred),
                                                  sum(c["step"] for c in pred),
                                                  sum(c["step"] + c["refresh"] for c in pred)])
    return out


def _worker(rank: int, world: int, folder: str) -> None:
    # A rank killed by a signal (an abort in a C++ thread) prints every Python thread's stack.
    faulthandler.enable()
    torch.set_num_threads(1)
    # Nothing here waits on a clock but the collectives' timeout, set generously: on a loaded machine a
    # rank may start (import torch) or step minutes after another. A rank that fails ends the run at
    # once (start_processes terminates the others), so the timeout never delays a failure.
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world,
                            timeout=TIMEOUT)
    out = {}
    for how, name in _runs(world):
        kind, opt_name, per_layer, refresh = CONFIGS[name]
        model, opt = _wrap(_model(kind), how, opt_name, per_layer, refresh)
        losses = _train(model, opt, range(STEPS), rank, world)
        out[f"{how}/{name}/losses"] = np.array(losses)
        if how == "fsdp2" and kind == "sltrain":
            out[f"{how}/{name}/support"] = _support_shards(model, world)
        for pname, value in _params(model).items():
            out[f"{how}/{name}/param/{pname}"] = value
    # Checkpoint: saved on 2 ranks half way (FSDP2, Fira, standard and per-layer), resumed on 4.
    for name in ("fira", "galore-per-layer"):
        kind, opt_name, per_layer, _ = CONFIGS[name]
        model, opt = _wrap(_model(kind), "fsdp2", opt_name, per_layer)
        ckpt = f"{folder}/../ckpt-{name}"
        if world == 2:
            _train(model, opt, range(CKPT_STEP), rank, world)
            lkd.save(model, opt, ckpt)
        else:
            lkd.load(model, opt, ckpt)
            losses = _train(model, opt, range(CKPT_STEP, STEPS), rank, world)
            out[f"resumed/{name}/losses"] = np.array(losses)
            for pname, value in _params(model).items():
                out[f"resumed/{name}/param/{pname}"] = value
    for opt_name, (counted, predicted) in _communication(world).items():
        out[f"comm/{opt_name}/counted"] = np.array(counted)
        out[f"comm/{opt_name}/predicted"] = np.array(predicted)
    if rank == 0:
        np.savez(f"{folder}/out.npz", **out)
    # No rank closes its connections while another may still be reading from them.
    dist.barrier()
    dist.destroy_process_group()
    # Leave without the interpreter's and the C++ runtime's exit-time teardown: about one run in ten on
    # this machine, a rank whose work was done and whose process group was destroyed aborted there
    # ("terminate called without an active exception" from a thread of torch's runtime, with the main
    # thread past its last Python frame), failing the run after every result was written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawn(world: int, root: str) -> dict:
    folder = tempfile.mkdtemp(dir=root)
    mp.start_processes(_worker, args=(world, folder), nprocs=world, start_method="spawn", join=True)
    with np.load(f"{folder}/out.npz") as f:
        return dict(f)


@pytest.fixture(scope="module")
def runs():
    """World sizes 2 then 4 (which resumes 2's checkpoints), and the single-process references."""
    with tempfile.TemporaryDirectory() as root:
        results = {2: _spawn(2, root), 4: _spawn(4, root)}
        single = {}
        for name, (kind, opt_name, per_layer, refresh) in CONFIGS.items():
            model = _model(kind)
            opt = _optimizer(model, opt_name, per_layer, refresh)
            single[f"{name}/losses"] = np.array(_train(model, opt, range(STEPS)))
            for pname, value in _params(model).items():
                single[f"{name}/param/{pname}"] = value
        # Resume on one process, no process group, no FSDP: plain tensors load the sharded state.
        for name in ("fira", "galore-per-layer"):
            kind, opt_name, per_layer, _ = CONFIGS[name]
            model = _model(kind)
            opt = _optimizer(model, opt_name, per_layer)
            lkd.load(model, opt, f"{root}/ckpt-{name}")
            single[f"resumed/{name}/losses"] = np.array(_train(model, opt, range(CKPT_STEP, STEPS)))
            for pname, value in _params(model).items():
                single[f"resumed/{name}/param/{pname}"] = value
        results[1] = single
        yield results


def _close(got, want, what):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6, err_msg=what)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("how", ["ddp", "fsdp2"])
def test_matches_single_process(runs, world, how):
    """20 steps with refreshes at 0, 7, 14: the losses and every parameter equal the single-process
    run's within fp32 rounding, for every configuration (GaLore, Fira, plain, per-layer, LoRA, SLTrain)."""
    single = runs[1]
    names = [name for h, name in _runs(world) if h == how]
    assert names
    for name in names:
        _close(runs[world][f"{how}/{name}/losses"], single[f"{name}/losses"], f"{how} {name} losses, world {world}")
        keys = [k for k in single if k.startswith(f"{name}/param/")]
        assert keys
        for key in keys:
            _close(runs[world][f"{how}/{key}"], single[key], f"{how} {key}, world {world}")


@pytest.mark.parametrize("world", [2, 4])
def test_sltrain_support_is_sharded_with_its_values(runs, world):
    """Under FSDP2 each rank keeps only its shard of sp_index, the entries of its sp_values shard
    (ceil(nnz / world) on the first ranks, the rest on the last), and no per-entry kernel format:
    the buffers left are the CSR row pointers (N + 1 and K + 1 entries)."""
    for nnz, *rest, sharded, largest in runs[world]["fsdp2/sltrain-fira/support"]:
        index_sizes, value_sizes = rest[:world], rest[world:]
        assert sharded == 1 and index_sizes == value_sizes and sum(index_sizes) == nnz
        assert max(index_sizes) == -(-nnz // world) < nnz
        assert largest <= max(D_IN, D_HID, D_OUT) + 1 < nnz


@pytest.mark.parametrize("world", [1, 4])
def test_checkpoint_resumes_on_another_world_size(runs, world):
    """Saved on 2 ranks at step 10, resumed on 1 (one process, no FSDP) and on 4: the next 10
    steps equal the uninterrupted run's (the 2-rank run, itself equal to one process's)."""
    got = runs[world] if world != 1 else {k: v for k, v in runs[1].items()}
    for name in ("fira", "galore-per-layer"):
        _close(got[f"resumed/{name}/losses"], runs[2][f"fsdp2/{name}/losses"][CKPT_STEP:], f"{name} losses")
        keys = [k for k in got if k.startswith(f"resumed/{name}/param/")]
        assert keys
        for key in keys:
            _close(got[key], runs[2][key.replace("resumed/", "fsdp2/")], key)


@pytest.mark.parametrize("world", [2, 4])
def test_communication_matches_formula(runs, world):
    """The bytes counted at torch.distributed's collectives during step(): a first refresh step
    (seed broadcast with refresh='randomized', refresh, step), a plain step, a second refresh:
    communication_bytes', for the randomized refresh (sketches), 'svd' (the gathered gradient) and
    'dct' (the gathered gradient on the left, the energies on the right)."""
    for opt_name, refresh in COMMUNICATION:
        counted = runs[world][f"comm/{opt_name}-{refresh}/counted"]
        predicted = runs[world][f"comm/{opt_name}-{refresh}/predicted"]
        np.testing.assert_array_equal(counted, predicted)
        assert counted[1] > 0 and counted[2] > counted[1]


def test_communication_of_the_readme_matrix():
    """The README's figures for a 4096×11008 weight at r = 256 on 8 ranks (side 'left', fp32): a
    reduce-scatter and an all-gather of (r, n), Fira's with one more row and its limiter's fp32."""
    c = lkd.communication_bytes((4096, 11008), 256, 8)
    assert c["step"] == 2 * 256 * 11008 * 4 == 22_544_384
    assert c["refresh"] == 3 * 264 * (11008 + 4096) * 4 == 47_849_472
    assert lkd.communication_bytes((4096, 11008), 256, 8, fira=True)["step"] == 2 * 257 * 11008 * 4 + 4 == 22_632_452
    assert lkd.communication_bytes((11008, 4096), 256, 8)["step"] == 0


def test_refusals(one_rank_group):
    """accumulation_steps > 1 on a sharded parameter is refused at construction; so are a save before
    the first step and ddp_per_layer on an optimizer that is not per-layer."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    p = nn.Parameter(distribute_tensor(torch.randn(8, 6), mesh, [Shard(0)]))
    with pytest.raises(ValueError, match="accumulation_steps"):
        lk.FiraAdamW([{"params": [p], "rank": 2}], refresh="randomized", per_layer=True, accumulation_steps=2)
    opt = lk.FiraAdamW([{"params": [p], "rank": 2}], refresh="randomized")
    with pytest.raises(ValueError, match="first step"):
        lkd.save(nn.Module(), opt, "unused")
    ddp = nn.parallel.DistributedDataParallel(nn.Linear(4, 3))
    with pytest.raises(ValueError, match="per_layer=True"):
        lkd.ddp_per_layer(ddp, lk.GaLoreAdamW(ddp.parameters()))


@pytest.mark.parametrize("method, options", [
    ("lora", {}), ("vera", {}), ("vera", {"bases": "seeded"}), ("randlora", {}), ("randlora", {"bases": "seeded"}),
    ("sltrain", {"density": 0.2}), ("lowrank", {}),
])
def test_every_method_under_fsdp2(one_rank_group, method, options):
    """Each LowRankLinear method (converted layers, bases shared by convert) under fully_shard:
    trainable and frozen parameters (SLTrain's support index too) become DTensors, bases and the
    supports' kernel formats stay plain buffers (the stored bases one shared object, seeded ones
    absent), and 3 Fira steps equal one process's."""
    from torch.distributed.fsdp import fully_shard

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(D_IN, D_HID), nn.Tanh(), nn.Linear(D_HID, D_OUT))
        lk.convert(model, method=method, rank=4, backend="reference", **options)
        with torch.no_grad():  # zero-initialised factors and scales: move them, so every one gets gradients
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn_like(p))
        return model

    def run(model):
        named = [p for p in model.parameters() if p.requires_grad]
        opt = lk.FiraAdamW([{"params": [p for p in named if p.dim() != 2]},
                            {"params": [p for p in named if p.dim() == 2], "rank": 2, "update_proj_gap": 2,
                             "alpha": 0.5}], lr=1e-2, refresh="randomized", backend="reference")
        return _train(model, opt, range(3)), _params(model)

    want_losses, want = run(build())
    model = build()
    buffers = {n: b for n, b in model.named_buffers()}
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    assert all(isinstance(p, DTensor) for p in model.parameters())  # sltrain: sp_index (frozen, int64) too
    assert all(not isinstance(b, DTensor) and b is buffers[n] for n, b in model.named_buffers())
    if method in ("vera", "randlora"):
        names = [n for n in vars(model[0])["_buffers"] if n.startswith(method + "_")]
        assert len(names) == 2
        for name in names:
            a, b = getattr(model[0], name), getattr(model[2], name)
            assert (a is None and b is None) if options else a is b
    losses, got = run(model)
    _close(np.array(losses), np.array(want_losses), f"{method} losses")
    for name, value in want.items():
        _close(got[name], value, f"{method} {name}")
