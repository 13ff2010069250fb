"""lowrank_kernels.warmup: a step's Triton launches recorded, compiled in parallel for sm_90a with
the GPU compiler (no GPU needed) into Triton's cache, found there by a second warmup.

The test suite runs under the Triton interpreter, whose kernels cannot be compiled for a GPU, so
the warmups run in one subprocess without it (its own Triton cache in a temporary folder, one
autotune candidate per kernel: a couple of compiles)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import lowrank_kernels as lk

SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    import lowrank_kernels as lk
    from lowrank_kernels.warmup import Recorder, compile_job, cubin_resources, gpu_target

    torch.manual_seed(0)
    out = {}
    model = torch.nn.Sequential(lk.LowRankLinear(64, 48, rank=8, method="lora", bias=False))
    x = torch.randn(32, 64)
    before = [p.detach().clone() for p in model.parameters()]
    os.environ["LOWRANK_KERNELS_AUTOTUNE"] = "0"  # one candidate per kernel: a couple of compiles
    first = lk.warmup(model, x, target=90, processes=2)
    second = lk.warmup(model, x, target=90, processes=2)
    plain = lk.warmup(torch.nn.Sequential(torch.nn.Linear(8, 8)), torch.randn(2, 8), target=90)
    for name, r in (("first", first), ("second", second), ("plain", plain)):
        out[name] = dict(jobs=r.jobs, kernels=r.kernels, cached=r.cached, compiled=r.compiled, errors=r.errors,
                         text=str(r))
    out["unchanged"] = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    out["grads"] = [p.grad is None for p in model.parameters()]

    # sparse_lowrank_linear with no sparse part, bf16: lowrank_gemm's tail-only product (K = 0)
    # over a zero-width slice of B with a stride of 8, at every tile the autotuner could time
    del os.environ["LOWRANK_KERNELS_AUTOTUNE"]
    rec = Recorder(90)
    with rec.active():
        xb = torch.randn(64, 128, dtype=torch.bfloat16)
        a, b = torch.randn(8, 128, dtype=torch.bfloat16), torch.randn(96, 8, dtype=torch.bfloat16)
        lk.sparse_lowrank_linear(xb, a, b, scaling=2.0, backend="triton")
    gemm = [j for j in rec.jobs.values() if j.name == "lowrank_gemm_kernel"]
    out["tail_only"] = [[j.config_text(), cubin_resources(compile_job(j, gpu_target(90)).asm["cubin"])[1]]
                        for j in gemm]
    json.dump(out, sys.stdout)
""")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LOWRANK_KERNELS_BACKEND")}
    env.update(TRITON_CACHE_DIR=str(tmp_path_factory.mktemp("triton-cache")), TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_records_and_compiles_the_steps_kernels(results):
    first = results["first"]
    assert first["jobs"] > 0 and first["kernels"] > 0
    assert first["compiled"] == first["jobs"] and first["cached"] == 0, first
    assert first["errors"] == []
    assert "sm_90a" in first["text"]


def test_second_warmup_finds_everything_cached(results):
    second = results["second"]
    assert second["jobs"] == results["first"]["jobs"]
    assert second["cached"] == second["jobs"] and second["compiled"] == 0, second


def test_no_fused_layer_no_job(results):
    assert results["plain"]["jobs"] == 0 and results["plain"]["compiled"] == 0
    assert results["plain"]["text"] == "warmup: no Triton kernel to compile"


def test_recording_changes_nothing(results):
    assert results["unchanged"]
    assert all(results["grads"])  # no gradient left behind


def test_tail_only_gemm_keeps_tiles_that_do_not_spill(results):
    # The tile of 64x128 on 4 warps spilled 112 B a thread on sm_90a here (its dead base loop
    # reads an unaligned W with scalar loads): the pruning keeps only tiles that fit.
    tiles = results["tail_only"]
    assert tiles, "no lowrank_gemm launch recorded"
    assert all(spill == 0 for _, spill in tiles), tiles
    assert not any("BLOCK_M=64,BLOCK_N=128,BLOCK_K=64,GROUP_M=8,warps=4" in cfg for cfg, _ in tiles), tiles


def test_bad_arguments():
    with pytest.raises(TypeError, match="^model"):
        lk.warmup("not a model", torch.randn(2, 2))
    with pytest.raises(ValueError, match="^processes"):
        lk.warmup(torch.nn.Linear(2, 2), torch.randn(2, 2), processes=0)
    with pytest.raises(ValueError, match="^target"):
        lk.warmup(torch.nn.Linear(2, 2), torch.randn(2, 2), target="sm90")


def test_interpreter_has_nothing_to_compile():
    # This suite runs under the interpreter: a warmup there compiles nothing.
    report = lk.warmup(torch.nn.Sequential(lk.LowRankLinear(16, 8, rank=2)), torch.randn(4, 16))
    assert report.jobs == 0 and str(report) == "warmup: no Triton kernel to compile"
