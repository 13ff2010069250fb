"""``backend="auto"``, the default on CUDA tensors: time the backends that can run a call, keep the
fastest.

Fused kernels are not always faster than the unfused composition of cuBLAS calls that PEFT's
layers amount to (the reference path run on CUDA tensors), least of all in backward. So on the
first call of each (op, call key, device) the op's candidates (``backend.candidates``: the
reference, Triton, and CUDA where built and implemented for the op) run on that call's shapes, are
timed with CUDA events (``timer``), and the fastest is kept, in memory and on disk. Every later
call with that key runs the kept backend straight away. All candidates compute the same math with
the same dropout masks (one counter-based RNG), so which one runs does not change training.

What is timed is what the training step runs:

- layer ops (``lora_linear``, ...) with gradients on: forward and backward of the op's autograd
  Function, called with detached aliases of the caller's tensors as fresh leaves (no copies) and
  ``torch.autograd.grad`` (nothing lands in ``.grad``; the caller's graph is not touched); under
  no_grad the forward alone;
- in-place optimizer steps (``projected_adamw_steps``, ``adamw_steps``, ``apollo_steps``): on
  scratch copies of every tensor argument, never the caller's weights, moments or step counts.

Timing runs inside ``torch.random.fork_rng``, so a ``seed=None`` call draws the same dropout seed
as it would without auto. It never runs while ``torch.compile`` traces, a CUDA graph is being
captured, launches are planned for another GPU (``backend.planning_for``) or inside
``suspended()``: the choice cached by an earlier eager call (or on disk) is used there, else the
op's default (``backend.CUDA_DEFAULTS``).

The call key: the op; per tensor argument its shape and dtype, the batch rows of the ``rows``
arguments (x: all leading dims flattened) rounded up to a power of two, every other dim exact;
whether gradients are needed and the autocast dtype; floats as zero or not (dropout on or off,
weight decay on or off), bools and strings as given, ints only where they set the work (``exact``).

The disk cache: one JSON file per GPU and versions (GPU name and compute capability, this
package's, torch's and Triton's versions, like Triton's own autotune cache), in
``$LOWRANK_KERNELS_CACHE_DIR`` (default ``~/.cache/lowrank_kernels``; empty: memory only), written
atomically; a file from other versions is ignored, a corrupted one too, with a warning.

Environment: ``LOWRANK_KERNELS_BACKEND`` forces one backend for every op (``auto`` keeps this
mode); ``LOWRANK_KERNELS_AUTO_BACKEND=0`` turns timing off: CUDA tensors then run ``CUDA_DEFAULTS``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import logging
import math
import os
import statistics
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from lowrank_kernels import _version
from lowrank_kernels import backend as _backend

AUTO_ENV = "LOWRANK_KERNELS_AUTO_BACKEND"
CACHE_ENV = "LOWRANK_KERNELS_CACHE_DIR"
CACHE_FORMAT = 1

log = logging.getLogger(__name__)


def enabled() -> bool:
    """Whether auto mode times candidates (``LOWRANK_KERNELS_AUTO_BACKEND`` unset or not 0)."""
    return os.environ.get(AUTO_ENV, "1") not in ("", "0")


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------
def cuda_event_timer(run: Callable[[], object], budget_ms: float = 25.0, max_reps: int = 50) -> float:
    """Median milliseconds of ``run()`` on the current CUDA stream, by CUDA events.

    One untimed call first: it compiles the Triton kernels and runs their own autotuning. Then as
    many calls as fit in ``budget_ms`` (3 to ``max_reps``), each between its own pair of events.
    """
    run()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(max_reps)]
    events[0][0].record()
    run()
    events[0][1].record()
    events[0][1].synchronize()
    reps = max(3, min(max_reps, int(budget_ms / max(events[0][0].elapsed_time(events[0][1]), 1e-3))))
    for start, end in events[:reps]:
        start.record()
        run()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events[:reps])


# The function that times a candidate: takes a zero-argument callable, returns milliseconds.
# Replace it (e.g. monkeypatch in tests) to drive the selection with other timings.
timer: Callable[[Callable[[], object]], float] = cuda_event_timer


# ----------------------------------------------------------------------------------------------
# Where a choice is valid: the device and the versions
# ----------------------------------------------------------------------------------------------
# device -> its label; filled in eager mode (compiled code only reads it: no CUDA query to trace).
_LABELS: dict = {}


def device_label(device: torch.device) -> str:
    """The device a timing is valid for: the GPU's name and compute capability (or the device type)."""
    label = _LABELS.get(device)
    if label is None:
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            major, minor = torch.cuda.get_device_capability(index)
            label = f"{torch.cuda.get_device_name(index)} sm{major}{minor}"
        else:
            label = device.type
        _LABELS[device] = label
    return label


def scope(device: torch.device) -> dict:
    """What a cached choice depends on besides the call: the device and the software versions."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"device": device_label(device), "lowrank_kernels": _version.__version__, "torch": torch.__version__,
            "triton": triton_version}


def cache_dir() -> "Path | None":
    """The disk cache's folder, or None where ``LOWRANK_KERNELS_CACHE_DIR`` is set empty (memory only)."""
    configured = os.environ.get(CACHE_ENV)
    if configured is not None:
        return Path(configured).expanduser() if configured else None
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lowrank_kernels"


def cache_file(device: torch.device) -> "Path | None":
    """The JSON file holding the choices made on ``device`` with these versions (None: memory only)."""
    folder = cache_dir()
    if folder is None:
        return None
    where = scope(device)
    digest = hashlib.sha1(json.dumps(where, sort_keys=True).encode()).hexdigest()[:16]
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in where["device"])
    return folder / f"auto-backend-{slug}-{digest}.json"


# ----------------------------------------------------------------------------------------------
# The cache: memory, backed by one file per scope
# ----------------------------------------------------------------------------------------------
# (device label, call key text) -> backend
_CHOICES: dict = {}
# (device label, call key) -> {"op", "backend", "ms"}: what was measured (or read from disk).
_RECORDS: dict = {}
# device labels whose disk file has been read
_LOADED: set = set()
# (op, device, fast key) -> backend: what an op's entry point looks up on every call (see
# _fast_key), and compiled code reads. Bounded: cleared when full, refilled from _CHOICES.
_FAST: dict = {}
_FAST_LIMIT = 1 << 16


def clear_memory() -> None:
    """Forget every choice held in memory (the disk cache stays)."""
    _FAST.clear()
    _CHOICES.clear()
    _RECORDS.clear()
    _LOADED.clear()


def _read(path: Path, where: dict) -> dict:
    """The records of a cache file for ``where``; {} for a missing, stale or corrupted file."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        warnings.warn(f"lowrank_kernels: ignoring the corrupted auto-backend cache {path}: {err}", stacklevel=3)
        return {}
    if not isinstance(data, dict) or not isinstance(data.get("choices"), dict):
        warnings.warn(f"lowrank_kernels: ignoring the auto-backend cache {path}: not a cache file", stacklevel=3)
        return {}
    if data.get("format") != CACHE_FORMAT or data.get("scope") != where:
        log.info("ignoring the auto-backend cache %s: made for %s, this is %s", path, data.get("scope"), where)
        return {}
    return {k: v for k, v in data["choices"].items()
            if isinstance(v, dict) and v.get("backend") in _backend.BACKENDS}


def _load(device: torch.device) -> None:
    label = device_label(device)
    if label in _LOADED:
        return
    _LOADED.add(label)
    path = cache_file(device)
    if path is None:
        return
    for key, record in _read(path, scope(device)).items():
        _RECORDS.setdefault((label, key), record)
        _CHOICES.setdefault((label, key), record["backend"])


def _save(device: torch.device, key: str, record: dict) -> None:
    """Add one record to the device's cache file: read, merge, write to a temporary file, rename
    (another process writing the same file loses nothing but a race's last record)."""
    path = cache_file(device)
    if path is None:
        return
    where = scope(device)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        choices = _read(path, where)
        choices[key] = record
        fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump({"format": CACHE_FORMAT, "scope": where, "choices": choices}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as err:
        warnings.warn(f"lowrank_kernels: could not write the auto-backend cache {path}: {err}", stacklevel=3)


def cached(device: torch.device, key: str) -> "str | None":
    """The backend chosen for ``key`` on ``device`` (from memory, or the disk cache), or None."""
    _load(device)
    return _CHOICES.get((device_label(device), key))


def records(device: "torch.device | None" = None) -> list:
    """Every choice known for ``device`` (all devices: None), as dicts with "device", "key", "op",
    "backend" and "ms" ({candidate: median ms}; empty where only one candidate could run)."""
    if device is not None:
        _load(device)
    label = None if device is None else device_label(device)
    return [dict(device=dev, key=key, **record) for (dev, key), record in sorted(_RECORDS.items())
            if label is None or dev == label]


# ----------------------------------------------------------------------------------------------
# Choosing
# ----------------------------------------------------------------------------------------------
def choose(op: str, key: str, device: torch.device, candidates, workload: Callable[[str], Callable[[], object]]) -> str:
    """The fastest of ``candidates`` (backend names, preferred first) for the call ``key`` on
    ``device``, timed once and cached.

    ``workload(b)`` prepares one candidate (e.g. scratch copies) and returns the zero-argument
    callable that ``timer`` times. A candidate whose preparation or run raises is skipped; ties go
    to the earlier candidate. If every candidate raises: the candidates' common error when they all
    raised the same one (the input is wrong whatever the backend), else a RuntimeError listing them.
    """
    choice = cached(device, key)
    if choice is not None and choice in candidates:
        return choice
    candidates = list(candidates)
    if len(candidates) == 1:
        choice, ms = candidates[0], {}
    else:
        ms, errors = {}, {}
        for b in candidates:
            # The caller's RNG must not move, and saved-tensor hooks of an enclosing activation
            # checkpoint must not see the timing's own graph (only the innermost hooks apply).
            with _isolated(device):
                try:
                    ms[b] = float(timer(workload(b)))
                except Exception as err:  # a candidate that cannot run this call is skipped
                    log.info("%s: backend %r skipped for %s: %s: %s", op, b, key, type(err).__name__, err)
                    errors[b] = err
        if not ms:
            _raise_all_failed(op, key, errors)
        choice = min(ms, key=ms.get)
        log.info("%s: %s -> %s (%s)", op, key, choice, ", ".join(f"{b} {t:.4f} ms" for b, t in ms.items()))
    label = device_label(device)
    record = {"op": op, "backend": choice, "ms": ms}
    _CHOICES[(label, key)] = choice
    _RECORDS[(label, key)] = record
    if ms:
        _save(device, key, record)
    return choice


@contextlib.contextmanager
def _isolated(device: torch.device):
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices, device_type="cuda"), \
            torch.autograd.graph.saved_tensors_hooks(_same, _same):
        yield


def _same(t):
    return t


def _raise_all_failed(op: str, key: str, errors: dict):
    first = next(iter(errors.values()))
    if all(type(e) is type(first) and str(e) == str(first) for e in errors.values()):
        raise first
    listing = "; ".join(f"{b}: {type(e).__name__}: {e}" for b, e in errors.items())
    raise RuntimeError(f"{op}: no backend can run this call ({key}): {listing}") from first


# ----------------------------------------------------------------------------------------------
# The call key
# ----------------------------------------------------------------------------------------------
def bucket(m: int) -> int:
    """Rows rounded up to a power of two (at least 1): one timing serves a range of batch sizes."""
    return 1 << max(int(m) - 1, 0).bit_length()


def _tensor_part(t: Tensor, rows: bool, dtypes: set) -> tuple:
    shape = tuple(t.shape)
    if rows:
        shape = (bucket(math.prod(shape[:-1])), shape[-1]) if len(shape) > 1 else (bucket(shape[0]) if shape else 1,)
    if t.is_floating_point() and t.dim() >= 2:  # the matrices' dtypes decide (float64 step counts do not)
        dtypes.add(t.dtype)
    return ("T", shape, t.dtype, "" if type(t) in (Tensor, torch.nn.Parameter) else type(t).__name__)


def _part(name: str, v, spec: "_Spec", dtypes: set):
    if isinstance(v, Tensor):
        return _tensor_part(v, name in spec.rows, dtypes)
    if isinstance(v, (list, tuple)):
        if v and all(isinstance(t, Tensor) for t in v):
            return ("L", len(v), _tensor_part(v[0], name in spec.rows, dtypes))
        return ("S", tuple(_part(name, e, spec, dtypes) for e in v))
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, float):
        return ("F", v != 0)
    if isinstance(v, int):
        return ("I", v if name in spec.exact else None)
    # an op's own object (e.g. SparseSupport): its type, kind and shape
    return ("O", type(v).__name__, getattr(v, "kind", ""), tuple(getattr(v, "shape", ())))


def call_key(spec: "_Spec", args: tuple, kwargs: dict) -> tuple:
    """(key, floating dtypes of the call's matrices, whether gradients are needed) for one call;
    the key is a tuple (``key_text`` spells it)."""
    dtypes: set = set()
    parts, grad = [], False
    grad_on = torch.is_grad_enabled()
    for i, name in enumerate(spec.names):
        if i == spec.backend_pos:
            continue
        v = args[i] if i < len(args) else kwargs.get(name, spec.defaults.get(name))
        parts.append(None if v is None else _part(name, v, spec, dtypes))
        if grad_on and not grad and v is not None:
            grad = any(t.requires_grad for t in _tensors(v))
    device = _first_device(args, kwargs)
    amp = torch.get_autocast_dtype(device.type) if torch.amp.is_autocast_available(device.type) and \
        torch.is_autocast_enabled(device.type) else None
    return (*parts, grad, amp), dtypes, grad


def key_text(spec: "_Spec", key: tuple) -> str:
    """The key as the cache file and ``python -m lowrank_kernels`` show it, e.g.
    ``x=(8192,4096):bfloat16;weight=(4096,4096):bfloat16;...;grad=1``."""
    names = [n for i, n in enumerate(spec.names) if i != spec.backend_pos]
    text = [f"{n}={_text(p)}" for n, p in zip(names, key) if p is not None]
    text.append(f"grad={int(key[-2])}")
    if key[-1] is not None:
        text.append(f"autocast={_dtype(key[-1])}")
    return ";".join(text)


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _text(part) -> str:
    if not isinstance(part, tuple):
        return repr(part)
    tag = part[0]
    if tag == "T":
        return f"{part[3]}({','.join(map(str, part[1]))}):{_dtype(part[2])}"
    if tag == "L":
        return f"{part[1]}x{_text(part[2])}"
    if tag == "S":
        return "(" + ",".join(map(_text, part[1])) + ")"
    if tag == "F":
        return "f" if part[1] else "0"
    if tag == "I":
        return "i" if part[1] is None else str(part[1])
    return f"{part[1]}:{part[2]}({','.join(map(str, part[3]))})"


def _tensors(v):
    if isinstance(v, Tensor):
        return (v,)
    if isinstance(v, (list, tuple)):
        return tuple(t for t in v if isinstance(t, Tensor))
    return ()


def _first_device(args, kwargs) -> torch.device:
    for v in (*args, *kwargs.values()):
        ts = _tensors(v)
        if ts:
            return ts[0].device
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------------
# The decorator the ops' functional entry points wear
# ----------------------------------------------------------------------------------------------
class _Spec:
    def __init__(self, fn, rows, exact, mutates):
        params = inspect.signature(fn).parameters
        self.names = tuple(params)
        self.defaults = {n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty}
        self.backend_pos = self.names.index("backend")
        self.rows, self.exact, self.mutates = frozenset(rows), frozenset(exact), mutates
        self.exact_pos = frozenset(self.names.index(n) for n in exact)


_SUSPENDED = 0


@contextlib.contextmanager
def suspended():
    """Time nothing inside this block: the ops run the choice already cached for the call, else
    the default. For code that runs the ops with their kernel launches intercepted instead of run
    (recording launches to compile them ahead, as ``warmup`` does), whose timings would be wrong."""
    global _SUSPENDED
    _SUSPENDED += 1
    try:
        yield
    finally:
        _SUSPENDED -= 1


def tunes(device: torch.device) -> bool:
    """Whether auto mode times backends for tensors on ``device`` (CUDA only: elsewhere the reference
    runs, and the Triton interpreter is no performance path)."""
    return device.type == "cuda"


def tuned(op: str, rows=("x",), exact=(), mutates: bool = False):
    """Make ``backend=None`` / ``"auto"`` of an op's functional entry point pick the fastest backend
    on CUDA tensors (see the module docstring). ``rows``: the arguments whose leading dims are the
    batch rows (bucketed in the key); ``exact``: int arguments that set the work (kept in the key);
    ``mutates``: the op updates its tensors in place (timed on scratch copies)."""

    def wrap(fn):
        spec = _Spec(fn, rows, exact, mutates)

        @functools.wraps(fn)
        def auto(*args, **kwargs):
            given = args[spec.backend_pos] if len(args) > spec.backend_pos else kwargs.get("backend")
            if given not in (None, "auto") or (os.environ.get(_backend.ENV_VAR) or "auto") != "auto" or not enabled():
                return fn(*args, **kwargs)
            device = _first_device(args, kwargs)
            if not tunes(device):
                return fn(*args, **kwargs)
            choice = _choice(op, spec, fn, device, args, kwargs)
            if choice is None:
                return fn(*args, **kwargs)
            if len(args) > spec.backend_pos:
                args = args[:spec.backend_pos] + (choice,) + args[spec.backend_pos + 1:]
            else:
                kwargs = {**kwargs, "backend": choice}
            return fn(*args, **kwargs)

        return auto

    return wrap


def _choice(op, spec, fn, device, args, kwargs) -> "str | None":
    """The backend for this call, or None for the op's default (not timed yet where no timing can
    run, or a shape that torch.compile traces symbolically)."""
    compiling = torch.compiler.is_compiling()
    if compiling and any(type(d) is not int for v in (*args, *kwargs.values()) for t in _tensors(v) for d in t.shape):
        return None
    fast = (op, device, _fast_key(spec, device, args, kwargs))
    choice = _FAST.get(fast)
    if (choice is not None or compiling or _SUSPENDED or _backend.planning()
            or (device.type == "cuda" and torch.cuda.is_current_stream_capturing())):
        # no timing inside a traced region, a graph capture, or while launches are intercepted:
        # an earlier eager call's choice
        return choice
    key, dtypes, grad = call_key(spec, args, kwargs)
    choice = choose(op, key_text(spec, key), device, _backend.candidates(op, device, dtypes),
                    functools.partial(_workload, fn, spec, args, kwargs, grad))
    if len(_FAST) >= _FAST_LIMIT:
        _FAST.clear()
    _FAST[fast] = choice
    return choice


def _fast_key(spec: "_Spec", device: torch.device, args: tuple, kwargs: dict) -> tuple:
    """A key finer than ``call_key`` (exact shapes, each tensor's requires_grad, positional and
    keyword arguments apart) and cheap to build: equal fast keys have equal call keys, so the
    per-call lookup needs no bucketing or text."""
    key = [torch.is_grad_enabled(), torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type)]
    for i, v in enumerate(args):
        key.append(_fast_part(v, i in spec.exact_pos))
    for name, v in kwargs.items():
        key.append(name)
        key.append(_fast_part(v, name in spec.exact))
    return tuple(key)


def _fast_part(v, exact: bool):
    if isinstance(v, Tensor):
        return v.shape, v.dtype, v.requires_grad
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, float):
        return "f", v == 0
    if isinstance(v, int):
        return "i", v if exact else None
    if isinstance(v, (list, tuple)):
        return tuple(_fast_part(e, exact) for e in v)
    return type(v), getattr(v, "kind", None), getattr(v, "shape", None)


def _workload(fn, spec: _Spec, args: tuple, kwargs: dict, grad: bool, b: str) -> Callable[[], object]:
    """One candidate's run of this call: on scratch copies for an in-place op; otherwise forward
    (and, when gradients are needed, backward through autograd.grad) on detached aliases."""
    leaves: list = []

    def scratch(v):
        if isinstance(v, Tensor):
            if spec.mutates:
                return v.detach().clone()
            if grad and v.requires_grad:
                leaves.append(v.detach().requires_grad_(True))
                return leaves[-1]
            return v
        if isinstance(v, (list, tuple)) and not hasattr(v, "_fields"):
            return type(v)(scratch(e) for e in v)
        return v

    args = tuple(scratch(v) for v in args)
    kwargs = {k: scratch(v) for k, v in kwargs.items()}
    if len(args) > spec.backend_pos:
        args = args[:spec.backend_pos] + (b,) + args[spec.backend_pos + 1:]
    else:
        kwargs["backend"] = b
    dy: list = []

    def run():
        out = fn(*args, **kwargs)
        if leaves:
            if not dy:
                dy.append(torch.ones_like(out))
            torch.autograd.grad(out, leaves, dy[0], allow_unused=True)

    return run


def _info(gpu_device: "torch.device | None") -> dict:
    """backend.info()'s "auto" entry."""
    cache = cache_dir()
    return {"enabled": enabled(), "cache_dir": None if cache is None else str(cache),
            "candidates": {op: list(_backend.candidates(op, gpu_device)) for op in _backend.ops()}
            if gpu_device is not None else None,
            "choices": records(gpu_device) if gpu_device is not None else []}


_backend.add_info_section("auto", _info)
