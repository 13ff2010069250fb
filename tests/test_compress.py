"""lk.compress (LoRD / WeLore ranks, low-rank or low-rank + sparse layers) and WeLore's per-layer
ranks: the report's errors against float64 references, its parameter counts against the model's."""

import pytest
import torch

import lowrank_kernels as lk
from lowrank_kernels import GaLoreAdamW
from lowrank_kernels.compress import projected_param_groups, welore_rank, welore_ranks
from lowrank_kernels.nn import LowRankLinear, num_parameters


def _model():
    """Layer 0 has a heavy-tailed spectrum (log-spaced singular values), layer 2 a random one's."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 40))
    with torch.no_grad():
        U = torch.linalg.qr(torch.randn(48, 48))[0]
        V = torch.linalg.qr(torch.randn(64, 48))[0]
        model[0].weight.copy_(U @ torch.diag(torch.logspace(0, -3, 48)) @ V.t())
    return model


def _reference_error(W, k, density):
    """‖W − Ŵ‖_F / ‖W‖_F in float64: Ŵ the top-k SVD plus the largest-magnitude entries of the residual."""
    W = W.double()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    residual = W - (U[:, :k] * S[:k]) @ Vh[:k]
    nnz = int(round(density * W.numel()))
    if nnz:
        kept = residual.abs().flatten().topk(nnz).indices
        residual = residual.flatten().clone()
        residual[kept] = 0
    return (residual.norm() / W.norm()).item()


@pytest.mark.parametrize("method", ["lord", "welore"])
@pytest.mark.parametrize("density", [0.0, 0.05])
def test_report_errors_and_parameter_counts(method, density):
    model = _model()
    weights = {"0": model[0].weight.detach().clone(), "2": model[2].weight.detach().clone()}
    before = num_parameters(model)
    report = lk.compress(model, ratio=0.5, method=method, density=density)
    assert report.parameters_before == before
    assert report.parameters_after == num_parameters(model)
    saved = sum(r.dense_parameters - r.parameters for r in report.layers.values())
    assert report.parameters_after == before - saved
    assert report.achieved_ratio <= 0.5
    for name, r in report.layers.items():
        layer = model[int(name)]
        assert isinstance(layer, LowRankLinear) and layer.rank == r.rank
        # The parameters the report counts are the layer's own (its bias aside).
        assert r.parameters == num_parameters(layer) - layer.bias.numel()
        ref = _reference_error(weights[name], r.rank, density)
        assert r.relative_error == pytest.approx(ref, rel=1e-4, abs=1e-6)
        fitted = layer._method.delta_weight(layer).double()
        assert ((fitted - weights[name].double()).norm() / weights[name].double().norm()).item() == \
            pytest.approx(ref, rel=1e-4, abs=1e-6)


def test_lord_is_uniform_and_welore_follows_the_spectrum():
    lord = lk.compress(_model(), ratio=0.5, method="lord")
    welore = lk.compress(_model(), ratio=0.5, method="welore")
    # LoRD: the largest rank within the ratio in each layer.
    for (N, K), r in ((r.shape, r) for r in lord.layers.values()):
        assert r.rank * (N + K) <= 0.5 * N * K < (r.rank + 1) * (N + K)
    # WeLore: the heavy-tailed layer gives rank to the flat one.
    assert welore.layers["0"].rank < lord.layers["0"].rank
    assert welore.layers["2"].rank > lord.layers["2"].rank


def test_welore_keeps_a_layer_dense_when_low_rank_saves_nothing():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.Linear(48, 4))
    with torch.no_grad():
        # Orthonormal rows: four equal singular values, a flat spectrum that WeLore keeps whole.
        model[1].weight.copy_(torch.linalg.qr(torch.randn(48, 4))[0].t())
    report = lk.compress(model, ratio=0.6, method="welore")
    # Rank 4 of a (4, 48) layer costs 4·52 > 4·48 parameters: it stays dense.
    assert report.layers["1"].rank is None and type(model[1]) is torch.nn.Linear
    assert report.layers["1"].relative_error == 0.0
    assert report.achieved_ratio <= 0.6


def test_welore_rank_rule():
    s = torch.tensor([10.0, 5.0, 1.0, 0.1, 0.0])  # normalised: 1, 0.5, 0.1, 0.01, 0
    assert welore_rank(s, 0.05) == 3
    assert welore_rank(s, 0.5) == 2
    assert welore_rank(s, 1.0) == 1
    torch.manual_seed(0)
    mats = {"a": torch.randn(30, 20), "b": torch.randn(20, 20) @ torch.diag(torch.logspace(0, -4, 20))}
    ranks = welore_ranks(mats, ratio=0.5)
    assert sum(ranks.values()) <= 0.5 * 40
    assert ranks["b"] < ranks["a"]
    with pytest.raises(ValueError, match="exactly one"):
        welore_ranks(mats)


def test_ranks_set_galore_groups():
    model = _model()
    ranks = welore_ranks({"0": model[0].weight, "2": model[2].weight}, ratio=0.25)
    groups = projected_param_groups(model, ranks, update_proj_gap=10, scale=0.25, proj_type="std")
    assert sorted(g["rank"] for g in groups if "rank" in g) == sorted(set(ranks.values()))
    opt = GaLoreAdamW(groups, lr=1e-3)
    model(torch.randn(5, 64)).sum().backward()
    opt.step()
    for name, rank in ranks.items():
        weight = model[int(name)].weight
        # proj_type 'std' projects the shorter side: R is (r, max(m, n)) or (max(m, n), r).
        assert sorted(opt.state[weight]["exp_avg"].shape) == sorted((rank, max(weight.shape)))


def test_bad_arguments():
    with pytest.raises(ValueError, match="ratio"):
        lk.compress(_model(), ratio=1.5)
    with pytest.raises(ValueError, match="method"):
        lk.compress(_model(), ratio=0.5, method="svd")
    with pytest.raises(ValueError, match="density"):
        lk.compress(_model(), ratio=0.1, density=0.2)
    with pytest.raises(ValueError, match="in place"):
        lk.compress(torch.nn.Linear(8, 8), ratio=0.5)
