"""The front door: `python -m lowrank_kernels`, backend.info(), the interpreter switched on too late,
and the benchmark scripts' --help and progress bars."""

import ast
import contextlib
import importlib
import io
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lowrank_kernels as lk
from lowrank_kernels import backend

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
SCRIPTS = ["bench_lora", "bench_projected_step", "bench_random_basis", "bench_sparse_lowrank", "refresh_energy",
           "train_sltrain_fidelity", "run_all", "plot"]
# The scripts whose runs take minutes: each shows a progress bar.
LONG_RUNS = ["bench_lora", "bench_projected_step", "bench_random_basis", "bench_sparse_lowrank", "refresh_energy",
             "train_sltrain_fidelity", "run_all"]


def test_info_says_what_was_found():
    found = backend.info()
    assert found["version"] == lk.__version__ and found["torch"] == torch.__version__
    assert set(found["backends"]) == set(backend.OPS)
    for op, per_device in found["backends"].items():
        assert per_device["cpu"] in backend.BACKENDS, op
        assert (per_device["cuda"] is None) == (not torch.cuda.is_available())
    built, reason = backend.cuda_extension_status()
    assert found["cuda_extension"] is built and found["cuda_extension_reason"] == reason
    if not built:
        assert reason  # one line saying why
        if torch.version.cuda is None:
            assert reason == f"torch {torch.__version__} is a CPU build"


def test_python_dash_m_prints_the_report(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["python -m lowrank_kernels"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        runpy.run_module("lowrank_kernels", run_name="__main__")
    assert exit_.value.code == 0
    text = out.getvalue()
    found = backend.info()
    assert text.startswith(f"lowrank_kernels {lk.__version__}\n")
    for needle in (f"torch    {torch.__version__}", "triton", "GPU", "CUDA extension lowrank_kernels._C: ",
                   "make test", "make bench", "benchmarks/run_all.py"):
        assert needle in text, needle
    if not found["cuda_extension"]:
        assert f"not built ({found['cuda_extension_reason']})" in text
    for op, per_device in found["backends"].items():
        assert re.search(rf"^  {op}\s+{per_device['cpu']}\s", text, re.M), op


def test_interpreter_switched_on_after_import_is_explained():
    code = ("import os, torch, lowrank_kernels as lk\n"
            "os.environ['TRITON_INTERPRET'] = '1'\n"
            "x, w = torch.randn(4, 8), torch.randn(6, 8)\n"
            "try:\n"
            "    lk.lora_linear(x, w, torch.randn(2, 8), torch.randn(6, 2), 1.0, backend='triton')\n"
            "except RuntimeError as err:\n"
            "    print(err)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert "TRITON_INTERPRET=1 was set after lowrank_kernels was imported" in out.stdout, out.stdout + out.stderr
    assert "before the first import" in out.stdout


@pytest.fixture(scope="module")
def scripts():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield {name: importlib.import_module(name) for name in SCRIPTS}
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_help_is_complete(scripts, name):
    parser = scripts[name].build_parser()
    text = parser.format_help()
    assert not re.search(r"\bissues?\b|tracker", text, re.I), name
    assert len(parser.description.strip().splitlines()) > 3  # the whole docstring, not its first line
    for action in parser._actions:
        assert action.help and action.help.strip(), f"{name}: {action.option_strings or action.dest} has no help"


def test_long_runs_show_progress(scripts):
    tqdm = pytest.importorskip("tqdm")
    bar = scripts["run_all"].progress(range(3), desc="x")
    assert isinstance(bar, tqdm.tqdm) and list(bar) == [0, 1, 2]
    bar.close()
    for name in LONG_RUNS:
        tree = ast.parse(Path(scripts[name].__file__).read_text())
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "progress"]
        assert calls, f"{name} runs its long loop without a progress bar"
