"""The front door: `python -m lowrank_kernels`, backend.info(), the interpreter switched on too late,
and the benchmark scripts' --help and progress bars."""

import ast
import contextlib
import csv
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
from lowrank_kernels import backend, registry

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
# Every script in benchmarks/ (_common.py is their shared module, not a script).
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_"))
# benchmarks/pretrain.py runs lowrank_kernels.pretrain.main: its --help is that module's (test_pretrain.py).
WRAPPERS = {"pretrain"}
# The scripts that finish in seconds; every other one runs for minutes and shows a progress bar.
SHORT_RUNS = {"plot", "scale_out", "racecheck"}


def test_info_says_what_was_found():
    found = backend.info()
    assert found["version"] == lk.__version__ and found["torch"] == torch.__version__
    assert set(found["backends"]) == set(backend.ops())
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
        assert re.search(rf"^  {op}\s+{'/'.join(registry.get(op).backends())}\s+{per_device['cpu']}\s", text, re.M), op


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


def test_script_lists_name_existing_scripts():
    assert {"bench_lora", "bench_multi_lora", "run_all", "plot", "scale_out"} <= set(SCRIPTS)
    assert WRAPPERS | SHORT_RUNS <= set(SCRIPTS)


@pytest.mark.parametrize("name", sorted(set(SCRIPTS) - WRAPPERS))
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
    for name in sorted(set(SCRIPTS) - WRAPPERS - SHORT_RUNS):
        tree = ast.parse(Path(scripts[name].__file__).read_text())
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "progress"]
        assert calls, f"{name} runs its long loop without a progress bar"


def test_plot_reads_only_benchmark_csvs(scripts, tmp_path, capsys):
    """A results folder as `make bench` leaves it: op CSVs and floors.csv per device, the compile
    check's tables in compile/, the pretraining run's curves in <device>/pretrain/."""
    common = importlib.import_module("_common")  # on sys.path while the scripts fixture is up
    cpu, compile_, pretrain = tmp_path / "cpu", tmp_path / "compile", tmp_path / "cpu" / "pretrain"
    for folder in (cpu, compile_, pretrain):
        folder.mkdir(parents=True, exist_ok=True)
    row = dict(op="lora", mode="fwd", shape="M=4;K=8;N=8;r=2", dtype="fp32", p20_ms="0.9", p80_ms="1.1",
               tflops="0.001", gbps="0.5", extra_peak_bytes="", device="cpu", torch="2", triton="3",
               commit="abc", timestamp="2026-01-01T00:00:00+00:00")
    rows = [dict(row, provider="base", median_ms="1.0", ratio_to_base="1.0"),
            dict(row, provider="reference", median_ms="1.5", ratio_to_base="1.5")]
    write_csv(cpu / "lora.csv", common.COLUMNS, rows)
    write_csv(cpu / "floors.csv", common.FLOOR_COLUMNS,
              [dict(op="lora", dtype="fp32", matmul_tflops="0.1", copy_gbps="10", device="cpu", torch="2",
                    triton="3", commit="abc", timestamp=row["timestamp"])])
    write_csv(compile_ / "sm90.csv", ["kernel", "config", "spills"], [dict(kernel="k", config="c", spills="0")])
    write_csv(pretrain / "adamw.csv", ["step", "train_loss", "val_loss", "tokens_per_s", "elapsed"],
              [dict(step="1", train_loss="5.5", val_loss="", tokens_per_s="100", elapsed="1")])
    assert scripts["plot"].main([str(tmp_path), "--table"]) == 0
    out = capsys.readouterr().out
    assert "lora on cpu" in out and "1.00/" in out and "1.50/" in out
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png")) == ["cpu/lora.png"]


def write_csv(path, columns, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns))
        w.writeheader()
        w.writerows(rows)


def test_run_all_checks_every_stage_wrote_its_files(scripts, tmp_path):
    """run_all's checks (make bench, make bench-smoke): a stage whose files are missing or not in
    the documented format is named."""
    run_all, common = scripts["run_all"], importlib.import_module("_common")
    since = "2026-01-01T00:00:00+00:00"
    pretrain = tmp_path / "pretrain"
    pretrain.mkdir()
    assert "summary.json" in run_all.check_pretrain(pretrain)[0]
    (pretrain / "summary.json").write_text('{"methods": {"adamw": {"csv": "adamw.csv"}, "lora": {"csv": "lora.csv"}}}')
    for name in ("loss.png", "memory.png"):
        (pretrain / name).write_bytes(b"png")
    write_csv(pretrain / "adamw.csv", run_all.PRETRAIN_COLUMNS,
              [dict(step="1", train_loss="5.5", val_loss="5.4", tokens_per_s="100", elapsed="1")])
    write_csv(pretrain / "lora.csv", ["step", "loss"], [dict(step="1", loss="5.5")])
    assert run_all.check_pretrain(pretrain) == [
        f"pretrain: {pretrain / 'lora.csv'} has columns ('step', 'loss'), expected {run_all.PRETRAIN_COLUMNS}"]

    assert run_all.check_benchmark(tmp_path, "lora", since) == [f"lora: {tmp_path / 'lora.csv'} missing"]
    row = dict(op="lora", provider="base", mode="fwd", shape="M=4", dtype="fp32", median_ms="1.0", p20_ms="1",
               p80_ms="1", tflops="0.1", gbps="1", ratio_to_base="1", extra_peak_bytes="", device="cpu",
               torch="2", triton="3", commit="abc", timestamp=since)
    write_csv(tmp_path / "lora.csv", common.COLUMNS, [dict(row, timestamp="2025-01-01T00:00:00+00:00")])
    assert run_all.check_benchmark(tmp_path, "lora", since) == [f"lora: no row of this run in {tmp_path / 'lora.csv'}"]
    write_csv(tmp_path / "lora.csv", common.COLUMNS, [row, dict(row, mode="sideways")])
    problems = run_all.check_benchmark(tmp_path, "lora", since)
    assert [p.split(":")[1].strip() for p in problems] == [
        "malformed row in " + str(tmp_path / "lora.csv"),
        f"{tmp_path / 'floors.csv'} missing or without the columns {common.FLOOR_COLUMNS}",
        f"{tmp_path / 'lora.png'} not drawn by this run",
    ]
    write_csv(tmp_path / "lora.csv", common.COLUMNS, [row])
    write_csv(tmp_path / "floors.csv", common.FLOOR_COLUMNS,
              [dict(op="lora", dtype="fp32", matmul_tflops="0.1", copy_gbps="10", device="cpu", torch="2",
                    triton="3", commit="abc", timestamp=since)])
    (tmp_path / "lora.png").write_bytes(b"png")
    assert run_all.check_benchmark(tmp_path, "lora", since) == []
