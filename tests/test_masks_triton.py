"""Triton masks kernels on groups of every size the C++ kernels take (SPEC §5): N:M with m over
64, R×S windows over 64 elements (9×9, 11×11, 7×10), CK groups, and groups over 4096 elements
(radix select, one program each), equal bit for bit to ``sparsekern.reference`` with heavy ties
and NaN (above every number); the launchers' grids and tiles for the GPU, from meta tensors.
Without a GPU the kernels run under TRITON_INTERPRET=1 (slow): small tensors."""
import math

import pytest
import torch

from sparsekern import reference as R
from sparsekern.triton import _common
from sparsekern.triton import masks as T
from utils import DTYPES, TRITON_DEVICE as DEV
# the interpreter is slow: 16-bit weights with heavy ties only
CASES = [pytest.param(d, t, id=f"{str(d)[6:]}-{'ties' if t else 'randn'}")
         for d in DTYPES for t in (False, True) if t or d == torch.float32]


def _weight(shape, dtype, ties, nans=(), seed=0):
    """randn (with ``ties`` rounded to multiples of 0.5: long runs of equal |w|), NaN at the flat
    indices ``nans``, on the Triton device."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    w = (w * 1.5).round() / 2 if ties else w
    w.view(-1)[list(nans)] = math.nan
    return w.to(dtype).to(DEV)


def _ref_kernel_mask(w, window_keep, ck_keep, by_out):
    """The launcher ``kernel_mask``'s contract from the reference: window keep per R×S kernel,
    then the CK keep per group of kernels scored by their max kept |w| (AND of both)."""
    k, c, r, s = w.shape
    a = w.float().abs().reshape(k * c, r * s)
    wm = R.keep_top(a, window_keep)
    score = torch.where(wm, a, 0.0).amax(1).reshape(k, c) if r * s else a.new_zeros(k, c)
    alive = R.keep_top(score, ck_keep) if by_out else R.keep_top(score.t(), ck_keep).t()
    return (wm.reshape(k, c, r * s) & alive[:, :, None]).reshape(w.shape)


def _eq(got, want):
    assert got.dtype == torch.bool and got.shape == want.shape
    assert torch.equal(got.cpu(), want), f"{int((got.cpu() ^ want).sum())} entries differ"


def _kernel_cases(k, c, rs):
    """(window_keep, ck_keep, by_out): window only, CK by input channel / output filter, both."""
    return [(0, k, False), (1, k // 2, False), (rs // 2, 1, True), (rs - 1, 0, False),
            (rs, k, False), (rs, c - 1, True), (rs // 3, k - 1, False)]


@pytest.mark.parametrize("dtype, ties", CASES)
def test_nm_groups_over_64(dtype, ties):
    """N:M with m = 96 and 128 (bisection in registers, 32 and 16 groups a program), 256 and 1024
    (whole-tile groups), along in of a Linear and along C at fixed (k, r, s) of a conv."""
    cases = [((5, 192), 96), ((3, 128), 128), ((3, 512), 256), ((2, 1024, 1, 3), 1024)]
    for i, (shape, m) in enumerate(cases):
        w = _weight(shape, dtype, ties, nans=(5, 200), seed=i)
        for n in (0, 1, m // 2 + 1, m - 1, m):
            _eq(T.nm_mask(w, n, m), R.nm_mask(w, n, m))


@pytest.mark.parametrize("dtype, ties", CASES)
def test_kernels_over_64(dtype, ties):
    """Window, CK and intra masks of 9×9, 11×11 and 7×10 convs (odd K and C): the window step
    by bisection in registers, its scores into the CK step of both groupings."""
    for i, shape in enumerate([(6, 5, 9, 9), (3, 4, 11, 11), (5, 3, 7, 10)]):
        w = _weight(shape, dtype, ties, nans=(7, 100), seed=i)
        k, c, rs = shape[0], shape[1], shape[2] * shape[3]
        for window_keep, ck_keep, by_out in _kernel_cases(k, c, rs):
            want = _ref_kernel_mask(w.cpu(), window_keep, ck_keep, by_out)
            _eq(T.kernel_mask(w, window_keep, ck_keep, by_out), want)
        s, f = 0.7, 0.5
        s_ck = R.intra_ck_sparsity(rs, s, f)
        for group, g in (("in", k), ("out", c)):
            keeps = R.window_keep(rs, f * s), g - R.spec_round(g * s_ck)
            _eq(T.kernel_mask(w, *keeps, group == "out"), R.intra_mask(w.cpu(), s, f, group))


@pytest.mark.parametrize("ties", [False, True])
def test_groups_over_4096_radix_select(ties):
    """Groups over 4096 elements, one program each: N:M with m = 8192, 65×65 windows (and their
    scores into CK), CK groups of 4100 kernels of both groupings; keep = 0, 1, the middle, all
    but one, all (a window keep over R·S keeps all, as in the C++ kernels)."""
    w = _weight((2, 8192), torch.float32, ties, nans=(3, 9000))
    for n in (0, 1, 4097, 8191, 8192):
        _eq(T.nm_mask(w, n, 8192), R.nm_mask(w, n, 8192))
    w = _weight((1, 2, 65, 65), torch.bfloat16, ties, nans=(4, 4300), seed=1)
    for window_keep, ck_keep, by_out in ((0, 1, False), (1, 1, True), (2113, 1, True),
                                         (4224, 2, True), (4300, 0, True)):
        want = _ref_kernel_mask(w.cpu(), window_keep, ck_keep, by_out)
        _eq(T.kernel_mask(w, window_keep, ck_keep, by_out), want)
    for shape, by_out in (((4100, 2, 1, 1), False), ((2, 4100, 1, 1), True)):
        w = _weight(shape, torch.float16, ties, nans=(0, 4101), seed=2)
        for ck_keep in (0, 1, 2050, 4099):
            want = _ref_kernel_mask(w.cpu(), 1, ck_keep, by_out)
            _eq(T.kernel_mask(w, 1, ck_keep, by_out), want)


def test_launches_fit_the_gpu():
    """From meta tensors (nothing runs, nothing is read back): every launch, small to huge groups,
    has a grid within CUDA's limits, every selection a register tile of at most 4096 elements;
    groups over 64 elements take the bisection tile, over 4096 the streamed radix select."""
    launches = []

    def record(kernel, grid, args, kwargs):
        launches.append((kernel.fn.__name__, grid, kwargs))
        return False

    meta = dict(device="meta", dtype=torch.float16)
    with _common.recording(record):
        T.nm_mask(torch.empty(4096, 1 << 19, **meta), 2, 4)
        T.nm_mask(torch.empty(64, 1 << 16, 3, 3, **meta), 100, 1024)
        T.nm_mask(torch.empty(1 << 12, 1 << 16, **meta), 1000, 1 << 16)
        T.kernel_mask(torch.empty(1 << 12, 1 << 12, 11, 11, **meta), 60, 100, False)
        T.kernel_mask(torch.empty(8, 6000, 65, 65, **meta), 60, 100, True)
    for name, grid, kw in launches:
        assert len(grid) == 1 and 1 <= grid[0] <= 2 ** 31 - 1, (name, grid)
    selects = [(name, kw) for name, _, kw in launches if name.endswith("_select_kernel")]
    assert [(name[1:5], kw.get("RANK")) for name, kw in selects] == [
        ("tile", True), ("tile", False), ("stre", None),  # 2:4, m = 1024, m = 65536
        ("tile", False), ("tile", False),  # 11×11 windows, CK groups of 4096
        ("stre", None), ("stre", None)]  # 65×65 windows, CK groups of 6000
    for name, kw in selects:
        if name == "_stream_select_kernel":
            assert kw["BLOCK"] <= 4096
        else:
            assert kw["BLOCK_G"] * kw["MP"] * (kw["MP"] if kw["RANK"] else 1) <= 4096, kw
