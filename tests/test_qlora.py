"""lora_linear on a bitsandbytes 4-bit base (QLoRA), and from_peft on PEFT's QLoRA layers.

bitsandbytes (0.50+) quantises and dequantises NF4/FP4 on the CPU, so everything here runs without
a GPU: the reference and the Triton kernels (interpreted) against a float64 reference built from
bnb's own dequantisation, and the fused PEFT layers against PEFT's.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from _helpers import (
    DEVICE,
    LargestAllocation,
    activation,
    assert_4bit_layers_match,
    assert_close,
    block_absmax,
    bnb_weight,
    kernel_backends,
    kernel_dtypes,
    lora_factors,
    needs_triton,
    params4bit,
    qlora_model,
    quantised_base,
    skip_fp32_on_cuda_4bit,
    to_cpu_layout,
)
from torch import nn

import lowrank_kernels as lk
from lowrank_kernels import backend as lk_backend
from lowrank_kernels.ops import _quant, gemm
from lowrank_kernels.ops import lora as lora_op

bnb = pytest.importorskip("bitsandbytes")
bnbF = pytest.importorskip("bitsandbytes.functional")

pytestmark = pytest.mark.usefixtures("eager_compile")


@pytest.fixture
def flat_bnb_forward(monkeypatch):
    """Linear4bit layers made from here on keep the flat layout in their eval-mode forward on every CPU
    (bitsandbytes repacks only where it finds AVX512-BF16): tests that need the CPU layout make it."""
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: False)


def make_inputs(M, K, N, r, dtype, adapter_dtype=None, lead=(), noncontig=False, bias=True, **quant):
    x = activation(M, K, dtype, lead, noncontig)
    p = params4bit(torch.randn(N, K) / K**0.5, **quant)
    A, B = lora_factors(K, N, r, adapter_dtype or dtype)
    b = torch.randn(N, device=DEVICE, dtype=dtype) if bias else None
    return x, p, A, B, b


def float64_reference(x, p, A, B, b, scaling, dropout_p, seed, dy, cpu_layout=False):
    """Output, base term and (dx, dA, dB) in float64, with W as bnb dequantises it to x's dtype."""
    W = bnb_weight(p, x.dtype, cpu_layout).double()
    xd, Ad, Bd = (t.detach().double().requires_grad_(True) for t in (x, A, B))
    bd = b.double() if b is not None else None
    y = lora_op.lora_linear_reference(xd, W, Ad, Bd, scaling, bd, dropout_p, seed)
    grads = torch.autograd.grad(y, (xd, Ad, Bd), dy.double())
    return y.detach(), F.linear(xd, W, bd).detach(), grads


# ----------------------------------------------------------------------------------------------
# The 4-bit storage and its dequantisation
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("shape", [(33, 40), (7, 129)])
def test_dequantize_equals_bitsandbytes(quant_type, nested, shape):
    for blocksize in (32, 64, 4096):
        p = params4bit(torch.randn(*shape), quant_type, blocksize, nested)
        q = _quant.from_params4bit(p)
        assert q.nested == nested and q.blocksize == blocksize and q.shape == shape
        for dtype in (torch.float32, torch.bfloat16):
            assert torch.equal(_quant.dequantize(q, dtype), bnb_weight(p, dtype))
        assert torch.equal(_quant.dequantize(q.t(), torch.float32), bnbF.dequantize_4bit(p.data, p.quant_state).t())


def test_quant_storage_other_than_uint8():
    # FSDP-style storage: the packed bytes viewed as another dtype are read as bytes.
    W = torch.randn(16, 24)
    p = bnb.nn.Params4bit(W, requires_grad=False, quant_type="nf4", quant_storage=torch.float16).to(DEVICE)
    assert p.dtype == torch.float16
    q = _quant.from_params4bit(p)
    assert torch.equal(_quant.dequantize(q, torch.float32), bnbF.dequantize_4bit(p.data, p.quant_state))


# ----------------------------------------------------------------------------------------------
# The op: every backend against the float64 reference, forward and every gradient
# ----------------------------------------------------------------------------------------------
# (M, K, N, r, leading dims, quantisation): odd sizes with a non-contiguous x, or leading dims
ODD = (37, 40, 33, 3, (), dict(quant_type="nf4", blocksize=64, nested=True))
LEAD = (5, 64, 70, 17, (2,), dict(quant_type="fp4", blocksize=32, nested=False))
F16, BF16 = kernel_dtypes()[1:]
F32 = torch.float32
COMBOS = [  # dtype, adapter dtype, dropout p, case (few: each costs seconds in the interpreter)
    pytest.param(F32, F32, 0.0, ODD, id="fp32-odd-nf4"),
    pytest.param(F32, F32, 0.3, LEAD, id="fp32-drop-lead-fp4"),
    pytest.param(F16, F16, 0.3, ODD, id="fp16-drop-odd-nf4"),
    pytest.param(F16, F32, 0.0, LEAD, id="fp16-fp32adapters-lead-fp4"),
    pytest.param(F16, F32, 0.3, ODD, id="fp16-fp32adapters-drop-odd-nf4"),
    pytest.param(BF16.values[0], F32, 0.3, ODD, marks=BF16.marks, id="bf16-fp32adapters-drop-odd-nf4"),
    pytest.param(BF16.values[0], BF16.values[0], 0.0, LEAD, marks=BF16.marks, id="bf16-lead-fp4"),
]


@pytest.mark.parametrize("backend", ["reference"] + kernel_backends())
@pytest.mark.parametrize("dtype,adapter_dtype,p,case", COMBOS)
def test_matches_float64_reference(backend, dtype, adapter_dtype, p, case):
    M, K, N, r, lead, quant = case
    skip_fp32_on_cuda_4bit(backend, dtype)
    x, W4, A, B, b = make_inputs(M, K, N, r, dtype, adapter_dtype, lead=lead, noncontig=not lead, **quant)
    seed, s = 77, 1.5
    y = lk.lora_linear(x, W4, A, B, s, b, dropout_p=p, seed=seed, backend=backend)
    assert y.dtype == dtype and y.shape == (*lead, M, N)
    dy = torch.randn_like(y)
    gx, gA, gB = torch.autograd.grad(y, (x, A, B), dy)
    y_ref, base, (rx, rA, rB) = float64_reference(x, W4, A, B, b, s, p, seed, dy)
    assert_close(y, y_ref, dtype, "y")
    assert_close(y.double() - base, y_ref - base, dtype, "adapter term")
    assert_close(gx, rx, dtype, "dx")
    assert gA.dtype == adapter_dtype and gB.dtype == adapter_dtype
    assert_close(gA, rA, dtype, "d lora_A")
    assert_close(gB, rB, dtype, "d lora_B")


@needs_triton
def test_triton_every_blocksize_into_poisoned_outputs():
    """Forward y and backward dx GEMMs on the 4-bit W at every bnb blocksize (NF4 and FP4, nested on
    and off, in turn), outputs NaN-filled."""
    M, K, N, r = 9, 72, 40, 2
    x, dy = torch.randn(M, K, device=DEVICE), torch.randn(M, N, device=DEVICE)
    A, B = torch.randn(r, K, device=DEVICE) / K**0.5, torch.randn(N, r, device=DEVICE)
    for i, blocksize in enumerate(_quant.BLOCKSIZES):
        quant_type, nested = ("nf4", "fp4")[i % 2], (i // 2) % 2 == 0
        p = params4bit(torch.randn(N, K) / K**0.5, quant_type, blocksize, nested)
        q = _quant.from_params4bit(p)
        W = bnb_weight(p, torch.float32).double()
        y = torch.full((M, N), float("nan"), device=DEVICE)
        _, h = lora_op._triton_forward(x, q, A, B, None, 2.0, None, out=y)
        assert_close(y, x.double() @ W.t() + 2.0 * (x.double() @ A.double().t()) @ B.double().t(), torch.float32, "y")
        dx = torch.full((M, K), float("nan"), device=DEVICE)
        g = dy @ B
        gemm.lowrank_gemm(dy, q.t(), g, A.t(), 2.0, torch.float32, out=dx)
        assert_close(dx, dy.double() @ W + 2.0 * g.double() @ A.double(), torch.float32, f"dx (blocksize {blocksize})")


def test_bias_gradient_and_frozen_weight():
    x, W4, A, B, b = make_inputs(11, 24, 20, 2, torch.float32)
    b.requires_grad_(True)
    y = lk.lora_linear(x, W4, A, B, 1.0, b, backend="reference")
    (db,) = torch.autograd.grad(y.sum(), (b,))
    torch.testing.assert_close(db, torch.ones_like(y).sum(0))
    # float storage can be marked trainable; the 4-bit codes cannot train
    W16 = bnb.nn.Params4bit(torch.randn(20, 24), requires_grad=False, quant_storage=torch.float16).to(DEVICE)
    W16.requires_grad_(True)
    with pytest.raises(ValueError, match="4-bit base weight is frozen"):
        lk.lora_linear(x, W16, A, B, 1.0, b)


def test_bad_inputs_name_the_argument():
    x, W4, A, B, b = make_inputs(4, 32, 16, 2, torch.float32)
    with pytest.raises(ValueError, match="4-bit weight"):
        lk.lora_linear(torch.randn(4, 31), W4, A, B)
    with pytest.raises(ValueError, match="lora_B"):
        lk.lora_linear(x, W4, A, B[:-1])
    with pytest.raises(TypeError, match="lora_A"):
        lk.lora_linear(x.half(), W4, A.bfloat16(), B.bfloat16())
    W4.quant_state.packing_format_for_cpu = True  # the flag without the layout
    with pytest.raises(ValueError,
                       match=r"^weight: a weight repacked for bitsandbytes' CPU kernel \(packing_format_for_cpu\)"):
        lk.lora_linear(x, W4, A, B)


# ----------------------------------------------------------------------------------------------
# bitsandbytes' CPU layout (packing_format_for_cpu): read as its CPU kernel reads it, or refused
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("shape,blocksize", [((64, 128), 64), ((96, 64), 32), ((32, 256), 256)])
def test_cpu_layout_reads_as_bitsandbytes_cpu_kernel(quant_type, nested, shape, blocksize):
    p = params4bit(torch.randn(*shape), quant_type, blocksize, nested)
    packed = to_cpu_layout(p)
    q = _quant.from_params4bit(packed)
    assert not q.nested and q.shape == shape
    want = bnb_weight(p, torch.float32, cpu_layout=True)
    assert torch.equal(_quant.dequantize(q, torch.float32), want)
    assert torch.equal(_quant.dequantize(q.t(), torch.float32), want.t())
    assert not torch.equal(want, bnb_weight(p, torch.float32))  # the bf16 absmax differ: a real check
    # bitsandbytes' inverse (before saving, .cuda()): flat codes again; a nested absmax re-quantised, one
    # that was not left transposed (K/blocksize, N), which bitsandbytes' own dequantize_4bit misreads.
    data, qs = bnbF._convert_weight_packed_for_cpu_inverse(packed.data.clone(), copy.deepcopy(packed.quant_state))
    restored = _quant.dequantize(_quant.from_params4bit(bnb.nn.Params4bit(data, requires_grad=False, quant_state=qs,
                                                                          bnb_quantized=True)), torch.float32)
    if nested:
        assert torch.equal(restored, bnbF.dequantize_4bit(data, qs))
    else:
        assert qs.absmax.shape == (shape[1] // blocksize, shape[0]) and torch.equal(restored, want)
    if bnbF.has_avx512bf16():  # bitsandbytes' CPU kernel itself (bf16) on the repacked weight
        x = torch.randn(5, shape[1]).bfloat16()
        y = bnb.matmul_4bit(x, packed.t(), quant_state=packed.quant_state)
        assert_close(y, x.double() @ want.double().t(), torch.bfloat16, "bitsandbytes' CPU kernel")


@pytest.mark.parametrize("backend", ["reference"] + kernel_backends())
def test_cpu_layout_matches_float64_reference(backend):
    M, K, N, r = 9, 64, 96, 3
    x, W4, A, B, b = make_inputs(M, K, N, r, torch.float32, nested=True)
    y = lk.lora_linear(x, to_cpu_layout(W4), A, B, 1.5, b, backend=backend)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, A, B), dy)
    y_ref, base, ref_grads = float64_reference(x, W4, A, B, b, 1.5, 0.0, None, dy, cpu_layout=True)
    assert_close(y, y_ref, torch.float32, "y")
    for what, got, want in zip(("dx", "d lora_A", "d lora_B"), grads, ref_grads):
        assert_close(got, want, torch.float32, what)


def test_cpu_layout_refused_where_it_cannot_be_read(monkeypatch):
    p = to_cpu_layout(params4bit(torch.randn(64, 128)))
    bad = bnb.nn.Params4bit(p.data[:, :32].contiguous(), requires_grad=False, quant_state=p.quant_state,
                            bnb_quantized=True)
    with pytest.raises(ValueError, match=r"^w: a weight repacked .* must hold uint8 codes \(64, 64\)"):
        _quant.from_params4bit(bad, name="w")
    # a bitsandbytes that packs in other blocks: refused, never read with 32-row blocks
    pack = bnbF._convert_weight_packed_for_cpu
    monkeypatch.setattr(bnbF, "_convert_weight_packed_for_cpu", lambda qweight, quant_state, block_n=64: pack(
        qweight, quant_state, block_n))
    with pytest.raises(ValueError, match=r"^w: the weight was repacked .* cannot read .*block_n=32"):
        _quant.from_params4bit(p, name="w")


# ----------------------------------------------------------------------------------------------
# Memory: the dequantised W never exists in the fused path
# ----------------------------------------------------------------------------------------------
@needs_triton
def test_no_dequantised_weight_in_forward_or_backward():
    M, K, N, r = 8, 96, 80, 4
    x, W4, A, B, b = make_inputs(M, K, N, r, torch.float16)
    x, A, B = x.detach(), A.detach(), B.detach()
    q = _quant.from_params4bit(W4)
    # The backend functions are called directly: a dispatch mode does not see inside a custom op.
    for backend, (fwd, bwd) in [("triton", (lora_op._triton_forward, lora_op._triton_backward)),
                                ("reference", (lora_op._reference_forward, lora_op._reference_backward))]:
        args = (None,) if backend == "triton" else (0.0, None)
        with LargestAllocation() as mem:
            y, h = fwd(x, q, A, B, b, 1.0, *args)
            bwd(torch.randn_like(y), x, q, A, B, h, 1.0, *args, True)
        if backend == "triton":
            assert mem.largest < N * K // 4, f"a {mem.largest}-element temporary (N·K = {N * K})"
        else:
            assert mem.largest >= N * K  # the check sees the reference's dequantised W


# ----------------------------------------------------------------------------------------------
# from_peft on a PEFT QLoRA model
# ----------------------------------------------------------------------------------------------
def linear4bit_layers(model):
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def trainable_grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("backend,compute_dtype", [("reference", torch.float32), ("reference", torch.bfloat16),
                                                   ("triton", torch.float32), ("triton", torch.float16)])
def test_from_peft_matches_peft_qlora(backend, compute_dtype):
    """Each PEFT QLoRA layer (NF4 nested with a bias, FP4 blocksize 128 without) against its fused
    swap: output, dx and the adapters' gradients; then the whole model in fp32 (where the chain
    of layers does not amplify 16-bit rounding)."""
    if backend == "triton" and not lk_backend.triton_available():
        pytest.skip("needs triton")
    ref = qlora_model(compute_dtype)
    fused = lk.from_peft(copy.deepcopy(ref), backend=backend)
    assert_4bit_layers_match(ref, fused, compute_dtype)
    if compute_dtype == torch.float32:
        x = torch.randn(3, 40, device=DEVICE)
        outs = []
        for model in (ref, fused):
            xi = x.clone().requires_grad_(True)
            model(xi).square().sum().backward()
            outs.append((model(xi), xi.grad, trainable_grads(model)))
        assert_close(outs[1][0], outs[0][0].double(), torch.float32, "model y")
        assert_close(outs[1][1], outs[0][1].double(), torch.float32, "model dx")
        assert outs[0][2].keys() == outs[1][2].keys() and len(outs[0][2]) == 4
        for name, g in outs[0][2].items():
            assert_close(outs[1][2][name], g.double(), torch.float32, name)


@pytest.mark.parametrize("layout", ["flat", "cpu"])
def test_evaluated_qlora_model_trains_on(layout, flat_bnb_forward):
    """A PEFT QLoRA model whose weights an evaluation left flat or in bitsandbytes' CPU layout (as on a
    CPU with AVX512-BF16; made here by bitsandbytes' repack function, on any CPU) converts and trains:
    output, dx and every adapter gradient as PEFT's on the weights its CPU kernel reads."""
    ref = qlora_model(K=64, H=128)  # sizes bitsandbytes can repack: out_features a multiple of 32
    model = copy.deepcopy(ref)
    if layout == "cpu":
        for lin, lin_ref in zip(linear4bit_layers(model), linear4bit_layers(ref)):
            lin.weight = to_cpu_layout(lin.weight)
            qs = lin_ref.weight.quant_state  # PEFT's side: the same values in the flat layout
            qs.absmax, qs.nested = block_absmax(qs, cpu_layout=True), False
    fused = lk.from_peft(model, backend="reference")
    assert all(getattr(lin.weight.quant_state, "packing_format_for_cpu", False) == (layout == "cpu")
               for lin in linear4bit_layers(fused))
    x = torch.randn(3, 64, device=DEVICE)
    outs = []
    for m in (ref, fused):
        m.train()
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        y.square().sum().backward()
        outs.append((y, xi.grad, trainable_grads(m)))
    assert_close(outs[1][0], outs[0][0].double(), torch.float32, "model y")
    assert_close(outs[1][1], outs[0][1].double(), torch.float32, "model dx")
    assert outs[0][2].keys() == outs[1][2].keys() and len(outs[0][2]) == 4
    for name, g in outs[0][2].items():
        assert_close(outs[1][2][name], g.double(), torch.float32, name)


def test_from_peft_qlora_save_load_merge(tmp_path, flat_bnb_forward):
    from peft import PeftModel

    model = qlora_model()
    x = torch.randn(5, 40, device=DEVICE)
    with torch.no_grad():
        y_peft = model(x)
    lk.from_peft(model, backend="reference")
    with torch.no_grad():
        torch.testing.assert_close(model(x), y_peft)
        with model.disable_adapter():
            base = model(x)
    model.save_pretrained(tmp_path)
    loaded = lk.from_peft(PeftModel.from_pretrained(quantised_base(), tmp_path), backend="reference")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), y_peft)
        assert not torch.allclose(base, y_peft)
        # PEFT's merge (dequantise, add ΔW, requantise to 4 bits) keeps working: the merged layer
        # runs PEFT's own path, with PEFT's requantisation error
        unconverted = PeftModel.from_pretrained(quantised_base(), tmp_path)
        loaded.merge_adapter()
        unconverted.merge_adapter()
        torch.testing.assert_close(loaded(x), unconverted(x))


def test_from_peft_refuses_8bit_bases_naming_the_layer():
    peft = pytest.importorskip("peft")

    class Tiny8bit(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = bnb.nn.Linear8bitLt(16, 8, has_fp16_weights=False)
            self.is_loaded_in_8bit = True

        def forward(self, x):
            return self.proj(x)

    model = peft.get_peft_model(Tiny8bit(), peft.LoraConfig(r=2, target_modules=["proj"]))
    assert type(model.base_model.model.proj).__name__ == "Linear8bitLt"
    with pytest.raises(ValueError, match=r"'base_model\.model\.proj'.*8-bit"):
        lk.from_peft(model, strict=True)
