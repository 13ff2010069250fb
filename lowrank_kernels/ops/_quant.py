"""4-bit base weights as bitsandbytes stores them, and their dequantisation inside GEMM tiles.

A ``bnb.nn.Params4bit`` W (N, K) is its flattened row-major values, two 4-bit codes a byte (the
element at even flat index e in the high nibble), plus a ``QuantState``:

    W[n, k] = code[q(e)] · absmax[e // blocksize],   e = n·K + k

``code`` is the 16-value NF4 or FP4 table (fp32), ``absmax`` one fp32 scale per block of
``blocksize`` consecutive flat elements (32 ... 4096, a power of two). With nested (double)
quantisation (``compress_statistics=True``) the absmax are themselves 8-bit codes:

    absmax[b] = code2[a8[b]] · absmax2[b // blocksize2] + offset

with the 256-value dynamic table ``code2``, fp32 ``absmax2`` per ``blocksize2`` (256) block and one
fp32 ``offset``. Everything is formed in fp32 and rounded once to the compute dtype, which is what
bitsandbytes' ``dequantize_4bit(..., dtype)`` and its 4-bit matmul do.

``Quant4`` carries these tensors (any device, read as they are stored: no copy), ``dequantize``
is the plain-torch reference, and ``tl_dequant4`` is the @triton.jit helper that GEMM kernels call
on a tile of flat indices in their main loop (ops/gemm.py ``lowrank_gemm``): the dequantised W
never exists in memory. A transposed view (``Quant4.t()``) reads the same storage with the strides
swapped, for dx = dy·W.

bitsandbytes (0.50+) on a CPU with AVX512-BF16 repacks a ``Linear4bit``'s weight in place for its
CPU kernel during an eval-mode forward without gradients (``quant_state.packing_format_for_cpu``,
``bitsandbytes.functional._convert_weight_packed_for_cpu`` with 32-row blocks; N a multiple of 32,
K of the blocksize): the codes become (N, K/2) bytes, ordered by row block nb and column pair kp,
32 bytes each, byte j holding in its low nibble the code of W[32·nb + j//2, 2·kp + j%2] and in its
high nibble that of W[32·nb + 16 + j//2, 2·kp + j%2]; the absmax are de-nested, rounded to bf16
and stored transposed, (K/blocksize, N). ``from_params4bit`` reads that layout back into the flat
one above (a copy, made per call; the absmax as the bf16 values bitsandbytes' CPU kernel uses),
so a model evaluated on such a CPU trains on. It also reads the transposed (K/blocksize, N)
absmax that bitsandbytes' inverse (``_convert_weight_packed_for_cpu_inverse``, run before saving
and by ``.cuda()``) leaves on a weight that was not nested.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from lowrank_kernels.backend import triton_available

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
CPU_BLOCK_N = 32  # rows per block of bitsandbytes' CPU layout (the module docstring)


class Quant4(NamedTuple):
    """A bitsandbytes 4-bit matrix (see the module docstring), as (N, K) or, transposed, (K, N)."""

    packed: Tensor  # uint8 (ceil(N·K / 2),)
    absmax: Tensor  # fp32 (blocks,), or uint8 (blocks,) when nested
    code: Tensor  # fp32 (16,)
    blocksize: int
    n: int
    k: int
    absmax2: Optional[Tensor] = None  # fp32 (blocks2,), nested only
    code2: Optional[Tensor] = None  # fp32 (256,), nested only
    offset: Optional[Tensor] = None  # fp32 0-d, nested only
    blocksize2: int = 0
    transposed: bool = False

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None

    @property
    def shape(self) -> tuple:
        return (self.k, self.n) if self.transposed else (self.n, self.k)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def t(self) -> "Quant4":
        return self._replace(transposed=not self.transposed)

    def strides(self) -> tuple:
        """Element strides of the logical matrix over the flat row-major (N, K) storage."""
        return (1, self.k) if self.transposed else (self.k, 1)

    def tensors(self) -> tuple:
        """(packed, absmax, code, absmax2, code2, offset): the tensors a custom op passes along."""
        return self.packed, self.absmax, self.code, self.absmax2, self.code2, self.offset


def quant4(packed: Tensor, absmax: Tensor, code: Tensor, absmax2: Optional[Tensor], code2: Optional[Tensor],
           offset: Optional[Tensor], blocksize: int, blocksize2: int, n: int, k: int) -> Quant4:
    """The (N, K) = (n, k) Quant4 of a registered op's 4-bit storage arguments (``op_args``, in order)."""
    return Quant4(packed, absmax, code, blocksize, n, k, absmax2, code2, offset, blocksize2)


def op_args(weight) -> tuple:
    """(tensors, sizes): a base weight as the registered ops and their autograd take it. A dense W
    is ((W,), ()); a 4-bit one (Quant4) is its storage, ``tensors()``, and (blocksize, blocksize2,
    out_features), its in_features being x's (``quant4`` rebuilds it)."""
    if isinstance(weight, Quant4):
        return weight.tensors(), (weight.blocksize, weight.blocksize2, weight.n)
    return (weight,), ()


def device_tensors(weight) -> dict:
    """A base weight's tensors by the names device errors give them: ``weight`` (a dense W, or a
    4-bit W's packed codes) and a 4-bit W's quant_state tensors."""
    if not isinstance(weight, Quant4):
        return {"weight": weight}
    names = ("weight", "weight.quant_state.absmax", "weight.quant_state.code", "weight.quant_state.state2.absmax",
             "weight.quant_state.state2.code", "weight.quant_state.offset")
    return dict(zip(names, weight.tensors()))


def is_4bit(weight) -> bool:
    """Whether ``weight`` is a bitsandbytes 4-bit parameter (a tensor with a ``quant_state``)."""
    return isinstance(weight, Tensor) and getattr(weight, "quant_state", None) is not None


def storage_dtype(weight: Tensor) -> torch.dtype:
    """The dtype ``dequantize_4bit(W, quant_state)`` gives for a weight in bitsandbytes' own layout
    (PEFT's DoRA norm is formed in it): ``quant_state.dtype``, or, for a weight repacked for
    bitsandbytes' CPU kernel (which sets ``quant_state.dtype`` to bf16 for that kernel), the dtype it
    had before the repack."""
    qs = weight.quant_state
    if getattr(qs, "packing_format_for_cpu", False):
        return getattr(qs, "original_dtype", qs.dtype)
    return qs.dtype


def from_params4bit(weight: Tensor, name: str = "weight") -> Quant4:
    """The Quant4 of a ``bnb.nn.Params4bit`` (or any packed tensor carrying a bnb ``QuantState``).

    Raises ValueError/TypeError naming ``name`` for a state this package cannot read: not 2-D,
    not NF4/FP4, a blocksize bitsandbytes does not allow, or sizes that disagree with the packed
    data (a weight in bitsandbytes' CPU layout is read as the module docstring says, or refused).
    """
    qs = weight.quant_state
    if len(qs.shape) != 2:
        raise ValueError(f"{name}: a 4-bit weight must be 2-D (out_features, in_features), "
                         f"got quant_state.shape {tuple(qs.shape)}")
    if qs.quant_type not in ("nf4", "fp4"):
        raise ValueError(f"{name}: quant_type must be 'nf4' or 'fp4', got {qs.quant_type!r}")
    if qs.blocksize not in BLOCKSIZES:
        raise ValueError(f"{name}: blocksize must be one of {BLOCKSIZES}, got {qs.blocksize}")
    n, k = (int(d) for d in qs.shape)
    code = qs.code.to(torch.float32)
    if code.numel() != 16:
        raise ValueError(f"{name}: quant_state.code must hold 16 values, got {code.numel()}")
    if getattr(qs, "packing_format_for_cpu", False):
        packed, absmax = _from_cpu_layout(weight.detach(), qs, n, k, name)
        return Quant4(packed, absmax, code, int(qs.blocksize), n, k)
    packed = weight.detach().reshape(-1)
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8)  # quant_storage other than uint8 (e.g. bf16 for FSDP)
    if packed.numel() != (n * k + 1) // 2:
        raise ValueError(f"{name}: {packed.numel()} packed bytes for a {n}x{k} 4-bit matrix, "
                         f"expected {(n * k + 1) // 2}")
    blocks = -(-n * k // qs.blocksize)
    if qs.absmax.dim() == 2 and not qs.nested:
        if k % qs.blocksize or tuple(qs.absmax.shape) != (k // qs.blocksize, n):
            raise ValueError(f"{name}: a 2-D quant_state.absmax must be (in_features / blocksize, out_features) = "
                             f"({k / qs.blocksize:g}, {n}) as bitsandbytes' CPU layout leaves it, "
                             f"got {tuple(qs.absmax.shape)}")
        return Quant4(packed, _cpu_layout_absmax(qs.absmax), code, int(qs.blocksize), n, k)
    absmax = qs.absmax.reshape(-1)
    if absmax.numel() != blocks:
        raise ValueError(f"{name}: quant_state.absmax has {absmax.numel()} blocks, expected {blocks}")
    if not qs.nested:
        if absmax.dtype != torch.float32:
            raise TypeError(f"{name}: quant_state.absmax must be float32, got {absmax.dtype}")
        return Quant4(packed, absmax, code, int(qs.blocksize), n, k)
    s2 = qs.state2
    if absmax.dtype != torch.uint8:
        raise TypeError(f"{name}: nested quant_state.absmax must be uint8, got {absmax.dtype}")
    if s2.blocksize not in BLOCKSIZES or s2.code.numel() != 256 or s2.absmax.numel() != -(-blocks // s2.blocksize):
        raise ValueError(f"{name}: nested quant_state.state2 (blocksize {s2.blocksize}, {s2.code.numel()} codes, "
                         f"{s2.absmax.numel()} scales) does not fit {blocks} absmax blocks")
    offset = torch.as_tensor(qs.offset, dtype=torch.float32, device=packed.device).reshape(())
    return Quant4(packed, absmax, code, int(qs.blocksize), n, k, s2.absmax.reshape(-1).to(torch.float32),
                  s2.code.to(torch.float32), offset, int(s2.blocksize))


def base_weight(weight):
    """A base weight as the ops take it: a bitsandbytes 4-bit one as its Quant4 (refused with a
    ValueError where it requires grad: a 4-bit base is frozen), anything else unchanged."""
    if not is_4bit(weight):
        return weight
    if weight.requires_grad:
        raise ValueError("weight: a 4-bit base weight is frozen; it must not require grad")
    return from_params4bit(weight)


def _cpu_layout_absmax(absmax: Tensor) -> Tensor:
    """The (K/blocksize, N) absmax of bitsandbytes' CPU layout as the flat fp32 per-block scales."""
    if not absmax.is_floating_point():
        raise TypeError(f"quant_state.absmax of bitsandbytes' CPU layout must be floating point, got {absmax.dtype}")
    return absmax.t().reshape(-1).to(torch.float32)


def _check_cpu_block_n(name: str) -> None:
    """Refuse the CPU layout where the installed bitsandbytes packs it otherwise than this module
    reads it (32-row blocks): a changed layout must not be misread."""
    import inspect

    import bitsandbytes
    import bitsandbytes.functional as bnbF

    pack = getattr(bnbF, "_convert_weight_packed_for_cpu", None)
    block_n = inspect.signature(pack).parameters.get("block_n") if pack is not None else None
    if block_n is None or block_n.default != CPU_BLOCK_N:
        raise ValueError(f"{name}: the weight was repacked for the CPU kernel of bitsandbytes "
                         f"{bitsandbytes.__version__} "
                         f"(packing_format_for_cpu), whose layout this package cannot read (it reads "
                         f"_convert_weight_packed_for_cpu with block_n={CPU_BLOCK_N}); re-quantise the weight")


def _from_cpu_layout(data: Tensor, qs, n: int, k: int, name: str) -> tuple:
    """(flat packed codes, fp32 absmax) of a weight in bitsandbytes' CPU layout (module docstring)."""
    _check_cpu_block_n(name)
    bs = int(qs.blocksize)
    expected = f"uint8 codes ({n}, {k // 2}) and absmax ({k // bs}, {n})"
    if (data.dtype != torch.uint8 or tuple(data.shape) != (n, k // 2) or n % CPU_BLOCK_N or k % bs or k % 2
            or qs.nested or tuple(qs.absmax.shape) != (k // bs, n)):
        raise ValueError(f"{name}: a weight repacked for bitsandbytes' CPU kernel (packing_format_for_cpu) of a "
                         f"{n}x{k} matrix, blocksize {bs}, must hold {expected} (out_features a multiple of "
                         f"{CPU_BLOCK_N}, in_features of the blocksize, absmax not nested); got {data.dtype} codes "
                         f"{tuple(data.shape)}, absmax {tuple(qs.absmax.shape)}, nested={qs.nested}")
    blocks = data.reshape(n // CPU_BLOCK_N, k // 2, CPU_BLOCK_N)
    # Low nibbles hold rows 0..15 of the row block, high nibbles rows 16..31; byte j: row j//2, column parity j%2.
    codes = torch.cat((blocks & 15, blocks >> 4), dim=2).reshape(n // CPU_BLOCK_N, k // 2, CPU_BLOCK_N, 2)
    codes = codes.permute(0, 2, 1, 3).reshape(-1)  # row-major (N, K)
    return (codes[0::2] << 4) | codes[1::2], _cpu_layout_absmax(qs.absmax)


def block_scales(q: Quant4) -> Tensor:
    """The fp32 absmax of every block (nested: decoded from its 8-bit codes)."""
    if not q.nested:
        return q.absmax
    blk = torch.arange(q.absmax.numel(), device=q.device)
    return q.code2[q.absmax.long()] * q.absmax2[blk // q.blocksize2] + q.offset


def dequantize(q: Quant4, dtype: torch.dtype) -> Tensor:
    """The reference: the logical matrix (q.shape) in ``dtype``, as bnb's dequantize_4bit gives it."""
    nk = q.n * q.k
    codes = torch.stack((q.packed >> 4, q.packed & 15), dim=1).reshape(-1)[:nk].long()
    e = torch.arange(nk, device=q.device)
    w = (q.code[codes] * block_scales(q)[e // q.blocksize]).to(dtype).reshape(q.n, q.k)
    return w.t() if q.transposed else w


def dequantize_rows(q: Quant4, rows: slice, dtype: torch.dtype) -> Tensor:
    """Rows ``rows`` (a slice with start and stop) of the (N, K) matrix of a non-transposed ``q`` in
    ``dtype``, as ``dequantize`` gives them: reads and forms only that row block."""
    e = torch.arange(rows.start * q.k, rows.stop * q.k, device=q.device)
    byte = q.packed[e >> 1]
    codes = torch.where((e & 1) == 1, byte & 15, byte >> 4).long()
    return (q.code[codes] * block_scales(q)[e // q.blocksize]).to(dtype).reshape(-1, q.k)


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def tl_dequant4(W_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, e, mask,
                    QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr, NESTED: tl.constexpr):
        """fp32 W values at the int64 flat indices ``e`` (any tile shape), 0 where ~mask.

        Blocksizes are constexpr powers of two, so the block indices are shifts. The code tables
        (16 and 256 values) and the scales are gathered through the L1 cache.
        """
        byte = tl.load(W_ptr + (e >> 1), mask=mask, other=0).to(tl.int32)
        nib = tl.where((e & 1) == 1, byte & 15, byte >> 4)
        val = tl.load(code_ptr + nib, mask=mask, other=0.0)
        blk = e // QBLOCK
        if NESTED:
            a8 = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
            scale = (tl.load(code2_ptr + a8, mask=mask, other=0.0)
                     * tl.load(absmax2_ptr + blk // QBLOCK2, mask=mask, other=0.0))
            scale = scale + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
        return val * scale


def kernel_args(q: Quant4, placeholder: Tensor):
    """(runtime pointer group, constexpr dict) of ``q`` for a kernel calling tl_dequant4;
    ``placeholder`` stands in for the nested tensors when q is not nested."""
    runtime = (q.absmax, q.code,
               q.absmax2 if q.nested else placeholder, q.code2 if q.nested else placeholder,
               q.offset if q.nested else placeholder)
    meta = dict(QBLOCK=q.blocksize, QBLOCK2=q.blocksize2 if q.nested else 1, NESTED=q.nested)
    return runtime, meta
