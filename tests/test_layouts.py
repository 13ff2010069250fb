"""Every tensor argument of every public op, in every layout a view can have, on every backend.

The arguments come from the ops' registrations: each op file's ``LAYOUT_SOURCES`` says which
public argument stands behind each tensor argument of its registered ops (ops/_checks.py,
``layout_sources``), and ``test_every_registered_tensor_argument_has_a_source`` fails when a
registered op or one of its tensor arguments is missing there. Each public argument named there is
swept: passed as a strided slice, an expanded (stride-0) view, a view at a storage offset and (2-D
and up) a transposed view, the rest contiguous. The result (output and every gradient, or the
state an in-place step mutates) must equal the reference backend's on contiguous copies within the
dtype's tolerance, or the call must be refused with a ValueError/TypeError naming the argument
where refusal is the contract (a self-overlapping tensor written in place; a layout an op
documents as required). The buffer behind each view is poisoned (NaN) outside the view, so a
kernel reading past the view's elements shows up in the result, and must be unchanged afterwards,
so a kernel writing past them is caught too.
"""

import importlib
import inspect
import pkgutil
import re
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
from _helpers import assert_close, kernel_backends

import lowrank_kernels as lk
import lowrank_kernels.ops
from lowrank_kernels.ops import dora as dora_op
from lowrank_kernels.ops import projected_step as ps

M, K, N, R = 5, 33, 17, 3
LAYOUTS = ("strided", "expanded", "offset", "transposed")
BACKENDS = ["reference"] + kernel_backends()
# What pads a view's buffer outside the view: read, it poisons the result.
INT_POISON = 1 << 40


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # hundreds of tiny calls: torch's thread pool costs more than it saves, most on a busy machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------
# The registrations' tables
# ----------------------------------------------------------------------------------------------
def _tables() -> dict:
    out = {}
    for info in pkgutil.iter_modules(lowrank_kernels.ops.__path__):
        module = importlib.import_module(f"lowrank_kernels.ops.{info.name}")
        for op, publics in getattr(module, "LAYOUT_SOURCES", {}).items():
            out[f"lowrank_kernels::{op}"] = publics
    return out


SOURCES = _tables()


def _registered() -> dict:
    """{op name: its schema's tensor arguments} of every registered lowrank_kernels op."""
    out = {}
    for name in torch._C._dispatch_get_all_op_names():
        if not name.startswith("lowrank_kernels::"):
            continue
        schema = getattr(torch.ops.lowrank_kernels, name.split("::")[1]).default._schema
        out[name] = [a.name for a in schema.arguments if "Tensor" in str(a.type)]
    return out


def _swept() -> dict:
    """{public op: sorted public arguments} named by the tables."""
    out = {}
    for publics in SOURCES.values():
        for public, args in publics.items():
            names = out.setdefault(public, set())
            for source in args.values():
                names.update(s for s in (source if isinstance(source, tuple) else (source,)) if s is not None)
    return {op: sorted(names) for op, names in out.items()}


SWEPT = _swept()


def test_every_registered_tensor_argument_has_a_source():
    registered = _registered()
    assert registered, "no lowrank_kernels ops registered"
    for op, tensors in registered.items():
        assert op in SOURCES, f"{op} is registered but no op file's LAYOUT_SOURCES names it"
        for public, args in SOURCES[op].items():
            missing = [t for t in tensors if t not in args]
            assert not missing, f"{op}: tensor arguments {missing} have no source for {public} in LAYOUT_SOURCES"
            unknown = [a for a in args if a not in tensors]
            assert not unknown, f"{op}: LAYOUT_SOURCES names {unknown}, not tensor arguments of its schema"


def test_every_swept_argument_is_built():
    for public, names in SWEPT.items():
        assert public in BUILDERS, f"{public} is in LAYOUT_SOURCES but this test cannot build its arguments"
        case = BUILDERS[public](torch.float32)
        built = set(case.args) | ({"grad_output"} if case.grad_output else set())
        assert set(names) <= built, f"{public}: no builder for {sorted(set(names) - built)}"


# ----------------------------------------------------------------------------------------------
# Views
# ----------------------------------------------------------------------------------------------
def _poison(like: torch.Tensor, numel: int) -> torch.Tensor:
    if like.is_floating_point():
        return torch.full((numel,), float("nan"), dtype=like.dtype)
    return torch.full((numel,), INT_POISON, dtype=like.dtype)


def applicable(layout: str, t: torch.Tensor) -> bool:
    if layout == "strided":
        return t.dim() >= 1 and t.numel() > 0
    if layout == "expanded":
        return any(s > 1 for s in t.shape)
    if layout == "transposed":
        return t.dim() >= 2
    return True


def make_view(t: torch.Tensor, layout: str):
    """(view, buffer): a view of ``buffer`` in ``layout`` holding t's values (an expanded view
    holds t's first slice along its first dim of size > 1, repeated). The buffer outside the view
    is poison."""
    t = t.detach()
    if layout == "strided":
        buf = _poison(t, 2 * t.numel()).view(*t.shape[:-1], 2 * t.shape[-1])
        view = buf[..., ::2]
    elif layout == "offset":
        buf = _poison(t, t.numel() + 5)
        view = buf[3:3 + t.numel()].view(t.shape)
    elif layout == "transposed":
        buf = _poison(t, t.numel()).view(*t.shape[:-2], t.shape[-1], t.shape[-2])
        view = buf.transpose(-1, -2)
    else:
        d = next(i for i, s in enumerate(t.shape) if s > 1)
        one = t.narrow(d, 0, 1)
        buf = _poison(t, 2 * one.numel())
        base = buf[:one.numel()].view(one.shape)
        base.copy_(one)
        return base.expand(t.shape), buf
    view.copy_(t)
    return view, buf


def _covered(view: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """Boolean mask over ``buf``'s elements that ``view`` addresses."""
    pos = torch.arange(buf.numel()).as_strided(view.shape, view.stride(), view.storage_offset() - buf.storage_offset())
    mask = torch.zeros(buf.numel(), dtype=torch.bool)
    mask[pos.reshape(-1)] = True
    return mask


# ----------------------------------------------------------------------------------------------
# Cases: one builder per public op, giving its arguments contiguous
# ----------------------------------------------------------------------------------------------
@dataclass
class Case:
    call: Callable  # (args dict, backend) -> output, or None for an in-place step
    args: dict
    grads: tuple = ()  # arguments whose gradients are compared
    mutated: tuple = ()  # arguments an in-place step updates (compared after the step)
    grad_output: bool = False  # a layer: sweep the layout of the gradient backward receives
    refused: dict = field(default_factory=dict)  # {argument: layouts the op documents as refused}
    derive: Callable = None  # recomputes arguments that depend on others: (args, swept) -> None
    lists: bool = False  # the op takes lists: errors name an argument by its singular

    def name_in_error(self, arg: str) -> str:
        return arg[:-1] if self.lists and arg.endswith("s") else arg


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def lora_case(dtype):
    args = dict(x=randn(M, K, dtype=dtype), weight=randn(N, K, dtype=dtype), lora_A=randn(R, K, dtype=dtype),
                lora_B=randn(N, R, dtype=dtype), bias=randn(N, dtype=dtype))
    return Case(lambda a, be: lk.lora_linear(a["x"], a["weight"], a["lora_A"], a["lora_B"], 2.0, bias=a["bias"],
                                             backend=be),
                args, grads=tuple(args), grad_output=True)


def _params4bit(W):
    import bitsandbytes as bnb

    with torch.compiler.set_stance("force_eager"):
        return bnb.nn.Params4bit(W.float(), requires_grad=False, quant_type="nf4", blocksize=64,
                                 compress_statistics=True).to("cpu")


def lora_4bit_case(dtype):
    case = lora_case(dtype)
    W4 = _params4bit(case.args.pop("weight"))
    case.call = lambda a, be: lk.lora_linear(a["x"], W4, a["lora_A"], a["lora_B"], 2.0, bias=a["bias"], backend=be)
    case.grads = tuple(case.args)
    return case


def dora_case(dtype, weight=None):
    args = dict(x=randn(M, K, dtype=dtype), weight=randn(N, K, dtype=dtype), lora_A=randn(R, K, dtype=dtype),
                lora_B=randn(N, R, dtype=dtype), magnitude=randn(N, dtype=dtype).abs() + 0.5,
                bias=randn(N, dtype=dtype))

    def derive(a, swept):
        if swept != "weight_sq_norm":
            a["weight_sq_norm"] = dora_op.weight_sq_norm(a["weight"] if weight is None else weight)

    def call(a, be):
        return lk.dora_linear(a["x"], a["weight"] if weight is None else weight, a["lora_A"], a["lora_B"],
                              a["magnitude"], 2.0, bias=a["bias"], weight_sq_norm=a["weight_sq_norm"], backend=be)

    if weight is not None:
        del args["weight"]
    derive(args, None)
    grads = tuple(k for k in args if k not in ("weight", "weight_sq_norm"))
    return Case(call, args, grads=grads, grad_output=True, derive=derive)


def dora_4bit_case(dtype):
    return dora_case(dtype, weight=_params4bit(randn(N, K)))


def vera_case(dtype):
    args = dict(x=randn(M, K, dtype=dtype), weight=randn(N, K, dtype=dtype), vera_A=randn(R, K, dtype=dtype),
                vera_B=randn(N, R, dtype=dtype), lambda_d=randn(R, dtype=dtype), lambda_b=randn(N, dtype=dtype),
                bias=randn(N, dtype=dtype))
    return Case(lambda a, be: lk.vera_linear(a["x"], a["weight"], a["vera_A"], a["vera_B"], a["lambda_d"],
                                             a["lambda_b"], a["bias"], backend=be),
                args, grads=("x", "weight", "lambda_d", "lambda_b", "bias"), grad_output=True)


def randlora_case(dtype):
    nb, dmin, dmax = 2, min(N, K), max(N, K)
    args = dict(x=randn(M, K, dtype=dtype), weight=randn(N, K, dtype=dtype), basis_A=randn(R, nb, dmin, dtype=dtype),
                basis_B=randn(dmax, nb, R, dtype=dtype), lambda_=randn(R, nb, dtype=dtype),
                gamma=randn(nb, dmin, dtype=dtype), bias=randn(N, dtype=dtype))
    return Case(lambda a, be: lk.randlora_linear(a["x"], a["weight"], a["basis_A"], a["basis_B"], a["lambda_"],
                                                 a["gamma"], 0.5, a["bias"], backend=be),
                args, grads=("x", "weight", "lambda_", "gamma", "bias"), grad_output=True)


def nola_case(dtype):
    args = dict(x=randn(M, K, dtype=dtype), weight=randn(N, K, dtype=dtype), alpha=randn(4, dtype=dtype),
                beta=randn(3, dtype=dtype), bias=randn(N, dtype=dtype))
    return Case(lambda a, be: lk.nola_linear(a["x"], a["weight"], a["alpha"], a["beta"], R, 7, 0.5, a["bias"],
                                             backend=be),
                args, grads=tuple(args), grad_output=True)


def sparse_case(dtype):
    nnz = 40
    index = torch.randperm(N * K)[:nnz].sort().values
    args = dict(x=randn(M, K, dtype=dtype), lr_A=randn(R, K, dtype=dtype), lr_B=randn(N, R, dtype=dtype),
                sp_values=randn(nnz, dtype=dtype), sp_index=index, bias=randn(N, dtype=dtype))
    return Case(lambda a, be: lk.sparse_lowrank_linear(a["x"], a["lr_A"], a["lr_B"], a["sp_values"], a["sp_index"],
                                                       2.0, a["bias"], backend=be),
                args, grads=("x", "lr_A", "lr_B", "sp_values", "bias"), grad_output=True,
                # an expanded index repeats its first entry: a support with duplicates
                refused={"sp_index": ("expanded",)})


def multi_lora_case(dtype):
    n = 3
    args = dict(x=randn(M, K, dtype=dtype), weight=randn(N, K, dtype=dtype), lora_A=randn(n, R, K, dtype=dtype),
                lora_B=randn(n, N, R, dtype=dtype), bias=randn(N, dtype=dtype),
                adapter_index=torch.tensor([[0, 2], [1, -1], [2, 1], [0, 0], [1, 2]]),
                adapter_weight=randn(M, 2, dtype=dtype), scaling=randn(n, dtype=dtype),
                ranks=torch.tensor([3, 1, 2]))
    return Case(lambda a, be: lk.multi_lora_linear(a["x"], a["weight"], a["lora_A"], a["lora_B"], a["adapter_index"],
                                                   a["scaling"], a["bias"], backend=be,
                                                   adapter_weight=a["adapter_weight"], ranks=a["ranks"]),
                args, grads=("x", "weight", "lora_A", "lora_B", "bias", "adapter_weight", "scaling"),
                grad_output=True)


def _orthonormal_rows(r, n):
    return torch.linalg.qr(torch.randn(n, r))[0].t().contiguous()


def projected_case(dtype):
    args = dict(weight=randn(N, K, dtype=dtype), grad=randn(N, K, dtype=dtype), proj=_orthonormal_rows(R, K),
                exp_avg=randn(N, R), exp_avg_sq=randn(N, R).abs(), limiter_norm=torch.tensor(3.0),
                proj_grad=randn(N, R), step=torch.tensor(3.0, dtype=torch.float64), lr=torch.tensor(0.01))

    def call(a, be):
        # GaLore on the given projected gradient, or Fira on the full one
        galore = dict(grad=None, proj_grad=a["proj_grad"]) if call.swept == "proj_grad" else \
            dict(grad=a["grad"], fira=True, limiter_norm=a["limiter_norm"])
        lk.projected_adamw_step(a["weight"], galore.pop("grad"), a["proj"], a["exp_avg"], a["exp_avg_sq"],
                                side="right", step=a["step"], lr=a["lr"], weight_decay=0.1, scale=0.5,
                                backend=be, **galore)

    return Case(call, args, mutated=("weight", "exp_avg", "exp_avg_sq", "limiter_norm"))


def adamw_case(dtype):
    args = dict(weight=randn(N, K, dtype=dtype), grad=randn(N, K, dtype=dtype), exp_avg=randn(N, K),
                exp_avg_sq=randn(N, K).abs(), step=torch.tensor(3.0, dtype=torch.float64), lr=torch.tensor(0.01))
    return Case(lambda a, be: lk.adamw_step(a["weight"], a["grad"], a["exp_avg"], a["exp_avg_sq"], step=a["step"],
                                            lr=a["lr"], weight_decay=0.1, backend=be),
                args, mutated=("weight", "exp_avg", "exp_avg_sq"),
                # documented: the moments are contiguous
                refused={"exp_avg": ("strided", "expanded", "transposed"),
                         "exp_avg_sq": ("strided", "expanded", "transposed")})


def apollo_case(dtype):
    args = dict(weights=randn(N, K, dtype=dtype), grads=randn(N, K, dtype=dtype), projs=randn(R, K),
                exp_avgs=randn(N, R), exp_avg_sqs=randn(N, R).abs(), limiter_norms=torch.tensor(3.0),
                steps=torch.tensor(3.0, dtype=torch.float64), lr=torch.tensor(0.01))
    return Case(lambda a, be: ps.apollo_steps([a["weights"]], [a["grads"]], [a["projs"]], [a["exp_avgs"]],
                                              [a["exp_avg_sqs"]], [a["limiter_norms"]], side="right",
                                              steps=[a["steps"]], lr=a["lr"], weight_decay=0.1, scale=4.0,
                                              backend=be),
                args, mutated=("weights", "exp_avgs", "exp_avg_sqs", "limiter_norms"), lists=True)


def project_case(dtype):
    args = dict(grad=randn(N, K, dtype=dtype), proj=_orthonormal_rows(R, K))
    return Case(lambda a, be: ps.project(a["grad"], a["proj"], "right", backend=be), args)


BUILDERS = {
    "lora_linear": lora_case, "lora_linear_4bit": lora_4bit_case, "dora_linear": dora_case,
    "dora_linear_4bit": dora_4bit_case, "vera_linear": vera_case, "randlora_linear": randlora_case,
    "nola_linear": nola_case, "sparse_lowrank_linear": sparse_case, "multi_lora_linear": multi_lora_case,
    "projected_adamw_step": projected_case, "adamw_step": adamw_case, "apollo_steps": apollo_case,
    "project": project_case,
}


# ----------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------
def _example(public: str, arg: str):
    """The argument as the builder makes it (None where it makes none)."""
    if public not in _EXAMPLES:
        _EXAMPLES[public] = BUILDERS[public](torch.float32).args if public in BUILDERS else {}
    return torch.empty(M, N) if arg == "grad_output" else _EXAMPLES[public].get(arg)


_EXAMPLES: dict = {}


def _sweep_params():
    params = []
    for public, names in SWEPT.items():
        for arg in names:
            like = _example(public, arg)
            for layout in LAYOUTS:
                # an argument the builders lack fails test_every_swept_argument_is_built
                if like is not None and applicable(layout, like):
                    params.append(pytest.param(public, arg, layout, id=f"{public}-{arg}-{layout}"))
    return params


torch.manual_seed(0)
SWEEP = _sweep_params()


def _fresh(case_args, requires):
    return {k: (v.detach().clone().requires_grad_(k in requires) if isinstance(v, torch.Tensor) else v)
            for k, v in case_args.items()}


def _run(case, args, backend, grad_output):
    """(output or None, {name: gradient}, {name: state after the step})."""
    out = case.call(args, backend)
    grads = {}
    if out is not None and case.grads:
        out.backward(grad_output)
        grads = {k: args[k].grad for k in case.grads}
    return out, grads, {k: args[k] for k in case.mutated}


def run_layout(public, arg, layout, backend, dtype):
    torch.manual_seed(1)
    case = BUILDERS[public](dtype)
    case.call.swept = arg
    grad_output = randn(M, N, dtype=dtype) if case.grad_output else None
    source = grad_output if arg == "grad_output" else case.args[arg]
    view, buf = make_view(source, layout)
    before = buf.clone()

    ref_args = dict(case.args)
    if arg != "grad_output":
        ref_args[arg] = view.contiguous()
    if case.derive is not None:
        case.derive(ref_args, arg)
    test_args = _fresh(ref_args, case.grads)
    if arg == "grad_output":
        test_grad_output, ref_grad_output = view, view.contiguous()
    else:
        test_args[arg] = view.detach().requires_grad_(arg in case.grads) if view.is_floating_point() else view
        test_grad_output = ref_grad_output = grad_output
    ref_args = _fresh(ref_args, case.grads)

    must_refuse = layout in case.refused.get(arg, ()) or (layout == "expanded" and arg in case.mutated)
    try:
        out, grads, state = _run(case, test_args, backend, test_grad_output)
    except (ValueError, TypeError) as err:
        word = case.name_in_error(arg)
        assert re.search(rf"\b{re.escape(word)}", str(err)), f"refused without naming {word!r}: {err}"
        assert must_refuse or backend == "cuda", f"{arg} {layout} refused: {err}"
        return
    assert not must_refuse, f"{arg} as an {layout} view was accepted; it must be refused"

    ref_out, ref_grads, ref_state = _run(case, ref_args, "reference", ref_grad_output)
    if out is not None:
        assert_close(out, ref_out, dtype, "output")
    for k, g in ref_grads.items():
        assert grads[k] is not None, f"no gradient for {k}"
        assert_close(grads[k], g, dtype, f"d {k}")
    for k, s in ref_state.items():
        # fp32 moments follow the step's 16-bit products: the step's dtype sets the tolerance
        assert_close(state[k], s, dtype, f"{k} after the step")

    # nothing written outside the view; a read-only argument not written at all
    untouched = ~_covered(view, buf) if arg in case.mutated else torch.ones(buf.numel(), dtype=torch.bool)
    assert torch.equal(buf.reshape(-1)[untouched].isnan(), before.reshape(-1)[untouched].isnan())
    kept = untouched & ~before.reshape(-1).isnan() if buf.is_floating_point() else untouched
    assert torch.equal(buf.reshape(-1)[kept], before.reshape(-1)[kept]), \
        f"{arg}'s buffer written outside the op's outputs"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("public,arg,layout", SWEEP)
def test_layout(public, arg, layout, backend):
    run_layout(public, arg, layout, backend, torch.float32)


FP16_CASES = [(public, SWEPT[public][0]) for public in SWEPT]


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("public,arg", FP16_CASES, ids=[f"{p}-{a}" for p, a in FP16_CASES])
def test_layout_fp16(public, arg, backend):
    """One 16-bit case per op: a strided view of its first argument (in the tables' order)."""
    like = _example(public, arg)
    run_layout(public, arg, "strided" if applicable("strided", like) else "offset", backend, torch.float16)


def test_tables_name_only_public_arguments():
    """Each public argument named in the tables is an argument of the public function (a typo in
    a table would sweep nothing)."""
    functions = {"lora_linear": lk.lora_linear, "lora_linear_4bit": lk.lora_linear, "dora_linear": lk.dora_linear,
                 "dora_linear_4bit": lk.dora_linear, "vera_linear": lk.vera_linear,
                 "randlora_linear": lk.randlora_linear, "nola_linear": lk.nola_linear,
                 "sparse_lowrank_linear": lk.sparse_lowrank_linear, "multi_lora_linear": lk.multi_lora_linear,
                 "projected_adamw_step": lk.projected_adamw_step, "adamw_step": lk.adamw_step,
                 "apollo_steps": ps.apollo_steps, "project": ps.project}
    for public, names in SWEPT.items():
        assert public in functions, f"{public}: which public function is it?"
        params = set(inspect.signature(functions[public]).parameters) | {"grad_output"}
        assert set(names) <= params, f"{public}: {sorted(set(names) - params)} are not its arguments"
