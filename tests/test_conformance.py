"""Every declared op (lowrank_kernels.registry) on every backend it declares: torch.library.opcheck of
each of its library ops with valid arguments, and its public entry point compiled with
``torch.compile(fullgraph=True, backend="aot_eager")`` against eager (forward, and backward for the
layer ops). SAMPLES holds the arguments by op name; an op declared without a sample, or whose samples
leave one of its library ops unchecked, fails here."""

from __future__ import annotations

import dataclasses
from typing import Callable

import pytest
import torch
from _helpers import DEVICE, HAS_CUDA, activation, base_weight, lora_factors, params4bit

import lowrank_kernels as lk
from lowrank_kernels import backend as lk_backend
from lowrank_kernels import registry
from lowrank_kernels.ops import _quant, dora, multi_lora
from lowrank_kernels.ops import projected_step as ps
from lowrank_kernels.ops import random_basis as rb
from lowrank_kernels.ops.sparse_lowrank import op_args

SEED = torch.tensor(8, dtype=torch.int64)  # a dropout seed as the entry points pass it to the ops


# ----------------------------------------------------------------------------------------------
# Library ops by name, their arguments ordered by their schemas
# ----------------------------------------------------------------------------------------------
def _overload(op) -> torch._ops.OpOverload:
    """The OpOverload of a declared library op (a custom_op's definition or an overload packet)."""
    if hasattr(op, "_opoverload"):
        return op._opoverload
    return op.default if hasattr(op, "default") else op


def _name(op) -> str:
    return _overload(op)._schema.name.split("::")[1]


def _library(name: str) -> torch._ops.OpOverload:
    return getattr(torch.ops.lowrank_kernels, name).default


def _args(name: str, values: dict) -> tuple:
    """The op's positional arguments from ``values`` keyed by the schema's argument names."""
    args = []
    for a in _library(name)._schema.arguments:
        if a.name in values:
            args.append(values[a.name])
        elif a.has_default_value():
            args.append(a.default_value)
        else:
            raise KeyError(f"the sample gives no {a.name!r} for lowrank_kernels::{name}")
    return tuple(args)


def _call(name: str, values: dict):
    return _library(name)(*_args(name, values))


@dataclasses.dataclass
class Sample:
    """The library calls to opcheck, (name, arguments by schema name), and the entry point on
    ``inputs``; ``backward``: gradients with respect to the inputs that require grad are compared."""

    calls: list
    entry: Callable
    inputs: tuple
    backward: bool = True


@dataclasses.dataclass(frozen=True)
class Case:
    """A sample of an op: the library ops it checks, whether it has a 4-bit base weight, and
    ``build(backend) -> Sample``."""

    covers: tuple
    build: Callable
    quant4: bool = False


def _backward_calls(fwd: str, bwd: str, values: dict, outputs: tuple) -> list:
    """The forward call, then the backward call for both values of need_dx, reading the forward's
    outputs named ``outputs`` (the first is y, whose gradient dy is random)."""
    result = _call(fwd, values)
    named = dict(zip(outputs, result))
    after = {**values, **named, "dy": torch.randn_like(named["y"])}
    return [(fwd, values)] + [(bwd, {**after, "need_dx": need_dx}) for need_dx in (True, False)]


# ----------------------------------------------------------------------------------------------
# LoRA and DoRA: dense and 4-bit base weights, with and without dropout
# ----------------------------------------------------------------------------------------------
def _quant4_values(W4) -> dict:
    q = _quant.from_params4bit(W4)
    names = ("packed", "absmax", "code", "absmax2", "code2", "offset")
    return {**dict(zip(names, q.tensors())), "blocksize": q.blocksize, "blocksize2": q.blocksize2,
            "out_features": q.n}


def _adapter_inputs(M, K, N, r, dtype, quant4):
    x = activation(M, K, dtype)
    W = params4bit(torch.randn(N, K) / K**0.5) if quant4 else base_weight(N, K, dtype)
    A, B = lora_factors(K, N, r, dtype)
    b = torch.randn(N, device=DEVICE, dtype=dtype)
    return x, W, A, B, b


def _dtype(backend, quant4):
    # The CUDA backend's 4-bit GEMM runs on tensor cores only (registry.CUDA_16BIT).
    return torch.float16 if (quant4 and backend == "cuda") else torch.float32


def _lora(p, quant4=False):
    def build(backend):
        x, W, A, B, b = _adapter_inputs(7, 20, 12, 3, _dtype(backend, quant4), quant4)
        values = dict(x=x.detach(), lora_A=A.detach(), lora_B=B.detach(), bias=b, scaling=2.0, dropout_p=p,
                      seed=SEED if p else None, backend=backend)
        values.update(_quant4_values(W) if quant4 else dict(weight=W))
        prefix = "lora_linear_4bit" if quant4 else "lora_linear"
        calls = _backward_calls(f"{prefix}_fwd", f"{prefix}_bwd", values, ("y", "h"))

        def entry(x_, A_, B_):
            return lk.lora_linear(x_, W, A_, B_, 1.0, b, dropout_p=p, seed=21, backend=backend)
        return Sample(calls, entry, (x, A, B))
    prefix = "lora_linear_4bit" if quant4 else "lora_linear"
    return Case((f"{prefix}_fwd", f"{prefix}_bwd"), build, quant4)


def _dora(p, quant4=False):
    def build(backend):
        x, W, A, B, b = _adapter_inputs(7, 20, 12, 3, _dtype(backend, quant4), quant4)
        m = (torch.rand(12, device=DEVICE) + 0.5).to(x.dtype).requires_grad_(True)
        values = dict(x=x.detach(), lora_A=A.detach(), lora_B=B.detach(), magnitude=m.detach(), bias=b,
                      weight_sq=dora.weight_sq_norm(W), scaling=2.0, dropout_p=p, seed=SEED if p else None,
                      backend=backend, save=True)
        values.update(_quant4_values(W) if quant4 else dict(weight=W))
        prefix = "dora_linear_4bit" if quant4 else "dora_linear"
        calls = _backward_calls(f"{prefix}_fwd", f"{prefix}_bwd", values, ("y", "h", "v", "n"))

        def entry(x_, A_, B_, m_):
            return lk.dora_linear(x_, W, A_, B_, m_, 1.0, b, dropout_p=p, seed=21, backend=backend)
        return Sample(calls, entry, (x, A, B, m))
    prefix = "dora_linear_4bit" if quant4 else "dora_linear"
    return Case((f"{prefix}_fwd", f"{prefix}_bwd"), build, quant4)


# ----------------------------------------------------------------------------------------------
# Multi-LoRA: tokens grouped by adapter, with and without dropout
# ----------------------------------------------------------------------------------------------
def _multi_lora(p):
    def build(backend):
        M, n = 9, 3
        x = activation(M, 16, torch.float32)
        W, b = base_weight(12, 16, torch.float32), torch.randn(12, device=DEVICE)
        A, B = lora_factors(16, 12, 2, torch.float32, stack=(n,))
        index = torch.arange(M, device=DEVICE) % (n + 1) - 1  # every adapter and no adapter (-1)
        key, coef, ranks = multi_lora._prepare(x, A, B, index, 1.5, None, None)
        values = dict(x=x.detach(), weight=W, lora_A=A.detach(), lora_B=B.detach(), bias=b, key=key,
                      coef=coef.detach(), ranks=ranks, dropout_p=p, seed=SEED if p else None, backend=backend,
                      grouped=True)
        calls = _backward_calls("multi_lora_linear_fwd", "multi_lora_linear_bwd", values, ("y", "h", "grouping"))

        def entry(x_, A_, B_):
            return lk.multi_lora_linear(x_, W, A_, B_, index, 1.0, b, dropout_p=p, seed=3, backend=backend)
        return Sample(calls, entry, (x, A, B))
    return Case(("multi_lora_linear_fwd", "multi_lora_linear_bwd"), build)


# ----------------------------------------------------------------------------------------------
# VeRA, RandLoRA, NOLA: stored and seeded bases, both RandLoRA orientations
# ----------------------------------------------------------------------------------------------
def _random_basis(method, seeded, K=20, N=12):
    def build(backend):
        r = 3
        x = activation(7, K, torch.float32)
        W, b = base_weight(N, K, torch.float32), torch.randn(N, device=DEVICE)
        bseed = 11 if seeded else None
        if method == "vera":
            A = None if seeded else torch.randn(r, K, device=DEVICE)
            B = None if seeded else torch.randn(N, r, device=DEVICE)
            s1, s2, scaling, R = torch.rand(r, device=DEVICE), torch.rand(N, device=DEVICE), 0.5, r
        elif method == "randlora":
            n_b = rb.randlora_num_bases(K, N, r)
            A = None if seeded else torch.randn(r, 1, min(N, K), device=DEVICE)
            B = None if seeded else torch.randn(max(N, K), n_b, r, device=DEVICE)
            s1, s2 = torch.rand(r, n_b, device=DEVICE), torch.rand(n_b, min(N, K), device=DEVICE)
            scaling, R = 2.0, r * n_b
        else:
            A = B = None
            s1, s2, scaling, R = torch.randn(4, device=DEVICE), torch.randn(5, device=DEVICE), 1.5, r
        s1.requires_grad_(True)
        s2.requires_grad_(True)
        values = dict(x=x.detach(), weight=W, bias=b, basis_A=A, basis_B=B, scale_1=s1.detach(), scale_2=s2.detach(),
                      scaling=scaling, dropout_p=0.2, seed=SEED, basis_seed=bseed, rank=R, method=method,
                      backend=backend)
        calls = _backward_calls("random_basis_fwd", "random_basis_bwd", values, ("y", "h"))

        def entry(x_, s1_, s2_):
            kw = dict(dropout_p=0.2, seed=21, backend=backend)
            if method == "nola":
                return rb.nola_linear(x_, W, s1_, s2_, r, bseed, scaling, b, **kw)
            if method == "vera":
                return lk.vera_linear(x_, W, A, B, s1_, s2_, b, basis_seed=bseed, **kw)
            return lk.randlora_linear(x_, W, A, B, s1_, s2_, scaling, b, basis_seed=bseed, **kw)
        return Sample(calls, entry, (x, s1, s2))
    return Case(("random_basis_fwd", "random_basis_bwd"), build)


# ----------------------------------------------------------------------------------------------
# Sparse plus low-rank: uniform and block supports, and the low-rank-only op
# ----------------------------------------------------------------------------------------------
def _sparse_lowrank(kind, block=None):
    def build(backend):
        M, K, N, r = 6, 20, 18, 2
        support = None if kind == "none" else lk.random_support((N, K), 0.2, kind, block=block or (16, 16),
                                                                device=DEVICE)
        x = activation(M, K, torch.float32)
        A, B = lora_factors(K, N, r, torch.float32)
        v = None if support is None else torch.randn(support.nnz, device=DEVICE).requires_grad_(True)
        b = torch.randn(N, device=DEVICE).requires_grad_(True)
        parts, kind_, bh, bw, n_rows, n_cols = op_args(support)
        values = dict(x=x.detach(), lr_A=A.detach(), lr_B=B.detach(), sp_values=None if v is None else v.detach(),
                      parts=parts, kind=kind_, block_h=bh, block_w=bw, n_rows=n_rows, n_cols=n_cols,
                      bias=b.detach(), scaling=1.5, backend=backend)
        calls = _backward_calls("sparse_lowrank_linear_fwd", "sparse_lowrank_linear_bwd", values, ("y", "h"))

        def entry(x_, A_, B_, b_, *v_):
            return lk.sparse_lowrank_linear(x_, A_, B_, *(v_ or (None,)), support, 2.0, b_, backend=backend)
        return Sample(calls, entry, (x, A, B, b) + (() if v is None else (v,)))
    return Case(("sparse_lowrank_linear_fwd", "sparse_lowrank_linear_bwd"), build)


# ----------------------------------------------------------------------------------------------
# Optimizer steps (in place): the entry point steps copies and returns them
# ----------------------------------------------------------------------------------------------
def _coef(batch):
    return torch.tensor([[0.01, 0.001]] * batch, device=DEVICE)


def _projected(side, fira):
    def build(backend):
        m, n, r = 20, 12, 4
        Ws = [0.05 * torch.randn(m, n, device=DEVICE) for _ in range(2)]
        Gs = [torch.randn(m, n, device=DEVICE) for _ in range(2)]
        dim = n if side == "right" else m
        P = torch.linalg.qr(torch.randn(dim, r, device=DEVICE))[0]
        P = (P.t() if side == "right" else P).contiguous()
        rshape = ps.projected_shape((m, n), r, side)
        m1s = [torch.zeros(rshape, device=DEVICE) for _ in range(2)]
        m2s = [torch.rand(rshape, device=DEVICE) for _ in range(2)]
        lims = [torch.tensor(-1.0, device=DEVICE), torch.tensor(0.5, device=DEVICE)] if fira else []
        step = dict(weights=Ws, grads=Gs, projs=[P, P], exp_avgs=m1s, exp_avg_sqs=m2s, limiter_norms=lims,
                    proj_grads=[], coef=_coef(2), side=side, beta1=0.9, beta2=0.999, eps=1e-6, scale=0.5,
                    fira=fira, decay=True, backend=backend)
        calls = [("projected_adamw_step", step), ("project_grad", dict(grad=Gs[0], proj=P, side=side, backend=backend))]

        def entry(W, G, P_, m1, m2, lim):
            W, m1, m2, lim = W.clone(), m1.clone(), m2.clone(), lim.clone()
            ps.projected_adamw_step(W, G, P_, m1, m2, side=side, step=2, lr=1e-3, weight_decay=0.1, fira=fira,
                                    limiter_norm=lim if fira else None, backend=backend)
            return W, m1, m2, lim
        lim = torch.tensor(0.5, device=DEVICE)
        return Sample(calls, entry, (Ws[0], Gs[0], P, m1s[0], m2s[0], lim), backward=False)
    return Case(("projected_adamw_step", "project_grad"), build)


def _adamw():
    def build(backend):
        Ws = [torch.randn(20, 12, device=DEVICE) for _ in range(2)]
        Gs = [torch.randn(20, 12, device=DEVICE) for _ in range(2)]
        zeros = [torch.zeros_like(W) for W in Ws]
        step = dict(weights=Ws, grads=Gs, exp_avgs=zeros, exp_avg_sqs=[z.clone() for z in zeros], coef=_coef(2),
                    beta1=0.9, beta2=0.999, eps=1e-6, decay=True, backend=backend)

        def entry(W, G, m1, m2):
            W, m1, m2 = W.clone(), m1.clone(), m2.clone()
            ps.adamw_step(W, G, m1, m2, step=3, lr=1e-3, weight_decay=0.1, backend=backend)
            return W, m1, m2
        return Sample([("adamw_step", step)], entry, (Ws[0], Gs[0], torch.randn_like(Ws[0]), torch.rand_like(Ws[0])),
                      backward=False)
    return Case(("adamw_step",), build)


def _apollo(tensor_wise):
    def build(backend):
        from lowrank_kernels.optim.apollo import apollo_projection

        m, n, r = 20, 12, 4
        W, G = torch.randn(m, n, device=DEVICE), torch.randn(m, n, device=DEVICE)
        P = apollo_projection((m, n), r, "right", 3, DEVICE)
        m1, m2 = torch.zeros(m, r, device=DEVICE), torch.rand(m, r, device=DEVICE)
        lim = torch.tensor(-1.0, device=DEVICE)
        step = dict(weights=[W], grads=[G], projs=[P], exp_avgs=[m1], exp_avg_sqs=[m2], limiter_norms=[lim],
                    coef=_coef(1), side="right", beta1=0.9, beta2=0.999, eps=1e-6, scale=1.0, tensor_wise=tensor_wise,
                    decay=True, backend=backend)

        def entry(W_, G_, P_, m1_, m2_, lim_):
            W_, m1_, m2_, lim_ = W_.clone(), m1_.clone(), m2_.clone(), lim_.clone()
            ps.apollo_steps([W_], [G_], [P_], [m1_], [m2_], [lim_], side="right", steps=[torch.tensor(2)], lr=1e-3,
                            weight_decay=0.1, tensor_wise=tensor_wise, backend=backend)
            return W_, m1_, m2_, lim_
        return Sample([("apollo_step", step)], entry, (W, G, P, m1.clone(), m2.clone(), lim.clone()), backward=False)
    return Case(("apollo_step",), build)


# Keyed by op name, then by case id; every declared op needs an entry.
SAMPLES = {
    "lora_linear": {"p0": _lora(0.0), "dropout": _lora(0.2), "4bit": _lora(0.2, quant4=True)},
    "dora_linear": {"p0": _dora(0.0), "dropout": _dora(0.2), "4bit": _dora(0.2, quant4=True)},
    "multi_lora_linear": {"p0": _multi_lora(0.0), "dropout": _multi_lora(0.2)},
    "vera_linear": {"stored": _random_basis("vera", False), "seeded": _random_basis("vera", True)},
    "randlora_linear": {"stored": _random_basis("randlora", False), "seeded": _random_basis("randlora", True),
                        "stored-wide": _random_basis("randlora", False, K=12, N=20)},
    "nola_linear": {"seeded": _random_basis("nola", True)},
    "sparse_lowrank_linear": {"uniform": _sparse_lowrank("uniform"), "block16x16": _sparse_lowrank("block", (16, 16)),
                              "block1x16": _sparse_lowrank("block", (1, 16)), "lowrank": _sparse_lowrank("none")},
    "projected_adamw_step": {"right-fira": _projected("right", True), "left": _projected("left", False)},
    "adamw_step": {"step": _adamw()},
    "apollo_step": {"channel": _apollo(False), "tensor-wise": _apollo(True)},
}


# ----------------------------------------------------------------------------------------------
# The test
# ----------------------------------------------------------------------------------------------
def _unavailable(backend):
    if backend == "cuda" and not (HAS_CUDA and lk_backend.cuda_extension() is not None):
        return "needs a GPU and the CUDA extension"
    if backend == "triton" and not (HAS_CUDA or lk_backend.interpreter_enabled()):
        return "needs a GPU or the Triton interpreter"
    return None


def _cases():
    for op in registry.ops():
        for backend in registry.get(op).backends():
            reason = _unavailable(backend)
            marks = [pytest.mark.skip(reason=reason)] if reason else []
            cases = SAMPLES.get(op)
            if not cases:
                yield pytest.param(op, backend, None, id=f"{op}-{backend}-no-sample")
                continue
            for case_id, case in cases.items():
                if case.quant4 and registry.get(op).impl(backend).quant4 is None:
                    continue  # this backend declares no 4-bit base weight
                yield pytest.param(op, backend, case_id, id=f"{op}-{backend}-{case_id}", marks=marks)


@pytest.mark.parametrize("op, backend, case_id", list(_cases()))
def test_conformance(op, backend, case_id):
    assert case_id is not None, f"{op} is declared without a sample: add its arguments to SAMPLES"
    declared = {_name(o) for o in registry.get(op).library_ops}
    covered = {name for case in SAMPLES[op].values() for name in case.covers}
    assert covered == declared, f"{op}: SAMPLES checks {sorted(covered)}, the op declares {sorted(declared)}"
    torch.manual_seed(0)
    # Each case compiles afresh: values that vary across cases would otherwise turn dynamic.
    torch._dynamo.reset()
    case = SAMPLES[op][case_id]
    sample = case.build(backend)
    assert {name for name, _ in sample.calls} == set(case.covers)
    for name, values in sample.calls:
        torch.library.opcheck(_library(name), _args(name, values))

    compiled = torch.compile(sample.entry, fullgraph=True, backend="aot_eager")
    got, want = compiled(*sample.inputs), sample.entry(*sample.inputs)
    torch.testing.assert_close(got, want)
    if sample.backward:
        wrt = [t for t in sample.inputs if isinstance(t, torch.Tensor) and t.requires_grad]
        dy = torch.randn_like(got)
        for g, w in zip(torch.autograd.grad(got, wrt, dy), torch.autograd.grad(want, wrt, dy)):
            torch.testing.assert_close(g, w)
