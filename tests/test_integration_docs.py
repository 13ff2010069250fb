"""docs/integrations.md runs as written: its Python blocks execute in order on the CPU."""

from pathlib import Path

import pytest

from test_readme import python_blocks

for _library in ("peft", "transformers", "accelerate", "datasets"):
    pytest.importorskip(_library)
pytest.importorskip("trl", reason="trl is not installed (pip install trl): the page's TRL example needs it")

PAGE = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"


def test_python_blocks_run_as_written(tmp_path, monkeypatch):
    blocks = python_blocks(PAGE.read_text())
    assert len(blocks) == 6  # set-up, PEFT, Trainer, TRL, accelerate, apply_to
    monkeypatch.chdir(tmp_path)  # the examples write adapters, checkpoints and states
    namespace = {"__name__": "integrations_doc"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/integrations.md python block {i}", "exec"), namespace)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "accelerate-state").is_dir()
    assert namespace["report"].converted
