"""The optimizers in the transformers Trainer (optimizer_cls_and_kwargs=trainer_optimizer(...)) and
PEFT configs from peft_config in TRL's SFTTrainer: the Trainer's losses are those of the same loop
written by hand, and its own checkpoint resumes into an identical continuation."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from integration_models import tiny_llama, token_batches, word_tokenizer  # noqa: E402

import lowrank_kernels as lk  # noqa: E402

STEPS = 4
GROUP = {
    lk.GaLoreAdamW: {"rank": 4, "update_proj_gap": 2, "scale": 0.25},
    lk.FiraAdamW: {"rank": 4, "update_proj_gap": 2, "alpha": 0.5},
    lk.ApolloAdamW: {"rank": 4, "update_proj_gap": 2, "scale": 1.0},
}
LR = 3e-3


class Batches(torch.utils.data.IterableDataset):
    """The same STEPS batches of samples on every pass, unshuffled (the Trainer keeps their order)."""

    def __iter__(self):
        for ids in token_batches(STEPS):
            for row in ids:
                yield {"input_ids": row, "labels": row}


def record_losses(model):
    """A list that every forward of ``model`` appends its loss to."""
    losses = []
    model.register_forward_hook(lambda module, args, out: losses.append(out.loss.item()))
    return losses


def training_args(path, **kw):
    kw = {"save_strategy": "no", **kw}
    return transformers.TrainingArguments(
        output_dir=str(path), per_device_train_batch_size=2, max_steps=STEPS, learning_rate=LR,
        lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, logging_steps=1, report_to="none",
        use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, **kw)


def trainer_losses(optimizer_cls, path, resume=None, **kw):
    model = tiny_llama()
    args = training_args(path, **kw)
    losses = record_losses(model)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Batches(),
                                   optimizer_cls_and_kwargs=lk.trainer_optimizer(optimizer_cls, model, args=args,
                                                                                 **GROUP[optimizer_cls]))
    trainer.train(resume_from_checkpoint=resume)
    assert isinstance(trainer.optimizer.optimizer, optimizer_cls)
    return losses


def hand_losses(optimizer_cls):
    model = tiny_llama()
    losses = record_losses(model)
    opt = optimizer_cls(lk.projected_param_groups(model, "all-linear", **GROUP[optimizer_cls]), lr=LR,
                        betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    model.train()
    for ids in token_batches(STEPS):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return losses


@pytest.mark.parametrize("optimizer_cls", list(GROUP), ids=lambda c: c.__name__)
def test_trainer_equals_hand_loop(optimizer_cls, tmp_path):
    expected = hand_losses(optimizer_cls)
    assert len(expected) == STEPS and expected[0] != expected[-1]
    assert trainer_losses(optimizer_cls, tmp_path) == expected


@pytest.mark.parametrize("optimizer_cls", [lk.GaLoreAdamW, lk.ApolloAdamW], ids=lambda c: c.__name__)
def test_trainer_checkpoint_resumes_identically(optimizer_cls, tmp_path):
    full = trainer_losses(optimizer_cls, tmp_path / "a", save_strategy="steps", save_steps=2)
    resumed = trainer_losses(optimizer_cls, tmp_path / "a", resume=str(tmp_path / "a" / "checkpoint-2"))
    assert resumed == full[2:]


def test_param_groups_follow_optim_target_modules():
    pytest.importorskip("galore_torch")
    model = tiny_llama()
    names = {id(p): n for n, p in model.named_parameters()}
    for targets in (["q_proj", "mlp"], r".*\.self_attn\.(q|v)_proj", "all-linear"):
        args = transformers.TrainingArguments(output_dir="unused", optim="galore_adamw", optim_target_modules=targets,
                                              report_to="none", use_cpu=True)
        _, theirs = transformers.Trainer.get_optimizer_cls_and_kwargs(args, model)
        ours = lk.projected_param_groups(model, targets, rank=4)
        expected = {names[id(p)] for p in theirs["params"][1]["params"]}
        if targets == "all-linear":  # transformers projects the head; here it stays plain AdamW
            expected.discard("lm_head.weight")
        assert {names[id(p)] for p in ours[1]["params"]} == expected
        assert {names[id(p)] for p in ours[0]["params"]} == set(names.values()) - expected
        assert ours[1]["rank"] == 4


def test_trainer_optimizer_refusals():
    model = tiny_llama()
    with pytest.raises(ValueError, match="matched no trainable nn.Linear"):
        lk.projected_param_groups(model, ["no_such_layer"])
    with pytest.raises(TypeError, match="target_modules"):
        lk.projected_param_groups(model, 3)
    with pytest.raises(TypeError, match="optimizer_cls"):
        lk.trainer_optimizer(torch.optim.AdamW, model)


def test_sft_trainer_with_peft_config_equals_plain_peft(tmp_path):
    trl = pytest.importorskip("trl", reason="trl is not installed (pip install trl)")
    datasets = pytest.importorskip("datasets", reason="datasets (a trl dependency) is not installed")
    from peft import LoraConfig

    from lowrank_kernels.nn.peft import FusedLoraLinear

    data = datasets.Dataset.from_dict({"input_ids": [row.tolist() for ids in token_batches(STEPS) for row in ids]})

    def sft_losses(config):
        model = tiny_llama()
        args = trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=STEPS,
                             learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=0.0, report_to="none",
                             # fp32: TRL's default bf16 autocast would round both runs to bf16.
                             bf16=False,
                             use_cpu=True, save_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=word_tokenizer(),
                                 peft_config=config)
        losses = record_losses(trainer.model)
        trainer.train()
        return trainer.model, losses

    def config():
        return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)

    plain, expected = sft_losses(config())
    fused, losses = sft_losses(lk.peft_config(config()))
    fused_layers = [m for m in fused.modules() if type(m) is FusedLoraLinear]
    assert len(fused_layers) == 14 and not any(type(m) is FusedLoraLinear for m in plain.modules())
    assert len(expected) == STEPS and losses == expected
