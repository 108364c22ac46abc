"""Masks family (SPEC §5): N:M, window, CK, intra and FC block masks; the masked weight.

Masks are bool tensors shaped like ``w``, scored by fp32 ``|w|``; equal magnitudes keep the lower
flat index first (deterministic), NaN ranks above every number. The ops turn sparsities into
counts with SPEC §5's ``round(x) = floor(x + 0.5)`` (C++: ``csrc/cpu/common.h``; Python:
``reference.spec_round``). Ops (``torch.ops.sparsekern.*``, schemas below)::

    nm_mask(w, n, m)                    w [K, C, *]: n best of each m consecutive c at fixed (k, *)
    window_mask(w, sparsity, max_nonzero) / ck_mask(w, sparsity, group)
    intra_mask(w, sparsity, window_fraction, group)      w [K, C, R, S]
    block_mask(w, block, sparsity)      w [O, I]
    masked_weight(w, mask)              w where mask else 0 (autograd: grad where mask)
    prune_fc_inputs(conv, fc_weight) / pack_mask(mask) / unpack_mask(packed, shape)

Implementations: C++ on CPU (``csrc/cpu/masks.cpp``), Triton on CUDA (the adapters below turn
the sparsities into the counts of the launchers of ``sparsekern/triton/masks.py``), the reference
elsewhere; ``prune_fc_inputs`` / ``pack_mask`` / ``unpack_mask`` are the reference everywhere.
Masks are not differentiable (backward raises); ``masked_weight`` is.
"""
import math

import torch

from .. import reference
from ._common import check_cpp, check_number, check_weight, define, triton_module


def _tm():
    return triton_module("masks")


def _bool_like(w, *args):
    return torch.empty(w.shape, dtype=torch.bool, device=w.device)


# --- CUDA: the counts of the Triton launchers (kernel_mask / block_mask keeps) ------------------

def _window_keep(w, sparsity, max_nonzero=None):
    return reference.window_keep(w.shape[2] * w.shape[3], sparsity, max_nonzero)


def _ck_keep(w, sparsity, group):
    g = w.shape[1] if group == "out" else w.shape[0]
    return g - reference.spec_round(g * sparsity)


def _cuda_window(w, sparsity, max_nonzero):
    return _tm().kernel_mask(w.contiguous(), _window_keep(w, sparsity, max_nonzero), w.shape[0], False)


def _cuda_ck(w, sparsity, group):
    return _tm().kernel_mask(w.contiguous(), w.shape[2] * w.shape[3], _ck_keep(w, sparsity, group), group == "out")


def _cuda_intra(w, sparsity, window_fraction, group):
    s_ck = reference.intra_ck_sparsity(w.shape[2] * w.shape[3], sparsity, window_fraction)
    return _tm().kernel_mask(w.contiguous(), _window_keep(w, window_fraction * sparsity),
                             _ck_keep(w, s_ck, group), group == "out")


def _cuda_block(w, block, sparsity):
    nb = ((w.shape[0] + block - 1) // block) * ((w.shape[1] + block - 1) // block)
    return _tm().block_mask(w.contiguous(), block, nb - reference.spec_round(nb * sparsity))


# --- ops ----------------------------------------------------------------------------------------

def _define_mask(schema, **kwargs):
    """:func:`define` for a masks op with a bool / uint8 result (no gradient: autograd falls through)."""
    return define(schema, "masks", float_outputs=False, **kwargs)


_nm = _define_mask("nm_mask(Tensor w, SymInt n, SymInt m) -> Tensor", cpp=True, fake=_bool_like,
                   reference=reference.nm_mask, cuda=lambda w, n, m: _tm().nm_mask(w.contiguous(), n, m))
_window = _define_mask("window_mask(Tensor w, float sparsity, SymInt? max_nonzero) -> Tensor", cpp=True,
                       fake=_bool_like, reference=reference.window_mask, cuda=_cuda_window)
_ck = _define_mask("ck_mask(Tensor w, float sparsity, str group) -> Tensor", cpp=True, fake=_bool_like,
                   reference=reference.ck_mask, cuda=_cuda_ck)
_intra = _define_mask("intra_mask(Tensor w, float sparsity, float window_fraction, str group) -> Tensor",
                      cpp=True, fake=_bool_like, reference=reference.intra_mask, cuda=_cuda_intra)
_block = _define_mask("block_mask(Tensor w, SymInt block, float sparsity) -> Tensor", cpp=True,
                      fake=_bool_like, reference=reference.block_mask, cuda=_cuda_block)
_fc_inputs = _define_mask("prune_fc_inputs(Tensor conv, Tensor fc_weight) -> Tensor",
                          fake=reference.prune_fc_inputs, reference=reference.prune_fc_inputs)
_pack = _define_mask("pack_mask(Tensor mask) -> Tensor", fake=reference.pack_mask, reference=reference.pack_mask)
_unpack = _define_mask("unpack_mask(Tensor packed, SymInt[] shape) -> Tensor", fake=reference.unpack_mask,
                       reference=reference.unpack_mask)


def _masked_backward(ctx, grad):
    return _masked(grad, ctx.mask), None


def _masked_setup(ctx, inputs, output):
    ctx.mask = inputs[1]


_masked = define(
    "masked_weight(Tensor w, Tensor mask) -> Tensor", "masks", cpp=True,
    fake=lambda w, mask: w.new_empty(w.shape),
    reference=lambda w, mask: reference.masked_weight(w.contiguous(), mask.contiguous()),
    cuda=lambda w, mask: _tm().masked_fwd(w.contiguous(), mask.contiguous()),
    backward=_masked_backward, setup_context=_masked_setup)
check_cpp("masks")


# --- validation ---------------------------------------------------------------------------------

def _check_int(x, name, lo, hi=math.inf):
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    if not lo <= x <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {x}")
    return x


def _check_dim(w, dims, what):
    if w.dim() not in dims:
        raise ValueError(f"w must be {what}, got shape {tuple(w.shape)}")


def _check_conv(w, sparsity):
    check_weight(w)
    _check_dim(w, (4,), "a 4-D conv weight [K, C, R, S]")
    return check_number(sparsity, "sparsity", 0.0, 1.0)


def _check_group(group):
    if group not in ("in", "out"):
        raise ValueError(f"group must be 'in' or 'out', got {group!r}")


# --- public API ---------------------------------------------------------------------------------

def nm_mask(w, n, m):
    """N:M mask (SPEC §5): keep the ``n`` largest |w| of every ``m`` consecutive weights along
    the reduction dim 1 — ``in`` of a Linear ``[out, in]``; ``C`` of a conv ``[K, C, R, S]`` at each
    fixed ``(k, r, s)`` (channels-last groups, as sparse tensor cores need). ``0 ≤ n ≤ m``
    (``n = m`` keeps everything); ``w.shape[1] % m != 0`` is a ValueError. Bool, w's shape."""
    check_weight(w)
    if w.dim() < 2:
        raise ValueError(f"w must have a reduction dim 1 (Linear [out, in] or conv [K, C, ...]), "
                         f"got shape {tuple(w.shape)}")
    m = _check_int(m, "m", 1)
    n = _check_int(n, "n", 0, m)
    if w.shape[1] % m:
        raise ValueError(f"m={m} must divide the reduction size w.shape[1]={w.shape[1]}")
    return _nm(w, n, m)


def window_mask(w, sparsity, max_nonzero=None):
    """Window mask (SPEC §5) of a conv weight ``[K, C, R, S]``: in every ``R×S`` kernel keep the
    ``RS − round(RS·s)`` largest |w|, at most ``max_nonzero`` (int ≥ 0) when given."""
    sparsity = _check_conv(w, sparsity)
    if max_nonzero is not None:
        _check_int(max_nonzero, "max_nonzero", 0)
    return _window(w, sparsity, max_nonzero)


def ck_mask(w, sparsity, group="in"):
    """CK mask (SPEC §5) of ``[K, C, R, S]``: whole kernels, scored by their max |w|. ``"in"``
    (paper's Algorithm 1): for each input channel prune the ``round(K·s)`` lowest of its ``K``
    kernels; ``"out"``: for each output filter, of its ``C`` kernels. Never a partial kernel."""
    sparsity = _check_conv(w, sparsity)
    _check_group(group)
    return _ck(w, sparsity, group)


def intra_mask(w, sparsity, window_fraction=0.5, group="in"):
    """Intra-epoch mask (SPEC §5) of ``[K, C, R, S]``: window mask at ``f·s`` AND CK mask of the
    window-masked weights at ``1 − (1 − s)/d_w`` (``d_w = (RS − round(RS·f·s))/RS``, the window
    density actually reached; clamped to [0, 1]), so the density is ≈ ``1 − s`` up to the
    rounding of ``round(K·s_ck)``. The CK scores equal plain CK's (the window keeps each max)."""
    sparsity = _check_conv(w, sparsity)
    window_fraction = check_number(window_fraction, "window_fraction", 0.0, 1.0)
    _check_group(group)
    return _intra(w, sparsity, window_fraction, group)


def block_mask(w, block, sparsity):
    """Block mask (SPEC §5) of a Linear weight ``[out, in]``: ``block×block`` blocks (``1 ≤ block
    ≤ 4``; edge blocks are partial, scored over their own elements) by ``Σ|w|`` (fp32, row-major
    within the block); the ``round(nb·s)`` lowest of the ``nb`` blocks are pruned, equal scores
    pruning the higher block index first. Then every block row left empty gets its best block
    back, so every output row keeps at least one weight (the sparsity may end below ``s``)."""
    check_weight(w)
    _check_dim(w, (2,), "a 2-D Linear weight [out, in]")
    block = _check_int(block, "block", 1, 4)
    sparsity = check_number(sparsity, "sparsity", 0.0, 1.0)
    if w.numel() == 0:
        return torch.zeros(w.shape, dtype=torch.bool, device=w.device)
    return _block(w, block, sparsity)


def prune_fc_inputs(conv, fc_weight):
    """FC input mask (SPEC §5): bool ``[out, in]`` for ``fc_weight``, False on every input fed by a
    dead output channel of ``conv`` (``[K, C, R, S]`` weight or mask; dead = all its kernels
    zero). Inputs are ``flatten`` of the conv output ``[N, K, H, W]`` (channel-major): input ``j``
    comes from channel ``j // (in / K)``; with a global pool in between ``in = K``."""
    if not isinstance(conv, torch.Tensor) or conv.dim() != 4:
        raise ValueError("conv must be a 4-D conv weight or mask [K, C, R, S]")
    check_weight(fc_weight, "fc_weight")
    if fc_weight.dim() != 2:
        raise ValueError(f"fc_weight must be 2-D [out, in], got shape {tuple(fc_weight.shape)}")
    if conv.shape[0] == 0 or fc_weight.shape[1] % conv.shape[0]:
        raise ValueError(f"fc_weight's in={fc_weight.shape[1]} must be a multiple of the conv's "
                         f"K={conv.shape[0]} output channels (flatten of [N, K, H, W])")
    return _fc_inputs(conv, fc_weight)


def masked_weight(w, mask):
    """``w`` where ``mask`` else 0 (SPEC §5), fused; backward ``grad`` where ``mask`` else 0, so a
    pruned weight gets exactly zero gradient (no straight-through). mask: bool, w's shape."""
    check_weight(w)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
    if mask.shape != w.shape or mask.device != w.device:
        raise ValueError(f"mask {tuple(mask.shape)} on {mask.device} must match w {tuple(w.shape)} "
                         f"on {w.device}")
    return _masked(w, mask)


def pack_mask(mask):
    """Bit-packed storage of a bool ``mask`` (8× smaller): uint8 ``[ceil(numel/8)]``, flat
    row-major order, little-endian within a byte (bit ``i % 8`` of byte ``i // 8`` is element
    ``i``; padding bits 0). :func:`unpack_mask` restores it given the shape."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
    return _pack(mask)


def unpack_mask(packed, shape):
    """Bool mask of ``shape`` from :func:`pack_mask`'s uint8 ``packed`` ``[ceil(numel/8)]``."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 1:
        raise TypeError(f"packed must be a 1-D uint8 tensor, got "
                        f"{getattr(packed, 'dtype', type(packed).__name__)} {tuple(getattr(packed, 'shape', ()))}")
    if isinstance(shape, torch.Size):
        shape = list(shape)
    if not isinstance(shape, (list, tuple)) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise TypeError(f"shape must be a sequence of non-negative ints, got {shape!r}")
    need = (math.prod(shape) + 7) // 8
    if packed.numel() != need:
        raise ValueError(f"packed has {packed.numel()} bytes; shape {tuple(shape)} needs {need}")
    return _unpack(packed, list(shape))
