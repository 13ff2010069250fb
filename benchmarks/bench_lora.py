"""Benchmark of the fused LoRA linear: y = x Wᵀ + s · (x Aᵀ) Bᵀ with W frozen.

Providers: ``base`` (F.linear alone, W frozen: the floor's reference), ``peft`` (PEFT's LoRA
Linear layer), ``reference`` / ``triton`` / ``cuda`` (lowrank_kernels.lora_linear with that
backend; ``cuda`` only where the extension is built, ``triton`` on a GPU only: the interpreter is
not a performance path).

Modes: inference shapes (M in {1, 16, 128}) run ``fwd`` under torch.no_grad; training shapes
run ``fwd`` (autograd recording, as in training), ``bwd`` (the backward of one forward) and
``fwd+bwd``. Gradients: x, A and B (W frozen); the base's backward is dx = dy W alone.
No dropout, no bias (LLaMA's projections have none); adapters in the base dtype.

Cost (the minimum flops and bytes of each provider), e = element size:
  base   fwd: 2MKN flops, (MK + NK + MN)e bytes   bwd: 2MKN flops, (MN + NK + MK)e bytes
  LoRA   adds 2Mr(K + N) flops forward and 2Mr(2K + 2N) backward; bytes add A and B (rK + Nr)e
         forward, and backward reads x again (for dA), A and B, and writes dA and dB.

GPU shapes, bf16 (the target shape, M=8192 K=N=4096 r=16, always first):
  --quick   the target in every mode, and decode M=1 and M=128 at K=N=4096, r=16
  default   M in {2048, 8192, 16384} (training) and {1, 16, 128} (inference) x (K, N) in
            {(4096, 4096), (4096, 11008), (11008, 4096)} at r=16, plus r in {8, 64} at the target
  --full    the whole grid: every M x (K, N) x r in {8, 16, 64}
CPU (no GPU): a few small fp32 shapes whatever the flags, labelled cpu.

Rows ``method=dora`` (the same shapes and modes): base F.linear, PEFT's DoRA layer and
LowRankLinear(method="dora") per backend, gradients for x, A, B and the magnitude.
Rows ``method=qlora`` (the same shapes and modes, W frozen as bitsandbytes stores it: NF4,
blocksize 64, nested absmax, QLoRA's defaults): ``base`` bitsandbytes' 4-bit matmul alone
(bnb.matmul_4bit), ``peft`` PEFT's QLoRA layer (peft.tuners.lora.bnb.Linear4bit), ``reference`` /
``triton`` / ``cuda`` lora_linear on the Params4bit, and on a GPU ``dequant-cublas``: W dequantised
by bitsandbytes each call, then cuBLAS GEMMs for the base and the adapter (unsloth's scheme). The
floor counts W as its 4-bit bytes plus the fp32 absmax (N·K/2 + 4·N·K/64) instead of N·K·e.

``--method`` runs only the named row families.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from _common import (  # first: it puts this checkout on sys.path
    Bench,
    backend_of,
    bench_parser,
    device_cases,
    headline_cases,
    mode_fn,
    our_providers,
    peer_available,
    progress,
    shape_str,
)

import lowrank_kernels

TARGET = (8192, 4096, 4096, 16)  # (M, K, N, r)
TARGET_RATIO = {"fwd": 1.03, "fwd+bwd": 1.08}  # the targets on H100, bf16, vs the base
INFER_M, TRAIN_M, RANKS = (1, 16, 128), (2048, 8192, 16384), (8, 16, 64)
KN = ((4096, 4096), (4096, 11008), (11008, 4096))
CPU_CASES = ((16, 512, 512, 16), (512, 512, 512, 16), (512, 512, 1376, 16))
# --smoke: one inference and one training shape (every row family runs on the training one); K a
# multiple of the 4-bit blocksize, where bitsandbytes' CPU dequantisation is right.
SMOKE_CASES = ((1, 64, 48, 4), (24, 64, 48, 4))
TRAIN_MODES = ("fwd", "bwd", "fwd+bwd")


def is_training(M: int) -> bool:
    return M not in INFER_M


def gpu_cases(quick: bool, full: bool) -> list[tuple[int, int, int, int]]:
    if quick:
        cases = [TARGET, (1, 4096, 4096, 16), (128, 4096, 4096, 16)]
    else:
        ranks = RANKS if full else (16,)
        cases = [TARGET] + [(M, K, N, r) for M in TRAIN_M + INFER_M for K, N in KN for r in ranks]
        if not full:
            cases += [(TARGET[0], TARGET[1], TARGET[2], r) for r in RANKS]
    return list(dict.fromkeys(cases))  # drop repeats, keep the target first


def cost(M: int, K: int, N: int, r: int, mode: str, lora: bool, e: int) -> tuple[float, float]:
    """(flops, bytes) the provider must do at least in ``mode`` (see the module docstring)."""
    flops = elems = 0
    if mode in ("fwd", "fwd+bwd"):
        flops += 2 * M * K * N
        elems += M * K + N * K + M * N
        if lora:
            flops += 2 * M * r * (K + N)
            elems += r * K + N * r
    if mode in ("bwd", "fwd+bwd"):
        flops += 2 * M * K * N
        elems += M * N + N * K + M * K
        if lora:
            flops += 2 * M * r * (2 * K + 2 * N)
            elems += M * K + 2 * (r * K + N * r)
    return float(flops), float(elems * e)


class _OneLayer(torch.nn.Module):
    def __init__(self, proj: torch.nn.Linear):
        super().__init__()
        self.proj = proj


def _peft_layer(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, alpha: float,
                use_dora: bool = False) -> torch.nn.Module:
    """PEFT's LoRA Linear (DoRA with ``use_dora``) around an nn.Linear holding W, with adapters A and B
    (values copied)."""
    from peft import LoraConfig, get_peft_model

    N, K = W.shape
    lin = torch.nn.Linear(K, N, bias=False, device=W.device, dtype=W.dtype)
    lin.weight = torch.nn.Parameter(W, requires_grad=False)
    cfg = LoraConfig(r=A.shape[0], lora_alpha=alpha, target_modules=["proj"], lora_dropout=0.0, use_dora=use_dora)
    # autocast_adapter_dtype=False keeps the adapters in the base dtype like the other providers
    # (PEFT's default would upcast them to fp32 on a bf16 base and cast x to fp32 each call).
    layer = get_peft_model(_OneLayer(lin), cfg, autocast_adapter_dtype=False).base_model.model.proj
    with torch.no_grad():
        for mod, val in ((layer.lora_A["default"], A), (layer.lora_B["default"], B)):
            mod.to(W.dtype)
            mod.weight.copy_(val)
    return layer


def make_case(provider: str, mode: str, M: int, K: int, N: int, r: int, dtype: torch.dtype, device: str):
    """The ``make_fn`` for Bench.run: fresh random inputs (B non-zero) and one step of ``mode``."""
    train = is_training(M)
    scaling = 2.0  # alpha = 2r, a common LoRA setting

    def make_fn():
        x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=train)
        W = torch.randn(N, K, device=device, dtype=dtype) / math.sqrt(K)
        A = (torch.randn(r, K, device=device, dtype=dtype) / math.sqrt(K)).requires_grad_(train)
        B = (torch.randn(N, r, device=device, dtype=dtype) / math.sqrt(r)).requires_grad_(train)
        if provider == "base":
            fwd, params = (lambda: F.linear(x, W)), [x]
        elif provider == "peft":
            layer = _peft_layer(W, A, B, alpha=scaling * r)
            fwd = lambda: layer(x)  # noqa: E731
            params = [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        else:
            fwd = lambda: lowrank_kernels.lora_linear(x, W, A, B, scaling, backend=backend_of(provider))  # noqa: E731
            params = [x, A, B]
        return mode_fn(mode, fwd, params, torch.randn(M, N, device=device, dtype=dtype), inference=not train)

    return make_fn


# LowRankLinear methods that run on this op with a trainable factor folded into A (LoRA-SB's r×r
# core, A' = R·A; SoRA's gate, A' = diag(g)·A; NLoRA's core, A' = N·A): rows ``method=<name>`` on the
# training shapes, the layer's fwd/bwd against the same F.linear base (its cost floor counted as LoRA's).
METHOD_ROWS = ("lora_sb", "sora", "nlora")


def make_method_case(method: str, provider: str, mode: str, M: int, K: int, N: int, r: int, dtype, device):
    """The ``make_fn`` of a ``method=`` row: a LowRankLinear of ``method`` (or the base) on fresh inputs."""

    def make_fn():
        x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
        lin = torch.nn.Linear(K, N, bias=False, device=device, dtype=dtype)
        dy = torch.randn(M, N, device=device, dtype=dtype)
        if provider == "base":
            W = lin.weight.detach()
            return mode_fn(mode, lambda: F.linear(x, W), [x], dy)
        layer = lowrank_kernels.LowRankLinear.from_linear(lin, method=method, rank=r, backend=backend_of(provider))
        return mode_fn(mode, lambda: layer(x), [x] + [p for p in layer.parameters() if p.requires_grad], dy)

    return make_fn


# DoRA (ops/dora.py) rows ``method=dora``: base F.linear, PEFT's DoRA layer, and LowRankLinear(method="dora")
# on each backend (‖W_j‖² cached across calls, as in training with W frozen). The floor is LoRA's plus the
# norm's skinny W Aᵀ (2NKr flops per forward; W is read by the GEMM anyway).
def make_dora_case(provider: str, mode: str, M: int, K: int, N: int, r: int, dtype, device):
    """The ``make_fn`` of a ``method=dora`` row: fresh inputs, B non-zero, one step of ``mode``."""
    train = is_training(M)

    def make_fn():
        x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=train)
        lin = torch.nn.Linear(K, N, bias=False, device=device, dtype=dtype).requires_grad_(False)
        A = torch.randn(r, K, device=device, dtype=dtype) / math.sqrt(K)
        B = torch.randn(N, r, device=device, dtype=dtype) / math.sqrt(r)
        dy = torch.randn(M, N, device=device, dtype=dtype)
        if provider == "base":
            W = lin.weight.detach()
            fwd, params = (lambda: F.linear(x, W)), [x]
        elif provider == "peft":
            layer = _peft_layer(lin.weight.detach(), A, B, alpha=2.0 * r, use_dora=True)
            fwd, params = (lambda: layer(x)), [x] + [p for p in layer.parameters() if p.requires_grad]
        else:
            layer = lowrank_kernels.LowRankLinear.from_linear(lin, method="dora", rank=r, alpha=2.0 * r,
                                                              backend=backend_of(provider))
            with torch.no_grad():
                layer.lora_A.copy_(A)
                layer.lora_B.copy_(B)
            fwd, params = (lambda: layer(x)), [x] + [p for p in layer.parameters() if p.requires_grad]
        return mode_fn(mode, fwd, params, dy, inference=not train)

    return make_fn


def dora_cost(M: int, K: int, N: int, r: int, mode: str, provider: str, e: int) -> tuple[float, float]:
    flops, nbytes = cost(M, K, N, r, mode, provider != "base", e)
    if provider != "base" and mode in ("fwd", "fwd+bwd"):
        flops += 2 * N * K * r
    return flops, nbytes


# QLoRA (a bitsandbytes 4-bit W, ops/_quant.py) rows ``method=qlora``.
QLORA_BLOCKSIZE = 64


def _params4bit(N: int, K: int, device):
    import bitsandbytes as bnb

    W = torch.randn(N, K) / math.sqrt(K)
    return bnb.nn.Params4bit(W, requires_grad=False, quant_type="nf4", blocksize=QLORA_BLOCKSIZE,
                             compress_statistics=True).to(device)


def _peft_qlora_layer(W4, A: torch.Tensor, B: torch.Tensor, alpha: float, dtype) -> torch.nn.Module:
    """PEFT's QLoRA layer around a bitsandbytes Linear4bit holding W4, adapters A and B (values copied)."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    N, K = W4.quant_state.shape
    lin = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=dtype, quant_type="nf4")
    lin.weight = W4
    model = _OneLayer(lin)
    model.is_loaded_in_4bit = True  # what PEFT reads to pick its 4-bit layer
    cfg = LoraConfig(r=A.shape[0], lora_alpha=alpha, target_modules=["proj"], lora_dropout=0.0)
    layer = get_peft_model(model, cfg, autocast_adapter_dtype=False).base_model.model.proj
    with torch.no_grad():
        for mod, val in ((layer.lora_A["default"], A), (layer.lora_B["default"], B)):
            mod.to(device=A.device, dtype=dtype)
            mod.weight.copy_(val)
    return layer


def make_qlora_case(provider: str, mode: str, M: int, K: int, N: int, r: int, dtype, device):
    """The ``make_fn`` of a ``method=qlora`` row: fresh inputs, B non-zero, one step of ``mode``."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF

    train = is_training(M)
    scaling = 2.0

    def make_fn():
        x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=train)
        W4 = _params4bit(N, K, device)
        A = (torch.randn(r, K, device=device, dtype=dtype) / math.sqrt(K)).requires_grad_(train)
        B = (torch.randn(N, r, device=device, dtype=dtype) / math.sqrt(r)).requires_grad_(train)
        params = [x, A, B]
        if provider == "base":
            fwd, params = (lambda: bnb.matmul_4bit(x, W4.t(), quant_state=W4.quant_state)), [x]
        elif provider == "peft":
            layer = _peft_qlora_layer(W4, A.detach(), B.detach(), scaling * r, dtype)
            fwd = lambda: layer(x)  # noqa: E731
            params = [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        elif provider == "dequant-cublas":
            def fwd():
                W = bnbF.dequantize_4bit(W4.data, W4.quant_state).to(dtype)
                return torch.addmm(x @ W.t(), x @ A.t(), B.t(), alpha=scaling)
        else:
            fwd = lambda: lowrank_kernels.lora_linear(x, W4, A, B, scaling, backend=backend_of(provider))  # noqa: E731
        return mode_fn(mode, fwd, params, torch.randn(M, N, device=device, dtype=dtype), inference=not train)

    return make_fn


def qlora_cost(M: int, K: int, N: int, r: int, mode: str, provider: str, e: int) -> tuple[float, float]:
    """LoRA's cost with each read of W at its 4-bit size (codes and fp32 absmax)."""
    flops, nbytes = cost(M, K, N, r, mode, provider != "base", e)
    reads = (mode in ("fwd", "fwd+bwd")) + (mode in ("bwd", "fwd+bwd"))
    return flops, nbytes - reads * N * K * (e - 0.5 - 4 / QLORA_BLOCKSIZE)


def qlora_providers(bench: Bench) -> list[str]:
    if not peer_available(bench, "base", "bitsandbytes"):
        return []
    provs = providers(bench)
    if bench.on_gpu:
        provs.append("dequant-cublas")
    else:
        bench.skip("dequant-cublas", "no GPU (it stands for cuBLAS)")
    return provs


def providers(bench: Bench) -> list[str]:
    peft = ["peft"] if peer_available(bench, "peft", "peft") else []
    return ["base"] + peft + our_providers(bench)


def report_targets(rows: list[dict]) -> None:
    """Print the targets at the target shape against what each provider reached."""
    target = shape_str(M=TARGET[0], K=TARGET[1], N=TARGET[2], r=TARGET[3])
    print(f"\nTargets at {target}, bf16 (measured on this GPU in this run):")
    for r in rows:
        if r["shape"] == target and r["mode"] in TARGET_RATIO and r["provider"] != "base" and r["ratio_to_base"]:
            goal = TARGET_RATIO[r["mode"]]
            verdict = "met" if r["ratio_to_base"] <= goal else "MISSED"
            print(f"  {r['mode']:<8} {r['provider']:<10} {r['ratio_to_base']:.3f}x base (target <= {goal}x): {verdict}")


def build_parser():
    parser = bench_parser(__doc__)
    parser.add_argument("--method", action="append", choices=("lora",) + METHOD_ROWS + ("dora", "qlora"),
                        help="run only these row families (repeatable; default: all)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    bench = Bench("lora", out=args.out, smoke=args.smoke, warmup=args.warmup)
    device, dtype, e, cases = device_cases(bench, gpu_cases(args.quick, args.full), CPU_CASES, SMOKE_CASES)
    if args.headline:  # the target's fwd+bwd, the plain LoRA rows alone
        cases, args.method = headline_cases(bench, TARGET, cases, lambda c: is_training(c[0])), ["lora"]
    modes = lambda M: ("fwd+bwd",) if args.headline else TRAIN_MODES if is_training(M) else ("fwd",)  # noqa: E731
    provs = providers(bench)
    wanted = lambda family: args.method is None or family in args.method  # noqa: E731
    for M, K, N, r in progress(cases if wanted("lora") else [], desc="lora"):
        shape = shape_str(M=M, K=K, N=N, r=r)
        for mode in modes(M):
            for p in provs:  # base first: every later line carries its ratio to it
                flops, nbytes = cost(M, K, N, r, mode, p != "base", e)
                bench.run(p, mode, shape, dtype, make_case(p, mode, M, K, N, r, dtype, device), flops, nbytes)
    for M, K, N, r in [c for c in cases if is_training(c[0])]:
        for method in [m for m in METHOD_ROWS if wanted(m)]:
            shape = shape_str(M=M, K=K, N=N, r=r, method=method)
            for mode in TRAIN_MODES:
                for p in [p for p in provs if p != "peft"]:
                    flops, nbytes = cost(M, K, N, r, mode, p != "base", e)
                    bench.run(p, mode, shape, dtype, make_method_case(method, p, mode, M, K, N, r, dtype, device),
                              flops, nbytes)
    for M, K, N, r in cases if wanted("dora") else []:
        shape = shape_str(M=M, K=K, N=N, r=r, method="dora")
        for mode in TRAIN_MODES if is_training(M) else ("fwd",):
            for p in provs:
                flops, nbytes = dora_cost(M, K, N, r, mode, p, e)
                bench.run(p, mode, shape, dtype, make_dora_case(p, mode, M, K, N, r, dtype, device), flops, nbytes)
    qprovs = qlora_providers(bench) if wanted("qlora") else []
    for M, K, N, r in cases if qprovs else []:
        shape = shape_str(M=M, K=K, N=N, r=r, method="qlora")
        for mode in TRAIN_MODES if is_training(M) else ("fwd",):
            for p in qprovs:
                flops, nbytes = qlora_cost(M, K, N, r, mode, p, e)
                bench.run(p, mode, shape, dtype, make_qlora_case(p, mode, M, K, N, r, dtype, device), flops, nbytes)
    return bench.finish(report_targets)


if __name__ == "__main__":
    sys.exit(main())
