"""SLTrain and low-rank methods for LowRankLinear (op: ops/sparse_lowrank.py).

``method="sltrain"``: W = s·B A + S, the whole layer (no frozen base weight), for pretraining with
a fraction of a dense layer's parameters. Trainable ``lr_A`` (r, K), ``lr_B`` (N, r),
``sp_values`` (nnz) and ``bias``; the support ``sp_index`` (the sorted flat indices, int64, in
the values' order) as a frozen integer parameter (requires_grad=False, so optimizers skip it
and FSDP2 shards and all-gathers it with the values), the buffer ``sp_block`` ((bh, bw), or
(0, 0) for a uniform support), both in the state_dict, plus the support's kernel formats as
buffers (rebuilt on load, not saved). ``num_parameters`` and ``memory_report`` count the index as
support, not as a weight. s = alpha / r.

Under FSDP2 (``fully_shard``) each rank keeps its shard of ``sp_index``, the index entries of its
shard of ``sp_values``. FSDP2 all-gathers both for the forward and the backward and frees them
after, as for any parameter. What stays whole on every rank: the per-row and per-block formats
(uniform: the CSR row pointers of S and Sᵀ, (N + K + 2) int32; block: 5 int32 per block, 20
bytes per bh·bw entries, plus the block-row and block-column pointers) and ``sp_block``. The one
per-entry format (uniform: ``t_pos``, the entries in Sᵀ's order) is not kept once FSDP2 replaces
the index parameter: each forward derives it from the gathered index (one stable sort of nnz
ints), and autograd frees it after the backward.

``method="lowrank"``: W = s·B A alone (the "low-rank" baseline of the GaLore paper).

Initialisation of a new layer (SLTrain's): B = 0, A Kaiming-uniform (a = √5), sparse values
U(−1/√K, 1/√K), bias as nn.Linear's. Options: ``density`` (0.03), ``support`` ("uniform" or
"block"), ``block`` ((16, 16)), ``seed`` (the support's draw; None uses torch's default
generator), ``init`` ("random", or "svd" to start from the wrapped layer's weight).

The default alpha follows the paper's settings by rank: 32 for r <= 128 (60M), 16 for r <= 256
(130M, 350M), 8 above (1B, 7B). Pass alpha explicitly for other model sizes.

From a dense layer (``LowRankLinear.from_linear(linear, method="sltrain", ...)``, init="svd"):
the low-rank part is the top-r SVD of W (split evenly between B and A), the sparse part holds
the largest-magnitude entries (or blocks) of the residual W − s·BA; ``module.reconstruction_error``
is ‖W − (s·BA + S)‖_F / ‖W‖_F.

``convert(model, method="sltrain", rank=..., density=...)`` replaces the targeted nn.Linear
layers by freshly initialised SLTrain layers (init="random", as SLTrain pretrains from scratch);
everything else (embeddings, norms, the LM head) stays dense and trainable. SLTrain keeps the LM
head dense: target the attention and MLP projections, e.g. ``target_modules=["q_proj", "k_proj",
"v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]`` for LLaMA; a conversion that would
include the model's output embedding is refused.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from lowrank_kernels.nn.registry import Method, register_method
from lowrank_kernels.ops.sparse_lowrank import (
    PART_NAMES,
    SparseSupport,
    magnitude_support,
    prepare_support,
    random_support,
    sparse_lowrank_linear,
    transpose_positions,
)

_AUX_PREFIX = "_sp_"
# The kernel formats with one entry per nonzero, derived from the index at forward time while the
# index parameter is not the one they were built for (FSDP2 swaps in its gathered copy).
_PER_ENTRY = {"uniform": ("t_pos",), "block": ()}
# module.__dict__ key of the index parameter the per-entry buffers were built for (not an
# nn.Module attribute: a Parameter assigned there would register as a second parameter).
_FORMATS_FOR = "_sp_formats_for"


def _install_support(module, support: SparseSupport, per_entry: bool = True) -> None:
    """Keep the support on the module: the index as a frozen int64 parameter (FSDP2 shards it with
    the values), its kernel formats as buffers, so .to()/.cuda() move them with the parameters.
    ``per_entry=False`` (a sharded index) leaves out the formats with one entry per nonzero."""
    for name in [n for n in module._buffers if n.startswith(_AUX_PREFIX)]:
        del module._buffers[name]
    index = module._parameters.get("sp_index")
    if index is None:  # on load the state_dict's index is already in the parameter
        module.sp_index = nn.Parameter(support.index, requires_grad=False)
    module.register_buffer("sp_block", torch.tensor(support.block or (0, 0), dtype=torch.int64))
    for name, part in zip(support.part_names[1:], support.parts[1:]):
        if per_entry or name not in _PER_ENTRY[support.kind]:
            module.register_buffer(_AUX_PREFIX + name, part, persistent=False)
    module._sp_kind, module._sp_blocksize = support.kind, support.block
    module.__dict__[_FORMATS_FOR] = module.sp_index if per_entry else None


def _module_support(module) -> SparseSupport:
    index, kind = module.sp_index, module._sp_kind
    if module.__dict__[_FORMATS_FOR] is not index:
        # FSDP2 (or another wrapper) replaced the index parameter: drop the per-entry formats
        # (and the reference to the old parameter) so that no nnz-sized copy persists.
        for name in _PER_ENTRY[kind]:
            module._buffers.pop(_AUX_PREFIX + name, None)
        module.__dict__[_FORMATS_FOR] = None
    parts = [index]
    for name in PART_NAMES[kind][1:]:
        part = module._buffers.get(_AUX_PREFIX + name)  # only t_pos (_PER_ENTRY) can be missing
        parts.append(transpose_positions(index, module.in_features) if part is None else part)
    return SparseSupport((module.out_features, module.in_features), kind, module._sp_blocksize, parts)


def _resize_for_load(module, state_dict, prefix, *args) -> None:
    # Block supports clipped at the matrix edge (and other densities) give other entry counts:
    # the loaded support replaces this one, so the values take its size before the copy.
    for name in ("sp_index", "sp_values"):
        incoming = state_dict.get(prefix + name)
        current = getattr(module, name)
        if isinstance(incoming, torch.Tensor) and incoming.dim() == 1 and incoming.shape != current.shape:
            current.data = current.new_empty(incoming.shape)


def _reload_support(module, incompatible_keys) -> None:
    # The state_dict carries the support itself (sp_index, sp_block); its kernel formats follow. A
    # sharded index (DCP's load under FSDP2) is gathered once to validate it and build the per-row
    # and per-block formats; it stays sharded.
    index = module.sp_index
    sharded = isinstance(index, DTensor)
    bh, bw = (int(v) for v in module.sp_block.cpu())
    support = prepare_support(index.full_tensor() if sharded else index, (module.out_features, module.in_features),
                              block=(bh, bw) if bh else None)
    if module.sp_values.numel() != support.nnz:
        raise ValueError(f"loaded sp_values has {module.sp_values.numel()} entries but sp_index has {support.nnz}")
    _install_support(module, support, per_entry=not sharded)


def _empty_support_message(N, K, density, support, block) -> str:
    if support == "block":
        bh, bw = block
        need = 0.5 * bh * bw / (N * K)
        fix = (f"use density >= {need:.3g}, smaller blocks, or support='uniform'" if need <= 1 else
               "no density can give one block: use smaller blocks or support='uniform'")
        return (f"density={density:g} gives 0 sparse entries on a {N}×{K} layer with support='block', "
                f"block={tuple(block)} (round(density·N·K / (bh·bw)) = 0 blocks): {fix}")
    return (f"density={density:g} gives 0 sparse entries on a {N}×{K} layer (round(density·N·K) = 0): use "
            f"density >= {0.5 / (N * K):.3g}")


def _svd_factors(weight: torch.Tensor, rank: int, scaling: float):
    """B (N, r), A (r, K) with s·B·A the best rank-r approximation of weight, balanced."""
    U, S, Vh = torch.linalg.svd(weight.float(), full_matrices=False)
    root = (S[:rank] / scaling).sqrt()
    return U[:, :rank] * root, root[:, None] * Vh[:rank]


class LowRankMethod(Method):
    """W = s·B·A (no sparse part)."""

    name = "lowrank"
    has_base_weight = False
    default_rank = 128
    peer = "SLTrain paper's settings; PEFT has no such method"
    options = {"init": (None, "'random' (convert's default: A Kaiming-uniform; B = 0 for sltrain, as SLTrain; "
                              "for lowrank B scaled so s·B·A has nn.Linear's init variance) or 'svd' "
                              "(from_linear's default: start from the wrapped layer's weight)")}

    def default_alpha(self, rank):
        return 32.0 if rank <= 128 else 16.0 if rank <= 256 else 8.0

    def alpha_doc(self):
        return "alpha 32 for r <= 128, 16 for r <= 256, 8 above (s = alpha / r)"

    def create(self, module, base, device, dtype, bias=True, init=None, **options):
        if base is not None:
            device, dtype = base.weight.device, base.weight.dtype
            bias = base.bias is not None
        init = init or ("svd" if base is not None else "random")
        if init not in ("random", "svd") or (init == "svd" and base is None):
            raise ValueError(f"init must be 'random' or, with a layer to start from, 'svd'; got {init!r}")
        if module.rank > min(module.in_features, module.out_features):
            raise ValueError(f"rank {module.rank} exceeds min(in_features, out_features) = "
                             f"{min(module.in_features, module.out_features)}")
        if module.dropout:
            raise ValueError(f"method {self.name!r} has no dropout; got dropout={module.dropout}")
        N, K, r = module.out_features, module.in_features, module.rank
        module.scaling = module.alpha / r
        module.reconstruction_error = None
        module.lr_A = nn.Parameter(torch.empty(r, K, device=device, dtype=dtype))
        module.lr_B = nn.Parameter(torch.zeros(N, r, device=device, dtype=dtype))
        if base is not None and base.bias is not None:
            module.bias = base.bias
            module.bias.requires_grad_(True)
        elif bias:
            module.bias = nn.Parameter(torch.empty(N, device=device, dtype=dtype))
            nn.init.uniform_(module.bias, -1 / math.sqrt(K), 1 / math.sqrt(K))
        else:
            module.bias = None
        with torch.no_grad():
            if init == "random":
                nn.init.kaiming_uniform_(module.lr_A, a=math.sqrt(5))
                self._init_random_B(module)
                self._init_sparse(module, None, device, dtype, **options)
            else:
                W = base.weight.detach().float()
                B, A = _svd_factors(W, r, module.scaling)
                module.lr_A.copy_(A)
                module.lr_B.copy_(B)
                residual = W - module.scaling * (module.lr_B.float() @ module.lr_A.float())
                self._init_sparse(module, residual, device, dtype, **options)
                fit = self.delta_weight(module)
                module.reconstruction_error = ((W - fit).norm() / W.norm().clamp_min(1e-30)).item()

    def _init_random_B(self, module):
        # With no sparse part, B = 0 would make the layer output zero, and a network built of such
        # layers would pass no gradient to any B: nothing would train. B is drawn so that s·B·A
        # has the variance of nn.Linear's init, U(±1/√K): Var(s·BA) = s²·r·Var(B)·Var(A), with
        # Var(A) = 1/(3K), so B ~ U(±√3 / (s·√r)).
        bound = math.sqrt(3.0) / (module.scaling * math.sqrt(module.rank))
        nn.init.uniform_(module.lr_B, -bound, bound)

    def _init_sparse(self, module, residual, device, dtype, **options):
        pass

    def forward(self, module, x):
        return sparse_lowrank_linear(x, module.lr_A, module.lr_B, None, None, module.scaling, module.bias,
                                     backend=module.backend)

    def delta_weight(self, module):
        """The whole weight s·BA (+ S) in fp32: there is no base weight (for inspection/export)."""
        return (module.lr_B.float() @ module.lr_A.float()) * module.scaling

    def prepare_convert(self, model, targets, rank, **options):
        head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
        for name, linear in targets:
            if head is not None and linear is head:
                raise ValueError(
                    f"{name!r} is the model's LM head, which stays dense for method {self.name!r} (as in "
                    "SLTrain): pass target_modules naming the attention and MLP projections, e.g. "
                    "['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']"
                )
        # The targets' dense weights are dropped (pretraining starts from SLTrain's init); their
        # biases move into the new layers.
        return {"init": options.get("init", "random")}

    def extra_repr(self, module):
        return f"scaling={module.scaling:g}"


class SLTrainMethod(LowRankMethod):
    """W = s·B·A + S on a fixed sparse support."""

    name = "sltrain"
    options = {**LowRankMethod.options,
               "density": (0.03, "fraction of the N×K entries in the sparse part S"),
               "support": ("uniform", "'uniform' (SLTrain's random entries) or 'block' (random aligned blocks, "
                                      "tensor cores)"),
               "block": ((16, 16), "(bh, bw) block shape of support='block', powers of two"),
               "seed": (None, "seed of the support's draw (None: torch's default generator)")}

    def _init_random_B(self, module):
        pass  # B = 0, SLTrain's init: the sparse part carries the initial weight

    def _init_sparse(self, module, residual, device, dtype, density=0.03, support="uniform", block=(16, 16), seed=None):
        N, K = module.out_features, module.in_features
        if residual is None:
            gen = torch.Generator().manual_seed(seed) if seed is not None else None
            sup = random_support((N, K), density, support, block=block, generator=gen, device=device)
            values = torch.empty(sup.nnz, device=device, dtype=dtype).uniform_(-1 / math.sqrt(K), 1 / math.sqrt(K))
        else:
            sup = magnitude_support(residual, density, support, block=block)
            values = residual.flatten()[sup.index].to(dtype)
        if sup.nnz == 0 and density > 0:
            raise ValueError(_empty_support_message(N, K, density, support, block))
        module.sp_values = nn.Parameter(values)
        _install_support(module, sup)
        module.register_load_state_dict_pre_hook(_resize_for_load)
        module.register_load_state_dict_post_hook(_reload_support)

    def forward(self, module, x):
        return sparse_lowrank_linear(x, module.lr_A, module.lr_B, module.sp_values, _module_support(module),
                                     module.scaling, module.bias, backend=module.backend)

    def delta_weight(self, module):
        W = super().delta_weight(module).flatten()
        W[module.sp_index] += module.sp_values.float()
        return W.view(module.out_features, module.in_features)

    def extra_repr(self, module):
        blk = f", block={module._sp_blocksize}" if module._sp_blocksize else ""
        sup = module.sp_index.numel() / (module.out_features * module.in_features)
        return f"scaling={module.scaling:g}, density={sup:.4g}, support={module._sp_kind!r}{blk}"


register_method(LowRankMethod())
register_method(SLTrainMethod())


# ----------------------------------------------------------------------------------------------
# Accounting
# ----------------------------------------------------------------------------------------------
def _is_whole_weight_layer(module) -> bool:
    method = getattr(module, "_method", None)
    return method is not None and not method.has_base_weight


def memory_report(model: nn.Module, optimizer_states: int = 2) -> dict:
    """Bytes of weights, gradients and optimizer states of ``model`` against the dense model it
    stands for (each SLTrain/low-rank layer replaced by a trainable dense N×K weight of the same
    dtype, everything else as it is).

    ``optimizer_states`` is the number of per-parameter states of the optimizer's dtype (AdamW: 2,
    kept in the parameter's dtype as torch.optim.AdamW does). Activations are not counted.

    Returns a dict with "ours" and "dense", each {"weights", "gradients", "optimizer_states",
    "support", "total"} in bytes ("support" is the SLTrain layers' index buffers, which the dense
    model does not have: their ``sp_index`` parameters and their buffers), and "ratio" = ours
    total / dense total.
    """
    def tally(params):
        w = sum(n * b for n, b, _ in params)
        g = sum(n * b for n, b, t in params if t)
        return {"weights": w, "gradients": g, "optimizer_states": optimizer_states * g}

    ours, dense, support = [], [], 0
    replaced, indices = set(), set()
    for module in model.modules():
        if _is_whole_weight_layer(module):
            size = module.lr_A.element_size()
            dense.append((module.out_features * module.in_features, size, True))
            replaced.update(id(p) for p in (module.lr_A, module.lr_B, getattr(module, "sp_values", None)))
            index = module._parameters.get("sp_index")
            tensors = [*module.buffers()] + ([index] if index is not None else [])
            support += sum(t.numel() * t.element_size() for t in tensors)
            indices.add(id(index))
    for p in model.parameters():
        if id(p) in indices:
            continue
        entry = (p.numel(), p.element_size(), p.requires_grad)
        ours.append(entry)
        if id(p) not in replaced:
            dense.append(entry)
    out = {"ours": tally(ours), "dense": tally(dense)}
    out["ours"]["support"], out["dense"]["support"] = support, 0
    for side in ("ours", "dense"):
        out[side]["total"] = sum(out[side].values())
    out["ratio"] = out["ours"]["total"] / max(out["dense"]["total"], 1)
    return out
