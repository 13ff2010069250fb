"""Writes the documentation's tables that are derived from the code.

    python docs/generate.py           rewrite every generated table in README.md and docs/*.md
    python docs/generate.py --check   rewrite nothing; exit 1 naming each file whose table is stale

A generated table sits between a line ``<!-- generated:NAME -->`` and the next line
``<!-- end generated -->``; NAME picks the function below that writes it. Everything outside the
markers is hand-written and left as it is.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the package of this checkout, installed or not

import lowrank_kernels as lk  # noqa: E402

SECTION = re.compile(r"^(<!-- generated:([\w-]+) -->\n)(.*?)^(<!-- end generated -->)$", re.S | re.M)


def method_defaults() -> str:
    """Each method of LowRankLinear / convert with its peer, its defaults and its options."""
    lines = ["| method | peer | default rank | default alpha (scaling s) | options (default) |",
             "|---|---|---|---|---|"]
    for name in lk.available_methods():
        method = lk.nn.get_method(name)
        options = ", ".join(f"`{option}={default!r}`" for option, (default, _) in method.options.items())
        lines.append(f"| `{name}` | {method.peer} | {method.default_rank} | {method.alpha_doc()} | {options} |")
    return "\n".join(lines) + "\n"


def _dtypes(table) -> str:
    names = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}
    return "; ".join(f"{'' if dev == 'any' else dev + ': '}{', '.join(sorted(names[str(d)[6:]] for d in dtypes))}"
                     for dev, dtypes in table.items())


def op_support() -> str:
    """Every op the backend registry declares, with what each implementation supports."""
    from lowrank_kernels import registry

    lines = ["| op | computes | backend | dtypes (by device) | 4-bit base weight |", "|---|---|---|---|---|"]
    for name in registry.ops():
        op = registry.get(name)
        for backend in op.backends():
            impl = op.impl(backend)
            default = " (default on CUDA tensors)" if backend == op.cuda_default else ""
            quant4 = "no" if impl.quant4 is None else _dtypes(impl.quant4)
            first = f"`{name}` | {op.summary}" if backend == op.backends()[0] else " | "
            lines.append(f"| {first} | `{backend}`{default} | {_dtypes(impl.dtypes)} | {quant4} |")
    return "\n".join(lines) + "\n"


GENERATORS = {"method-defaults": method_defaults, "op-support": op_support}


def pages() -> list[Path]:
    """The files that may hold generated tables: README.md and docs/*.md."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def regenerate(text: str) -> str:
    """``text`` with every generated section rewritten; ValueError naming an unknown generator."""
    def section(match):
        name = match.group(2)
        if name not in GENERATORS:
            raise ValueError(f"unknown generated table {name!r}; known: {sorted(GENERATORS)}")
        return match.group(1) + GENERATORS[name]() + match.group(4)

    return SECTION.sub(section, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a committed table differs; write nothing")
    args = parser.parse_args(argv)
    stale = []
    for page in pages():
        text = page.read_text()
        new = regenerate(text)
        if new != text:
            stale.append(page.relative_to(ROOT).as_posix())
            if not args.check:
                page.write_text(new)
    if stale:
        verb = "stale" if args.check else "rewritten"
        print(f"{verb}: {', '.join(stale)}" + (" (run: python docs/generate.py)" if args.check else ""))
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
