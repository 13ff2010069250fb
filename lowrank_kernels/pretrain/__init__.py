"""Pretrain a LLaMA-style model on the standard library's bytes with every low-rank method.

    python -m lowrank_kernels.pretrain [--size tiny|60m|130m] [--method adamw,galore,...] [--peers]
                                       [--steps N] [--lr LR ...] [--backend B] [--out DIR] ...

The end-to-end run of the package: the same model and data trained with plain AdamW, with the
package's fused optimizers (GaLore, Fira) and with its layers (low-rank, SLTrain, LoRA), with the
held-out loss, tokens/s and memory of each. It uses only the public API (``convert``,
``GaLoreAdamW``, ``FiraAdamW``, ``nn.memory_report``, ``nn.num_parameters``), so it doubles as an
example of how to use the package.

The model: transformers' LlamaForCausalLM built from a config (RMSNorm, rotary attention,
SwiGLU), vocabulary 256 (one byte, one token), untied embeddings. ``--size tiny`` is hidden 128,
intermediate 344, 4 layers, 4 heads, sequence 128, batch 16 (minutes on 2 CPU cores); ``60m`` and
``130m`` are the GaLore paper's LLaMA-60M/130M shapes (hidden 512/768, 8/12 layers) for a GPU.

The data, which needs no download: the files ``*.py`` directly in the folder of the running
Python's ``os`` module, sorted by name and concatenated as bytes; the last 5% held out. Training
batches are windows of seq + 1 bytes at random positions from a generator seeded with ``--seed``;
the held-out loss is the mean over 20 batches at random held-out positions from a generator with
a fixed seed (the same batches for every run).

Methods:
  adamw     torch.optim.AdamW on every parameter.
  galore    lk.GaLoreAdamW: every 2-D weight of the decoder blocks projected (rank, update_proj_gap,
            scale, proj_type, refresh), the rest plain AdamW: galore-torch's param groups.
  fira      lk.FiraAdamW, the same groups with Fira's alpha = --scale.
  lowrank   every decoder projection a LowRankLinear(method="lowrank"), W = s·B·A, trained from
            scratch with AdamW, starting from the top-r SVD of the dense initial weight
            (--lowrank-init random: the method's own random factors);
            its rank is raised per layer so that its parameter count equals sltrain's (unless
            --lowrank-rank is given).
  sltrain   every decoder projection a LowRankLinear(method="sltrain"), W = s·B·A + S on a fixed
            random support (--density, --support), trained from scratch with AdamW.
  lora      LoRA on every decoder projection, fine-tuning the adamw run's final weights (or the
            checkpoint --init-from PATH) on new training batches; the rest frozen.
  --peers adds galore-torch (galore_torch.GaLoreAdamW) and fira-pkg (the fira package's
  FiraAdamW), with the same groups, where they are installed.

Every run: linear warm-up over the first 10% of the steps, then cosine decay to 10% of the lr
(GaLore's schedule); gradients clipped to a global norm of --clip (per parameter with
--per-layer, where no global norm exists); weight decay --weight-decay.

Writes, under --out:
  <method>[_lr<lr>].csv  one row per step: step, train_loss, val_loss (at every eval), tokens_per_s
                         (of that step), elapsed (seconds since the run began, evals included);
  summary.json           per method its best run (lowest final held-out loss over the --lr sweep):
                         lr, val_loss, tokens_per_s, peak_bytes, weight_bytes, grad_bytes,
                         optimizer_bytes, params; and the run's settings, data, device and commit;
  loss.png, memory.png   the loss curves of every method; memory per method as stacked bars;
and prints a table at the end. Memory: weight_bytes are the model's parameters and buffers;
grad_bytes the most gradient bytes held at once during a backward (hooks count the .grad
tensors; per-layer mode frees each gradient right after its step); optimizer_bytes the tensors in
the optimizer's state (moments, projectors, counters). peak_bytes: on a GPU
torch.cuda.max_memory_allocated over the run, less what was allocated before it; on a CPU the
growth of the process's peak resident set (VmHWM, reset before each run): allocator caching makes
that figure rough. tokens_per_s is batch·seq over the median time of a training step, the first
step (compilation, first-call allocations) and the evals left out: the median, because a shared
machine's other work lands on a few steps. On the CPU torch uses one thread unless --threads says
otherwise (as the kernel benchmarks do): more threads than free cores run many times slower.

``--backend triton`` on CPU tensors runs the Triton kernels under the Triton interpreter, which
must be on before triton is imported: from the command line the script restarts itself with
TRITON_INTERPRET=1; called as ``main([...])`` it raises an error saying so. ``--compare DIR``
prints, per method, how far this run's curves are from another run's summary (fidelity of a
backend, seed-to-seed noise).

The modules: ``data`` (the corpus, batches, held-out loss), ``methods`` (the model's shapes, each
method's layers and optimizer, the schedule), ``memory`` (the byte counts), ``train`` (one run,
every run), ``report`` (CSVs, summary.json, plots, table, comparison) and ``cli`` (the options and
``main``); their public names are importable from ``lowrank_kernels.pretrain`` itself.
"""

from lowrank_kernels.pretrain.cli import main, parser, resolve_args
from lowrank_kernels.pretrain.data import (
    EVAL_SEED,
    HELD_OUT,
    VOCAB,
    held_out_loss,
    lm_loss,
    random_batch,
    stdlib_corpus,
)
from lowrank_kernels.pretrain.memory import GradCounter, PeakMemory, optimizer_bytes, tensor_bytes, weight_bytes
from lowrank_kernels.pretrain.methods import (
    DEFAULT_LR,
    METHODS,
    PEERS,
    SIZES,
    TARGETS,
    build_model,
    convert_layers,
    decoder_matrices,
    equal_param_ranks,
    lr_lambda,
    make_optimizer,
    projected_groups,
)
from lowrank_kernels.pretrain.report import (
    CURVE_COLUMNS,
    compare,
    device_name,
    plot,
    read_curve,
    source_commit,
    summarize,
    table,
    write_curve,
)
from lowrank_kernels.pretrain.train import run_name, train_methods, train_one, warm_up

__all__ = [
    "CURVE_COLUMNS", "DEFAULT_LR", "EVAL_SEED", "HELD_OUT", "METHODS", "PEERS", "SIZES", "TARGETS", "VOCAB",
    "GradCounter", "PeakMemory", "build_model", "compare", "convert_layers", "decoder_matrices", "device_name",
    "equal_param_ranks", "held_out_loss", "lm_loss", "lr_lambda", "main", "make_optimizer", "optimizer_bytes",
    "parser", "plot", "projected_groups", "random_batch", "read_curve", "resolve_args", "run_name", "source_commit",
    "stdlib_corpus", "summarize", "table", "tensor_bytes", "train_methods", "train_one", "warm_up", "weight_bytes",
    "write_curve",
]
