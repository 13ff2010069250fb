"""pytest plugin that runs PEFT's own test suite, offline on the CPU, plain or through from_peft.

Loaded with ``-p peft_suite_plugin`` (tests/peft_suite on PYTHONPATH) by run_peft_suite.py, in the
tests/ folder of PEFT's source distribution. It provides what PEFT's repository conftest and CI
environment provide and the sdist lacks:

- the ``regression`` tests (they need the Hub's regression artifacts) are skipped;
- ``testing_utils.hub_online_once`` always takes its offline branch (HF_HUB_OFFLINE=1 is set by the
  runner, with an empty HF_HOME), so a test that needs the Hub fails at once instead of downloading;
- where the ``datasets`` package is missing, a stand-in module (testing_utils imports
  ``load_dataset`` at module level; only Hub tests call it).

With ``--lowrank-backend BACKEND`` every model that PEFT's public entry points build or extend
(``get_peft_model``, ``inject_adapter_in_model``, ``PeftModel.from_pretrained`` / ``add_adapter`` /
``load_adapter`` and the PeftMixedModel ones) goes through ``lowrank_kernels.from_peft(model,
backend=BACKEND)`` as a user would call it, once per outermost call. Whatever from_peft raises
reaches the test, so a model it refuses is a failing test.

``--lowrank-select`` picks the tests: ``family`` keeps those not parametrized with a PEFT config
class other than LoraConfig (LoRA, DoRA and the LoRA variants), VeraConfig or RandLoraConfig;
a path keeps exactly the test ids listed in that file (one per line, ``#`` comments), and the run
stops with a usage error when any listed id is not collected.

``--lowrank-record PATH`` writes one JSON line per test: its id, outcome, the exception type and
message of a failure, its duration, the PEFT types of the adapters the entry points built (``types``), and how
many adapter layers from_peft left running fused (``fused``), so the runner can tell which tests
built only LoRA-family adapters and which ones exercised a fused layer.
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import json
import sys
import threading
import types
from collections import defaultdict
from pathlib import Path

import pytest

FAMILY_CONFIGS = {"LoraConfig", "VeraConfig", "RandLoraConfig"}


def _datasets_stand_in() -> None:
    if importlib.util.find_spec("datasets") is not None:
        return
    module = types.ModuleType("datasets")
    module.__spec__ = importlib.machinery.ModuleSpec("datasets", None)

    def load_dataset(*args, **kwargs):
        raise RuntimeError("datasets is not installed here: PEFT's Hub-dataset tests cannot run offline")

    module.load_dataset = load_dataset
    sys.modules["datasets"] = module


_datasets_stand_in()


class _SeenAlready(defaultdict):
    """hub_online_once's cache of model ids, in which every id has been seen: always offline."""

    def __contains__(self, key):
        return True


# ----------------------------------------------------------------------------------------------
# The entry points: one from_peft per outermost call (get_peft_model builds a PeftModel whose
# from_pretrained calls load_adapter, ... each of them wrapped).
# ----------------------------------------------------------------------------------------------
_STATE = threading.local()  # the depth of nested entry-point calls, per thread
_RUN = {"backend": None}
_TEST = {"types": set(), "fused": 0}


def _fused_layers(model) -> int:
    return sum(type(m).__module__.startswith("lowrank_kernels.") for m in model.modules())


def _record_types(model, args, kwargs) -> None:
    from peft import PeftConfig

    configs = [a for a in (*args, *kwargs.values()) if isinstance(a, PeftConfig)]
    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, dict):
        configs += [c for c in peft_config.values() if isinstance(c, PeftConfig)]
    _TEST["types"].update(str(getattr(c.peft_type, "value", c.peft_type)) for c in configs)


def _wrap(fn, model_of):
    @functools.wraps(fn)
    def entry_point(*args, **kwargs):
        depth = getattr(_STATE, "depth", 0)
        _STATE.depth = depth + 1
        try:
            out = fn(*args, **kwargs)
        finally:
            _STATE.depth = depth
        if depth == 0:
            model = model_of(args, out)
            _record_types(model, args, kwargs)
            if _RUN["backend"] is not None:
                import lowrank_kernels

                lowrank_kernels.from_peft(model, backend=_RUN["backend"])
                _TEST["fused"] = max(_TEST["fused"], _fused_layers(model))
        return out

    entry_point.lowrank_wrapped = True
    return entry_point


def _returned(args, out):
    return out


def _self(args, out):
    return args[0]


def _subclasses(cls):
    yield cls
    for sub in cls.__subclasses__():
        yield from _subclasses(sub)


def _patch_entry_points() -> None:
    import peft
    from peft import PeftMixedModel, PeftModel

    for name in ("get_peft_model", "inject_adapter_in_model"):
        original = getattr(peft, name)
        wrapped = _wrap(original, _returned)
        # The function is re-exported (peft, peft.mapping_func, peft.mapping, ...): replace every binding.
        for module in list(sys.modules.values()):
            if getattr(module, "__name__", "").startswith("peft") and getattr(module, name, None) is original:
                setattr(module, name, wrapped)
    for base in (PeftModel, PeftMixedModel):
        for cls in _subclasses(base):
            for name, model_of in (("from_pretrained", _returned), ("add_adapter", _self), ("load_adapter", _self)):
                attr = cls.__dict__.get(name)
                if isinstance(attr, classmethod):
                    setattr(cls, name, classmethod(_wrap(attr.__func__, model_of)))
                elif callable(attr) and not getattr(attr, "lowrank_wrapped", False):
                    setattr(cls, name, _wrap(attr, model_of))


# ----------------------------------------------------------------------------------------------
# pytest hooks
# ----------------------------------------------------------------------------------------------
def pytest_addoption(parser):
    group = parser.getgroup("lowrank_kernels")
    group.addoption("--lowrank-backend", default=None, choices=["reference", "triton", "cuda"],
                    help="apply lowrank_kernels.from_peft(model, backend=...) after each PEFT entry point")
    group.addoption("--lowrank-select", default=None,
                    help="'family' (LoRA/DoRA/VeRA/RandLoRA parametrizations) or a file of test ids")
    group.addoption("--lowrank-record", default=None, help="write one JSON line per test to this file")


def pytest_configure(config):
    config.addinivalue_line("markers", "regression: PEFT's regression tests (need the Hub's artifacts)")
    _RUN["backend"] = config.getoption("--lowrank-backend")
    _patch_entry_points()
    path = config.getoption("--lowrank-record")
    config._lowrank_record = open(path, "w") if path else None


def pytest_unconfigure(config):
    if getattr(config, "_lowrank_record", None) is not None:
        config._lowrank_record.close()


def _config_classes(item) -> set:
    from peft import PeftConfig

    callspec = getattr(item, "callspec", None)
    values = callspec.params.values() if callspec is not None else ()
    return {v.__name__ for v in values if isinstance(v, type) and issubclass(v, PeftConfig)}


def read_ids(path) -> list:
    """The test ids of a selection file: one per line, blank lines and ``#`` comments ignored."""
    lines = (line.strip() for line in Path(path).read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def pytest_collection_modifyitems(session, config, items):
    for item in items:
        if "regression" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="regression tests need the Hub's artifacts"))
    select = config.getoption("--lowrank-select")
    if select is None:
        return
    if select == "family":
        keep = [item for item in items if _config_classes(item) <= FAMILY_CONFIGS]
    else:
        wanted = read_ids(select)
        by_id = {item.nodeid: item for item in items}
        missing = [i for i in wanted if i not in by_id]
        if missing:
            raise pytest.UsageError(f"{len(missing)} of the {len(wanted)} test ids of {select} were not collected, "
                                    f"e.g. {missing[:3]}")
        keep = [by_id[i] for i in wanted]
    config.hook.pytest_deselected(items=[item for item in items if item not in set(keep)])
    items[:] = keep


def pytest_collection_finish(session):
    testing_utils = sys.modules.get("tests.testing_utils")
    if testing_utils is not None:
        testing_utils._HUB_MODEL_ACCESSES = _SeenAlready(int)


def pytest_runtest_logstart(nodeid, location):
    _TEST["types"], _TEST["fused"] = set(), 0


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "setup":
        item._lowrank = {"outcome": "passed", "error": None, "seconds": 0.0}
    state = item._lowrank
    state["seconds"] += report.duration
    if report.when == "call" and hasattr(report, "wasxfail"):
        state["outcome"] = "xpassed" if report.passed else "xfailed"
    elif report.skipped and state["outcome"] == "passed":
        state["outcome"] = "skipped"
    elif report.failed:
        state["outcome"] = "failed" if report.when == "call" else "error"
        if state["error"] is None and call.excinfo is not None:
            message = str(call.excinfo.value).strip().splitlines()
            state["error"] = f"{call.excinfo.typename}: {message[0][:300] if message else ''}"
    if report.when == "teardown" and item.config._lowrank_record is not None:
        state["seconds"] = round(state["seconds"], 3)
        line = {"id": item.nodeid, **state, "types": sorted(_TEST["types"]), "fused": _TEST["fused"]}
        item.config._lowrank_record.write(json.dumps(line) + "\n")
        item.config._lowrank_record.flush()
    return report
