"""What the test modules share: where kernels run, comparisons against float64 references, the
random inputs of the LoRA-family layers, an allocation tracker, and 4-bit bases made by bitsandbytes.

Test modules import it as ``from _helpers import ...`` (pytest puts tests/, the folder of the rootdir
conftest, on sys.path); conftest.py, imported before any of them, sets TRITON_INTERPRET.
"""

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lowrank_kernels import backend as _backend

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")

needs_triton = pytest.mark.skipif(not _backend.triton_available(), reason="needs triton")


def kernel_backends():
    """Backends whose kernels can run here: triton always (interpreted on CPU), cuda on a GPU."""
    out = ["triton"]
    out.append(pytest.param("cuda", marks=pytest.mark.skipif(
        not (HAS_CUDA and _backend.cuda_extension() is not None), reason="needs a GPU and the CUDA extension")))
    return out


def kernel_dtypes():
    """fp32 and fp16 everywhere; bf16 only on a GPU (the interpreter's bf16 dot is wrong)."""
    out = [torch.float32, torch.float16]
    out.append(pytest.param(torch.bfloat16, marks=pytest.mark.skipif(not HAS_CUDA, reason="bf16 needs a GPU")))
    return out


def dtype_pairs():
    """(dtype, adapter_dtype) parameters: each of kernel_dtypes() with adapters in the same dtype, and each
    16-bit one with fp32 adapters (mixed precision, as PEFT keeps them)."""
    out = []
    for entry in kernel_dtypes():
        dtype, marks = (entry.values[0], entry.marks) if hasattr(entry, "values") else (entry, ())
        name = str(dtype).removeprefix("torch.")
        out.append(pytest.param(dtype, dtype, marks=marks, id=name))
        if dtype != torch.float32:
            out.append(pytest.param(dtype, torch.float32, marks=marks, id=f"{name}-fp32adapters"))
    return out


def against_float64(cases):
    """Parametrises a test of an op against its float64 reference over backend (the reference and every
    kernel backend), dtype and adapter_dtype (dtype_pairs()), dropout p (off and on) and case (``cases``)."""
    marks = (pytest.mark.parametrize("case", cases), pytest.mark.parametrize("p", [0.0, 0.3]),
             pytest.mark.parametrize("dtype,adapter_dtype", dtype_pairs()),
             pytest.mark.parametrize("backend", ["reference"] + kernel_backends()))

    def parametrize(test):
        for mark in marks:
            test = mark(test)
        return test

    return parametrize


# ----------------------------------------------------------------------------------------------
# Comparisons against float64 references
# ----------------------------------------------------------------------------------------------
def rel_err(out, ref):
    """‖out − ref‖ / ‖ref‖ in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def _check_written(out, ref, name):
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values (unwritten or poisoned output?)"


def assert_close(out, ref, dtype, name="output"):
    """Relative error against a float64 reference within the package tolerance for ``dtype``."""
    _check_written(out, ref, name)
    tol = TOL[dtype]
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        tol = 5e-4
    err = rel_err(out, ref)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.0e} ({dtype})"


def run_unfused(fn, args, dy, wrt):
    """``fn(*args)`` (PyTorch's own composition of an op, in the inputs' dtypes) and the gradients of
    ``(y * dy).sum()`` with respect to the tensors of ``args`` that are in ``wrt``, as detached copies."""
    wrt_ids = {id(t) for t in wrt}
    leaves, call = [], []
    for a in args:
        if isinstance(a, torch.Tensor):
            a = a.detach().requires_grad_(id(a) in wrt_ids)
            if a.requires_grad:
                leaves.append(a)
        call.append(a)
    if len(leaves) != len(wrt):
        raise ValueError(f"wrt: {len(wrt)} tensors, {len(leaves)} of them among args")
    y = fn(*call)
    return y.detach(), torch.autograd.grad(y, leaves, dy)


def assert_close_as_unfused(out, unfused, ref, dtype, name="output", factor=2.0, floor=None):
    """``out``'s relative error against the float64 reference ``ref`` at most ``factor`` times that of
    ``unfused``, PyTorch's unfused composition of the same op in the same ``dtype``, plus ``floor``
    (default: ``dtype``'s machine epsilon), which covers cases the unfused path computes exactly.

    A fused kernel is held to the accuracy PyTorch itself reaches at that precision, rather than to a
    fixed tolerance per dtype: as tight as the arithmetic allows in fp32, as loose as it must be in fp16."""
    _check_written(out, ref, name)
    if floor is None:
        floor = torch.finfo(dtype).eps
        if dtype == torch.float32 and out.is_cuda:
            # fp32 products on a GPU's tensor cores: TF32 where torch allows it (the unfused path
            # too, but with other roundings), 3xTF32 (about 2**-21 relative) for fp32 adapters on a
            # 16-bit layer, where the unfused path runs IEEE fp32 (tile_config.dot_precision)
            floor = 5e-4 if torch.backends.cuda.matmul.allow_tf32 else 2.0 ** -19
    err, base = rel_err(out, ref), rel_err(unfused, ref)
    bound = factor * base + floor
    assert err <= bound, (f"{name}: relative error {err:.3e} > {factor} × unfused {base:.3e} + {floor:.1e} "
                          f"({dtype})")


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------
def activation(M, K, dtype, lead=(), noncontig=False):
    """x (*lead, M, K) requiring grad; ``noncontig``: every other column of a wider buffer (strided)."""
    if noncontig:
        x = torch.randn(*lead, M, 2 * K, device=DEVICE, dtype=dtype)[..., ::2]
    else:
        x = torch.randn(*lead, M, K, device=DEVICE, dtype=dtype)
    return x.requires_grad_(True)


def base_weight(N, K, dtype):
    """A frozen W (N, K) with entries of std 1/sqrt(K): W x about as large as x."""
    return (torch.randn(N, K, device=DEVICE) / K**0.5).to(dtype)


def lora_factors(K, N, r, dtype, stack=()):
    """A (*stack, r, K) and B (*stack, N, r) requiring grad, scaled so the adapter's term B A x is as
    large as the base's (B is not zero as at initialisation)."""
    A = (torch.randn(*stack, r, K, device=DEVICE) / K**0.5).to(dtype).requires_grad_(True)
    B = (torch.randn(*stack, N, r, device=DEVICE) / r**0.5).to(dtype).requires_grad_(True)
    return A, B


# ----------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------
class LargestAllocation(TorchDispatchMode):
    """The largest tensor (in elements) torch allocates while active: every op's outputs, less views
    (outputs sharing an input's storage, as W.t() inside F.linear) and the Triton interpreter's host
    copies of kernel arguments. A dispatch mode does not see inside a custom op: call the backend
    functions directly."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.__name__.startswith(("set_", "copy_")):
            return out
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.numel())
        return out


# ----------------------------------------------------------------------------------------------
# 4-bit bases (bitsandbytes, imported on first use: only the QLoRA tests need it)
# ----------------------------------------------------------------------------------------------
def params4bit(W, quant_type="nf4", blocksize=64, nested=True):
    """W (N, K) quantised by bitsandbytes, as Linear4bit holds it."""
    bnb = pytest.importorskip("bitsandbytes")
    return bnb.nn.Params4bit(W.detach().float().cpu(), requires_grad=False, quant_type=quant_type,
                             blocksize=blocksize, compress_statistics=nested).to(DEVICE)


def block_absmax(qs, cpu_layout=False):
    """The fp32 absmax of a flat quant_state (nested: decoded); ``cpu_layout``: rounded to bf16, as
    bitsandbytes' CPU layout stores them."""
    bnbF = pytest.importorskip("bitsandbytes.functional")
    absmax = bnbF.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset if qs.nested else qs.absmax
    return absmax.bfloat16().float() if cpu_layout else absmax


def bnb_weight(p, dtype, cpu_layout=False):
    """The base weight as bitsandbytes' 4-bit matmul uses it: dequantised straight to ``dtype``;
    ``cpu_layout``: as its CPU kernel uses it once the weight is repacked (``to_cpu_layout``)."""
    qs = p.quant_state
    return torch.ops.bitsandbytes.dequantize_4bit.default(p.data, block_absmax(qs, cpu_layout), qs.blocksize,
                                                          qs.quant_type, qs.shape, dtype)


def to_cpu_layout(p):
    """A copy of the flat Params4bit ``p`` in bitsandbytes' CPU layout, made by bitsandbytes' own repack
    function: what Linear4bit's eval-mode forward without grad leaves on a CPU with AVX512-BF16, here
    on any CPU."""
    bnb = pytest.importorskip("bitsandbytes")
    bnbF = pytest.importorskip("bitsandbytes.functional")
    data, qs = bnbF._convert_weight_packed_for_cpu(p.data.clone(), copy.deepcopy(p.quant_state))
    assert qs.packing_format_for_cpu
    return bnb.nn.Params4bit(data, requires_grad=False, quant_state=qs, bnb_quantized=True)


def skip_fp32_on_cuda_4bit(backend, dtype):
    """Skips a case the CUDA extension's 4-bit path does not take: it computes in 16 bits only."""
    if backend == "cuda" and dtype == torch.float32:
        pytest.skip("the CUDA 4-bit path is 16-bit")


class TinyQLoRABase(nn.Module):
    """Two bitsandbytes Linear4bit layers (NF4 nested, FP4 blocksize 128), as a 4-bit loaded model."""

    def __init__(self, K=40, H=33, compute_dtype=torch.float32):
        super().__init__()
        bnb = pytest.importorskip("bitsandbytes")
        self.up = bnb.nn.Linear4bit(K, H, bias=True, compute_dtype=compute_dtype, quant_type="nf4",
                                    compress_statistics=True)
        self.down = bnb.nn.Linear4bit(H, K, bias=False, compute_dtype=compute_dtype, quant_type="fp4",
                                      compress_statistics=False)
        self.down.weight.blocksize = 128
        self.is_loaded_in_4bit = True  # what transformers sets on a load_in_4bit model; PEFT reads it

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def quantised_base(compute_dtype=torch.float32, **sizes):
    """The 4-bit base, the same on every call, prepared for k-bit training as PEFT's QLoRA recipe does."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    return peft.prepare_model_for_kbit_training(TinyQLoRABase(compute_dtype=compute_dtype, **sizes).to(DEVICE),
                                                use_gradient_checkpointing=False)


def qlora_model(compute_dtype=torch.float32, use_dora=False, **sizes):
    """PEFT's QLoRA (``use_dora``: QLoRA + DoRA) on quantised_base(), rank 3 on both layers, B not zero."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["up", "down"], lora_dropout=0.0,
                             init_lora_weights=False, use_dora=use_dora)
    return peft.get_peft_model(quantised_base(compute_dtype, **sizes), config)


def assert_4bit_layers_match(ref, fused, compute_dtype):
    """Each layer of qlora_model() ``ref`` (PEFT's) against its fused swap in ``fused``: output, dx and the
    gradients of lora_A, lora_B and (DoRA) the magnitude, within the tolerance of ``compute_dtype``."""
    from peft.tuners.lora.bnb import Linear4bit

    for name, in_features in (("up", 40), ("down", 33)):
        layer_ref, layer = getattr(ref.base_model.model, name), getattr(fused.base_model.model, name)
        assert isinstance(layer_ref, Linear4bit) and type(layer).__name__ == "FusedLora4bit"
        assert layer.lora_A["default"].weight.dtype == torch.float32  # PEFT's fp32 adapters
        assert ("default" in layer.lora_variant) == layer_ref.use_dora["default"]
        x = torch.randn(2, 7, in_features, device=DEVICE, dtype=compute_dtype)
        dy, outs = None, []
        for mod in (layer_ref, layer):
            xi = x.clone().requires_grad_(True)
            y = mod(xi)
            dy = torch.randn_like(y) if dy is None else dy
            wrt = [xi, mod.lora_A["default"].weight, mod.lora_B["default"].weight]
            if mod.use_dora["default"]:
                wrt.append(mod.lora_magnitude_vector["default"].weight)
            outs.append((y, *torch.autograd.grad(y, wrt, dy)))
        assert outs[1][0].dtype == outs[0][0].dtype == compute_dtype
        for what, got, want in zip(("y", "dx", "d lora_A", "d lora_B", "d magnitude"), outs[1], outs[0]):
            assert_close(got, want.double(), compute_dtype, f"{name}: {what}")


# The CUDA emulation library's dtype codes (tests/cuda_emu/exports.cpp), as its C entry points take them.
EMU_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
