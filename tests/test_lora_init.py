"""LoRA initialisations (nn/lora_init.py): PiSSA, LoRA-GA and CorDA against PEFT's own
implementations, EoRA against its closed-form optimum in float64, and the calibrate() plumbing."""

import copy

import pytest
import torch
from _helpers import rel_err
from torch import nn

import lowrank_kernels as lk
from lowrank_kernels.nn import lora_init

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraGAConfig, preprocess_loraga  # noqa: E402
from peft.tuners.lora.config import CordaConfig  # noqa: E402
from peft.tuners.lora.corda import preprocess_corda  # noqa: E402


class Net(nn.Module):
    def __init__(self, K=40, H=33, N=21):
        super().__init__()
        self.up = nn.Linear(K, H)
        self.down = nn.Linear(H, N)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def peft_layers(model):
    inner = model.base_model.model
    return {n: getattr(inner, n) for n in ("up", "down")}


def sign_align(ours, theirs, dim):
    """``ours`` with each row (dim=0) / column (dim=1) flipped to agree in sign with ``theirs``."""
    dots = (ours * theirs).sum(dim=1 - dim, keepdim=True)
    return ours * torch.where(dots < 0, -1.0, 1.0)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4"])
def test_pissa_matches_peft(init):
    base = Net()
    if init != "pissa":
        # A well-separated top-r spectrum, so the randomized SVD (a random sketch, other in each
        # library) converges to the same top-r subspace.
        with torch.no_grad():
            for lin in (base.up, base.down):
                U, _, Vh = torch.linalg.svd(lin.weight, full_matrices=False)
                S = torch.cat([torch.tensor([9.0, 7.0, 5.0]), torch.full((U.shape[1] - 3,), 0.01)])
                lin.weight.copy_((U * S) @ Vh)
    x = torch.randn(2, 5, 40)
    y0 = base(x)
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=3, lora_alpha=6, target_modules=["up", "down"],
                                                             init_lora_weights=init))
    ours = lk.convert(copy.deepcopy(base), rank=3, alpha=6, init=init)
    tol = 1e-5 if init == "pissa" else 1e-4
    for name, layer in peft_layers(theirs).items():
        mine = getattr(ours, name)
        BA = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        assert rel_err(mine.lora_B @ mine.lora_A, BA) < tol
        # The residual, relative to W (with a gapped spectrum it is small next to W).
        W0 = getattr(base, name).weight
        assert ((mine.weight - layer.base_layer.weight).norm() / W0.norm()).item() < tol
        # The split itself: A and B equal up to the SVD's sign per component.
        assert rel_err(sign_align(mine.lora_A, layer.lora_A["default"].weight, 0), layer.lora_A["default"].weight) < tol
    assert rel_err(ours(x), y0) < 1e-5
    merged = lk.merge_and_unload(ours)
    for name in ("up", "down"):
        assert rel_err(getattr(merged, name).weight, getattr(base, name).weight) < 1e-6


def test_pissa_from_linear_fp32_adapters_on_fp16_base_and_errors():
    lin = nn.Linear(40, 33, dtype=torch.float16)
    W0 = lin.weight.detach().clone()
    layer = lk.LowRankLinear.from_linear(lin, rank=4, init="pissa", adapter_dtype=torch.float32)
    assert layer.lora_A.dtype == torch.float32 and layer.weight.dtype == torch.float16
    assert layer.weight.data_ptr() == lin.weight.data_ptr()  # W changed in place
    # W + s·B·A (what merge writes) is W0 within one fp16 rounding of the residual.
    assert rel_err(layer.merged_weight(), W0) < 1e-3
    with pytest.raises(ValueError, match="pissa_niter_K"):
        lk.LowRankLinear.from_linear(nn.Linear(8, 8), rank=2, init="pissa_niter_x")
    with pytest.raises(ValueError, match="calibrat"):
        lk.LowRankLinear.from_linear(nn.Linear(8, 8), rank=2, init="lora_ga")
    with pytest.raises(ValueError, match="rank <= min"):
        lk.LowRankLinear.from_linear(nn.Linear(8, 3), rank=4, init="pissa")
    g = lk.LowRankLinear.from_linear(nn.Linear(400, 300), rank=4, init="gaussian")
    assert abs(g.lora_A.std().item() - 0.25) < 0.01 and not g.lora_B.any()


def batches_for(seed=1, n=2, tokens=4):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(1, tokens, 40, generator=gen), torch.randn(1, tokens, 21, generator=gen))
            for _ in range(n)]


def mse(model, batch):
    return ((model(batch[0]) - batch[1]) ** 2).mean()


@pytest.mark.filterwarnings("ignore:Full backward hook")  # PEFT's own hook in preprocess_loraga
@pytest.mark.parametrize("scale", ["stable", "gd_scale"])
def test_lora_ga_matches_peft(scale):
    base = Net()
    data = batches_for()
    x = torch.randn(3, 40)
    y0 = base(x)

    theirs = copy.deepcopy(base)
    cfg = LoraConfig(r=3, lora_alpha=6, target_modules=["up", "down"], init_lora_weights="lora_ga",
                     lora_ga_config=LoraGAConfig(scale=scale))

    def train_step():
        for inp, target in data:
            mse(theirs, (inp, target)).backward()

    preprocess_loraga(theirs, cfg, train_step)
    theirs = get_peft_model(theirs, cfg)

    ours = lk.convert(copy.deepcopy(base), rank=3, alpha=6)
    lk.nn.calibrate(ours, data, init="lora_ga", loss_fn=mse, scale=scale)
    # 8 calibration tokens: the gradient has rank <= 8 <= 4r, so the randomized SVD is exact.
    for name, layer in peft_layers(theirs).items():
        mine = getattr(ours, name)
        A_p, B_p = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert rel_err(sign_align(mine.lora_A, A_p, 0), A_p) < 1e-4
        assert rel_err(sign_align(mine.lora_B, B_p, 1), B_p) < 1e-4
        W0 = getattr(base, name).weight
        # The offset correction, with this init's own signs: W = W0 − s·B·A.
        assert rel_err(mine.weight, W0 - mine.scaling * (mine.lora_B @ mine.lora_A)) < 1e-6
        assert rel_err(layer.base_layer.weight, W0 - layer.scaling["default"] * (B_p @ A_p)) < 1e-6
        assert not mine.weight.requires_grad and mine.lora_A.requires_grad
    assert rel_err(ours(x), y0) < 1e-5
    assert rel_err(theirs(x), y0) < 1e-5
    assert rel_err(lk.merge_and_unload(ours).up.weight, base.up.weight) < 1e-6


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_corda_matches_peft(mode):
    base = Net()
    data = [t for t, _ in batches_for(n=3, tokens=30)]
    x = torch.randn(3, 40)
    y0 = base(x)
    theirs = copy.deepcopy(base)
    cfg = LoraConfig(r=3, lora_alpha=6, target_modules=["up", "down"], init_lora_weights="corda",
                     corda_config=CordaConfig(corda_method=mode))

    def run_model():
        for inp in data:
            theirs(inp)

    preprocess_corda(theirs, cfg, run_model=run_model)
    theirs = get_peft_model(theirs, cfg)
    ours = lk.convert(copy.deepcopy(base), rank=3, alpha=6).train()
    lk.nn.calibrate(ours, data, init="corda", mode=mode)
    assert ours.training  # restored
    for name, layer in peft_layers(theirs).items():
        mine = getattr(ours, name)
        BA = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        assert rel_err(mine.lora_B @ mine.lora_A, BA) < 1e-4
        assert rel_err(mine.weight, layer.base_layer.weight) < 1e-5
    assert rel_err(ours(x), y0) < 1e-5


def test_eora_is_the_weighted_rank_r_optimum_float64():
    torch.manual_seed(3)
    N, K, r, s = 21, 40, 3, 2.0
    W = torch.randn(N, K, dtype=torch.float64)
    Wc = torch.where(W.abs() < 0.7, torch.zeros_like(W), W)  # magnitude-pruned "compressed" layer
    X = torch.randn(200, K, dtype=torch.float64) @ torch.randn(K, K, dtype=torch.float64)  # correlated inputs
    C = X.t() @ X
    A, B = lora_init.eora_factors(W - Wc, C, r, s)
    L = s * B.double() @ A.double()
    # The optimum of min_rank(L)<=r ‖(ΔW − L) Xᵀ‖_F through another factorisation: C = R Rᵀ
    # (Cholesky), L* = [ΔW R]_r R⁻¹.
    R = torch.linalg.cholesky(C)
    U, S, Vh = torch.linalg.svd((W - Wc) @ R)
    L_star = (U[:, :r] * S[:r]) @ Vh[:r] @ torch.linalg.inv(R)
    assert rel_err(L, L_star) < 1e-5

    def err(M):
        return ((W - Wc - M) @ X.t()).norm().item()

    # And it beats the plain (unweighted) truncated SVD of ΔW on the calibration activations.
    U2, S2, Vh2 = torch.linalg.svd(W - Wc)
    assert err(L) < err((U2[:, :r] * S2[:r]) @ Vh2[:r])


def test_eora_through_calibrate():
    base = Net()
    compressed = copy.deepcopy(base)
    with torch.no_grad():
        for lin in (compressed.up, compressed.down):
            lin.weight.mul_(lin.weight.abs() > 0.1)
    data = [t for t, _ in batches_for(n=2, tokens=40)]
    model = lk.convert(copy.deepcopy(compressed), rank=4, alpha=8)
    Wc = model.up.weight.detach().clone()
    lk.nn.calibrate(model, data, init="eora", original_weights=base.state_dict())
    assert torch.equal(model.up.weight, Wc)  # the compressed weight is kept
    # The layer's factors are EoRA's for the layer's own inputs; the first layer's inputs are
    # the calibration batches themselves.
    Xs = torch.cat([t.reshape(-1, 40) for t in data])
    A, B = lora_init.eora_factors(base.up.weight - Wc, Xs.t() @ Xs, 4, model.up.scaling)
    assert rel_err(model.up.lora_B @ model.up.lora_A, B @ A) < 1e-4
    # Compensation brings the layer's and the model's outputs closer to the original's.
    err = ((base.up.weight - Wc - model.up.scaling * model.up.lora_B @ model.up.lora_A) @ Xs.t()).norm()
    assert err < 0.9 * ((base.up.weight - Wc) @ Xs.t()).norm()
    x = data[0]
    assert (model(x) - base(x)).norm() < (compressed(x) - base(x)).norm()
    with pytest.raises(ValueError, match="original_weights"):
        lk.nn.calibrate(model, data, init="eora", original_weights={"up.weight": base.up.weight})


def test_calibrate_errors_and_restores_state():
    model = lk.convert(Net(), rank=3)
    data = batches_for()
    with pytest.raises(ValueError, match="init must be one of"):
        lk.nn.calibrate(model, data, init="pissa")
    with pytest.raises(ValueError, match="scalar loss"):
        lk.nn.calibrate(model, [x for x, _ in data], init="lora_ga")
    with pytest.raises(ValueError, match="direction"):
        lk.nn.calibrate(model, data, init="lora_ga", loss_fn=mse, direction="AB")
    with pytest.raises(ValueError, match="no LowRankLinear layer of method 'lora_sb'"):
        lk.nn.calibrate(model, data, init="lora_sb", loss_fn=mse, lr=1e-3)
    with pytest.raises(ValueError, match="empty"):
        lk.nn.calibrate(model, [], init="corda")
    with pytest.raises(ValueError, match="2·rank"):
        lk.nn.calibrate(lk.convert(Net(K=40, H=5, N=21), rank=3), data, init="lora_ga", loss_fn=mse)
    model.eval()
    lk.nn.calibrate(model, data, init="lora_ga", loss_fn=mse)
    assert not model.training
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "up.lora_A", "up.lora_B", "down.lora_A", "down.lora_B"]
    assert all(p.grad is None for p in model.parameters())


def test_peft_config_and_names_carry_the_init():
    base = Net()
    a = lk.convert(copy.deepcopy(base), LoraConfig(r=3, lora_alpha=6, target_modules=["up", "down"],
                                                   init_lora_weights="pissa"))
    b = lk.convert(copy.deepcopy(base), r=3, lora_alpha=6, init_lora_weights="pissa")
    c = lk.convert(copy.deepcopy(base), rank=3, alpha=6, init="pissa")
    for m in (a, b):
        assert torch.equal(m.up.weight, c.up.weight) and torch.equal(m.down.lora_A, c.down.lora_A)
    # Data-driven inits are refused with the way to get them.
    with pytest.raises(ValueError, match="calibrate"):
        lk.convert(copy.deepcopy(base), r=3, init_lora_weights="corda")


def test_calibrate_after_another_init_keeps_the_output():
    base = Net()
    x = torch.randn(3, 40)
    model = lk.convert(copy.deepcopy(base), rank=3, init="pissa")
    lk.nn.calibrate(model, batches_for(), init="lora_ga", loss_fn=mse)
    assert rel_err(model(x), base(x)) < 1e-5
    assert rel_err(lk.merge_and_unload(model).up.weight, base.up.weight) < 1e-6
