# `make test`: the test suite (CPU: reference + Triton interpreter; GPU: everything).
# `make bench`: the pretraining run (every method on a tiny LLaMA, benchmarks/results/<gpu>/pretrain/),
#   then the kernel benchmarks (GPU shapes on a GPU, small CPU shapes otherwise).
# Both set up what they need on a fresh machine (see .ci/env.sh).
SHELL := /bin/bash

.PHONY: lint test test-quick bench bench-smoke gpu-rehearse cuda-check sass-check gpu-check peft-suite clean

# ruff.toml's rules (pyflakes, pycodestyle errors and warnings, import order) on the whole repository.
lint:
	@PY=$$(bash .ci/env.sh) && $$PY -m ruff check .

test:
	@PY=$$(bash .ci/env.sh) && $$PY -m pytest tests -q -ra $(PYTEST_ARGS)

# The tests not marked slow (distributed, pretraining, CUDA emulation, ...): minutes on 2 CPU cores.
test-quick:
	@PY=$$(bash .ci/env.sh) && $$PY -m pytest tests -q -ra -m "not slow" $(PYTEST_ARGS)

bench:
	@PY=$$(bash .ci/env.sh) && $$PY benchmarks/run_all.py $(BENCH_ARGS)

# `make bench` on tiny settings (the same stages: pretraining run, every benchmark, plots; minutes on
# a CPU) into a temporary folder, then a check that every stage wrote its files in the documented
# format; the committed results stay untouched. CI runs it.
bench-smoke:
	@PY=$$(bash .ci/env.sh) && $$PY benchmarks/run_all.py --smoke $(BENCH_ARGS)

# benchmarks/gpu_suite.sh (the one call on a lent GPU) rehearsed on the CPU: every stage on tiny
# shapes within its limit, CSVs in the documented format, the archive as the summary names it. CI runs it.
gpu-rehearse:
	@PY=$$(bash .ci/env.sh) && PYTHON=$$PY bash benchmarks/gpu_suite.sh --rehearse $${GPU_REHEARSE_OUT:-build/gpu-rehearse}

# Compile csrc/ with nvcc against a CUDA build of torch, without a GPU (CI's compile check).
cuda-check:
	@bash .ci/build_cuda.sh

# Disassemble the objects `make cuda-check` left in build/cuda-check/temp for sm_90a: fail where a
# kernel computing a 16-bit product has no HMMA/HGMMA, or has a stack frame (spills). Table in
# benchmarks/results/compile/cuda_sass.csv.
sass-check:
	@PY=$$(bash .ci/env.sh) && $$PY .ci/sass_check.py $(SASS_CHECK_ARGS)

# The GPU build proven without a GPU: every Triton kernel the ops can launch compiled for sm_90a
# and sm_80 at every autotune config they can pick (fails on compile errors, shared memory over
# the limit, spills, 16-bit dots off tensor cores), with the installed Triton and with the oldest
# supported one (pyproject.toml's lower bound, installed once under build/: every job through its
# front end, a fixed sample in full), then, where nvcc exists, csrc/ built and its SASS checked.
# Tables in benchmarks/results/compile/.
gpu-check:
	@PY=$$(bash .ci/env.sh) && $$PY .ci/gpu_check.py $(GPU_CHECK_ARGS)
	@if command -v nvcc >/dev/null 2>&1; then $(MAKE) --no-print-directory cuda-check sass-check; \
	else echo "gpu-check: nvcc not on PATH, CUDA build and SASS check skipped"; fi

# PEFT's own LoRA/DoRA/VeRA/RandLoRA tests through from_peft (offline, CPU): the fixed subset of
# tests/peft_suite/subset.txt by default (CI), PEFT_SUITE_ARGS="--selection full" for all of them
# run plain and through from_peft, "--backend triton" for the Triton kernels. Fails on a test that
# passes with plain PEFT and fails through from_peft. Report in build/peft_suite/.
peft-suite:
	@PY=$$(bash .ci/env.sh) && $$PY tests/peft_suite/run_peft_suite.py $(PEFT_SUITE_ARGS)

clean:
	rm -rf build *.egg-info lowrank_kernels/_C*.so .pytest_cache
