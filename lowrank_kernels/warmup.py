"""Compile a model's Triton kernels before its first step, in parallel.

A first training step compiles every kernel variant its model launches (and every autotune
candidate of each), one after another, as the launches come. ``warmup(model, example_inputs)``
runs one forward and backward (and an optimizer step, if given) with the Triton launches
intercepted instead of run, so that it knows them all at once, then compiles them in a process
pool into Triton's on-disk cache under the key the real launches look up (the same options, the
same ``TRITON_DEFAULT_FP_FUSION``): the first real step finds them there.

The same machinery is the compile check's (``make gpu-check``): :class:`Recorder` records launches,
:class:`Job` is one compile (kernel, signature, constexprs, attributes, options) and can be written
as plain data for another Triton version to compile, :func:`compile_job` / :func:`front_end`
compile it.

Usage::

    report = lowrank_kernels.warmup(model, (input_ids,), optimizer=opt)
    print(report)   # jobs, already cached, compiled, compile seconds serial vs wall

On a GPU the kernels are compiled for the current device. Without one, ``target=90`` (or 80)
compiles for sm_90a (sm_80) with the GPU compiler, as if the model ran there: that measures the
compile cost, it does not speed up anything on the CPU. Under the Triton interpreter there is
nothing to compile and the report is empty.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import multiprocessing as mp
import os
import re
import subprocess
import tempfile
import time

import torch

from lowrank_kernels import auto_backend
from lowrank_kernels import backend as _backend

__all__ = ["warmup", "WarmupReport", "Job", "Recorder", "compile_job", "front_end", "cubin_resources"]


def _triton():
    import triton
    from triton.backends.compiler import GPUTarget

    return triton, GPUTarget


def gpu_target(arch: "int | None" = None):
    """Triton's target for compute capability ``arch`` (90 = sm_90a), or the current device's."""
    triton, GPUTarget = _triton()
    if arch is None:
        return triton.runtime.driver.active.get_current_target()
    return GPUTarget("cuda", arch, 32)


# ----------------------------------------------------------------------------------------------
# A compile job
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Job:
    """One kernel compile: what Triton's launcher would hand to ``triton.compile``.

    ``options`` holds the backend options that differ from the backend's defaults (num_warps,
    num_stages, ...): parsed again they give the launch's options, hence its cache key.
    """

    kernel: object  # triton JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    scenarios: set = dataclasses.field(default_factory=set)
    variants: int = 1

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    @property
    def num_warps(self) -> int:
        return self.options.get("num_warps", 4)

    @property
    def num_stages(self) -> int:
        return self.options.get("num_stages", 3)

    def key(self):
        return (self.kernel, tuple(self.signature.items()), repr(sorted(self.constexprs.items())),
                repr(sorted(self.attrs.items())), repr(sorted(self.options.items())))

    def sig_text(self, with_tiles: bool = True) -> str:
        # ":16" marks what Triton's binder found divisible by 16 (pointers, integers)
        types = ",".join(v + (":16" if ["tt.divisibility", 16] in self.attrs.get((i,), []) else "")
                         for i, v in enumerate(self.signature.values()) if v != "constexpr")
        names = [(self.kernel.arg_names[p[0]], v) for p, v in sorted(self.constexprs.items())]
        consts = ",".join(f"{n}={_show(v)}" for n, v in names
                          if n.isupper() and (with_tiles or not n.startswith(("BLOCK", "GROUP"))))
        return f"{types} | {consts}"

    def config_text(self) -> str:
        blocks = ",".join(f"{self.kernel.arg_names[p[0]]}={v}" for p, v in sorted(self.constexprs.items())
                          if self.kernel.arg_names[p[0]].startswith(("BLOCK", "GROUP")))
        return f"{blocks},warps={self.num_warps},stages={self.num_stages}"

    def source(self):
        from triton.compiler import ASTSource

        return ASTSource(fn=self.kernel, signature=self.signature, constexprs=self.constexprs, attrs=self.attrs)

    def spec(self) -> dict:
        """The job as JSON-able data (kernel named by module and name), for another process, or
        another Triton version, to rebuild with :meth:`from_spec`."""
        return dict(module=self.kernel.fn.__module__, kernel=self.kernel.fn.__qualname__,
                    signature=self.signature,
                    constexprs=[[list(k), _encode(v)] for k, v in self.constexprs.items()],
                    attrs=[[list(k), v] for k, v in self.attrs.items()], options=self.options,
                    scenarios=sorted(self.scenarios), variants=self.variants)

    @classmethod
    def from_spec(cls, spec: dict) -> "Job":
        kernel = importlib.import_module(spec["module"])
        for part in spec["kernel"].split("."):
            kernel = getattr(kernel, part)
        from triton.runtime.jit import JITFunction

        while not isinstance(kernel, JITFunction):  # the JITFunction inside an Autotuner
            kernel = kernel.fn
        return cls(kernel, dict(spec["signature"]), {tuple(k): _decode(v) for k, v in spec["constexprs"]},
                   {tuple(k): v for k, v in spec["attrs"]}, dict(spec["options"]), set(spec["scenarios"]),
                   spec["variants"])


def _show(v) -> str:
    return str(v).replace("triton.language.", "")


def _encode(v):
    if type(v).__name__ == "dtype":  # triton.language.dtype: by name, rebuilt by this Triton
        return {"dtype": str(v)}
    return v


def _decode(v):
    if isinstance(v, dict):
        import triton.language as tl

        return tl.dtype(v["dtype"])
    return v


# ----------------------------------------------------------------------------------------------
# Recording launches
# ----------------------------------------------------------------------------------------------
class Recorder:
    """Intercepts ``JITFunction.run`` / ``Autotuner.run`` while the package's ops run: each launch
    is recorded as the :class:`Job` Triton would compile for it (every autotune candidate the
    autotuner could time, after the package's pruning), and nothing runs.

    ``arch`` None records for the current GPU; an int plans for that GPU on CPU tensors
    (``backend.planning_for``), as if the ops ran there."""

    def __init__(self, arch: "int | None" = None):
        from triton.compiler import make_backend

        self.arch = arch
        self.target = gpu_target(arch)
        self.backend = make_backend(self.target)
        self.defaults = self.backend.parse_options({}).__dict__
        self.binders: dict = {}
        self.jobs: dict = {}
        self.scenario = ""

    def record(self, jit, args, kwargs):
        from triton import knobs
        from triton.runtime.jit import create_function_from_signature

        # What JITFunction.run adds to the launch's options before parsing them.
        kwargs["debug"] = kwargs.get("debug", jit.debug) or knobs.runtime.debug
        for knob in ("instrumentation_mode", "fpsan_homomorphic_casts"):
            if knob in self.defaults and hasattr(knobs.compilation, knob):
                kwargs[knob] = getattr(knobs.compilation, knob)
        binder = self.binders.get(jit)
        if binder is None:
            binder = self.binders[jit] = create_function_from_signature(jit.signature, jit.params, self.backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = jit._pack_args(self.backend, kwargs, bound, specialization, options)
        options = {k: v for k, v in options.__dict__.items() if v != self.defaults.get(k)}
        job = Job(jit, signature, constexprs, attrs, options)
        job = self.jobs.setdefault(job.key(), job)
        job.scenarios.add(self.scenario)

    @contextlib.contextmanager
    def active(self):
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction

        recorder = self

        def jit_run(self, *args, grid, warmup, **kwargs):
            recorder.record(self, args, kwargs)

        def tuner_run(self, *args, **kwargs):
            kwargs.pop("grid", None)
            kwargs.pop("warmup", None)
            self.nargs = dict(zip(self.arg_names, args))
            for config in self.prune_configs(kwargs):
                self.fn.run(*args, grid=None, warmup=True, **kwargs, **config.all_kwargs())
            self.nargs = None

        saved = JITFunction.run, Autotuner.run
        JITFunction.run, Autotuner.run = jit_run, tuner_run
        try:
            # backend="auto" must not time launches that do not run
            with (_backend.planning_for(self.arch) if self.arch is not None else contextlib.nullcontext()), \
                    auto_backend.suspended():
                yield self
        finally:
            JITFunction.run, Autotuner.run = saved


# ----------------------------------------------------------------------------------------------
# Compiling
# ----------------------------------------------------------------------------------------------
def compile_job(job: Job, target):
    """``triton.compile`` of ``job`` for ``target`` (a GPUTarget): ttgir, PTX and cubin, written to
    Triton's cache under the key a launch with the job's options looks up."""
    triton, _ = _triton()
    return triton.compile(job.source(), target=target, options=job.options)


def front_end(job: Job, target) -> str:
    """The job's ttgir (Triton's front end: Python AST -> ttir -> ttgir), without PTX or cubin."""
    from triton._C.libtriton import ir
    from triton.compiler import make_backend

    src = job.source()
    backend = make_backend(target)
    options = backend.parse_options(dict(job.options, **src.parse_options()))
    stages: dict = {}
    backend.add_stages(stages, options, src.language)
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = src.make_ir(target, options, backend.get_codegen_implementation(options), backend.get_module_map(),
                         context)
    metadata = {"hash": "front-end", "target": target, **options.__dict__}
    for stage in ("ttir", "ttgir"):
        module = stages[stage](module, metadata)
    return str(module)


def is_cached(job: Job, target) -> bool:
    """Whether Triton's cache already holds ``job`` compiled for ``target``."""
    import hashlib

    from triton.compiler import make_backend
    from triton.compiler.compiler import get_cache_invalidating_env_vars
    from triton.runtime.cache import get_cache_key, get_cache_manager

    src = job.source()
    backend = make_backend(target)
    options = backend.parse_options(dict(job.options, **src.parse_options()))
    key = get_cache_key(src, backend, options, env_vars=get_cache_invalidating_env_vars())
    manager = get_cache_manager(hashlib.sha256(key.encode("utf-8")).hexdigest())
    name = f"{src.name[:150]}.json"
    return (manager.get_group(name) or {}).get(name) is not None


def cubin_resources(cubin: bytes) -> "tuple[int, int]":
    """(registers, local bytes per thread: spills and stack) of a cubin's kernel, from the
    ``cuobjdump -res-usage`` shipped with Triton."""
    triton, _ = _triton()
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", text).group(1))
    local = int(re.search(r"LOCAL:(\d+)", text).group(1))
    stack = int(re.search(r"STACK:(\d+)", text).group(1))
    return regs, max(local, stack)


# Jobs of the pool being run: forked workers read them by index (JITFunctions do not pickle).
_POOL_JOBS: list = []


def _compile_indexed(args):
    index, target = args
    t0 = time.perf_counter()
    try:
        compile_job(_POOL_JOBS[index], target)
        error = None
    except Exception as e:  # noqa: BLE001 - reported per job; the real launch raises it again
        lines = str(e).strip().splitlines()
        error = type(e).__name__ + (": " + lines[-1] if lines else "")
    return index, time.perf_counter() - t0, error


def compile_parallel(jobs: list, target, processes: int):
    """Compile ``jobs`` for ``target`` in ``processes`` forked workers (in this process for 1):
    [(index, seconds, error or None)] in completion order."""
    _POOL_JOBS[:] = jobs
    try:
        tasks = [(i, target) for i in range(len(jobs))]
        if processes <= 1 or len(jobs) <= 1:
            return [_compile_indexed(t) for t in tasks]
        with mp.get_context("fork").Pool(min(processes, len(jobs))) as pool:
            return list(pool.imap_unordered(_compile_indexed, tasks))
    finally:
        _POOL_JOBS.clear()


# ----------------------------------------------------------------------------------------------
# warmup
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class WarmupReport:
    """What :func:`warmup` did. ``compile_seconds`` is the sum of the compiles' own times (what a
    first step spends compiling them one after another); ``wall_seconds`` the compile phase's
    wall time on ``processes`` workers; ``saved_seconds`` the difference."""

    target: str = ""
    jobs: int = 0
    kernels: int = 0
    cached: int = 0
    compiled: int = 0
    errors: list = dataclasses.field(default_factory=list)
    record_seconds: float = 0.0
    compile_seconds: float = 0.0
    wall_seconds: float = 0.0
    processes: int = 0

    @property
    def saved_seconds(self) -> float:
        return max(0.0, self.compile_seconds - self.wall_seconds)

    def __str__(self) -> str:
        if not self.jobs:
            return "warmup: no Triton kernel to compile"
        text = (f"warmup ({self.target}): {self.jobs} compiles of {self.kernels} kernels, "
                f"{self.cached} already cached, {self.compiled} compiled on {self.processes} processes "
                f"in {self.wall_seconds:.1f} s "
                f"({self.compile_seconds:.1f} s one after another: {self.saved_seconds:.1f} s saved); "
                f"recorded in {self.record_seconds:.1f} s")
        if self.errors:
            text += f"; {len(self.errors)} failed to compile: " + "; ".join(self.errors[:3])
        return text


def _default_loss(output) -> torch.Tensor:
    leaves = [t for t in torch.utils._pytree.tree_leaves(output)
              if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]
    if not leaves:
        raise ValueError("warmup: the model's output has no floating-point tensor that requires grad; "
                         "pass loss_fn, or call warmup on a model with trainable parameters")
    return sum(t.float().sum() for t in leaves)


@contextlib.contextmanager
def _untouched(model: torch.nn.Module, optimizer):
    """Restores the parameters, buffers, gradients, optimizer state and RNG a recording run
    changed (the intercepted kernels leave whatever memory held in their outputs)."""
    tensors = list(model.parameters()) + list(model.buffers())
    values = [t.detach().clone() for t in tensors]
    grads = [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]
    opt_state = copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            with torch.no_grad():
                for t, v in zip(tensors, values):
                    t.copy_(v)
            for p, g in zip(model.parameters(), grads):
                p.grad = g
            if optimizer is not None:
                optimizer.load_state_dict(opt_state)


def warmup(model: torch.nn.Module, example_inputs, *, optimizer=None, loss_fn=None, target: "int | None" = None,
           processes: "int | None" = None) -> WarmupReport:
    """Compile every Triton kernel a training step of ``model`` launches, in parallel, before the
    first step.

    Args:
        model: the model, on the device it will train on (its layers' backends as they will run).
        example_inputs: a batch as the model takes it: a tensor, a tuple of positional arguments,
            or a dict of keyword arguments (the shapes that select the kernels: use a real batch).
        optimizer: also record its step (GaLore/Fira/Apollo's fused steps).
        loss_fn: ``loss_fn(output) -> scalar``; default: the sum of the output's tensors.
        target: compute capability to compile for (90 = sm_90a, 80 = sm_80) with the model on the
            CPU, to measure compile cost without a GPU; default: the current GPU.
        processes: compile workers (default: every core).

    The recording step changes nothing: parameters, buffers, gradients, the optimizer's state and
    the RNG are restored. Returns a :class:`WarmupReport`; a kernel that fails to compile is
    listed in ``errors`` (the real launch raises the error).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if processes is not None and (not isinstance(processes, int) or processes < 1):
        raise ValueError(f"processes must be a positive int, got {processes!r}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if target is not None and (not isinstance(target, int) or isinstance(target, bool) or target < 70):
        raise ValueError(f"target must be a CUDA compute capability such as 80 or 90, got {target!r}")
    report = WarmupReport()
    if not _backend.triton_available() or _backend.interpreter_enabled():
        return report
    if target is None and not torch.cuda.is_available():
        return report
    t0 = time.perf_counter()
    tgt = gpu_target(target)
    report.target = f"{tgt.backend} sm_{tgt.arch}{'a' if tgt.arch == 90 else ''}"
    recorder = Recorder(target)
    if isinstance(example_inputs, dict):
        args, kwargs = (), example_inputs
    else:
        args, kwargs = (example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)), {}
    # Planned on the CPU, the ops take the kernels they would take on the GPU.
    env = {_backend.ENV_VAR: "triton"} if target is not None and not os.environ.get(_backend.ENV_VAR) else {}
    with _untouched(model, optimizer), _environ(env), recorder.active():
        loss = (loss_fn or _default_loss)(model(*args, **kwargs))
        loss.backward()
        if optimizer is not None:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.nan_to_num_(0.0, 0.0, 0.0)  # the kernels did not run: their outputs hold old memory
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    jobs = list(recorder.jobs.values())
    report.jobs, report.kernels = len(jobs), len({j.name for j in jobs})
    report.record_seconds = time.perf_counter() - t0
    todo = [j for j in jobs if not is_cached(j, tgt)]
    report.cached = len(jobs) - len(todo)
    report.processes = processes or os.cpu_count() or 1
    t1 = time.perf_counter()
    for index, seconds, error in compile_parallel(todo, tgt, report.processes):
        report.compile_seconds += seconds
        if error is None:
            report.compiled += 1
        else:
            report.errors.append(f"{todo[index].name}: {error}")
    report.wall_seconds = time.perf_counter() - t1
    return report


@contextlib.contextmanager
def _environ(values: dict):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
