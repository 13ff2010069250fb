"""GaLoreAdamW / FiraAdamW: peer parity, kernels in the loop, validation, checkpoints, per-layer mode,
refresh kinds, batched launches, host-read-free steps, CUDA graphs, torch.compile."""

import contextlib
import io
import warnings

import pytest
import torch
from _helpers import DEVICE, HAS_CUDA, TOL, rel_err

from lowrank_kernels.ops import projected_step as ps
from lowrank_kernels.optim import ApolloAdamW, FiraAdamW, GaLoreAdamW, GraphedStep, projection_side
from lowrank_kernels.optim import refresh as rf

OURS = {"galore": (GaLoreAdamW, "scale"), "fira": (FiraAdamW, "alpha")}


def peers():
    """The peers' optimizers (test extras); galore-torch needs bitsandbytes importable."""
    galore_torch = pytest.importorskip("galore_torch")
    fira = pytest.importorskip("fira")
    return {"galore": galore_torch.GaLoreAdamW, "fira": fira.FiraAdamW}


class Tiny(torch.nn.Module):
    """Two linear layers so a plain (bias, 1-D) group and a projected (2-D) group both train."""

    def __init__(self, m, n, dtype=torch.float32):
        super().__init__()
        self.lin = torch.nn.Linear(n, m).to(device=DEVICE, dtype=dtype)
        self.out = torch.nn.Linear(m, 3).to(device=DEVICE, dtype=dtype)

    def forward(self, x):
        return self.out(torch.tanh(self.lin(x)))


def groups(model, kind, rank=5, gap=6, proj_type="std", **extra):
    key = OURS[kind][1]
    return [
        {"params": [model.lin.bias, model.out.weight, model.out.bias]},
        {"params": [model.lin.weight], "rank": rank, "update_proj_gap": gap, key: 0.5, "proj_type": proj_type, **extra},
    ]


def batches(n, steps, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, n, generator=g).to(DEVICE, dtype), torch.randn(16, 3, generator=g).to(DEVICE, dtype))
            for _ in range(steps)]


def loss_fn(model, x, y):
    return ((model(x).float() - y.float()) ** 2).mean()


def train(model, opt, data, sched=None):
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        loss_fn(model, x, y).backward()
        opt.step()
        if sched is not None:
            sched.step()
    return [p.detach().clone() for p in model.parameters()]


def fresh(m, n, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return Tiny(m, n, dtype)


@pytest.mark.parametrize("kind", ["galore", "fira"])
@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
def test_peer_parity(kind, proj_type, shape):
    """20 steps, refreshes at steps 0, 6, 12, 18: our reference path follows the peer's trajectory."""
    peer_cls = peers()[kind]
    m, n = shape
    data = batches(n, 20)
    ours_model, peer_model = fresh(m, n), fresh(m, n)
    ours_groups = groups(ours_model, kind, proj_type=proj_type)
    ours_opt = OURS[kind][0](ours_groups, lr=1e-2, weight_decay=0.1, backend="reference")
    ours = train(ours_model, ours_opt, data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        peer_opt = peer_cls(groups(peer_model, kind, proj_type=proj_type), lr=1e-2, weight_decay=0.1)
    theirs = train(peer_model, peer_opt, data)
    start = [p.detach() for p in fresh(m, n).parameters()]
    for a, b, s in zip(ours, theirs, start):
        assert rel_err(a - s, b - s) <= 1e-6


@pytest.mark.parametrize("kind", ["galore", "fira"])
def test_triton_backend_follows_reference(kind):
    m, n = 33, 20
    data = batches(n, 8)
    runs = {}
    for backend in ["reference", "triton"]:
        model = fresh(m, n)
        opt = OURS[kind][0](groups(model, kind, gap=4), lr=1e-2, weight_decay=0.1, backend=backend)
        runs[backend] = train(model, opt, data)
    start = [p.detach() for p in fresh(m, n).parameters()]
    for a, b, s in zip(runs["triton"], runs["reference"], start):
        assert rel_err(a - s, b - s) <= 1e-4


@pytest.mark.parametrize("kind", ["galore", "fira"])
@pytest.mark.parametrize("key, value", [
    ("lr", -1.0), ("betas", (0.9, 1.0)), ("betas", (-0.1, 0.9)), ("eps", -1.0), ("weight_decay", float("nan")),
    ("rank", 0), ("rank", 25), ("rank", 2.5), ("update_proj_gap", 0), ("proj_type", "full"),
    ("proj_type", "diagonal"), ("refresh", "qr"), ("scale_key", float("inf")),
])
def test_bad_group_hyper_parameters(kind, key, value):
    model = fresh(40, 24)
    g = groups(model, kind)
    key = OURS[kind][1] if key == "scale_key" else key
    g[1][key] = value
    with pytest.raises(ValueError, match=rf"param group 1: '{key}'"):
        OURS[kind][0](g)


def test_rank_on_non_2d_parameter():
    model = fresh(40, 24)
    with pytest.raises(ValueError, match="param group 0: 'rank'.*2-D"):
        GaLoreAdamW([{"params": [model.lin.bias], "rank": 2}])


def test_bad_constructor_arguments():
    params = list(fresh(40, 24).parameters())
    for kwargs, word in [(dict(lr=-1.0), "lr"), (dict(accumulation_steps=2), "accumulation_steps"),
                         (dict(max_grad_norm=0.0), "max_grad_norm"), (dict(backend="tpu"), "backend"),
                         (dict(power_iters=-1), "power_iters")]:
        with pytest.raises(ValueError, match=word):
            GaLoreAdamW(params, **kwargs)


def test_projection_side_rules():
    assert projection_side("std", (40, 24)) == "right" and projection_side("std", (24, 40)) == "left"
    assert projection_side("reverse_std", (40, 24)) == "left" and projection_side("reverse_std", (24, 40)) == "right"
    assert projection_side("left", (40, 24)) == "left" and projection_side("right", (24, 40)) == "right"


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------
def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("kind, refresh, backend", [
    ("galore", "svd", "reference"), ("fira", "randomized", "reference"), ("galore", "dct", "reference"),
    ("fira", "svd", "triton"),
])
def test_resume_is_bit_identical(kind, refresh, backend):
    m, n = 24, 40
    data = batches(n, 9)
    cls = OURS[kind][0]
    model = fresh(m, n)
    opt = cls(groups(model, kind, gap=3, refresh=refresh), lr=1e-2, weight_decay=0.1, backend=backend)
    full = train(model, opt, data)

    model = fresh(m, n)
    opt = cls(groups(model, kind, gap=3, refresh=refresh), lr=1e-2, weight_decay=0.1, backend=backend)
    train(model, opt, data[:4])
    saved_model = _roundtrip(model.state_dict())
    saved_opt = _roundtrip(opt.state_dict())
    del model, opt
    model = fresh(m, n, seed=123)
    model.load_state_dict(saved_model)
    opt = cls(groups(model, kind, gap=3, refresh=refresh), lr=1e-2, weight_decay=0.1, backend=backend)
    opt.load_state_dict(saved_opt)
    resumed = train(model, opt, data[4:])
    for a, b in zip(full, resumed):
        assert torch.equal(a, b)


def test_state_dict_keeps_fp32_moments_for_bf16_parameters():
    model = fresh(24, 40, dtype=torch.bfloat16)
    opt = FiraAdamW(groups(model, "fira"), lr=1e-2, backend="reference")
    train(model, opt, batches(40, 2, torch.bfloat16))
    opt2 = FiraAdamW(groups(model, "fira"), lr=1e-2, backend="reference")
    opt2.load_state_dict(_roundtrip(opt.state_dict()))
    for p in model.parameters():
        st = opt2.state[p]
        assert st["exp_avg"].dtype == torch.float32 and st["exp_avg_sq"].dtype == torch.float32
        assert torch.equal(st["exp_avg"], opt.state[p]["exp_avg"])
    assert opt2.state[model.lin.weight]["limiter_norm"].dtype == torch.float32


# ----------------------------------------------------------------------------------------------
# Per-layer mode
# ----------------------------------------------------------------------------------------------
def _train_per_layer(model, opt, data, accumulation=1, sched=None):
    for i in range(0, len(data), accumulation):
        for x, y in data[i:i + accumulation]:
            (loss_fn(model, x, y) / accumulation).backward()
            assert all(p.grad is None for p in model.parameters() if p in opt._position) or accumulation > 1
        opt.step()
        if sched is not None:
            sched.step()
    return [p.detach().clone() for p in model.parameters()]


def _train_accumulating(model, opt, data, accumulation, sched=None):
    for i in range(0, len(data), accumulation):
        opt.zero_grad(set_to_none=True)
        for x, y in data[i:i + accumulation]:
            (loss_fn(model, x, y) / accumulation).backward()
        opt.step()
        if sched is not None:
            sched.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("kind", ["galore", "fira"])
def test_per_layer_matches_global_step_with_scheduler(kind):
    m, n = 40, 24
    data = batches(n, 8)
    cls = OURS[kind][0]
    lam = lambda s: 1.0 / (1 + s)  # noqa: E731

    model = fresh(m, n)
    opt = cls(groups(model, kind, gap=3), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lam)
    ref = train(model, opt, data, sched)

    model = fresh(m, n)
    opt = cls(groups(model, kind, gap=3), lr=1e-2, weight_decay=0.1, per_layer=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lam)
    out = _train_per_layer(model, opt, data, sched=sched)
    assert sched.last_epoch == len(data)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * lam(len(data)))
    for a, b in zip(out, ref):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["galore", "fira"])
def test_per_layer_accumulation(kind):
    m, n = 40, 24
    data = batches(n, 12)
    cls = OURS[kind][0]
    model = fresh(m, n)
    ref = _train_accumulating(model, cls(groups(model, kind, gap=2), lr=1e-2), data, 3)
    model = fresh(m, n)
    opt = cls(groups(model, kind, gap=2), lr=1e-2, per_layer=True, accumulation_steps=3)
    seen_projected = []
    orig = opt._can_accumulate_projected
    opt._can_accumulate_projected = lambda p, g: seen_projected.append(orig(p, g)) or seen_projected[-1]
    out = _train_per_layer(model, opt, data, accumulation=3)
    # GaLore keeps only R between refreshes (gap 2 leaves every other step refresh-free);
    # Fira always keeps the full gradient.
    assert any(seen_projected) == (kind == "galore")
    start = [p.detach() for p in fresh(m, n).parameters()]
    for a, b, s in zip(out, ref, start):
        assert rel_err(a - s, b - s) <= 1e-5


@pytest.mark.parametrize("kind", ["galore", "fira"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.slow
def test_per_layer_resume_inside_an_accumulation_is_bit_identical(kind, backend):
    """12 micro-batches, 3 per step, refreshes at steps 0 and 2: a checkpoint taken after micro-batch
    4 (GaLore holds projected sums R) or 7 (before a refresh: full sums) carries the pending
    accumulation, and the resumed run equals the uninterrupted one bit for bit."""
    m, n = 40, 24
    data = batches(n, 12)
    cls = OURS[kind][0]

    def build(seed=0):
        model = fresh(m, n, seed=seed)
        return model, cls(groups(model, kind, gap=2), lr=1e-2, weight_decay=0.1, per_layer=True,
                          accumulation_steps=3, backend=backend)

    model, opt = build()
    full = _train_per_layer(model, opt, data, accumulation=3)
    opt.remove_hooks()
    for cut, pending in ((4, "proj_grad_acc" if kind == "galore" else "grad_acc"), (7, "grad_acc")):
        model, opt = build()
        for x, y in data[:cut]:
            (loss_fn(model, x, y) / 3).backward()
        saved = [_roundtrip(x.state_dict()) for x in (model, opt)]
        assert all(p.grad is None for p in model.parameters())
        assert pending in saved[1]["state"][3]  # lin.weight: group 1, the fourth parameter
        opt.remove_hooks()
        model, opt = build(seed=123)
        for obj, sd in zip((model, opt), saved):
            obj.load_state_dict(sd)
        for x, y in data[cut:]:
            (loss_fn(model, x, y) / 3).backward()
        opt.remove_hooks()
        for a, b in zip(full, model.parameters()):
            assert torch.equal(a, b), f"resumed after micro-batch {cut}"


def test_per_parameter_clipping():
    m, n = 40, 24
    data = batches(n, 4)
    model = fresh(m, n)
    opt = GaLoreAdamW(groups(model, "galore"), lr=1e-2, max_grad_norm=0.05, per_layer=True)
    out = _train_per_layer(model, opt, data)
    model = fresh(m, n)
    opt = GaLoreAdamW(groups(model, "galore"), lr=1e-2)
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        loss_fn(model, x, y).backward()
        for p in model.parameters():
            norm = p.grad.norm()
            p.grad.mul_(torch.clamp(0.05 / (norm + 1e-6), max=1.0))
        opt.step()
    for a, b in zip(out, model.parameters()):
        assert rel_err(a, b.detach()) <= TOL[torch.float32]


@pytest.mark.parametrize("kind", ["galore", "fira"])
def test_per_layer_resume_follows_the_scheduler_bit_for_bit(kind):
    """The hooks read the groups that load_state_dict installs (and the scheduler edits)."""
    m, n = 40, 24
    data = batches(n, 8)
    cls = OURS[kind][0]
    lam = lambda s: 1.0 / (1 + s)  # noqa: E731

    def build(seed=0):
        model = fresh(m, n, seed=seed)
        opt = cls(groups(model, kind, gap=3), lr=1e-2, weight_decay=0.1, per_layer=True)
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lam)

    model, opt, sched = build()
    full = _train_per_layer(model, opt, data, sched=sched)
    opt.remove_hooks()

    model, opt, sched = build()
    _train_per_layer(model, opt, data[:4], sched=sched)
    saved = [_roundtrip(x.state_dict()) for x in (model, opt, sched)]
    opt.remove_hooks()
    model, opt, sched = build(seed=123)
    for obj, sd in zip((model, opt, sched), saved):
        obj.load_state_dict(sd)
    resumed = _train_per_layer(model, opt, data[4:], sched=sched)
    for a, b in zip(full, resumed):
        assert torch.equal(a, b)

    # An lr edited after loading takes effect: lr 0 and no decay leave every weight where it is.
    for group in opt.param_groups:
        group["lr"], group["weight_decay"] = 0.0, 0.0
    before = [p.detach().clone() for p in model.parameters()]
    _train_per_layer(model, opt, data[:2])
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)


def test_second_per_layer_optimizer_on_the_same_parameters_is_refused():
    model = fresh(40, 24)
    first = GaLoreAdamW(groups(model, "galore"), lr=1e-2, per_layer=True)
    with pytest.raises(ValueError, match=r"param group 0: params\[0\].*per-layer GaLoreAdamW.*remove_hooks\(\).*"
                                         r"remove_per_layer_hooks"):
        FiraAdamW(groups(model, "fira"), lr=1e-2, per_layer=True)
    # The documented ways out: the holder's remove_hooks(), or the function when it is out of reach.
    from lowrank_kernels.optim import remove_per_layer_hooks

    assert remove_per_layer_hooks(model.parameters()) == [first]
    second = GaLoreAdamW(groups(model, "galore"), lr=1e-2, per_layer=True)
    x, y = batches(24, 1)[0]
    loss_fn(model, x, y).backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(int(second.state[p]["step"]) == 1 for p in model.parameters())
    assert "step" not in first.state.get(model.lin.weight, {})


def _checkpoint(kind, rank=5, **extra):
    model = fresh(24, 40)
    opt = OURS[kind][0](groups(model, kind, rank=rank, **extra), lr=1e-2)
    train(model, opt, batches(40, 2))
    return _roundtrip(opt.state_dict())


@pytest.mark.parametrize("make, into, match", [
    (lambda: _checkpoint("galore"), "fira", r"checkpoint param group 1: missing key\(s\) \['alpha'\].*GaLore"),
    (lambda: _checkpoint("fira"), "galore", r"checkpoint param group 1: missing key\(s\) \['scale'\]"),
    (lambda: _checkpoint("galore", rank=8), "galore", r"checkpoint param group 1: 'rank' is 8 .* but 5"),
    (lambda: _checkpoint("galore", proj_type="left"), "galore", r"group 1: 'proj_type' is 'left'"),
])
def test_mismatched_checkpoints_fail_at_load_time(make, into, match):
    saved = make()
    model = fresh(24, 40)
    opt = OURS[into][0](groups(model, into), lr=1e-2)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(saved)
    assert not opt.state  # nothing was loaded


def test_torch_adamw_checkpoint_and_unknown_state_keys_are_refused():
    model = fresh(24, 40)
    torch_opt = torch.optim.AdamW(groups(model, "galore")[:1] + [{"params": [model.lin.weight]}], lr=1e-2)
    train(model, torch_opt, batches(40, 1))
    opt = GaLoreAdamW(groups(model, "galore"), lr=1e-2)
    with pytest.raises(ValueError, match=r"checkpoint param group 0: missing key\(s\) \['correct_bias', 'refresh'\]"
                                         r".*torch.optim"):
        opt.load_state_dict(torch_opt.state_dict())
    saved = _checkpoint("fira")
    with pytest.raises(ValueError, match=r"group 1, params\[0\]: unknown state key\(s\) \['limiter_norm'\]"):
        saved["param_groups"][1]["scale"] = saved["param_groups"][1].pop("alpha")
        GaLoreAdamW(groups(fresh(24, 40), "galore"), lr=1e-2).load_state_dict(saved)


@pytest.mark.parametrize("kind", ["galore", "fira"])
@pytest.mark.parametrize("key, edit, match", [
    ("exp_avg_sq", lambda v: v.neg_(), r"'exp_avg_sq' holds negative values"),
    ("exp_avg", lambda v: v.index_fill_(1, torch.tensor([3]), float("nan")), r"'exp_avg' holds NaN or inf"),
    ("step", lambda v: 2.5, r"'step' must be an int >= 0 or a 0-d floating tensor"),
    ("step", lambda v: torch.tensor(-1.0, dtype=torch.float64), r"'step' must be .* = -1"),
    ("proj", lambda v: v[:, :3], r"'proj' must be a floating-point tensor of shape \(24, 5\)"),
    ("refreshes", lambda v: -1, r"'refreshes' must be an int >= 0"),
    ("micro", lambda v: 1, r"'micro' is 1, .* accumulation_steps=1"),
])
def test_bad_state_values_fail_at_load_time(kind, key, edit, match):
    """A checkpoint whose values no step could have written (a negative second moment, which would
    make the weights NaN one step later, NaN moments, a step count that is no count, a projector of
    another shape, a pending micro-batch the optimizer cannot finish) is refused at load time, naming
    the parameter and the key; nothing is loaded."""
    saved = _checkpoint(kind)
    state = saved["state"][3]  # lin.weight: group 1, the fourth parameter
    state[key] = edit(state.get(key))
    model = fresh(24, 40)
    opt = OURS[kind][0](groups(model, kind), lr=1e-2)
    with pytest.raises(ValueError, match=r"checkpoint param group 1, params\[0\]: " + match):
        opt.load_state_dict(saved)
    assert not opt.state


def test_int_step_loads_as_a_device_count():
    """An int 'step' (torch.optim's old layout, the peers') is a count: it loads as the 0-d float64
    tensor the steps count on, and the run goes on as from the tensor."""
    saved = _checkpoint("galore")
    as_int = _roundtrip(saved)
    for state in as_int["state"].values():
        state["step"] = int(state["step"])
    runs = []
    for sd in (saved, as_int):
        model = fresh(24, 40)
        opt = GaLoreAdamW(groups(model, "galore"), lr=1e-2)
        opt.load_state_dict(sd)
        assert all(s["step"].dtype == torch.float64 and s["step"].dim() == 0 for s in opt.state.values())
        runs.append(train(model, opt, batches(40, 3, seed=2)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def _peer_run(kind, model, steps, data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        opt = peers()[kind](groups(model, kind, gap=3), lr=1e-2, weight_decay=0.1)
    train(model, opt, data[:steps])
    return opt


@pytest.mark.parametrize("kind", ["galore", "fira"])
@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
def test_peer_checkpoint_loads_and_continues_as_the_peer(kind, shape):
    """galore-torch's / fira's own state_dict (int step, a projector object, Fira's scaling_grad),
    saved after 4 steps (refreshes at 0 and 3), loads into ours; the next 7 steps (refreshes at 6,
    9) follow the peer continuing from the same checkpoint."""
    m, n = shape
    data = batches(n, 11)
    peer_model = fresh(m, n)
    peer_opt = _peer_run(kind, peer_model, 4, data)
    buf = io.BytesIO()
    torch.save((peer_model.state_dict(), peer_opt.state_dict()), buf)  # the projector object is pickled
    buf.seek(0)
    model_sd, opt_sd = torch.load(buf, weights_only=False)
    assert isinstance(opt_sd["state"][3]["step"], int) and "projector" in opt_sd["state"][3]
    start = [p.detach().clone() for p in peer_model.parameters()]
    theirs = train(peer_model, peer_opt, data[4:])

    model = fresh(m, n, seed=7)
    model.load_state_dict(model_sd)
    opt = OURS[kind][0](groups(model, kind, gap=3), lr=1e-2, weight_decay=0.1, backend="reference")
    opt.load_state_dict(opt_sd)
    assert opt.state[model.lin.weight]["refreshes"] == 2
    ours = train(model, opt, data[4:])
    for a, b, s in zip(ours, theirs, start):
        assert rel_err(a - s, b - s) <= 1e-6


def test_peer_checkpoints_that_do_not_map_are_refused():
    """A galore-torch checkpoint into FiraAdamW lacks Fira's keys; into refresh='dct' its SVD projector
    has nowhere to go."""
    data = batches(40, 2)
    model = fresh(24, 40)
    opt_sd = _peer_run("galore", model, 2, data).state_dict()
    with pytest.raises(ValueError, match=r"checkpoint param group 1: missing key\(s\) \['alpha'\].*GaLore"):
        FiraAdamW(groups(fresh(24, 40), "fira", gap=3), lr=1e-2).load_state_dict(opt_sd)
    with pytest.raises(ValueError, match=r"param group 1, params\[0\]: this GaLoreAdamW has refresh='dct'.*'svd'"):
        GaLoreAdamW(groups(fresh(24, 40), "galore", gap=3, refresh="dct"), lr=1e-2).load_state_dict(opt_sd)


@pytest.mark.parametrize("kind, key", [("galore", "update_proj_gaps"), ("fira", "scale"), ("galore", "alpha")])
def test_unknown_group_keys_are_refused(kind, key):
    model = fresh(24, 40)
    g = groups(model, kind)
    g[1][key] = 10
    with pytest.raises(ValueError,
                       match=rf"param group 1: unknown key\(s\) \['{key}'\].*accepted keys:.*'update_proj_gap'"):
        OURS[kind][0](g, lr=1e-2)
    saved = _checkpoint(kind)
    saved["param_groups"][1][key] = 10
    with pytest.raises(ValueError, match=rf"checkpoint param group 1: unknown key\(s\) \['{key}'\]"):
        OURS[kind][0](groups(model, kind), lr=1e-2).load_state_dict(saved)


@pytest.mark.parametrize("refresh", ["svd", "randomized", "dct"])
def test_non_finite_gradient_at_a_refresh_names_parameter_and_step(refresh):
    model = fresh(24, 40)
    opt = GaLoreAdamW(groups(model, "galore", gap=2, refresh=refresh), lr=1e-2)
    train(model, opt, batches(40, 2))
    x, y = batches(40, 1)[0]
    opt.zero_grad()
    loss_fn(model, x, y).backward()
    model.lin.weight.grad[3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"param group 1, params\[0\] of shape \(24, 40\) has a NaN or inf gradient "
                                         r"at optimizer step 3, a projector refresh step"):
        opt.step()


def test_per_layer_refuses_grad_scaler():
    model = fresh(40, 24)
    opt = GaLoreAdamW(groups(model, "galore"), lr=1e-2, per_layer=True)
    scaler = torch.amp.GradScaler("cuda" if HAS_CUDA else "cpu")
    x, y = batches(24, 1)[0]
    scaler.scale(loss_fn(model, x, y)).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        with pytest.raises(RuntimeError, match="GradScaler"):
            scaler.step(opt)


# ----------------------------------------------------------------------------------------------
# Refresh kinds
# ----------------------------------------------------------------------------------------------
def _low_rank_plus_noise(m, n, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(m, r, generator=g)
    v = torch.randn(r, n, generator=g)
    s = torch.logspace(1, 0, r)
    return (u * s) @ v + 0.3 * torch.randn(m, n, generator=g)


@pytest.mark.parametrize("side", ["left", "right"])
def test_randomized_refresh_captures_svd_energy(side):
    G = _low_rank_plus_noise(90, 70, 8)
    exact = rf.captured_energy(G, rf.svd_projector(G, 8, side), side)
    P = rf.randomized_projector(G, 8, side, seed=5)
    assert rf.captured_energy(G, P, side) >= 0.99 * exact
    eye = P @ P.t() if side == "right" else P.t() @ P
    assert torch.allclose(eye, torch.eye(8), atol=1e-5)
    assert torch.equal(P, rf.randomized_projector(G, 8, side, seed=5))
    assert not torch.equal(P, rf.randomized_projector(G, 8, side, seed=6))


@pytest.mark.parametrize("n", [16, 37])
def test_dct_coefficients_match_explicit_basis(n):
    g = torch.randn(5, n, dtype=torch.float64)
    D = rf.dct_basis_rows(torch.arange(n), n).double()
    assert torch.allclose(D @ D.t(), torch.eye(n, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(rf.dct_coefficients(g), g @ D.t(), atol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_dct_selects_the_most_aligned_columns(side):
    m, n, r = 30, 50, 4
    dim = n if side == "right" else m
    chosen = torch.tensor([1, 7, 20, 29])
    basis = rf.dct_basis_rows(chosen, dim)
    coeffs = torch.randn(m if side == "right" else n, r) * 10
    G = coeffs @ basis if side == "right" else (coeffs @ basis).t()
    G = G + 0.01 * torch.randn_like(G)
    idx = rf.dct_select(G, r, side)
    assert torch.equal(idx, chosen)
    P = rf.dct_projector(idx, dim, side)
    assert rf.captured_energy(G, P, side) > 0.99


def test_dct_state_holds_indices_only():
    model = fresh(24, 40)
    opt = GaLoreAdamW(groups(model, "galore", refresh="dct"), lr=1e-2)
    train(model, opt, batches(40, 2))
    st = opt.state[model.lin.weight]
    assert "proj" not in st and st["dct_index"].dtype == torch.int64 and st["dct_index"].numel() == 5


# ----------------------------------------------------------------------------------------------
# Batched launches, host-read-free steps, CUDA graphs, torch.compile
# ----------------------------------------------------------------------------------------------
class Stack(torch.nn.Module):
    """Three same-shape matrices (one bucket), one of another shape, biases (a plain bucket)."""

    def __init__(self, d=16, h=20):
        super().__init__()
        self.inp = torch.nn.Linear(d, h).to(DEVICE)
        self.mid = torch.nn.ModuleList(torch.nn.Linear(h, h, bias=False).to(DEVICE) for _ in range(2))
        self.side = torch.nn.Linear(d, h).to(DEVICE)
        self.out = torch.nn.Linear(h, 3).to(DEVICE)

    def forward(self, x):
        h = torch.tanh(self.inp(x)) + torch.tanh(self.side(x))
        for lin in self.mid:
            h = torch.tanh(lin(h))
        return self.out(h)

    def matrices(self):
        return [self.inp.weight, self.side.weight] + [lin.weight for lin in self.mid]


def stack_groups(model, kind, one_group_per_matrix=False, **extra):
    key = OURS[kind][1]
    hyper = dict(rank=4, update_proj_gap=3, proj_type="std", **{key: 0.5}, **extra)
    plain = [p for p in model.parameters() if all(p is not q for q in model.matrices())]
    mats = model.matrices()
    if one_group_per_matrix:
        return [{"params": plain}] + [{"params": [p], **hyper} for p in mats]
    return [{"params": plain}, {"params": mats, **hyper}]


def fresh_stack(seed=0):
    torch.manual_seed(seed)
    return Stack()


@pytest.mark.parametrize("kind", ["galore", "fira"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.slow
def test_same_shape_parameters_share_one_launch(kind, backend, monkeypatch):
    """One launch per bucket, and the same bits as one launch per parameter."""
    data = batches(16, 4)
    cls = OURS[kind][0]
    launches = []
    real = ps.projected_adamw_steps
    monkeypatch.setattr(ps, "projected_adamw_steps", lambda w, *a, **k: launches.append(len(w)) or real(w, *a, **k))
    model = fresh_stack()
    batched = train(model, cls(stack_groups(model, kind), lr=1e-2, weight_decay=0.1, backend=backend), data)
    # (16 → 20) inp and side share a bucket, and so do the two (20 → 20) mid layers.
    assert launches == [2, 2] * len(data)
    launches.clear()
    model = fresh_stack()
    single = train(model, cls(stack_groups(model, kind, True), lr=1e-2, weight_decay=0.1, backend=backend), data)
    assert launches == [1] * 4 * len(data)
    for a, b in zip(batched, single):
        assert torch.equal(a, b)


@contextlib.contextmanager
def no_host_reads():
    """Fail on any read of a tensor's value by the host: on a GPU, each would synchronise. On a
    GPU torch's sync debug mode checks the same from the driver's side."""

    def read(*args, **kwargs):
        raise AssertionError("a tensor's value was read on the host during a step without refresh")

    names = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")
    saved = {name: getattr(torch.Tensor, name) for name in names}
    for name in names:
        setattr(torch.Tensor, name, read)
    if HAS_CUDA:
        torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)
        if HAS_CUDA:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("kind, backend, extra", [
    ("galore", "reference", {}), ("fira", "reference", {"max_grad_norm": 0.1}),
    ("galore", "triton", {"refresh": "dct"}), ("fira", "triton", {"refresh": "randomized"}),
])
@pytest.mark.slow
def test_steps_without_refresh_read_nothing_on_the_host(kind, backend, extra):
    """Step counts, step sizes, a tensor lr under a scheduler, the limiter and clipping all stay
    on the device; only the refresh schedule is decided on the host, without reading it."""
    model = fresh_stack()
    refresh = {"refresh": extra.pop("refresh")} if "refresh" in extra else {}
    lr = torch.tensor(1e-2, dtype=torch.float64, device=DEVICE)
    opt = OURS[kind][0](stack_groups(model, kind, **refresh), lr=lr, weight_decay=0.1, backend=backend, **extra)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    due = []
    for x, y in batches(16, 5):
        opt.zero_grad(set_to_none=False)
        loss_fn(model, x, y).backward()
        due.append(opt.refresh_due())
        if due[-1]:
            opt.step()
        else:
            with no_host_reads():
                opt.step()
        sched.step()
    assert due == [True, False, False, True, False]
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.slow
def test_tensor_lr_under_a_scheduler_matches_float_lr():
    data = batches(16, 5)
    runs = []
    for lr in (1e-2, torch.tensor(1e-2, dtype=torch.float64, device=DEVICE)):
        model = fresh_stack()
        opt = FiraAdamW(stack_groups(model, "fira"), lr=lr, weight_decay=0.1)
        runs.append(train(model, opt, data, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("kind", ["galore", "fira"])
def test_graphed_step_matches_eager(kind):
    """Graph replays on the steps without refresh, eager refreshes: the eager trajectory, bit for bit."""
    data = batches(16, 10)
    runs = []
    for graphed in (False, True):
        model = fresh_stack()
        lr = torch.tensor(1e-2, dtype=torch.float64, device=DEVICE)
        opt = OURS[kind][0](stack_groups(model, kind), lr=lr, weight_decay=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        step = GraphedStep(opt, warmup_steps=1) if graphed else opt.step
        for x, y in data:
            loss_fn(model, x, y).backward()
            step()
            opt.zero_grad(set_to_none=False)
            sched.step()
        if graphed:
            assert step.graph is not None
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_graphed_step_needs_the_standard_mode():
    model = fresh_stack()
    with pytest.raises(ValueError, match="per_layer"):
        GraphedStep(GaLoreAdamW(stack_groups(model, "galore"), per_layer=True))


@pytest.mark.parametrize("kind, backend", [("galore", "reference"), ("fira", "triton")])
@pytest.mark.slow
def test_compiled_step_matches_eager(kind, backend):
    """torch.compile (aot_eager on the CPU) of a function calling opt.step(): the custom ops stay
    whole, the host bookkeeping runs between graphs, and the trajectory is eager's."""
    data = batches(16, 4)
    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model = fresh_stack()
        opt = OURS[kind][0](stack_groups(model, kind), lr=1e-2, weight_decay=0.1, backend=backend)

        def step():
            opt.step()

        fn = torch.compile(step, backend="aot_eager") if compiled else step
        for x, y in data:
            opt.zero_grad(set_to_none=True)
            loss_fn(model, x, y).backward()
            fn()
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("make", [
    lambda ps_: GaLoreAdamW([{"params": ps_, "rank": 2}], lr=1e-2, backend="reference"),
    lambda ps_: FiraAdamW([{"params": ps_, "rank": 2}], lr=1e-2, backend="reference"),
    lambda ps_: ApolloAdamW([{"params": ps_, "rank": 2}], lr=1e-2, backend="reference"),
], ids=["galore", "fira", "apollo"])
def test_step_runs_the_closure_with_grad_and_returns_its_loss(make):
    """torch.optim's closure protocol: step() (under no_grad) evaluates the closure with grad on."""
    W = torch.nn.Parameter(torch.randn(8, 6, device=DEVICE))
    opt = make([W])
    before = W.detach().clone()

    def closure():
        opt.zero_grad()
        loss = (W ** 2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.equal(loss, (before ** 2).sum())
    assert not torch.equal(W.detach(), before)
