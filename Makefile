# `make test`: the test suite (CPU: reference + Triton interpreter; GPU: everything).
# `make bench`: the benchmarks (GPU shapes on a GPU, small CPU shapes otherwise).
# Both set up what they need on a fresh machine (see .ci/env.sh).
SHELL := /bin/bash

.PHONY: test bench cuda-check clean

test:
	@PY=$$(bash .ci/env.sh) && $$PY -m pytest tests -q -ra $(PYTEST_ARGS)

bench:
	@PY=$$(bash .ci/env.sh) && $$PY benchmarks/run_all.py $(BENCH_ARGS)

# Compile csrc/ with nvcc against a CUDA build of torch, without a GPU (CI's compile check).
cuda-check:
	@bash .ci/build_cuda.sh

clean:
	rm -rf build *.egg-info lowrank_kernels/_C*.so .pytest_cache
