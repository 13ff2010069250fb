"""The README runs as written: its Python blocks execute in order on the small model they build,
and its method-defaults table says what the methods do."""

import re
from pathlib import Path

import pytest

import lowrank_kernels as lk

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()

pytest.importorskip("peft")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")


def python_blocks(text):
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


def test_python_blocks_run_as_written(tmp_path, monkeypatch):
    blocks = python_blocks(README)
    assert len(blocks) >= 2  # the quickstart and the adapter checkpoints
    monkeypatch.chdir(tmp_path)  # the snippets write adapters.safetensors
    namespace = {"__name__": "readme"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i}", "exec"), namespace)
    assert (tmp_path / "adapters.safetensors").exists()


def test_method_defaults_table_matches_the_methods():
    rows = re.findall(r"^\| `(\w+)` \| [^|]+ \| (\d+) \|", README, re.M)
    assert sorted(name for name, _ in rows) == lk.available_methods()
    for name, rank in rows:
        method = lk.nn.get_method(name)
        assert method.default_rank == int(rank), name
        assert lk.LowRankLinear(512, 512, method=name).rank == int(rank)
