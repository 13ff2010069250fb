"""QLoRA + DoRA: dora_linear on a bitsandbytes 4-bit base, and from_peft on PEFT's QLoRA layers
with ``use_dora=True``.

Everything runs on the CPU (bitsandbytes 0.50 quantises and dequantises NF4/FP4 there): every
backend against the float64 DoRA reference on bnb's dequantisation of W, the norm's pieces, the
allocations of the fused path, the registered ops, and the fused PEFT layers against PEFT's.
"""

import copy

import pytest
import torch
from _helpers import (
    DEVICE,
    LargestAllocation,
    activation,
    assert_4bit_layers_match,
    assert_close,
    bnb_weight,
    kernel_backends,
    kernel_dtypes,
    lora_factors,
    needs_triton,
    params4bit,
    qlora_model,
    skip_fp32_on_cuda_4bit,
    to_cpu_layout,
)

import lowrank_kernels as lk
from lowrank_kernels import backend as lk_backend
from lowrank_kernels.ops import _quant
from lowrank_kernels.ops import dora as dora_op

bnb = pytest.importorskip("bitsandbytes")

pytestmark = pytest.mark.usefixtures("eager_compile")


def make_inputs(M, K, N, r, dtype, adapter_dtype, lead=(), **quant):
    x = activation(M, K, dtype, lead, noncontig=True)
    W4 = params4bit(torch.randn(N, K) / K**0.5, **quant)
    A, B = lora_factors(K, N, r, adapter_dtype)
    m = (torch.rand(N, device=DEVICE) + 0.5).to(adapter_dtype).requires_grad_(True)
    b = torch.randn(N, device=DEVICE, dtype=dtype)
    return x, W4, A, B, m, b


F32, F16 = kernel_dtypes()[:2]
CASES = [  # dtype, adapter dtype, dropout p, (M, K, N, r, lead, quant)
    pytest.param(F32, F32, 0.0, (37, 40, 33, 3, (), dict(quant_type="nf4", blocksize=64, nested=True)),
                 id="fp32-nf4-nested-64"),
    pytest.param(F32, F32, 0.3, (5, 70, 17, 2, (2,), dict(quant_type="fp4", blocksize=128, nested=False)),
                 id="fp32-drop-fp4-128-lead"),
    pytest.param(F16, F32, 0.0, (9, 64, 31, 4, (), dict(quant_type="fp4", blocksize=32, nested=True)),
                 id="fp16-fp32adapters-fp4-nested-32"),
    pytest.param(F16, F16, 0.3, (11, 40, 33, 3, (), dict(quant_type="nf4", blocksize=256, nested=False)),
                 id="fp16-drop-nf4-256"),
]


@pytest.mark.parametrize("backend", ["reference"] + kernel_backends())
@pytest.mark.parametrize("dtype,adapter_dtype,p,case", CASES)
def test_matches_float64_reference(backend, dtype, adapter_dtype, p, case):
    M, K, N, r, lead, quant = case
    skip_fp32_on_cuda_4bit(backend, dtype)
    x, W4, A, B, m, b = make_inputs(M, K, N, r, dtype, adapter_dtype, lead, **quant)
    seed, s = 31, 1.5
    y = lk.dora_linear(x, W4, A, B, m, s, b, dropout_p=p, seed=seed, backend=backend)
    assert y.dtype == dtype and y.shape == (*lead, M, N)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, A, B, m), dy)
    W = bnb_weight(W4, dtype).double()
    xd, Ad, Bd, md = (t.detach().double().requires_grad_(True) for t in (x, A, B, m))
    y_ref = dora_op.dora_linear_reference(xd, W, Ad, Bd, md, s, b.double(), p, seed)
    ref_grads = torch.autograd.grad(y_ref, (xd, Ad, Bd, md), dy.double())
    assert_close(y, y_ref, dtype, "y")
    for what, got, want in zip(("dx", "d lora_A", "d lora_B", "d magnitude"), grads, ref_grads):
        assert_close(got, want, dtype, what)
    assert grads[1].dtype == grads[2].dtype == grads[3].dtype == adapter_dtype


@pytest.mark.parametrize("backend", ["reference"] + (["triton"] if lk_backend.triton_available() else []))
@pytest.mark.parametrize("quant", [dict(quant_type="nf4", blocksize=64, nested=True),
                                   dict(quant_type="fp4", blocksize=512, nested=False)], ids=["nf4-64", "fp4-512"])
def test_norm_pieces_against_float64(backend, quant):
    """‖W_j‖² by row blocks of the 4-bit W, and the norms from the expansion, against float64 on bnb's W."""
    N, K, r, s = 45, 24, 3, 0.7
    W4 = params4bit(torch.randn(N, K) / K**0.5, **quant)
    W = bnb_weight(W4, torch.float32).double()  # quant_state.dtype, as PEFT dequantises for the norm
    A, B = torch.randn(r, K, device=DEVICE), torch.randn(N, r, device=DEVICE)
    w_sq = dora_op.weight_sq_norm(W4)
    assert w_sq.dtype == torch.float32
    assert_close(w_sq, W.square().sum(1), torch.float32, "‖W_j‖²")
    n = dora_op.dora_weight_norm(W4, A, B, s, backend=backend)
    assert_close(n, torch.linalg.norm(W + s * (B.double() @ A.double()), dim=1), torch.float32, "norm")


def test_bad_inputs_name_the_argument():
    x, W4, A, B, m, b = make_inputs(4, 16, 8, 2, torch.float32, torch.float32)
    with pytest.raises(ValueError, match="the 4-bit weight"):
        lk.dora_linear(x[..., :-1], W4, A, B, m)
    with pytest.raises(ValueError, match="magnitude must be"):
        lk.dora_linear(x, W4, A, B, m[:-1])
    with pytest.raises(ValueError, match="lora_A must be"):
        lk.dora_linear(x, W4, A[:, :-1], B, m)
    with pytest.raises(ValueError, match="weight_sq_norm must be"):
        lk.dora_linear(x, W4, A, B, m, weight_sq_norm=torch.zeros(9))


@needs_triton
def test_no_dequantised_weight_in_forward_or_backward():
    """The Triton path (norm pieces, forward with and without dropout, backward) allocates nothing
    near W's size; the check does see a dequantised W."""
    M, K, N, r = 6, 96, 80, 4
    x, W4, A, B, m, b = make_inputs(M, K, N, r, torch.float16, torch.float32)
    x, A, B, m = (t.detach().contiguous() for t in (x, A, B, m))
    q = _quant.from_params4bit(W4)
    seed = torch.tensor(3, dtype=torch.int64)
    for p in (0.0, 0.25):
        # The Triton functions are called directly: a dispatch mode does not see inside a custom op.
        with LargestAllocation() as mem:
            w_sq = dora_op.weight_sq_norm(W4)
            y, h, v, n = dora_op._dora_fwd(x, q, A, B, m, b, w_sq, 1.0, p, seed, "triton", True)
            dora_op._dora_bwd(torch.randn_like(y), x, q, A, B, m, h, v, n, 1.0, p, seed, "triton", True)
        assert mem.largest < N * K // 4, f"a {mem.largest}-element temporary (N·K = {N * K}), p = {p}"
    with LargestAllocation() as mem:
        _quant.dequantize(q, torch.float16)
    assert mem.largest >= N * K


# ----------------------------------------------------------------------------------------------
# from_peft on PEFT's QLoRA + DoRA layers
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,compute_dtype", [("reference", torch.float32), ("reference", torch.bfloat16),
                                                   ("triton", torch.float16)])
def test_from_peft_matches_peft_qlora_dora(backend, compute_dtype):
    """Each PEFT QLoRA + DoRA layer (NF4 nested with a bias, FP4 blocksize 128 without) against its
    fused swap: output, dx and the gradients of lora_A, lora_B and the magnitude; merge and disable."""
    if backend == "triton" and not lk_backend.triton_available():
        pytest.skip("needs triton")
    ref = qlora_model(compute_dtype, use_dora=True)
    fused = lk.from_peft(copy.deepcopy(ref), backend=backend)
    assert_4bit_layers_match(ref, fused, compute_dtype)
    x = torch.randn(3, 40, device=DEVICE, dtype=compute_dtype)
    with torch.no_grad():
        y_ref = ref(x)
        assert_close(fused(x), y_ref.double(), compute_dtype, "model y")
        with fused.disable_adapter(), ref.disable_adapter():
            assert torch.equal(fused(x), ref(x))  # PEFT's own base path on both


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_norm_of_cpu_layout_weight_in_the_dtype_before_the_repack(dtype):
    # bitsandbytes' repack sets quant_state.dtype to bf16 for its CPU kernel; PEFT's norm (dequantize_4bit
    # on the weight in bitsandbytes' own layout) is in the weight's dtype before the repack
    p = bnb.nn.Params4bit((torch.randn(64, 128) / 128**0.5).to(dtype), requires_grad=False, quant_type="nf4",
                          blocksize=64, compress_statistics=False).to(DEVICE)
    packed = to_cpu_layout(p)
    assert packed.quant_state.dtype == torch.bfloat16 and _quant.storage_dtype(packed) == dtype
    # the repacked weight is bnb_weight(cpu_layout=True) (its absmax rounded to bf16), dequantised in dtype
    want = dora_op.weight_sq_norm(bnb_weight(p, dtype, cpu_layout=True))
    torch.testing.assert_close(dora_op.weight_sq_norm(packed), want, rtol=1e-6, atol=0)
