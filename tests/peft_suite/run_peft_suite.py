"""PEFT's own LoRA / DoRA / VeRA / RandLoRA tests, run plain and through lowrank_kernels.from_peft.

    python tests/peft_suite/run_peft_suite.py [--selection subset|full] [--backend reference|triton]

(``make peft-suite``, ``PEFT_SUITE_ARGS="--selection full"``.) Sets up what it needs in the current
interpreter's environment (from PyPI: requests, pytest-timeout, diffusers without its dependencies)
and the tests of PEFT's source distribution for the installed peft version, cached under
build/peft_suite/. The tests run offline on the CPU (peft_suite_plugin.py says how), Triton under
its interpreter where there is no GPU.

- ``--selection full``: every test of FILES not parametrized with another method's config, run
  plain, then with from_peft applied after each PEFT entry point. The tests counted are those
  that built LoRA-family adapters (LoRA, DoRA and LoRA's variants, VeRA, RandLoRA) and no other
  through PEFT's entry points in the plain run. A regression is such a test that passes plain and
  fails through from_peft.
- ``--selection subset`` (CI): the fixed ids of subset.txt, all of which passed with plain PEFT
  when the list was drawn, run through from_peft only; whatever fails is rerun plain, and is a
  regression if it passes there. A listed test that fails plain too means the environment
  changed (PEFT, transformers, torch): the list is out of date and the run fails as well, as it
  does when any listed id is not collected. ``--plain`` runs the whole subset plain first
  instead.
- ``--write-subset``: after a full run, draw subset.txt again (see draw_subset); ``--reuse``
  takes the records of the last full run instead of running it again.

Writes build/peft_suite/report-<selection>-<backend>.txt (counts, regressions with their error)
and the per-test records next to it; exits 1 on a regression, an out-of-date list or an
incomplete collection.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import time
from collections import Counter, defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BUILD = ROOT / "build" / "peft_suite"
SUBSET = HERE / "subset.txt"
sys.path.insert(0, str(HERE))
from peft_suite_plugin import read_ids  # noqa: E402

FILES = ["test_custom_models.py", "test_initialization.py", "test_vera.py", "test_randlora.py",
         "test_lora_variants.py", "test_other.py", "test_low_level_api.py"]
FAMILY = {"LORA", "VERA", "RANDLORA"}
# (module, pip arguments): what PEFT's tests import (or the runner uses) beyond peft's own
# dependencies. diffusers is imported by testing_common for its Stable Diffusion tests, which
# are not run; --no-deps keeps its dependencies (and their versions) out of the environment.
NEEDS = [("requests", ["requests"]), ("pytest_timeout", ["pytest-timeout"]), ("scipy", ["scipy"]),
         ("diffusers", ["--no-deps", "diffusers"])]
# What PEFT's CI accepts; a skipped test tested nothing, so it does not count as passing.
PASS = {"passed", "xpassed", "xfailed"}
SLOW = 5.0  # seconds: tests slower than this (plain) are left out of the subset


def log(msg: str) -> None:
    print(f"peft-suite: {msg}", flush=True)


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-qq", *args], check=True)


def ensure_dependencies() -> None:
    for module, spec in NEEDS:
        if importlib.util.find_spec(module) is None:
            log(f"installing {' '.join(spec)}")
            pip("install", *spec)


def ensure_tests(version: str) -> Path:
    """PEFT's tests/ of the sdist of ``version`` (and its pyproject.toml: pytest's markers and
    warning filters), unpacked under build/peft_suite/peft-<version>/."""
    tree = BUILD / f"peft-{version}"
    if (tree / "tests" / "__init__.py").exists():
        return tree
    sdist = BUILD / f"peft-{version}.tar.gz"
    if not sdist.exists():
        log(f"downloading the source distribution of peft {version}")
        pip("download", "--no-binary", ":all:", "--no-deps", f"peft=={version}", "-d", str(BUILD))
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers()
                   if m.name.startswith(f"peft-{version}/tests/") or m.name == f"peft-{version}/pyproject.toml"]
        tar.extractall(BUILD, members=members, filter="data")
    # PEFT's test modules import each other relatively (from .testing_utils import ...): the
    # repository's tests/ is a package, the sdist leaves out its (empty) __init__.py.
    (tree / "tests" / "__init__.py").touch()
    return tree


def load_records(path: Path) -> dict:
    """{test id: record} from peft_suite_plugin's JSON lines."""
    records = {}
    if path.exists():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            records[rec["id"]] = rec
    return records


def run_pytest(tree: Path, name: str, select: str, files: list, backend: str | None, timeout: int,
               reuse: bool = False) -> dict:
    """Run PEFT's tests, return {test id: record}; with ``reuse``, an earlier run's records."""
    record, logfile = BUILD / f"{name}.jsonl", BUILD / f"{name}.log"
    if reuse and record.exists():
        log(f"{name}: the records of an earlier run ({record.relative_to(ROOT)})")
        return load_records(record)
    record.unlink(missing_ok=True)
    # The configuration (PEFT's markers and warning filters) and the root of the test ids pinned:
    # pytest would otherwise look for them above every existing path among the arguments.
    cmd = [sys.executable, "-m", "pytest", "-c", str(tree / "pyproject.toml"), "--rootdir", str(tree),
           "-o", "addopts=", "-p", "no:cacheprovider", "-p", "peft_suite_plugin",
           "--lowrank-select", select, "--lowrank-record", str(record), f"--timeout={timeout}",
           "-q", "--disable-warnings", "-rN", *[f"tests/{f}" for f in files]]
    if backend is not None:
        cmd += ["--lowrank-backend", backend]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(BUILD / "hf_home"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])))
    import torch

    if not torch.cuda.is_available():
        env.setdefault("TRITON_INTERPRET", "1")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    log(f"{name}: {'from_peft, backend ' + backend if backend else 'plain PEFT'} (log: {logfile.relative_to(ROOT)})")
    start = time.monotonic()
    with open(logfile, "w") as out:
        rc = subprocess.run(cmd, cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    records = load_records(record)
    log(f"{name}: {len(records)} tests in {time.monotonic() - start:.0f} s, pytest exit code {rc}")
    if rc not in (0, 1):  # 1: some tests failed; anything else: pytest did not run them all
        tail = "\n".join(logfile.read_text().splitlines()[-20:])
        raise SystemExit(f"peft-suite: pytest stopped with exit code {rc} ({logfile}):\n{tail}")
    return records


def passed(rec: dict | None) -> bool:
    return rec is not None and rec["outcome"] in PASS


def family(rec: dict) -> bool:
    """Built LoRA-family adapters, and nothing else, through PEFT's entry points."""
    return bool(rec["types"]) and set(rec["types"]) <= FAMILY


def method(test_id: str, rec: dict) -> str:
    types = set(rec["types"])
    if types & {"VERA", "RANDLORA"}:
        return "+".join(sorted(types))
    return "DORA" if "dora" in test_id.lower() else "LORA"


def draw_subset(plain: dict, ours: dict, size: int) -> list:
    """A fixed, stratified draw of about ``size`` LoRA-family tests that pass plain and take at most
    SLOW seconds (torch.compile and multi-process tests take 10-30 s each: CI's budget): strata are
    (file, method, test function, whether from_peft left a layer fused); each stratum gets a share
    proportional to its size, at least one test, picked in a fixed pseudo-random order (sha1 of
    the id)."""
    strata = defaultdict(list)
    for test_id, rec in plain.items():
        if family(rec) and passed(rec) and rec["seconds"] <= SLOW and test_id in ours:
            file, func = test_id.split("::")[0], test_id.split("::")[-1].split("[")[0]
            strata[(file, method(test_id, rec), func, ours[test_id]["fused"] > 0)].append(test_id)
    total = sum(len(ids) for ids in strata.values())
    chosen = []
    for key in sorted(strata):
        ids = sorted(strata[key], key=lambda i: hashlib.sha1(i.encode()).hexdigest())
        chosen += ids[:max(1, round(len(ids) * size / total))]
    return sorted(chosen)


def write_subset(ids: list, plain: dict, version: str) -> None:
    per_file = Counter(i.split("::")[0] for i in ids)
    per_method = Counter(method(i, plain[i]) for i in ids)
    header = [
        f"# A fixed, stratified subset of PEFT {version}'s LoRA-family tests (CI's peft-suite stage),",
        "# drawn by run_peft_suite.py --selection full --write-subset from the tests that passed with",
        f"# plain PEFT on the CPU. {len(ids)} tests, "
        f"about {sum(plain[i]['seconds'] for i in ids):.0f} s plain on one core.",
        "# peft " + version,
        "# per file: " + ", ".join(f"{f.split('/')[-1]} {n}" for f, n in sorted(per_file.items())),
        "# per method: " + ", ".join(f"{m} {n}" for m, n in sorted(per_method.items())),
    ]
    SUBSET.write_text("\n".join(header + ids) + "\n")
    log(f"wrote {len(ids)} ids to {SUBSET.relative_to(ROOT)}")


def subset_version() -> str:
    for line in SUBSET.read_text().splitlines():
        if line.startswith("# peft "):
            return line.split()[2]
    raise SystemExit(f"peft-suite: {SUBSET} names no peft version")


def describe(rec: dict | None) -> str:
    if rec is None:
        return "not run"
    return rec["error"] or rec["outcome"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--selection", choices=["subset", "full"], default="subset")
    parser.add_argument("--backend", choices=["reference", "triton", "cuda"], default="reference")
    parser.add_argument("--plain", action="store_true", help="subset: run the whole subset plain too")
    parser.add_argument("--write-subset", type=int, metavar="N",
                        help="full: draw subset.txt, N tests in proportion to the strata, at least one per stratum "
                             "(985 for N = 700 with PEFT 0.22.0)")
    parser.add_argument("--reuse", action="store_true",
                        help="full: use an earlier full run's records where they exist (delete "
                             "build/peft_suite/full-<backend>.jsonl to run the from_peft pass alone again)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per test (pytest-timeout)")
    args = parser.parse_args()

    version = importlib.metadata.version("peft")
    if args.selection == "subset" and subset_version() != version:
        raise SystemExit(f"peft-suite: {SUBSET.relative_to(ROOT)} lists the tests of peft {subset_version()}, "
                         f"peft {version} is installed: draw it again with --selection full --write-subset N")
    BUILD.mkdir(parents=True, exist_ok=True)
    ensure_dependencies()
    tree = ensure_tests(version)
    name = f"{args.selection}-{args.backend}"

    problems = []
    if args.selection == "full":
        plain = run_pytest(tree, "full-plain", "family", FILES, None, args.timeout, args.reuse)
        ours = run_pytest(tree, name, "family", FILES, args.backend, args.timeout, args.reuse)
        counted = sorted(i for i, rec in plain.items() if family(rec))
        baseline = {i: plain[i] for i in counted}
        header = [f"collected (no other method's config): {len(plain)}",
                  f"LoRA-family tests (built LoRA/DoRA/VeRA/RandLoRA adapters only, plain run): {len(counted)}",
                  f"expected failures (xfail) plain: {sum(plain[i]['outcome'] == 'xfailed' for i in counted)}"]
        if args.write_subset:
            write_subset(draw_subset(plain, ours, args.write_subset), plain, version)
    else:
        counted = read_ids(SUBSET)
        files = sorted({i.split("::")[0].removeprefix("tests/") for i in counted})
        ours = run_pytest(tree, name, str(SUBSET), files, args.backend, args.timeout)
        if args.plain:
            baseline = run_pytest(tree, "subset-plain", str(SUBSET), files, None, args.timeout)
        else:
            # The list holds tests that passed plain when drawn; only the ones failing through
            # from_peft are run plain again, to tell a regression from a changed environment.
            failing = [i for i in counted if not passed(ours.get(i))]
            baseline = {i: {"outcome": "passed", "error": None} for i in counted}
            if failing:
                rerun = BUILD / f"{name}-failing.txt"
                rerun.write_text("\n".join(failing) + "\n")
                files_failing = sorted({i.split("::")[0].removeprefix("tests/") for i in failing})
                baseline.update(run_pytest(tree, f"{name}-failing-plain", str(rerun), files_failing, None,
                                           args.timeout))
        header = [f"subset: {len(counted)} tests ({SUBSET.relative_to(ROOT)})"]
        if len(ours) != len(counted):
            problems.append(f"{len(counted)} tests listed, {len(ours)} ran through from_peft")
        drift = [i for i in counted if not passed(baseline.get(i))]
        if drift:
            problems.append(f"{len(drift)} listed tests fail with plain PEFT (environment changed, list out of date): "
                            + ", ".join(f"{i} ({describe(baseline.get(i))})" for i in drift[:5]))

    passed_plain = [i for i in counted if passed(baseline.get(i))]
    passed_ours = [i for i in passed_plain if passed(ours.get(i))]
    regressions = [i for i in passed_plain if not passed(ours.get(i))]
    exercised = [i for i in counted if (ours.get(i) or {}).get("fused", 0) > 0]
    kinds = Counter(describe(ours.get(i)).split(":")[0] for i in regressions)
    lines = [f"peft {version}, backend {args.backend}, selection {args.selection}", *header,
             f"passed plain: {len(passed_plain)}",
             f"passed through from_peft (of those): {len(passed_ours)}",
             f"ran at least one layer fused: {len(exercised)}",
             f"regressions (pass plain, fail through from_peft): {len(regressions)}"
             + (" (" + ", ".join(f"{k} {n}" for k, n in kinds.most_common()) + ")" if kinds else ""),
             *(f"  {i}  {describe(ours.get(i))}" for i in regressions)]
    if regressions:
        problems.append(f"{len(regressions)} regressions")
    lines += [f"FAILED: {p}" for p in problems]
    report = BUILD / f"report-{name}.txt"
    report.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:7 + min(len(regressions), 50)]))
    log(f"report: {report.relative_to(ROOT)}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
