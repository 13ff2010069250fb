"""The end-to-end pretraining run (lowrank_kernels/pretrain/) at toy sizes: a few steps of a
one-layer model, so each test takes seconds. What the full-size run measures is in the README."""

import csv
import importlib
import json
import os

import pytest
import torch
from _helpers import HAS_CUDA

from lowrank_kernels import pretrain

TOY = ["--hidden", "32", "--intermediate", "64", "--layers", "1", "--heads", "2", "--seq", "16", "--batch", "2",
       "--rank", "4", "--update-proj-gap", "2", "--eval-batches", "2", "--quiet"]
COLUMNS = ["step", "train_loss", "val_loss", "tokens_per_s", "elapsed"]
SUMMARY_KEYS = {"lr", "val_loss", "tokens_per_s", "peak_bytes", "weight_bytes", "grad_bytes", "optimizer_bytes",
                "params", "total_bytes", "csv"}
# Largest train/val loss difference between runs that should agree, by the run's dtype (the
# default: fp32 on the CPU, bf16 on a GPU, where the fused kernels round differently).
LOSS_TOL = {"fp32": 1e-4, "bf16": 3e-2}
ELEMENT_BYTES = {"fp32": 4, "bf16": 2}

pytestmark = pytest.mark.slow


def _imports(module: str) -> bool:
    """Whether ``module`` imports (galore_torch can be present and still fail: it imports bitsandbytes)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def dtype_of(summary) -> str:
    return summary["settings"]["dtype"]


def run(out, *extra, steps=3):
    assert pretrain.main([*TOY, "--steps", str(steps), "--out", str(out), *extra]) == 0
    return json.loads((out / "summary.json").read_text())


def rows(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


@pytest.fixture(scope="module")
def every_method(tmp_path_factory):
    out = tmp_path_factory.mktemp("every_method")
    return out, run(out, "--eval-every", "2", "--peers")


def test_help_lists_every_method(capsys):
    with pytest.raises(SystemExit) as e:
        pretrain.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for method in (*pretrain.METHODS, *pretrain.PEERS):
        assert method in text, f"--help does not mention {method}"
    for option in ("--steps", "--lr", "--rank", "--update-proj-gap", "--scale", "--proj-type", "--refresh",
                   "--per-layer", "--density", "--support", "--size", "--backend", "--compile", "--device",
                   "--out", "--init-from", "--peers", "--seed", "--batch", "--seq"):
        assert option in text


def test_every_method_writes_csv_summary_and_plots(every_method):
    out, summary = every_method
    expected = list(pretrain.METHODS) + [p for p, module in pretrain.PEERS.items() if _imports(module)]
    assert sorted(summary["methods"]) == sorted(expected)
    for name, rec in summary["methods"].items():
        assert SUMMARY_KEYS <= set(rec), f"{name}: missing {SUMMARY_KEYS - set(rec)}"
        header, body = rows(out / rec["csv"])
        assert header == COLUMNS
        assert [int(r["step"]) for r in body] == [1, 2, 3]
        # Held-out loss at the eval interval and at the last step, and that last value is the summary's.
        assert [r["val_loss"] != "" for r in body] == [False, True, True]
        assert float(body[-1]["val_loss"]) == pytest.approx(rec["val_loss"], rel=1e-5)
        assert all(0 < float(r["train_loss"]) < 10 and float(r["tokens_per_s"]) > 0 for r in body)
        assert rec["val_loss"] < 6 and rec["tokens_per_s"] > 0 and rec["params"] > 0
        assert rec["total_bytes"] == rec["weight_bytes"] + rec["grad_bytes"] + rec["optimizer_bytes"]
    for plot in ("loss.png", "memory.png"):
        assert (out / plot).stat().st_size > 1000
    assert (out / "checkpoints" / "adamw.pt").is_file()
    assert summary["data"]["held_out_bytes"] == summary["data"]["bytes"] - summary["data"]["train_bytes"]
    assert summary["commit"] and summary["device"]


def test_memory_is_counted_from_the_tensors(every_method):
    _, summary = every_method
    m = summary["methods"]
    e = ELEMENT_BYTES[dtype_of(summary)]
    adamw, galore, lora = m["adamw"], m["galore"], m["lora"]
    # AdamW: two moments per parameter in its dtype plus one step counter per parameter tensor.
    assert 2 * e * adamw["params"] <= adamw["optimizer_bytes"] <= 2 * e * adamw["params"] + 8 * 64
    assert adamw["grad_bytes"] == e * adamw["params"]
    # GaLore keeps projected fp32 moments for the decoder matrices: less than AdamW's state would
    # be in fp32.
    assert galore["optimizer_bytes"] < adamw["optimizer_bytes"] * 4 // e
    assert galore["grad_bytes"] == adamw["grad_bytes"] and galore["weight_bytes"] == adamw["weight_bytes"]
    # LoRA: frozen weights plus adapters; gradients and moments only for the adapters.
    assert lora["weight_bytes"] > adamw["weight_bytes"] and lora["grad_bytes"] == e * lora["params"]
    assert lora["params"] < adamw["params"]
    # Low-rank matches SLTrain's parameter count (the rank absorbs the sparse values), within 5%.
    assert abs(m["lowrank"]["params"] - m["sltrain"]["params"]) <= 0.05 * m["sltrain"]["params"]
    assert m["sltrain"]["vs_dense"] < 1 and m["lowrank"]["vs_dense"] < 1


@pytest.mark.parametrize("ours,peer", [("galore", "galore-torch"), ("fira", "fira-pkg")])
def test_fused_optimizers_follow_the_peers(every_method, ours, peer):
    if not _imports(pretrain.PEERS[peer]):
        pytest.skip(f"{pretrain.PEERS[peer]} does not import here")
    out, summary = every_method
    m = summary["methods"]
    dtype = dtype_of(summary)
    a = [float(r["train_loss"]) for r in rows(out / m[ours]["csv"])[1]]
    b = [float(r["train_loss"]) for r in rows(out / m[peer]["csv"])[1]]
    assert a == pytest.approx(b, abs=LOSS_TOL[dtype]), f"{ours} {a} vs {peer} {b}"
    # The same moments and projectors; ours keeps the moments in fp32 (the peer in the weights'
    # dtype) and adds a float64 step counter per parameter.
    e = ELEMENT_BYTES[dtype]
    assert m[peer]["optimizer_bytes"] <= m[ours]["optimizer_bytes"] <= m[peer]["optimizer_bytes"] * 4 // e + 8 * 64


def test_lr_sweep_reports_the_best_run(tmp_path):
    summary = run(tmp_path, "--method", "adamw", "--lr", "1e-4", "--lr", "3e-3", steps=2)
    names = sorted(p.name for p in tmp_path.glob("*.csv"))
    assert names == ["adamw_lr0.0001.csv", "adamw_lr0.003.csv"]
    runs = summary["runs"]
    assert [r["lr"] for r in runs] == [1e-4, 3e-3]
    assert summary["methods"]["adamw"]["val_loss"] == min(r["val_loss"] for r in runs)


def test_lora_fine_tunes_a_given_checkpoint(tmp_path, every_method):
    out, summary = every_method
    got = run(tmp_path, "--method", "lora", "--init-from", str(out / "checkpoints" / "adamw.pt"), steps=2)
    assert list(got["methods"]) == ["lora"]
    # It starts from the trained weights, not from scratch: the first loss is the checkpoint's.
    first = float(rows(tmp_path / "lora.csv")[1][0]["train_loss"])
    assert first < float(rows(out / "adamw.csv")[1][0]["train_loss"])


def test_per_layer_mode_holds_fewer_gradients_and_steps_the_same(tmp_path):
    a = run(tmp_path / "a", "--method", "galore", "--clip", "0")
    b = run(tmp_path / "b", "--method", "galore", "--clip", "0", "--per-layer")
    assert b["methods"]["galore"]["grad_bytes"] < a["methods"]["galore"]["grad_bytes"] / 2
    la = [float(r["train_loss"]) for r in rows(tmp_path / "a" / "galore.csv")[1]]
    lb = [float(r["train_loss"]) for r in rows(tmp_path / "b" / "galore.csv")[1]]
    assert la == pytest.approx(lb, abs=LOSS_TOL[dtype_of(a)] / 10)


def test_triton_matches_reference(tmp_path):
    """The fused kernels (under the interpreter on the CPU) give the reference path's curves."""
    methods = "galore,fira,sltrain"
    ref = tmp_path / "reference"
    run(ref, "--method", methods, "--backend", "reference", steps=2)
    got = run(tmp_path / "triton", "--method", methods, "--backend", "triton", "--compare", str(ref), steps=2)
    assert set(got["compare"]["methods"]) == set(methods.split(","))
    tol = LOSS_TOL[dtype_of(got)]
    for name, diff in got["compare"]["methods"].items():
        assert diff["steps"] == 2
        assert diff["max_train_diff"] < tol and diff["final_val_diff"] < tol, (name, diff)


def test_lora_triton_matches_reference(tmp_path, every_method):
    out, _ = every_method
    ckpt = str(out / "checkpoints" / "adamw.pt")
    ref = tmp_path / "reference"
    run(ref, "--method", "lora", "--init-from", ckpt, "--backend", "reference", steps=2)
    got = run(tmp_path / "triton", "--method", "lora", "--init-from", ckpt, "--backend", "triton",
              "--compare", str(ref), steps=2)
    diff, tol = got["compare"]["methods"]["lora"], LOSS_TOL[dtype_of(got)]
    assert diff["max_train_diff"] < tol and diff["final_val_diff"] < tol, diff


def test_seeds_differ_and_a_seed_repeats(tmp_path):
    a = run(tmp_path / "a", "--method", "adamw", "--seed", "0", steps=2)
    b = run(tmp_path / "b", "--method", "adamw", "--seed", "0", "--compare", str(tmp_path / "a"), steps=2)
    c = run(tmp_path / "c", "--method", "adamw", "--seed", "1", "--compare", str(tmp_path / "a"), steps=2)
    assert b["compare"]["methods"]["adamw"]["max_train_diff"] == 0.0
    assert c["compare"]["methods"]["adamw"]["max_train_diff"] > 1e-3
    assert a["methods"]["adamw"]["val_loss"] == b["methods"]["adamw"]["val_loss"]


def test_compile_matches_eager(tmp_path):
    # aot_eager: the whole capture (the package's custom ops inside the model's graph) without
    # inductor's C++ build, which takes minutes on a small CPU.
    eager = run(tmp_path / "eager", "--method", "sltrain", steps=2)
    compiled = run(tmp_path / "compiled", "--method", "sltrain", "--compile", "--compile-backend", "aot_eager",
                   "--compare", str(tmp_path / "eager"), steps=2)
    assert compiled["settings"]["compile"] is True and not eager["settings"]["compile"]
    assert compiled["compare"]["methods"]["sltrain"]["max_train_diff"] < LOSS_TOL[dtype_of(compiled)]


def test_corpus_is_the_os_folder_sorted_and_held_out_at_the_end():
    data, info = pretrain.stdlib_corpus()
    folder = os.path.dirname(os.__file__)
    files = sorted(f for f in os.listdir(folder) if f.endswith(".py") and os.path.isfile(os.path.join(folder, f)))
    assert info["files"] == len(files) and info["bytes"] == data.numel()
    with open(os.path.join(folder, files[0]), "rb") as f:
        head = f.read()
    assert bytes(data[:len(head)].tolist()) == head
    assert info["held_out_bytes"] == data.numel() - int(data.numel() * 0.95)
    gen = torch.Generator().manual_seed(0)
    x, y = pretrain.random_batch(data, 3, 8, gen, "cpu")
    assert x.shape == y.shape == (3, 8) and torch.equal(x[:, 1:], y[:, :-1])


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter requirement applies to CPU tensors")
def test_triton_on_cpu_without_interpreter_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(SystemExit, match="TRITON_INTERPRET=1"):
        pretrain.main([*TOY, "--steps", "1", "--method", "galore", "--backend", "triton", "--out", str(tmp_path)])


def test_bad_arguments_are_refused(capsys):
    for argv in (["--method", "sgd"], ["--lr", "-1"], ["--steps", "0"], ["--rank", "1000"]):
        with pytest.raises(SystemExit) as e:
            pretrain.main(argv)
        assert e.value.code == 2, argv
    assert "unknown method" in capsys.readouterr().err
