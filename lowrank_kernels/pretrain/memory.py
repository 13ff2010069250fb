"""The pretraining run's memory accounting: the bytes of the weights, of the gradients held at
once during a backward and of the optimizer's state, counted from the tensors; and the peak over a
run (CUDA's allocator counter on a GPU, the growth of the process's peak resident set on a CPU)."""

from __future__ import annotations

import contextlib
import ctypes
import gc
from pathlib import Path

import torch


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def weight_bytes(model) -> int:
    return sum(tensor_bytes(p) for p in model.parameters()) + sum(tensor_bytes(b) for b in model.buffers())


def optimizer_bytes(opt) -> int:
    """Bytes of the tensors in the optimizer's state, including those held by objects in it
    (galore-torch's and fira's projector objects)."""
    seen, total = set(), 0

    def add(value, depth=0):
        nonlocal total
        if isinstance(value, torch.Tensor):
            key = (value.data_ptr(), value.numel(), value.dtype)
            if key not in seen:
                seen.add(key)
                total += tensor_bytes(value)
        elif isinstance(value, dict):
            for v in value.values():
                add(v, depth)
        elif isinstance(value, (list, tuple)):
            for v in value:
                add(v, depth)
        elif depth < 2 and hasattr(value, "__dict__"):
            add(vars(value), depth + 1)

    for state in opt.state.values():
        add(state)
    return total


class GradCounter:
    """Most bytes of .grad tensors held at once during a backward, from hooks on every trainable
    parameter. Registered before the optimizer, so in per-layer mode it sees each gradient before
    the optimizer's hook frees it."""

    def __init__(self, params):
        self.params = list(params)
        self.peak = 0
        self.handles = [p.register_post_accumulate_grad_hook(self._seen) for p in self.params]

    def _seen(self, _):
        self.peak = max(self.peak, sum(tensor_bytes(p.grad) for p in self.params if p.grad is not None))

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


class PeakMemory:
    """Peak memory over a run: CUDA's allocator counter, or the growth of the process's peak RSS."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    @staticmethod
    def _status(key: str) -> int | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def start(self):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed memory back, so runs start alike
        self.base = self._status("VmRSS")
        try:  # "5" resets the peak resident set (VmHWM) to the current one (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.base = None

    def peak(self) -> int | None:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        hwm = self._status("VmHWM")
        return None if self.base is None or hwm is None else max(0, hwm - self.base)
