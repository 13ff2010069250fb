"""`python -m lowrank_kernels`: the version, what was found on this machine, the backend each op
will use, and the main commands."""

from __future__ import annotations

import sys

from lowrank_kernels import backend

COMMANDS = (
    ("make test", "the test suite (CPU: reference + Triton interpreter; GPU: everything, CUDA kernels included)"),
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
    lines += ["", "Backend per op (backend=None):", f"  {'op':<24}{'CPU tensors':<16}CUDA tensors"]
    for op, per_device in found["backends"].items():
        lines.append(f"  {op:<24}{per_device['cpu']:<16}{per_device['cuda'] or '(no GPU)'}")
    lines += ["", "Commands:"] + [f"  {cmd}\n      {what}" for cmd, what in COMMANDS]
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m lowrank_kernels", description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
