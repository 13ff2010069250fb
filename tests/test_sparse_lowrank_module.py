"""LowRankLinear with method="sltrain" / "lowrank": construction, forward against a dense W,
from_linear (SVD + residual), convert, accounting, state_dict round trip."""

import math

import pytest
import torch
from _helpers import DEVICE, assert_close
from torch import nn

import lowrank_kernels as lk
from lowrank_kernels.nn import memory_report, num_parameters


def dense_of(layer):
    """W = s·BA + S built here from the module's tensors, in float64."""
    W = layer.scaling * layer.lr_B.double() @ layer.lr_A.double()
    if layer.method == "sltrain":
        K = layer.in_features
        W = W.index_put((layer.sp_index // K, layer.sp_index % K), layer.sp_values.double(), accumulate=True)
    return W


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("method,options", [
    ("sltrain", dict(density=0.1)),
    ("sltrain", dict(density=0.1, support="block", block=(16, 16))),
    ("lowrank", {}),
])
def test_forward_backward_match_dense_weight(backend, method, options):
    layer = lk.LowRankLinear(45, 37, 4, method=method, alpha=8.0, backend=backend, device=DEVICE, **options)
    with torch.no_grad():
        layer.lr_B.normal_()  # B = 0 at init: give the low-rank part a value to check
    assert layer.lr_A.requires_grad and layer.lr_B.requires_grad and layer.bias.requires_grad
    x = torch.randn(2, 7, 45, device=DEVICE, requires_grad=True)
    y = layer(x)
    dy = torch.randn_like(y)
    params = [x] + [p for p in layer.parameters() if p.requires_grad]  # sp_index: a frozen int parameter
    grads = torch.autograd.grad(y, params, dy)
    W = dense_of(layer).detach().requires_grad_(True)
    xd = x.detach().double().requires_grad_(True)
    bd = layer.bias.detach().double().requires_grad_(True)
    y_ref = xd @ W.t() + bd
    gx, gW, gb = torch.autograd.grad(y_ref, (xd, W, bd), dy.double())
    assert_close(y, y_ref, torch.float32, "y")
    assert_close(grads[0], gx, torch.float32, "dx")
    named = dict(zip([n for n, p in layer.named_parameters() if p.requires_grad], grads[1:]))
    assert_close(named["bias"], gb, torch.float32, "d bias")
    if method == "sltrain":
        assert_close(named["sp_values"], gW.flatten()[layer.sp_index], torch.float32, "d sp_values")
    s = layer.scaling
    assert_close(named["lr_A"], s * layer.lr_B.double().t() @ gW, torch.float32, "d lr_A")
    assert_close(named["lr_B"], s * gW @ layer.lr_A.double().t(), torch.float32, "d lr_B")


def test_sltrain_initialisation_and_defaults():
    torch.manual_seed(1)
    layer = lk.LowRankLinear(256, 128, 16, method="sltrain")
    assert layer.alpha == 32.0 and layer.scaling == 2.0
    assert not layer.lr_B.any()
    assert layer.sp_values.numel() == round(0.03 * 256 * 128)
    bound = 1 / math.sqrt(256)
    assert layer.sp_values.abs().max() <= bound and layer.sp_values.std() > bound / 3
    assert lk.LowRankLinear(64, 64, 8, method="sltrain", alpha=None).alpha == 32.0
    assert lk.LowRankLinear(512, 512, 256, method="sltrain").alpha == 16.0
    assert lk.LowRankLinear(600, 600, 512, method="lowrank").alpha == 8.0
    a = lk.LowRankLinear(64, 48, 4, method="sltrain", seed=5)
    b = lk.LowRankLinear(64, 48, 4, method="sltrain", seed=5)
    assert torch.equal(a.sp_index, b.sp_index)
    assert "sltrain" in repr(a) and "density" in repr(a)


def test_lowrank_random_init_has_linear_variance_and_trains_from_scratch():
    # B = 0 with no sparse part would make every layer output zero, and a stack of them would
    # pass no gradient to any B: a from-scratch low-rank model would not train at all.
    torch.manual_seed(2)
    K, N, r = 256, 192, 32
    layer = lk.LowRankLinear(K, N, r, method="lowrank")
    W = dense_of(layer)
    dense_std = 1 / math.sqrt(3 * K)  # nn.Linear's U(±1/√K)
    assert 0.8 * dense_std < W.std().item() < 1.25 * dense_std
    stack = nn.Sequential(lk.LowRankLinear(32, 32, 4, method="lowrank"), nn.ReLU(),
                          lk.LowRankLinear(32, 32, 4, method="lowrank"))
    stack(torch.randn(8, 32)).square().sum().backward()
    assert all(m.lr_B.grad.abs().sum() > 0 and m.lr_A.grad.abs().sum() > 0 for m in stack if hasattr(m, "lr_B"))


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(method="sltrain", density=1.5), ValueError, "density"),
    (dict(method="sltrain", support="diag"), ValueError, "support"),
    (dict(method="sltrain", block=(3, 16), support="block"), ValueError, "powers of two"),
    (dict(method="sltrain", dropout=0.1), ValueError, "dropout"),
    (dict(method="sltrain", use_rslora=True), TypeError, "unexpected"),
    (dict(method="lowrank", density=0.1), TypeError, "unexpected"),
    (dict(method="sltrain", init="svd"), ValueError, "init"),
])
def test_bad_options(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        lk.LowRankLinear(32, 16, 4, **kwargs)


def test_rank_larger_than_layer_is_refused():
    with pytest.raises(ValueError, match="rank"):
        lk.LowRankLinear(32, 16, 17, method="sltrain")


def test_merge_is_refused_without_base_weight():
    layer = lk.LowRankLinear(32, 16, 4, method="sltrain")
    with pytest.raises(RuntimeError, match="no base weight"):
        layer.merged_weight()
    with pytest.raises(RuntimeError, match="no base weight"):
        layer.merge()
    with pytest.raises(ValueError, match="no base weight"):
        lk.merge_and_unload(nn.Sequential(layer))


@pytest.mark.parametrize("support", ["uniform", "block"])
@pytest.mark.slow
def test_from_linear_error_decreases_with_rank_and_density(support):
    torch.manual_seed(0)
    # A weight with a decaying spectrum under a random full-rank part, like a trained layer's.
    linear = nn.Linear(96, 80)
    with torch.no_grad():
        U, _ = torch.linalg.qr(torch.randn(80, 80))
        V, _ = torch.linalg.qr(torch.randn(96, 96))
        spectrum = 1.0 / (1 + torch.arange(80.0))
        linear.weight.mul_(0.5).add_((U * spectrum) @ V[:, :80].t())
    errors = {}
    for rank in (4, 16):
        for density in (0.0, 0.05, 0.2):
            layer = lk.LowRankLinear.from_linear(linear, method="sltrain", rank=rank, alpha=rank,
                                                 density=density, support=support, block=(16, 16))
            errors[rank, density] = layer.reconstruction_error
            W = dense_of(layer)
            measured = ((linear.weight.double() - W).norm() / linear.weight.double().norm()).item()
            assert abs(measured - layer.reconstruction_error) < 1e-5
            assert layer.bias is linear.bias and layer.bias.requires_grad
    for density in (0.0, 0.05, 0.2):
        assert errors[16, density] < errors[4, density]
    for rank in (4, 16):
        assert errors[rank, 0.2] < errors[rank, 0.05] < errors[rank, 0.0]
    # With no sparse part the error is exactly the SVD tail.
    S = torch.linalg.svdvals(linear.weight.double())
    assert abs(errors[4, 0.0] - (S[4:].norm() / S.norm()).item()) < 1e-5


def test_from_linear_lowrank_is_truncated_svd():
    linear = nn.Linear(40, 30)
    layer = lk.LowRankLinear.from_linear(linear, method="lowrank", rank=5)
    S = torch.linalg.svdvals(linear.weight.double())
    assert abs(layer.reconstruction_error - (S[5:].norm() / S.norm()).item()) < 1e-5
    assert not hasattr(layer, "sp_values")


def tiny_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_convert_llama_keeps_embeddings_and_head_dense_and_trainable():
    model = tiny_llama()
    dense_report = memory_report(model)
    n_dense = num_parameters(model)
    lk.convert(model, method="sltrain", rank=4, alpha=8, density=0.05, target_modules=LLAMA_TARGETS)
    layers = [m for m in model.modules() if isinstance(m, lk.LowRankLinear)]
    assert len(layers) == 2 * 7 and all(m.method == "sltrain" for m in layers)
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight.requires_grad
    assert model.model.embed_tokens.weight.requires_grad
    # Every weight trains; the supports' indices are frozen integer parameters (FSDP2 shards them).
    assert all(p.requires_grad != (p.dtype == torch.int64) for p in model.parameters())
    assert all(not m.sp_index.requires_grad for m in layers)
    # Fresh SLTrain initialisation, not the dense weights.
    assert all(not m.lr_B.any() for m in layers)
    ids = torch.randint(0, 64, (2, 9))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert num_parameters(model) < n_dense
    report = memory_report(model)
    assert report["dense"]["total"] == dense_report["ours"]["total"]
    assert report["ours"]["weights"] < report["dense"]["weights"]
    assert report["ours"]["support"] > 0 and report["ratio"] < 1.0


def test_convert_keeps_the_lm_head_dense():
    model = tiny_llama()
    lk.convert(model, method="sltrain", rank=4, density=0.05)  # all-linear: the output layer is left out
    assert sum(isinstance(m, lk.LowRankLinear) for m in model.modules()) == 2 * 7
    assert type(model.lm_head) is nn.Linear
    with pytest.raises(ValueError, match="LM head"):
        lk.convert(tiny_llama(), method="sltrain", rank=4, density=0.05, target_modules=["lm_head", "q_proj"])


@pytest.mark.parametrize("shape, options, match", [
    ((32, 48), dict(support="block", block=(64, 64)), r"density=0.03 gives 0 sparse entries on a 48×32 layer .*"
                                                      r"block=\(64, 64\).*no density can give one block"),
    ((8, 8), dict(density=0.005), r"density=0.005 gives 0 sparse entries on a 8×8 layer .*density >= 0\.00781"),
    ((64, 64), dict(support="block"), r"64×64 layer with support='block', block=\(16, 16\).*density >= 0\.0312"),
])
def test_empty_support_is_refused(shape, options, match):
    with pytest.raises(ValueError, match=match):
        lk.LowRankLinear(*shape, 4, method="sltrain", **options)


def test_convert_names_the_layer_whose_support_would_be_empty():
    # (16, 16) blocks at density 0.03 on 32×32 projections: round(0.03·1024/256) = 0 blocks.
    with pytest.raises(ValueError, match=r"layer 'model\.layers\.0\.self_attn\.q_proj': density=0.03 gives 0"):
        lk.convert(tiny_llama(), method="sltrain", rank=4, support="block", block=(16, 16),
                   target_modules=LLAMA_TARGETS)


def test_num_parameters_and_memory_report_of_one_layer():
    layer = lk.LowRankLinear(64, 48, 4, method="sltrain", density=0.05, bias=False)
    nnz = layer.sp_values.numel()
    assert num_parameters(layer) == 4 * (64 + 48) + nnz == num_parameters(layer, trainable_only=True)
    assert layer.num_parameters() == num_parameters(layer)
    report = memory_report(layer)
    assert report["ours"]["weights"] == 4 * (4 * (64 + 48) + nnz)
    assert report["dense"]["weights"] == 4 * 64 * 48
    assert report["ours"]["optimizer_states"] == 2 * report["ours"]["gradients"]
    # uniform support: int64 index + int32 row pointers of S and Sᵀ + int32 positions + sp_block
    assert report["ours"]["support"] == 8 * nnz + 4 * (49 + 65) + 4 * nnz + 16


@pytest.mark.parametrize("support", ["uniform", "block"])
def test_state_dict_round_trip_includes_support(support):
    a = lk.LowRankLinear(45, 37, 3, method="sltrain", density=0.2, support=support, block=(1, 16), seed=1)
    b = lk.LowRankLinear(45, 37, 3, method="sltrain", density=0.2, support=support, block=(1, 16), seed=2)
    assert not torch.equal(a.sp_index, b.sp_index)
    state = a.state_dict()
    assert "sp_index" in state and "sp_block" in state
    assert not any(k.startswith("_sp_") for k in state)
    b.load_state_dict(state)
    assert torch.equal(a.sp_index, b.sp_index)
    x = torch.randn(5, 45)
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)
    b.backend = "triton"
    torch.testing.assert_close(b(x), a(x))


def test_state_dict_can_switch_support_kind():
    a = lk.LowRankLinear(32, 32, 2, method="sltrain", density=0.25, support="block", block=(16, 16))
    b = lk.LowRankLinear(32, 32, 2, method="sltrain", density=0.25, support="uniform")
    b.load_state_dict(a.state_dict())
    assert b._sp_kind == "block" and b._sp_blocksize == (16, 16)
    x = torch.randn(3, 32)
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)


@pytest.mark.slow
def test_training_step_reduces_loss():
    torch.manual_seed(0)
    layer = lk.LowRankLinear(24, 16, 4, method="sltrain", density=0.2, backend="triton")
    target = nn.Linear(24, 16)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.05)
    x = torch.randn(64, 24)
    losses = []
    for _ in range(10):
        loss = (layer(x) - target(x).detach()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
