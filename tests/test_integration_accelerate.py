"""accelerate: Accelerator.prepare with fused layers (peft_config) and the package's optimizers;
save_state / load_state resumes into an identical continuation (one process)."""

import pytest

peft = pytest.importorskip("peft")
accelerate = pytest.importorskip("accelerate")

from integration_models import tiny_llama, token_batches  # noqa: E402

import lowrank_kernels as lk  # noqa: E402
from lowrank_kernels.nn.peft import FusedLoraLinear  # noqa: E402


def fused_model():
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return peft.get_peft_model(tiny_llama(), lk.peft_config(config))


def galore(model):
    # A full-model GaLore run: the base weights train, their gradients projected.
    return lk.GaLoreAdamW(lk.projected_param_groups(model, rank=4, update_proj_gap=2), lr=3e-3)


def fira_on_adapters(model):
    adapters = [p for p in model.parameters() if p.requires_grad]
    return lk.FiraAdamW([{"params": adapters, "rank": 2, "update_proj_gap": 2, "alpha": 0.5}], lr=3e-3)


def run(accelerator, model, optimizer, batches):
    losses = []
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("make", [(tiny_llama, galore), (fused_model, fira_on_adapters)], ids=["galore", "fira-peft"])
def test_prepare_and_state_round_trip(make, tmp_path):
    make_model, make_optimizer = make
    batches = token_batches(4)
    accelerator = accelerate.Accelerator(cpu=True)
    model = make_model()
    model, optimizer = accelerator.prepare(model, make_optimizer(model))
    assert isinstance(optimizer.optimizer, (lk.GaLoreAdamW, lk.FiraAdamW))
    if make_model is fused_model:
        assert sum(type(m) is FusedLoraLinear for m in model.modules()) == 14
    run(accelerator, model, optimizer, batches[:2])
    accelerator.save_state(tmp_path)
    expected = run(accelerator, model, optimizer, batches[2:])

    accelerator = accelerate.Accelerator(cpu=True)
    model = make_model()  # the initial weights: load_state replaces them
    model, optimizer = accelerator.prepare(model, make_optimizer(model))
    accelerator.load_state(tmp_path)
    assert run(accelerator, model, optimizer, batches[2:]) == expected


def test_fsdp2_plugin_on_cpu():
    pytest.skip("accelerate's FSDP plugin does not run on the CPU: AcceleratorState selects DistributedType.FSDP "
                "only when the distributed type is a GPU-family one (MULTI_GPU, MULTI_NPU, MULTI_XPU, ...; "
                "accelerate/state.py); with gloo on CPU processes it is MULTI_CPU and the plugin is ignored. "
                "FSDP2 on the CPU is tested with torch's fully_shard directly (tests/test_distributed.py)")
