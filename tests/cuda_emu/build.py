"""Build csrc/'s torch-free kernels as host C++ (g++, lk_emu.h) into a shared library for ctypes.

The sources are copied with two rewrites that C++ cannot express as macros: a launch
`kernel<<<grid, block, smem, stream>>>(args)` becomes `::lk_emu::Launch(grid, block, smem,
stream).run(kernel)(args)`, and `extern __shared__ T name[];` becomes a pointer to the launch's
dynamic shared memory. The library is cached under the temp dir, keyed by a hash of every input
and the compiler, so only a changed source rebuilds it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CSRC = HERE.parents[1] / "csrc"
FLAGS = ["-std=c++17", "-O1", "-pthread", "-fPIC", "-w"]


def _kernel_start(src: str, end: int) -> int:
    """Start of the kernel expression that ends just before src[end] (`name`, `ns::name<T, U>`, `&f`)."""
    i, depth = end, 0
    while i > 0:
        ch = src[i - 1]
        if ch == ">":
            depth += 1
        elif ch == "<":
            depth -= 1
        elif depth == 0 and not (ch.isalnum() or ch in "_:&"):
            break
        i -= 1
    return i


def rewrite(src: str) -> str:
    """The source with kernel launches and extern shared arrays in emulator form."""
    src = re.sub(r"extern\s+__shared__\s+(\w+)\s+(\w+)\s*\[\s*\]\s*;",
                 r"\1* \2 = ::lk_emu::dynamic_smem<\1>();", src)
    out, pos = [], 0
    while True:
        start = src.find("<<<", pos)
        if start < 0:
            out.append(src[pos:])
            return "".join(out)
        stop = src.find(">>>", start)
        k0 = _kernel_start(src, start)
        out.append(src[pos:k0])
        kernel = src[k0:start].strip()
        config = src[start + 3:stop]
        out.append(f"::lk_emu::Launch({config}).run({kernel})")
        pos = stop + 3


def _inputs() -> list[Path]:
    files = sorted(p for p in CSRC.iterdir() if p.suffix in (".cu", ".cuh", ".h"))
    files += sorted((HERE / "include").iterdir()) + [HERE / "lk_emu.h", HERE / "exports.cpp", Path(__file__)]
    return files


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def build() -> Path:
    """Path of the emulation library, building it if no cached copy matches the sources."""
    cxx = compiler()
    if cxx is None:
        raise FileNotFoundError("g++ not found")
    h = hashlib.sha256()
    h.update(subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.encode())
    h.update(" ".join(FLAGS).encode())
    for f in _inputs():
        h.update(f.name.encode())
        h.update(f.read_bytes())
    cache = Path(os.environ.get("LK_EMU_CACHE", Path(tempfile.gettempdir()) / "lowrank_kernels_emu"))
    target = cache / h.hexdigest()[:16] / "liblk_emu.so"
    if target.exists():
        return target
    work = Path(tempfile.mkdtemp(prefix="build-", dir=cache.mkdir(parents=True, exist_ok=True) or cache))
    src = work / "src"
    src.mkdir()
    for f in CSRC.iterdir():
        if f.suffix in (".cuh", ".h"):
            (src / f.name).write_text(rewrite(f.read_text()))
    units = []
    for f in sorted(CSRC.glob("*.cu")):
        dst = src / (f.stem + ".cpp")
        dst.write_text(rewrite(f.read_text()))
        units.append(dst)
    units.append(HERE / "exports.cpp")
    include = ["-I", str(HERE / "include"), "-I", str(src)]
    jobs = max(1, min(2, os.cpu_count() or 1))
    objs, running = [], []
    for u in units:
        obj = work / (u.stem + ".o")
        objs.append(obj)
        running.append((u, subprocess.Popen([cxx, *FLAGS, *include, "-c", str(u), "-o", str(obj)],
                                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
        if len(running) >= jobs:
            _wait(running.pop(0))
    for r in running:
        _wait(r)
    lib = work / "liblk_emu.so"
    _wait((lib, subprocess.Popen([cxx, "-shared", "-pthread", *map(str, objs), "-o", str(lib)],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(lib, target)  # atomic: a concurrent build of the same sources leaves one good copy
    shutil.rmtree(work, ignore_errors=True)
    return target


def _wait(job) -> None:
    name, proc = job
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"emulation build of {name} failed:\n{out}")


def load() -> ctypes.CDLL:
    return ctypes.CDLL(str(build()))
