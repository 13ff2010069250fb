"""Check the SASS of the built CUDA objects: 16-bit products on tensor cores, no spills.

Disassembles every object under build/cuda-check/temp/ (left there by `make cuda-check`) for
one architecture (default sm_90a) with the cuobjdump that triton ships
(triton/backends/nvidia/bin), counts per kernel the tensor-core instructions (HMMA, HGMMA)
and the fp32 FMAs (FFMA), and reads its registers, stack and shared memory (cuobjdump -res-usage).

The rule: a kernel that computes a product with 16-bit operands must show HMMA or HGMMA. Which
kernels those are is decided per kernel family from the template arguments (FAMILIES below: for
each GEMM-shaped kernel template, which arguments are the product's operand types). A kernel of
no listed family that has a 16-bit template argument and an FFMA-heavy body (at least
UNLISTED_FFMA FFMAs: the FMA tile loops unroll to 256 or more) is treated the same way, so a new
GEMM loop cannot slip through unclassified. Families in CUDA_CORE run on CUDA cores by design and
say why. Any kernel with a non-zero stack frame (register spills or local arrays) fails too.

Writes benchmarks/results/compile/cuda_sass.csv: kernel, arch, product, hmma, hgmma, ffma,
registers, stack_bytes, shared_bytes, status. Exits non-zero on a failure, or when no object or
no 16-bit product kernel is found (a build that silently produced nothing must not pass).
"""

from __future__ import annotations

import argparse
import csv
import glob
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIXTEEN = ("__half", "__nv_bfloat16")
UNLISTED_FFMA = 128

# family name (the kernel template's unqualified name) -> indices of the template arguments that
# are the product's operand types; the product is 16-bit when all of them are.
FAMILIES = {
    # tiles.cuh: C = P Q, <Cfg, TP, TQ, TC>
    "skinny_gemm_kernel": (1, 2),
    # random_basis.cu: <Cfg, TP, TA, TC>; the adapter TA decides (a 16-bit adapter shares the base
    # dtype, and the fp32 P of `up` is h, which the reference holds in the adapter dtype)
    "basis_product_kernel": (2,),
    # random_basis.cu: dS = gᵀ x reduced against the basis, <TX, TA>
    "scale_grads_kernel": (1,),
    # projected_step.cu: R = G Pᵀ and W += Z P, <T> (products in the gradient's dtype)
    "project_kernel": (0,),
    "back_kernel": (0,),
    # lora.cu: out += x · W with a 4-bit W dequantised into the 16-bit tiles, <T> (x's type)
    "quant4_gemm_kernel": (0,),
    # multi_lora.cu: h = x A_aᵀ, g = dy B_a <Cfg, TP, TQ>; y += (c·h) B_aᵀ <TA, TC> (TA both operands);
    # dA = gᵀ x, dBᵀ = hᵀ dy <Cfg, TP, TQ>
    "seg_down_kernel": (1, 2),
    "seg_expand_kernel": (0,),
    "seg_reduce_kernel": (1, 2),
}

# Families that run on CUDA cores whatever their types, and why.
CUDA_CORE = {
    "spmm_csr_kernel": "gather: each nonzero scales one token column of x (no dense tile to multiply)",
    "sddmm_csr_kernel": "gather: one dot product over tokens per nonzero",
    "spmm_block_kernel": "gather-bound: one small support block at a time against gathered x columns; "
                         "the Triton backend is the tensor-core path for block supports",
    "sddmm_block_kernel": "gather-bound: one small support block per thread block, reduced over tokens",
    "reduce_partials_kernel": "reduction of split-L partials",
    "moments_kernel": "elementwise Adam moments and row reductions",
    "limiter_kernel": "reduction",
    "adamw_kernel": "elementwise",
}


def cuobjdump() -> str:
    try:
        import triton
    except ImportError:
        sys.exit("sass-check: triton is not installed in this Python (its cuobjdump is needed)")
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.exists():
        sys.exit(f"sass-check: {path} not found")
    return str(path)


def demangle(names: list[str]) -> dict[str, str]:
    if not names:
        return {}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


def template_args(demangled: str) -> tuple[str, list[str]]:
    """(unqualified template name, top-level template arguments) of a demangled kernel name."""
    head = demangled.replace("(anonymous namespace)::", "")
    if head.startswith("void "):
        head = head[5:]
    lt, lp = head.find("<"), head.find("(")
    if lt < 0 or 0 <= lp < lt:
        return head[:lp if lp >= 0 else None].rsplit("::", 1)[-1], []
    name = head[:lt].rsplit("::", 1)[-1]
    args, depth, cur = [], 0, ""
    for ch in head[lt + 1:]:
        if ch == "<":
            depth += 1
        elif ch == ">":
            if depth == 0:
                args.append(cur.strip())
                break
            depth -= 1
        if ch == "," and depth == 0:
            args.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return name, args


def short_name(demangled: str) -> str:
    """The demangled kernel without namespaces and parameter list."""
    s = re.sub(r"\(anonymous namespace\)::|lowrank_kernels::", "", demangled)
    if s.startswith("void "):
        s = s[5:]
    depth = 0
    for i, ch in enumerate(s):
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0:
            return s[:i]
    return s


def parse_sass(text: str) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    cur = None
    op = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")
    for line in text.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            cur = counts.setdefault(m.group(1), {"HMMA": 0, "HGMMA": 0, "FFMA": 0})
            continue
        if cur is None:
            continue
        m = op.match(line)
        if m and m.group(1) in cur:
            cur[m.group(1)] += 1
    return counts


def parse_res(text: str) -> dict[str, dict[str, int]]:
    res, cur = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*Function (\S+):\s*$", line)
        if m:
            cur = m.group(1)
            continue
        if cur and "REG:" in line:
            res[cur] = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}
            cur = None
    return res


def classify(name: str, args: list[str], ffma: int) -> tuple[str, str]:
    """(product, rule): product '16-bit', 'fp32' or 'none'; rule 'tensor cores' or why CUDA cores."""
    if name in FAMILIES:
        ops = [args[i] for i in FAMILIES[name] if i < len(args)]
        if len(ops) != len(FAMILIES[name]):
            return "16-bit", f"cannot read the operand types of {name}: treated as 16-bit"
        if all(a in SIXTEEN for a in ops):
            return "16-bit", "tensor cores"
        return "fp32", "IEEE fp32 product (an fp32 operand): CUDA cores, as cuBLAS without tf32"
    if name in CUDA_CORE:
        return "none", "CUDA cores: " + CUDA_CORE[name]
    if any(a in SIXTEEN for a in args) and ffma >= UNLISTED_FFMA:
        return "16-bit", f"unlisted kernel with 16-bit types and {ffma} FFMAs: treated as a 16-bit GEMM loop"
    return "none", "no GEMM loop"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--objects", default=str(ROOT / "build" / "cuda-check" / "temp"),
                    help="folder searched for *.o (default: build/cuda-check/temp)")
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compile" / "cuda_sass.csv"))
    opts = ap.parse_args()

    objects = sorted(glob.glob(os.path.join(opts.objects, "**", "*.o"), recursive=True))
    if not objects:
        print(f"sass-check: no objects under {opts.objects}; run `make cuda-check` first", file=sys.stderr)
        return 1
    tool = cuobjdump()
    rows, failures = [], []
    for obj in objects:
        sass = subprocess.run([tool, "-sass", "-arch", opts.arch, obj], capture_output=True, text=True)
        if sass.returncode != 0 and "does not contain" not in sass.stderr:
            print(f"sass-check: cuobjdump failed on {obj}: {sass.stderr.strip()}", file=sys.stderr)
            return 1
        counts = parse_sass(sass.stdout)
        if not counts:
            continue  # a host-only object (the bindings)
        res = parse_res(subprocess.run([tool, "-res-usage", "-arch", opts.arch, obj], capture_output=True,
                                       text=True).stdout)
        names = demangle(list(counts))
        for mangled, c in sorted(counts.items(), key=lambda kv: names[kv[0]]):
            full = names[mangled]
            name, args = template_args(full)
            product, rule = classify(name, args, c["FFMA"])
            r = res.get(mangled, {})
            status = "ok"
            if product == "16-bit" and c["HMMA"] + c["HGMMA"] == 0:
                status = "FAIL: 16-bit product without HMMA/HGMMA"
            elif r.get("STACK", 0) > 0 or r.get("LOCAL", 0) > 0:
                status = f"FAIL: {r.get('STACK', 0)} bytes of stack (spills or local memory)"
            short = short_name(full)
            rows.append({
                "kernel": short, "object": os.path.basename(obj), "arch": opts.arch, "product": product,
                "rule": rule, "hmma": c["HMMA"], "hgmma": c["HGMMA"], "ffma": c["FFMA"],
                "registers": r.get("REG", ""), "stack_bytes": r.get("STACK", ""), "shared_bytes": r.get("SHARED", ""),
                "status": status,
            })
            if status != "ok":
                failures.append(f"{short}: {status}")

    os.makedirs(os.path.dirname(opts.out), exist_ok=True)
    fields = ["kernel", "object", "arch", "product", "hmma", "hgmma", "ffma", "registers", "stack_bytes",
              "shared_bytes", "status", "rule"]
    with open(opts.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)

    n16 = sum(r["product"] == "16-bit" for r in rows)
    tc = sum(r["product"] == "16-bit" and r["hmma"] + r["hgmma"] > 0 for r in rows)
    print(f"sass-check: {len(rows)} kernels in {len(objects)} objects ({opts.arch}); {n16} compute 16-bit products, "
          f"{tc} of them on tensor cores; HMMA {sum(r['hmma'] for r in rows)}, HGMMA {sum(r['hgmma'] for r in rows)}, "
          f"FFMA {sum(r['ffma'] for r in rows)}; table in {os.path.relpath(opts.out, ROOT)}")
    if n16 == 0:
        failures.append("no kernel computing a 16-bit product was found: the objects or the parsing are wrong")
    for f in failures:
        print("sass-check: FAIL", f, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
