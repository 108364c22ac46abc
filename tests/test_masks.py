"""Masks family (SPEC §5): every implementation of the ops (C++, Triton, reference fallback) equal
to ``sparsekern.reference`` bit for bit, the C++ counts equal to the Python ones, the mask
properties the SPEC prescribes, the op surface (validation, opcheck, autograd, torch.compile).
Schemas: ``sparsekern/ops/masks.py``."""
import math
import os
import subprocess
import sys

import pytest
import torch

import sparsekern as sk
from sparsekern import reference as R
from utils import DTYPES, kernel_backend

BACKENDS = ["cpp", "triton", "reference"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _backend(name):
    return kernel_backend(name, "masks")


def _weight(shape, dtype=torch.float32, ties=False, seed=0):
    """randn; with ``ties`` rounded to a few values (heavy ties: the lower-index rule decides)."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return ((w * 1.5).round() / 2 if ties else w).to(dtype)


def _eq(a, b):
    assert a.dtype == torch.bool and a.shape == b.shape
    assert torch.equal(a.cpu(), b.cpu()), f"{int((a.cpu() ^ b.cpu()).sum())} entries differ"


# --- kernels vs reference -------------------------------------------------------------------------

@pytest.mark.parametrize("isa", ["3", "0"])
def test_cpp_lanes_of_other_isas(isa):
    """The AVX2 (8 lanes) and generic vector leaves, forced by SPARSEKERN_MASKS_ISA, equal the
    reference (this CPU otherwise runs only its own level)."""
    _backend("cpp")
    code = """
import math, torch, sparsekern
from sparsekern import reference as R
ops = torch.ops.sparsekern
for seed, shape in enumerate([(40, 24, 3, 3), (7, 5, 3, 3), (9, 8, 1, 3), (17, 16, 5, 5), (33, 64, 1, 1),
                              (64, 3, 3, 3), (70, 13, 3, 3)]):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    w = (w * 1.5).round() / 2 if seed % 2 else w
    w.view(-1)[3] = math.nan
    rs, k, c = shape[2] * shape[3], shape[0], shape[1]
    for wk in range(rs + 1):  # every window keep, alone and with CK cuts (intra)
        s = (rs - wk) / rs
        assert torch.equal(ops.window_mask(w, s, None), R.window_mask(w, s))
        for s_all, group in ((0.5, "in"), (0.9, "in"), (0.3, "out")):
            f = min(1.0, s / s_all)
            assert torch.equal(ops.intra_mask(w, s_all, f, group), R.intra_mask(w, s_all, f, group))
    for g, group in ((k, "in"), (c, "out")):
        for keep in (g // 2, g // 10, max(g - 3, 0), c // 3):
            s = (g - keep) / g
            assert torch.equal(ops.ck_mask(w, s, group), R.ck_mask(w, s, group))
    for n, m in ((2, 4), (1, 8), (3, 4)):
        if c % m == 0:
            assert torch.equal(ops.nm_mask(w, n, m), R.nm_mask(w, n, m))
"""
    env = {**os.environ, "SPARSEKERN_MASKS_ISA": isa, "PYTHONPATH": REPO}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=REPO)



# the Triton interpreter is slow: its 16-bit runs use the heavy-ties weights only
KERNEL_CASES = [(b, d, t) for b in BACKENDS for d in DTYPES for t in (False, True)
                if not (b == "triton" and not t and d != torch.float32)]


@pytest.mark.parametrize("backend, dtype, ties", KERNEL_CASES)
def test_kernels_equal_reference(backend, dtype, ties):
    k, dev = _backend(backend)
    big = backend != "triton"  # the interpreter is slow: small shapes there
    conv = _weight((40, 24, 3, 3) if big else (20, 8, 3, 3), dtype, ties).to(dev)
    lin = _weight((33, 64) if big else (5, 32), dtype, ties, seed=1).to(dev)
    nms = [(2, 4), (1, 8), (5, 32), (0, 4), (4, 4)] if big else [(2, 4), (5, 32), (0, 4)]
    sparsities = (0.0, 0.3, 0.5, 1.0) if big else (0.3, 1.0)
    for n, m in nms:
        _eq(k.nm_mask(lin, n, m), R.nm_mask(lin, n, m))
        if conv.shape[1] % m == 0:
            _eq(k.nm_mask(conv, n, m), R.nm_mask(conv, n, m))
    for s in sparsities:
        _eq(k.window_mask(conv, s, None), R.window_mask(conv, s))
        _eq(k.ck_mask(conv, s, "in"), R.ck_mask(conv, s))
        _eq(k.ck_mask(conv, s, "out"), R.ck_mask(conv, s, "out"))
    for s, f in [(0.5, 0.5), (0.9, 0.5), (0.8, 1.0), (1.0, 0.5)][: 4 if big else 2]:
        for group in ("in", "out"):
            _eq(k.intra_mask(conv, s, f, group), R.intra_mask(conv, s, f, group))
    for block in (1, 2, 3, 4) if big else (1, 3):
        for s in (0.0, 0.5, 0.95, 1.0) if big else (0.5, 1.0):
            _eq(k.block_mask(lin, block, s), R.block_mask(lin, block, s))
    mask = R.nm_mask(lin, 2, 4)
    out = k.masked_weight(lin, mask)
    assert out.dtype == dtype and torch.equal(out.cpu(), R.masked_weight(lin, mask).cpu())


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_kernels_nan_and_empty(backend):
    k, dev = _backend(backend)
    w = _weight((4, 8, 3, 3)).to(dev)
    w[0, 0, 0, 0] = w[1, 2, 1, 1] = math.nan
    _eq(k.nm_mask(w, 1, 4), R.nm_mask(w, 1, 4))
    _eq(k.intra_mask(w, 5 / 6, 0.8, "in"), R.intra_mask(w, 5 / 6, 0.8, "in"))  # window keep 3, CK keep 2
    e = torch.empty(0, 8, 3, 3, device=dev)
    assert k.nm_mask(e, 2, 4).shape == e.shape and k.intra_mask(e, 0.5, 0.5, "in").shape == e.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_weights(backend, dtype):
    """Each implementation of the ops takes any strides (the C++ ones copy to contiguous
    themselves): transposed / strided views give the masks of their contiguous copies."""
    k, dev = _backend(backend)
    conv = _weight((12, 10, 3, 3), dtype, ties=True).to(dev).transpose(0, 1)  # [10, 12, 3, 3]
    lin = _weight((9, 24), dtype, seed=1).to(dev)[:, ::2]  # [9, 12], strided
    cc, lc = conv.contiguous(), lin.contiguous()
    assert not conv.is_contiguous() and not lin.is_contiguous()
    _eq(k.nm_mask(lin, 2, 4), R.nm_mask(lc, 2, 4))
    _eq(k.nm_mask(conv, 1, 4), R.nm_mask(cc, 1, 4))
    _eq(k.window_mask(conv, 0.5, None), R.window_mask(cc, 0.5))
    _eq(k.ck_mask(conv, 0.4, "out"), R.ck_mask(cc, 0.4, "out"))
    _eq(k.intra_mask(conv, 0.7, 0.5, "in"), R.intra_mask(cc, 0.7, 0.5, "in"))
    _eq(k.block_mask(lin, 3, 0.5), R.block_mask(lc, 3, 0.5))
    mask = R.nm_mask(lc, 2, 4)
    out = k.masked_weight(lin, mask.t().contiguous().t())
    assert out.is_contiguous() and torch.equal(out.cpu(), R.masked_weight(lc, mask).cpu())
    torch.library.opcheck(torch.ops.sparsekern.window_mask, (conv.cpu(), 0.5, None))
    torch.library.opcheck(torch.ops.sparsekern.masked_weight, (lin.cpu(), mask.cpu()))


@pytest.mark.parametrize("shape", [(4, 3, 0, 0), (4, 3, 0, 3), (4, 3, 3, 0), (0, 3, 3, 3), (4, 0, 3, 3)])
def test_empty_kernels(shape):
    """Issue 14: intra_mask of a conv with R·S = 0 raised ZeroDivisionError (its CK sparsity
    divides by R·S); every conv mask of an empty weight is the empty mask, for every option."""
    w = torch.empty(shape)
    ref = kernel_backend("reference", "masks")[0]
    for group in ("in", "out"):
        for s in (0.0, 0.5, 1.0):
            for mask in (sk.intra_mask(w, s, group=group), sk.intra_mask(w, s, window_fraction=1.0, group=group),
                         R.intra_mask(w, s, group=group), torch.ops.sparsekern.intra_mask(w, s, 0.5, group),
                         sk.window_mask(w, s), sk.ck_mask(w, s, group=group), R.ck_mask(w, s, group),
                         R.window_mask(w, s), ref.window_mask(w, s, 0), ref.ck_mask(w, 1.0, group)):
                assert mask.dtype == torch.bool and mask.shape == w.shape
    assert R.intra_ck_sparsity(0, 0.5, 0.5) == 0.0


def _grid(n):
    """Sparsities where ``n·s`` is a half or a whole (``j / 2n``: SPEC round's ties), their
    neighbouring doubles, and round decimals."""
    grid = {j / (2 * n) for j in range(2 * n + 1)} | {j / 20 for j in range(21)} | {1 / 3, 2 / 3, 0.999}
    return sorted(grid | {math.nextafter(x, 0.0) for x in grid if x > 0} | {math.nextafter(x, 1.0) for x in grid
                                                                             if x < 1})


def test_cpp_counts_equal_python():
    """The C++ ops derive their counts from the sparsities (csrc/cpu/common.h: spec_round,
    keep_count, window_keep, intra_ck_sparsity) exactly as the Python reference does, over a grid
    of sizes and sparsities including SPEC round's halves: distinct |w|, so equal masks are equal
    counts."""
    _backend("cpp")
    ops = torch.ops.sparsekern
    for shape in [(3, 2, 1, 1), (2, 3, 1, 3), (4, 3, 2, 2), (5, 7, 3, 3), (3, 4, 2, 5), (17, 2, 5, 5), (1, 13, 1, 7)]:
        w = _weight(shape, seed=sum(shape))
        k, c, rs = shape[0], shape[1], shape[2] * shape[3]
        for s in _grid(rs):
            assert (ops.window_mask(w, s, None).reshape(-1, rs).sum(1) == R.window_keep(rs, s)).all(), (shape, s)
            assert (ops.window_mask(w, s, 2).reshape(-1, rs).sum(1) == R.window_keep(rs, s, 2)).all(), (shape, s)
        for group, g, dim in (("in", k, 0), ("out", c, 1)):
            for s in _grid(g):
                alive = ops.ck_mask(w, s, group).reshape(k, c, rs).any(2)
                assert (alive.sum(dim) == g - R.spec_round(g * s)).all(), (shape, group, s)
            for s in _grid(2 * g)[::3]:
                for f in (0.25, 0.5, 0.7, 1.0):
                    _eq(ops.intra_mask(w, s, f, group), R.intra_mask(w, s, f, group))
    for shape, block in [((5, 7), 2), ((9, 4), 3), ((3, 3), 1), ((13, 11), 4)]:
        w = _weight(shape, seed=shape[0])
        nb = math.ceil(shape[0] / block) * math.ceil(shape[1] / block)
        for s in _grid(nb):
            _eq(ops.block_mask(w, block, s), R.block_mask(w, block, s))


# --- mask properties (public API, SPEC §5) ----------------------------------------------------------

def test_nm_counts_and_top_magnitudes():
    for shape in [(64, 128), (16, 32, 3, 3)]:
        w = _weight(shape, ties=True)
        mask = sk.nm_mask(w, 2, 4)
        _eq(mask, R.nm_mask(w, 2, 4))
        # groups of 4 consecutive c at each fixed (k, r, s): channels-last
        g = mask.reshape(shape[0], shape[1] // 4, 4, -1)
        assert (g.sum(2) == 2).all()
        a = w.abs().reshape(g.shape)
        kept_min = torch.where(g, a, math.inf).amin(2)
        pruned_max = torch.where(g, -math.inf, a).amax(2)
        assert (kept_min >= pruned_max).all()


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("shape", [(64, 33, 3, 3), (100, 5, 3, 3), (17, 20, 3, 3), (9, 7, 2, 2)])
def test_ck_cut_every_keep(ties, shape):
    """Every keep of CK groups of 5..100 kernels, both groupings, equal to the reference: the
    cut from a short sorted list (keep or G − keep + 1 small), from two sorted halves (33..64
    kernels) or by bisection; 3×3 fp32 scores straight from w (kernel counts not a multiple
    of the vector width included), other kernels' through the key buffer."""
    _backend("cpp")
    w = _weight(shape, ties=ties)
    w.view(-1)[5] = math.nan
    for group, g in (("in", shape[0]), ("out", shape[1])):
        for keep in range(g + 1):
            s = (g - keep) / g
            assert g - R.spec_round(g * s) == keep
            _eq(torch.ops.sparsekern.ck_mask(w, s, group), R.ck_mask(w, s, group))


@pytest.mark.parametrize("dtype", DTYPES)
def test_ck_bisection_constant_and_narrow_columns(dtype):
    """CK groups of more than 64 kernels take the bisection, started from the common prefix of
    every column's min and max score: columns of equal scores (only the lower-index rule
    decides), of scores within 0.1 %, all zero, with NaN, equal magnitudes of both signs; 11
    columns (a partial vector), both groupings, CK alone and after a window (intra)."""
    _backend("cpp")
    g = torch.Generator().manual_seed(3)
    w = torch.randn(97, 11, 3, 3, generator=g)
    w[:, 0] = 0.5
    w[:, 1] = 1 + torch.rand(97, 3, 3, generator=g) * 1e-3
    w[:, 2] = 0.0
    w[:, 3] = 2.0
    w[::3, 3] = -2.0
    w[5, 4, 1, 1] = math.nan
    w[60:, 5] *= 1e-30  # scores across many exponents (subnormal in fp32)
    w = w.to(dtype)
    for x in (w, w.transpose(0, 1).contiguous()):  # G = 97: groups "in" of w, "out" of its transpose
        group = "in" if x is w else "out"
        for keep in (0, 1, 2, 17, 48, 49, 50, 95, 96, 97):
            s = (97 - keep) / 97
            _eq(torch.ops.sparsekern.ck_mask(x, s, group), R.ck_mask(x, s, group))
        for s, f in ((0.5, 0.5), (0.9, 0.3)):
            _eq(sk.intra_mask(x, s, f, group), R.intra_mask(x, s, f, group))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nk", [1, 7, 8, 9, 15, 16, 17, 31, 33, 71, 72, 73, 145])
def test_3x3_kernel_counts_around_vector_blocks(dtype, nk):
    """3×3 windows and CK alone on kernel counts around the blocks of the vector leaves (8 or 16
    kernels per gather / transpose, 16 per byte-shuffle expansion; the rest one by one), with
    ties and a NaN, as one [nk, 1] and one [1, nk] filter bank (CK groups of nk or 1 kernels)."""
    _backend("cpp")
    for ties in (False, True):
        w = _weight((nk, 1, 3, 3), dtype, ties, seed=nk)
        w.view(-1)[min(4, w.numel() - 1)] = math.nan
        for x in (w, w.reshape(1, nk, 3, 3)):
            for s in (0.0, 0.3, 0.5, 1.0):
                _eq(sk.window_mask(x, s), R.window_mask(x, s))
                for group in ("in", "out"):
                    _eq(sk.ck_mask(x, s, group), R.ck_mask(x, s, group))
                    _eq(sk.intra_mask(x, s, 0.5, group), R.intra_mask(x, s, 0.5, group))


def test_lower_index_wins_ties():
    w = torch.ones(2, 8)
    assert sk.nm_mask(w, 2, 4)[0].tolist() == [True, True, False, False] * 2
    c = torch.ones(4, 2, 3, 3)
    assert sk.window_mask(c, 0.5).reshape(8, 9)[0].tolist() == [True] * 4 + [False] * 5
    assert sk.ck_mask(c, 0.5)[:, 0, 0, 0].tolist() == [True, True, False, False]
    assert sk.ck_mask(c, 0.5, "out")[0, :, 0, 0].tolist() == [True, False]


@pytest.mark.parametrize("s", [0.0, 0.2, 0.5, 0.7, 1.0])
def test_window_and_ck_counts(s):
    w = _weight((32, 16, 3, 3), ties=True)
    keep = 9 - R.spec_round(9 * s)
    assert (sk.window_mask(w, s).reshape(-1, 9).sum(1) == keep).all()
    assert (sk.window_mask(w, s, max_nonzero=2).reshape(-1, 9).sum(1) == min(keep, 2)).all()
    for group, dim, g in (("in", 0, 32), ("out", 1, 16)):
        mask = sk.ck_mask(w, s, group)
        per_kernel = mask.reshape(32, 16, 9).sum(2)
        assert ((per_kernel == 0) | (per_kernel == 9)).all(), "CK left a partial kernel"
        assert ((per_kernel > 0).sum(dim) == g - R.spec_round(g * s)).all()


@pytest.mark.parametrize("s", [0.3, 0.5, 0.8, 0.9])
def test_intra_total_sparsity(s):
    w = _weight((256, 64, 3, 3))
    mask = sk.intra_mask(w, s)
    _eq(mask, R.intra_mask(w, s))
    assert abs((1 - mask.float().mean().item()) - s) < 0.01
    assert (mask <= sk.window_mask(w, 0.5 * s)).all()


def test_block_row_rule_and_counts():
    w = _weight((10, 13))
    w[4:6] *= 1e-3  # a weak block row: pruned entirely, then its best block comes back
    mask = sk.block_mask(w, 2, 0.9)
    assert mask.any(1).all()
    nb = 5 * 7
    blocks = torch.nn.functional.pad(mask, (0, 1)).reshape(5, 2, 7, 2)[:, 0, :, 0]
    assert blocks.sum() >= nb - R.spec_round(0.9 * nb)
    assert sk.block_mask(w, 3, 1.0).any(1).all()
    assert sk.block_mask(w, 4, 0.0).all()


@pytest.mark.parametrize("ties", [False, True])
def test_groups_over_4096_by_radix_cut(ties):
    """Groups of more than 4096 elements (N:M with m = 8192, 65×65 windows) take the C++ radix
    cut, run inside the groups' parallel loop: equal to the reference at every count."""
    _backend("cpp")
    w = _weight((3, 2 * 8192), ties=ties)
    for n in (1, 4000, 8191):
        _eq(sk.nm_mask(w, n, 8192), R.nm_mask(w, n, 8192))
    c = _weight((2, 3, 65, 65), ties=ties, seed=1)
    for s in (0.1, 0.97):
        _eq(sk.window_mask(c, s), R.window_mask(c, s))
        _eq(sk.intra_mask(c, s), R.intra_mask(c, s))


@pytest.mark.parametrize("block", [1, 4, 5])
def test_block_mask_large_ties_in_parallel(block):
    """Over 2^18 blocks the C++ cut is found and applied in parallel chunks (2 threads): the
    ties at the cut are kept in block order across chunks, as the reference keeps them.
    block 5: the run-time block size path of the C++ op (the public API caps it at 4)."""
    _backend("cpp")
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        w = _weight((520 * block, 520 * block + 3), ties=True)  # > 2^18 blocks, partial edge blocks
        for s in (0.3, 0.5, 0.9):
            _eq(torch.ops.sparsekern.block_mask(w, block, s), R.block_mask(w, block, s))
    finally:
        torch.set_num_threads(n)


def test_prune_fc_inputs():
    conv = _weight((4, 3, 3, 3))
    conv[1] = 0
    fc = _weight((5, 4 * 6))  # conv output [N, 4, 2, 3] flattened
    mask = sk.prune_fc_inputs(conv, fc)
    assert mask.shape == fc.shape
    assert not mask[:, 6:12].any() and mask[:, :6].all() and mask[:, 12:].all()
    _eq(sk.prune_fc_inputs(conv != 0, fc), mask)
    with pytest.raises(ValueError, match="multiple"):
        sk.prune_fc_inputs(conv, _weight((5, 10)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_weight_gradient(dtype):
    w = _weight((8, 4, 3, 3), dtype).requires_grad_()
    mask = sk.ck_mask(w.detach(), 0.5)
    out = sk.masked_weight(w, mask)
    assert out.dtype == dtype and (out[~mask] == 0).all() and torch.equal(out[mask], w.detach()[mask])
    g = _weight(w.shape, dtype, seed=5)
    out.backward(g)
    assert torch.equal(w.grad, torch.where(mask, g, torch.zeros((), dtype=dtype)))
    assert (w.grad[~mask] == 0).all()


@pytest.mark.parametrize("shape", [(), (0,), (1,), (7,), (8,), (9,), (3, 5, 7), (4, 0, 2), (2, 8)])
def test_pack_mask_round_trip(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(3)) < 0.4
    packed = sk.pack_mask(mask)
    n = mask.numel()
    assert packed.dtype == torch.uint8 and packed.shape == ((n + 7) // 8,)
    # little-endian bits, flat row-major order, zero padding
    bits = [(int(packed[i // 8]) >> (i % 8)) & 1 for i in range(8 * packed.numel())]
    assert bits == [int(b) for b in mask.reshape(-1).tolist()] + [0] * (8 * packed.numel() - n)
    _eq(sk.unpack_mask(packed, mask.shape), mask)
    nc = mask.transpose(0, -1) if mask.dim() >= 2 else mask  # non-contiguous input
    _eq(sk.unpack_mask(sk.pack_mask(nc), nc.shape), nc)
    assert sk.pack_mask(torch.tensor([True] + [False] * 8 + [True])).tolist() == [1, 2]


@pytest.mark.parametrize("call, exc, match", [
    (lambda m, p: sk.pack_mask(m.float()), TypeError, "mask"),
    (lambda m, p: sk.pack_mask([True]), TypeError, "mask"),
    (lambda m, p: sk.unpack_mask(p.int(), m.shape), TypeError, "packed"),
    (lambda m, p: sk.unpack_mask(p[None], m.shape), TypeError, "packed"),
    (lambda m, p: sk.unpack_mask(p, (3, 6)), ValueError, "needs 3"),
    (lambda m, p: sk.unpack_mask(p, (3, -5)), TypeError, "shape"),
    (lambda m, p: sk.unpack_mask(p, "35"), TypeError, "shape"),
])
def test_pack_mask_bad_inputs(call, exc, match):
    m = torch.ones(3, 5, dtype=torch.bool)
    with pytest.raises(exc, match=match):
        call(m, sk.pack_mask(m))


# --- op surface ------------------------------------------------------------------------------------

def _op_cases():
    c, lin = _weight((8, 8, 3, 3)), _weight((6, 8))
    mask = R.window_mask(c, 0.5)
    return [
        (torch.ops.sparsekern.nm_mask, (lin, 2, 4)),
        (torch.ops.sparsekern.nm_mask, (c, 1, 4)),
        (torch.ops.sparsekern.window_mask, (c, 0.5, 3)),
        (torch.ops.sparsekern.ck_mask, (c, 0.5, "out")),
        (torch.ops.sparsekern.intra_mask, (c, 0.7, 0.5, "in")),
        (torch.ops.sparsekern.block_mask, (lin, 3, 0.5)),
        (torch.ops.sparsekern.prune_fc_inputs, (c, _weight((3, 16)))),
        (torch.ops.sparsekern.masked_weight, (c.clone().requires_grad_(), mask)),
        (torch.ops.sparsekern.pack_mask, (mask,)),
        (torch.ops.sparsekern.unpack_mask, (R.pack_mask(mask), list(mask.shape))),
    ]


@pytest.mark.parametrize("case", range(10))
def test_opcheck(case):
    op, args = _op_cases()[case]
    torch.library.opcheck(op, args)


def test_compile_fullgraph():
    torch._dynamo.reset()

    @torch.compile(fullgraph=True)
    def f(conv, lin):
        m = sk.intra_mask(conv, 0.6) & sk.window_mask(conv, 0.3)
        return (sk.masked_weight(conv, m), sk.nm_mask(lin, 2, 4),
                sk.unpack_mask(sk.pack_mask(sk.block_mask(lin, 2, 0.5)), lin.shape))

    conv, lin = _weight((8, 8, 3, 3)), _weight((6, 8))
    out, nm, blk = f(conv, lin)
    m = R.intra_mask(conv, 0.6) & R.window_mask(conv, 0.3)
    assert torch.equal(out, R.masked_weight(conv, m))
    _eq(nm, R.nm_mask(lin, 2, 4))
    _eq(blk, R.block_mask(lin, 2, 0.5))


@pytest.mark.parametrize("call, exc, match", [
    (lambda w, c: sk.nm_mask(w, 2, 3), ValueError, "m=3"),
    (lambda w, c: sk.nm_mask(w, 5, 4), ValueError, "n"),
    (lambda w, c: sk.nm_mask(w, 2.0, 4), TypeError, "n"),
    (lambda w, c: sk.nm_mask(w.int(), 2, 4), TypeError, "w"),
    (lambda w, c: sk.nm_mask(w[0], 2, 4), ValueError, "reduction"),
    (lambda w, c: sk.window_mask(c, 1.5), ValueError, "sparsity"),
    (lambda w, c: sk.window_mask(c, math.nan), ValueError, "sparsity"),
    (lambda w, c: sk.window_mask(w, 0.5), ValueError, "4-D"),
    (lambda w, c: sk.window_mask(c, 0.5, max_nonzero=-1), ValueError, "max_nonzero"),
    (lambda w, c: sk.ck_mask(c, -0.1), ValueError, "sparsity"),
    (lambda w, c: sk.ck_mask(c, 0.5, group="rows"), ValueError, "group"),
    (lambda w, c: sk.ck_mask(c.long(), 0.5), TypeError, "w"),
    (lambda w, c: sk.intra_mask(c, 0.5, window_fraction=2.0), ValueError, "window_fraction"),
    (lambda w, c: sk.block_mask(c, 2, 0.5), ValueError, "2-D"),
    (lambda w, c: sk.block_mask(w, 5, 0.5), ValueError, "block"),
    (lambda w, c: sk.block_mask(w, 2, "0.5"), TypeError, "sparsity"),
    (lambda w, c: sk.masked_weight(w, w > 0.0001), ValueError, None),
    (lambda w, c: sk.masked_weight(w, torch.ones_like(w)), TypeError, "mask"),
    (lambda w, c: sk.masked_weight(w, torch.ones(3, 3, dtype=torch.bool)), ValueError, "mask"),
])
def test_bad_inputs(call, exc, match):
    w, c = _weight((6, 8)), _weight((4, 4, 3, 3))
    if match is None:  # a valid call: no error
        call(w, c)
        return
    with pytest.raises(exc, match=match):
        call(w, c)
