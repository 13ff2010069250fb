"""backend="auto" (the default on CUDA tensors): the fastest candidate wins, choices are cached in
memory and on disk, stale or corrupted caches are ignored, failing candidates are skipped.

No GPU here: the timer is injected (``auto_backend.timer``), and the end-to-end tests let the ops'
entry points tune on CPU tensors (``auto_backend.tunes``), where the candidates are the reference and
the Triton kernels under the interpreter.
"""

import dataclasses
import json

import pytest
import torch

import lowrank_kernels as lk
from lowrank_kernels import __main__ as lk_main
from lowrank_kernels import auto_backend, backend, registry
from lowrank_kernels.ops import lora as lora_ops

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(auto_backend.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(auto_backend.AUTO_ENV, raising=False)
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    auto_backend.clear_memory()
    yield
    auto_backend.clear_memory()


class FakeTimer:
    """Times a workload by running it once and returning the injected milliseconds of the
    candidate it ran (the workload returns its backend, or a spy on resolve names it)."""

    def __init__(self, ms, which=None):
        self.ms, self.which, self.timed = ms, which, []

    def __call__(self, run):
        b = run() if self.which is None else self.which(run)
        self.timed.append(b)
        return self.ms[b]


def named(b):
    def run():
        if b == "broken":
            raise RuntimeError("this backend cannot run the call")
        return b
    return run


def test_fastest_wins_and_is_cached_in_memory_and_on_disk(monkeypatch):
    timer = FakeTimer({"triton": 2.0, "reference": 1.0, "cuda": 3.0})
    monkeypatch.setattr(auto_backend, "timer", timer)
    assert auto_backend.choose("lora_linear", "k1", CPU, ("triton", "reference", "cuda"), named) == "reference"
    assert timer.timed == ["triton", "reference", "cuda"]
    # memory
    assert auto_backend.choose("lora_linear", "k1", CPU, ("triton", "reference", "cuda"), named) == "reference"
    assert len(timer.timed) == 3
    # disk: a new process (memory cleared) reads the file, times nothing
    path = auto_backend.cache_file(CPU)
    data = json.loads(path.read_text())
    assert data["scope"] == auto_backend.scope(CPU)
    assert data["choices"]["k1"] == {"op": "lora_linear", "backend": "reference",
                                     "ms": {"triton": 2.0, "reference": 1.0, "cuda": 3.0}}
    auto_backend.clear_memory()
    assert auto_backend.choose("lora_linear", "k1", CPU, ("triton", "reference", "cuda"), named) == "reference"
    assert len(timer.timed) == 3
    assert [r["backend"] for r in auto_backend.records(CPU)] == ["reference"]
    # another key is timed on its own, and added to the same file
    timer.ms = {"triton": 0.5, "reference": 1.0}
    assert auto_backend.choose("lora_linear", "k2", CPU, ("triton", "reference"), named) == "triton"
    assert set(json.loads(path.read_text())["choices"]) == {"k1", "k2"}
    assert not [p for p in path.parent.iterdir() if p != path]  # the temporary file was renamed


def test_tie_keeps_the_first_candidate(monkeypatch):
    monkeypatch.setattr(auto_backend, "timer", FakeTimer({"triton": 1.0, "reference": 1.0}))
    assert auto_backend.choose("adamw_step", "k", CPU, ("triton", "reference"), named) == "triton"
    auto_backend.clear_memory()
    assert auto_backend.choose("adamw_step", "k2", CPU, ("reference", "triton"), named) == "reference"


def test_a_candidate_that_raises_is_skipped(monkeypatch):
    timer = FakeTimer({"triton": 5.0, "reference": 9.0})
    monkeypatch.setattr(auto_backend, "timer", timer)
    assert auto_backend.choose("lora_linear", "k", CPU, ("broken", "triton", "reference"), named) == "triton"
    assert timer.timed == ["triton", "reference"]

    def setup_fails(b):
        if b == "triton":
            raise TypeError("no kernel for this dtype")
        return named(b)

    assert auto_backend.choose("lora_linear", "k2", CPU, ("triton", "reference"), setup_fails) == "reference"


def test_every_candidate_raising_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(auto_backend, "timer", FakeTimer({}))

    def differs(b):
        def run():
            raise RuntimeError(f"{b} failed")
        return run

    with pytest.raises(RuntimeError, match=r"^lora_linear: no backend can run this call \(k\): "
                                           r"triton: RuntimeError: triton failed; reference: RuntimeError"):
        auto_backend.choose("lora_linear", "k", CPU, ("triton", "reference"), differs)

    def same(b):
        def run():
            raise ValueError("x has 9 features, expected 8")
        return run

    # the same error from every backend is the input's fault: it reaches the caller unchanged
    with pytest.raises(ValueError, match="^x has 9 features"):
        auto_backend.choose("lora_linear", "k", CPU, ("triton", "reference"), same)
    assert auto_backend.records(CPU) == []


def test_stale_cache_from_other_versions_is_ignored(monkeypatch):
    timer = FakeTimer({"triton": 1.0, "reference": 2.0})
    monkeypatch.setattr(auto_backend, "timer", timer)
    auto_backend.choose("lora_linear", "k", CPU, ("triton", "reference"), named)
    path = auto_backend.cache_file(CPU)
    # the same file name with another version inside (copied by hand, or a hash collision)
    data = json.loads(path.read_text())
    data["scope"]["torch"] = "0.0.1"
    data["choices"]["k"]["backend"] = "reference"
    path.write_text(json.dumps(data))
    auto_backend.clear_memory()
    assert auto_backend.choose("lora_linear", "k", CPU, ("triton", "reference"), named) == "triton"
    assert len(timer.timed) == 4
    # another package version reads another file: nothing cached there
    monkeypatch.setattr(lk._version, "__version__", "99.0")
    auto_backend.clear_memory()
    assert auto_backend.cache_file(CPU) != path
    auto_backend.choose("lora_linear", "k", CPU, ("triton", "reference"), named)
    assert len(timer.timed) == 6


def test_corrupted_cache_is_ignored_with_a_warning(monkeypatch):
    monkeypatch.setattr(auto_backend, "timer", FakeTimer({"triton": 1.0, "reference": 2.0}))
    path = auto_backend.cache_file(CPU)
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.warns(UserWarning, match="ignoring the corrupted auto-backend cache"):
        assert auto_backend.choose("lora_linear", "k", CPU, ("triton", "reference"), named) == "triton"
    assert json.loads(path.read_text())["choices"]["k"]["backend"] == "triton"  # rewritten whole


def test_empty_cache_dir_keeps_choices_in_memory_only(monkeypatch, tmp_path):
    monkeypatch.setenv(auto_backend.CACHE_ENV, "")
    monkeypatch.setattr(auto_backend, "timer", FakeTimer({"triton": 1.0, "reference": 2.0}))
    assert auto_backend.cache_file(CPU) is None
    assert auto_backend.choose("lora_linear", "k", CPU, ("triton", "reference"), named) == "triton"
    assert auto_backend.cached(CPU, "k") == "triton"
    assert not (tmp_path / "cache").exists()


def test_timing_does_not_move_the_callers_rng(monkeypatch):
    monkeypatch.setattr(auto_backend, "timer", lambda run: run())

    def draws(b):
        return lambda: torch.rand(()).item()  # a seed=None dropout draws like this

    torch.manual_seed(3)
    auto_backend.choose("lora_linear", "k", CPU, ("triton", "reference"), draws)
    after = torch.rand(3)
    torch.manual_seed(3)
    torch.testing.assert_close(after, torch.rand(3), rtol=0, atol=0)


def test_candidates():
    assert backend.candidates("lora_linear", CPU, {torch.float64}) == ("reference",)
    assert backend.candidates("lora_linear", CPU, {torch.float32}) == ("triton", "reference")  # interpreter on
    assert backend.candidates("lora_linear", CPU, {torch.bfloat16}) == ("reference",)  # interpreter's bf16
    cuda = torch.device("cuda", 0)
    assert backend.candidates("lora_linear", cuda, {torch.bfloat16})[0] == backend.cuda_default("lora_linear")


def test_candidates_with_the_cuda_extension(monkeypatch):
    monkeypatch.setattr(backend, "cuda_extension", lambda: object())
    cuda = torch.device("cuda", 0)
    assert backend.candidates("lora_linear", cuda, {torch.float16}) == ("triton", "reference", "cuda")
    for op in ("nola_linear", "apollo_step"):  # no CUDA kernels
        assert backend.candidates(op, cuda, {torch.float16}) == ("triton", "reference")
    assert backend.candidates("lora_linear", cuda, {torch.float32}, weight_4bit=True) == ("triton", "reference")
    cuda_first = dataclasses.replace(registry.get("adamw_step"), cuda_default="cuda")
    monkeypatch.setitem(registry._OPS, "adamw_step", cuda_first)
    assert backend.candidates("adamw_step", cuda, {torch.float32}) == ("cuda", "reference", "triton")


def test_bucket():
    assert [auto_backend.bucket(m) for m in (0, 1, 2, 3, 4, 5, 4096, 4097)] == [1, 1, 2, 4, 4, 8, 4096, 8192]


# ----------------------------------------------------------------------------------------------
# End to end through the ops' entry points, on CPU tensors made to tune
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def tuning(monkeypatch):
    """Tune on CPU tensors; a spy on resolve names the backend each run used; lora's backward
    implementation is counted."""
    monkeypatch.setattr(auto_backend, "tunes", lambda device: True)
    resolved, bwd = [], []
    real_resolve, real_bwd = backend.resolve, lora_ops._lora_bwd

    def resolve(op, b, *tensors, **named):
        out = real_resolve(op, b, *tensors, **named)
        resolved.append(out)
        return out

    def lora_bwd(*args):
        bwd.append(args[9])  # the backend argument
        return real_bwd(*args)

    monkeypatch.setattr(backend, "resolve", resolve)
    monkeypatch.setattr(lora_ops, "_lora_bwd", lora_bwd)

    def which(run):
        start = len(resolved)
        run()
        return resolved[start]

    return resolved, bwd, which


def lora_inputs(M, dtype=torch.float32, K=16, N=12, r=4):
    x = torch.randn(M, K, dtype=dtype, requires_grad=True)
    W = torch.randn(N, K, dtype=dtype)
    A = (torch.randn(r, K, dtype=dtype) / 4).requires_grad_()
    B = torch.randn(N, r, dtype=dtype).requires_grad_()
    return x, W, A, B


def test_auto_times_forward_and_backward_and_runs_the_winner(monkeypatch, tuning):
    resolved, bwd, which = tuning
    timer = FakeTimer({"triton": 1.0, "reference": 2.0}, which)
    monkeypatch.setattr(auto_backend, "timer", timer)
    x, W, A, B = lora_inputs(5)
    torch.manual_seed(7)
    y = lk.lora_linear(x, W, A, B, 0.5, dropout_p=0.25)  # seed=None: drawn after timing
    assert timer.timed == ["triton", "reference"]
    assert bwd == ["triton", "reference"]  # each candidate's timing ran its backward
    assert resolved[-1] == "triton"
    assert x.grad is None and A.grad is None and B.grad is None  # timing used autograd.grad on aliases
    torch.manual_seed(7)
    want = lk.lora_linear(x, W, A, B, 0.5, dropout_p=0.25, backend="triton")
    torch.testing.assert_close(y, want, rtol=0, atol=0)  # same seed drawn, same backend
    y.sum().backward()
    assert bwd[-1] == "triton"  # the choice made at forward is kept for backward

    # same bucket (M = 7 rounds to 8, as 5 does; arguments by keyword): cached; M = 9: a new bucket, timed
    x7, W7, A7, B7 = lora_inputs(7)
    lk.lora_linear(x7, W7, lora_A=A7, lora_B=B7, scaling=0.5, dropout_p=0.25)
    assert len(timer.timed) == 2 and resolved[-1] == "triton"
    timer.ms = {"triton": 3.0, "reference": 2.0}
    lk.lora_linear(*lora_inputs(9), 0.5, dropout_p=0.25)
    assert len(timer.timed) == 4 and resolved[-1] == "reference"
    # without gradients: another key, forward only
    n_bwd = len(bwd)
    with torch.no_grad():
        lk.lora_linear(*lora_inputs(5), 0.5, dropout_p=0.25)
    assert len(timer.timed) == 6 and len(bwd) == n_bwd
    keys = [r["key"] for r in auto_backend.records(CPU)]
    assert any("x=(8,16):float32" in k and k.endswith("grad=1") for k in keys)
    assert any("x=(16,16):float32" in k for k in keys) and any(k.endswith("grad=0") for k in keys)


def test_auto_steps_time_on_scratch_copies(monkeypatch, tuning):
    resolved, _, which = tuning
    monkeypatch.setattr(auto_backend, "timer", FakeTimer({"triton": 2.0, "reference": 1.0}, which))
    W = torch.randn(6, 10)
    state = [W, torch.randn(6, 10), torch.zeros(6, 10), torch.zeros(6, 10)]
    copies = [t.clone() for t in state]
    lk.adamw_step(*state, step=1, lr=1e-2, weight_decay=0.1)
    assert resolved[-3:] == ["triton", "reference", "reference"]
    lk.adamw_step(*copies, step=1, lr=1e-2, weight_decay=0.1, backend="reference")
    for got, want in zip(state, copies):  # one step on the caller's tensors, none from timing
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_unsupported_dtype_is_not_timed(monkeypatch, tuning):
    resolved, _, _ = tuning
    timer = FakeTimer({})
    monkeypatch.setattr(auto_backend, "timer", timer)
    lk.lora_linear(*lora_inputs(4, torch.float64), 0.5)  # float64: the reference only
    lk.lora_linear(*lora_inputs(4, torch.bfloat16), 0.5)  # bf16: not on the interpreter
    assert timer.timed == [] and resolved == ["reference", "reference"]
    assert [r["ms"] for r in auto_backend.records(CPU)] == [{}, {}]


def test_bad_input_raises_the_ops_own_error(monkeypatch, tuning):
    monkeypatch.setattr(auto_backend, "timer", FakeTimer({"triton": 1.0, "reference": 2.0}, tuning[2]))
    x, W, A, B = lora_inputs(4)
    with pytest.raises(ValueError, match=r"^lora_A must be \(r, 16\)"):
        lk.lora_linear(x, W, A[:, :5], B, 0.5)


def test_env_vars_and_explicit_backends_skip_timing(monkeypatch, tuning):
    resolved, _, _ = tuning
    timer = FakeTimer({})
    monkeypatch.setattr(auto_backend, "timer", timer)
    args = lora_inputs(4)
    lk.lora_linear(*args, 0.5, backend="reference")
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    lk.lora_linear(*args, 0.5)
    monkeypatch.setenv(backend.ENV_VAR, "auto")
    monkeypatch.setenv(auto_backend.AUTO_ENV, "0")
    lk.lora_linear(*args, 0.5)  # timing off: the device default (the reference on CPU tensors)
    assert timer.timed == [] and resolved == ["reference", "triton", "reference"]


def test_nothing_is_timed_while_suspended_or_planning(monkeypatch, tuning):
    """Launches intercepted (ahead-of-time compilation) or planned for another GPU: timings would
    be wrong, so the cached choice or the default runs, and nothing is cached."""
    resolved, _, which = tuning
    timer = FakeTimer({"triton": 1.0, "reference": 2.0}, which)
    monkeypatch.setattr(auto_backend, "timer", timer)
    args = lora_inputs(4)
    with auto_backend.suspended():
        lk.lora_linear(*args, 0.5)
    with backend.planning_for(90):
        lk.lora_linear(*args, 0.5)
    assert timer.timed == [] and resolved == ["reference", "reference"] and auto_backend.records() == []
    lk.lora_linear(*args, 0.5)  # timed now, triton kept
    with auto_backend.suspended():
        lk.lora_linear(*args, 0.5)
    assert len(timer.timed) == 2 and resolved[-1] == "triton"


def test_auto_on_cpu_tensors_is_the_reference_without_timing(monkeypatch):
    timer = FakeTimer({})
    monkeypatch.setattr(auto_backend, "timer", timer)
    x, W, A, B = lora_inputs(4)
    y = lk.lora_linear(x, W, A, B, 0.5, backend="auto")
    torch.testing.assert_close(y, lk.lora_linear(x, W, A, B, 0.5, backend="reference"), rtol=0, atol=0)
    assert backend.resolve("lora_linear", "auto", x) == "reference"
    monkeypatch.setenv(backend.ENV_VAR, "auto")
    assert backend.resolve("lora_linear", None, x) == "reference"
    assert timer.timed == [] and auto_backend.records() == []


def test_compiled_fullgraph_on_cpu_tensors():
    x, W, A, B = lora_inputs(6)

    def f(x, A, B):
        return lk.lora_linear(x, W, A, B, 0.5, backend="auto")

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(x, A, B), f(x, A, B))


def test_compiled_fullgraph_reads_an_eager_choice(monkeypatch, tuning):
    """Where auto mode tunes, compiled code looks the choice up (no timing, no graph break)."""
    resolved, _, which = tuning
    timer = FakeTimer({"triton": 1.0, "reference": 2.0}, which)
    monkeypatch.setattr(auto_backend, "timer", timer)
    x, W, A, B = lora_inputs(6)
    want = lk.lora_linear(x, W, A, B, 0.5)  # eager: timed, triton kept
    assert len(timer.timed) == 2

    def f(x, A, B):
        return lk.lora_linear(x, W, A, B, 0.5)

    resolved.clear()
    got = torch.compile(f, fullgraph=True)(x, A, B)
    torch.testing.assert_close(got, want)
    assert len(timer.timed) == 2 and resolved == ["triton"]  # resolved once, while tracing


# ----------------------------------------------------------------------------------------------
# What `python -m lowrank_kernels` says
# ----------------------------------------------------------------------------------------------
def test_info_and_report_show_auto_mode(monkeypatch):
    found = backend.info()
    assert found["auto"]["enabled"] is True
    assert found["auto"]["cache_dir"] == str(auto_backend.cache_dir())
    monkeypatch.setenv(auto_backend.AUTO_ENV, "0")
    assert backend.info()["auto"]["enabled"] is False
    # as on a GPU with one cached choice
    found["gpu"] = "NVIDIA H100 80GB HBM3"
    found["auto"]["candidates"] = {op: list(backend.candidates(op, torch.device("cuda", 0))) for op in backend.ops()}
    for per_device in found["backends"].values():
        per_device["cuda"] = "triton"
    found["auto"]["choices"] = [dict(device="NVIDIA H100 80GB HBM3 sm90", key="x=(8192,4096):bfloat16;grad=1",
                                     op="lora_linear", backend="reference", ms={"triton": 1.5, "reference": 1.25})]
    text = lk_main.report(found)
    assert ("  lora_linear             reference/triton/cuda     reference       "
            "auto: fastest of triton/reference (untimed: triton)") in text
    assert "Auto backend on CUDA tensors: on" in text
    assert "  lora_linear             reference  x=(8192,4096):bfloat16;grad=1  (triton 1.5 ms, reference 1.25 ms)" \
        in text
    found["auto"]["enabled"] = False
    assert f"off ({auto_backend.AUTO_ENV}=0" in lk_main.report(found)


def test_benchmarks_time_the_default_as_ours_auto(monkeypatch):
    """The benchmarks' ``ours-auto`` rows call the ops with backend=None (auto on CUDA tensors)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "_common.py"
    spec = importlib.util.spec_from_file_location("_common_for_auto", path)
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)

    class FakeBench:
        op, on_gpu, recorder, skipped = "lora", True, None, []

        def skip(self, provider, reason):
            self.skipped.append(provider)

    assert common.our_providers(FakeBench())[-1] == common.AUTO_PROVIDER == "ours-auto"
    assert common.backend_of("ours-auto") is None
    assert [common.backend_of(p) for p in backend.BACKENDS] == list(backend.BACKENDS)
    FakeBench.on_gpu = False
    assert "ours-auto" not in common.our_providers(FakeBench())


def test_modules_and_optimizers_accept_auto():
    layer = lk.LowRankLinear(16, 12, rank=4, backend="auto")
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 16)
    y = layer(x)
    want = lk.lora_linear(x, layer.weight, layer.lora_A, layer.lora_B, layer.scaling, layer.bias, backend="reference")
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    y.sum().backward()
    opt = lk.GaLoreAdamW([{"params": [layer.lora_A], "rank": 2, "update_proj_gap": 1}], lr=1e-3, backend="auto")
    opt.step()
    with pytest.raises(ValueError, match=r"^backend must be one of \('reference', 'triton', 'cuda', 'auto'\)"):
        lk.LowRankLinear(16, 12, rank=4, backend="fast")
