"""`python -m lowrank_kernels`: the version, what was found on this machine, the backend each op
will use (on CUDA tensors: the candidates auto mode times and the choices it cached), and the main
commands."""

from __future__ import annotations

import sys

from lowrank_kernels import auto_backend, backend, registry

COMMANDS = (
    ("make test", "the test suite (CPU: reference + Triton interpreter; GPU: everything, CUDA kernels included)"),
    ("make test-quick", "the tests but the slow ones (distributed, pretraining, CUDA emulation): the edit loop"),
    ("make bench", "every benchmark; CSVs and plots in benchmarks/results/<device>/"),
    ("python benchmarks/bench_<op>.py --help", "one op's benchmark (lora, random_basis, sparse_lowrank, "
                                              "projected_step)"),
    ("python benchmarks/run_all.py --help", "the benchmark grid, op by op"),
    ("LOWRANK_KERNELS_FORCE_CUDA=1 pip install -e . --no-build-isolation", "build the CUDA extension"),
)


def report(found: dict | None = None) -> str:
    """The text `python -m lowrank_kernels` prints, from ``backend.info()``."""
    found = found or backend.info()
    yes = "built" if found["cuda_extension"] else f"not built ({found['cuda_extension_reason']})"
    lines = [
        f"lowrank_kernels {found['version']}",
        "",
        "Found:",
        f"  python   {found['python']}",
        f"  torch    {found['torch']}",
        f"  triton   {found['triton'] or 'not installed'}"
        + ("  (TRITON_INTERPRET=1: kernels run interpreted on CPU tensors)" if found["interpreter"] else ""),
        f"  GPU      {found['gpu'] or 'none visible'}",
        f"  CUDA extension lowrank_kernels._C: {yes}",
    ]
    if not found["cuda_extension"]:
        lines.append("      CUDA tensors run the Triton kernels instead; to build it: "
                     "LOWRANK_KERNELS_FORCE_CUDA=1 pip install -e . --no-build-isolation")
    if found["backend_env"]:
        lines.append(f"  {backend.ENV_VAR}={found['backend_env']}")
    auto = found["auto"]
    lines += ["", "Ops (lowrank_kernels.registry), their implementations and the backend each runs (backend=None):",
              f"  {'op':<24}{'implementations':<26}{'CPU tensors':<16}CUDA tensors"]
    for op, per_device in found["backends"].items():
        impls = "/".join(registry.get(op).backends())
        lines.append(f"  {op:<24}{impls:<26}{per_device['cpu']:<16}{_cuda_cell(per_device['cuda'], auto, op)}")
    lines += ["", _auto_heading(auto, found["backend_env"])]
    for r in auto["choices"]:
        timed = ", ".join(f"{b} {ms:.4g} ms" for b, ms in r["ms"].items()) or "the only candidate"
        lines.append(f"  {r['op']:<24}{r['backend']:<11}{r['key']}  ({timed})")
    if not auto["choices"]:
        lines.append("  none cached" + ("" if found["gpu"] else " (no GPU)"))
    lines += ["", "Commands:"] + [f"  {cmd}\n      {what}" for cmd, what in COMMANDS]
    return "\n".join(lines)


def _cuda_cell(default, auto: dict, op: str) -> str:
    """The CUDA column: the backend that runs, or under auto mode the candidates it times and the
    one it runs before (or without) timing."""
    if default is None:
        return "(no GPU)"
    if default.startswith("error") or not auto["enabled"] or auto["candidates"] is None:
        return default
    return f"auto: fastest of {'/'.join(auto['candidates'][op])} (untimed: {default})"


def _auto_heading(auto: dict, backend_env) -> str:
    state = "on" if auto["enabled"] else f"off ({auto_backend.AUTO_ENV}=0: CUDA tensors run the defaults)"
    if backend_env and backend_env != "auto":
        state = f"overridden by {backend.ENV_VAR}={backend_env}"
    cache = auto["cache_dir"] or f"memory only ({auto_backend.CACHE_ENV} is empty)"
    return (f"Auto backend on CUDA tensors: {state}; the fastest backend per op and shape, timed on first use "
            f"and cached in {cache}:")


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m lowrank_kernels", description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
