"""spmm family: the CSR, block (BSR), N:M and CK kernels (C++ and reference) against dense
F.linear / F.conv2d, the format builders and their inverses (``sparsekern.inference.formats``), the
layers on the ops (``sparsekern.inference.functional``), opcheck, torch.compile, bad inputs."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import sparsekern  # noqa: F401  (registers torch.ops.sparsekern.*)
from sparsekern import reference
import sparsekern as sk
from sparsekern.inference import formats, functional
from sparsekern.inference.formats import bsr_from_dense, ck_from_dense, csr_from_dense, nm_from_dense, nm_pattern
from sparsekern.ops import spmm
from utils import kernel_backend

TOL = dict(atol=1e-4, rtol=1e-4)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _no_bias(bias, val):
    return bias if bias is not None else val.new_empty(0)


def csr_linear(x, rowptr, col, val, bias, out_features):
    """:func:`functional.sparse_linear` with a CSR weight (as ``CSRLinear``)."""
    b = _no_bias(bias, val)
    return functional.sparse_linear(x, lambda xt, tr: spmm.csr_mm(rowptr, col, val, b, xt, out_features, tr),
                                    out_features)


def csr_conv1x1(x, rowptr, col, val, bias, out_features, stride=1):
    """:func:`functional.sparse_conv1x1` with a CSR weight ``[out, in]`` (as ``CSRConv1x1``)."""
    b = _no_bias(bias, val)
    return functional.sparse_conv1x1(x, lambda xs, tr: spmm.csr_mm(rowptr, col, val, b, xs, out_features, tr),
                                     out_features, stride)


def sparse_weight(out, inp, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    return w * (torch.rand(out, inp, generator=g) < density)


@pytest.fixture(params=["cpp", "reference"])
def kern(request):
    return kernel_backend(request.param, "spmm")[0]


# (out, in, n): odd shapes, n = 1 (mat-vec), n crossing the 64/32/16/tail column tiles
SHAPES = [(1, 1, 1), (7, 5, 1), (7, 5, 3), (33, 17, 16), (65, 129, 100), (130, 77, 64), (19, 300, 47)]


@pytest.mark.parametrize("out,inp,n", SHAPES)
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("transpose_out", [False, True])
@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("has_residual", [False, True])
def test_csr_mm_matches_dense(kern, out, inp, n, density, transpose_out, has_bias, relu, has_residual):
    w = sparse_weight(out, inp, density)
    x = torch.randn(inp, n)
    bias = torch.randn(out) if has_bias else torch.empty(0)
    rowptr, col, val = csr_from_dense(w)
    expect = w @ x + (bias[:, None] if has_bias else 0)
    expect = expect.t() if transpose_out else expect
    residual = torch.randn_like(expect.t()).t() if has_residual else None  # non-contiguous
    expect = expect + residual if has_residual else expect
    y = kern.csr_mm(rowptr, col, val, bias, x, out, transpose_out, relu, residual)
    torch.testing.assert_close(y, expect.relu() if relu else expect, **TOL)
    assert y.is_contiguous()


def test_csr_from_dense_roundtrip_and_empty_rows():
    w = sparse_weight(40, 23, 0.3)
    w[::3] = 0  # empty rows
    rowptr, col, val = csr_from_dense(w)
    assert rowptr.dtype == torch.int64 and col.dtype == torch.int32 and val.dtype == torch.float32
    assert rowptr[-1] == val.numel() == int((w != 0).sum())
    torch.testing.assert_close(reference.csr_to_dense(rowptr, col, val, w.shape), w, rtol=0, atol=0)
    assert torch.equal(formats.csr_to_dense(rowptr, col, val, w.shape), w)  # the modules' weight_dense


@pytest.mark.parametrize("lead", [(), (1,), (3,), (2, 5)])
def test_csr_linear_leading_dims(lead):
    w, b = sparse_weight(31, 45, 0.2), torch.randn(31)
    x = torch.randn(*lead, 45)
    torch.testing.assert_close(csr_linear(x, *csr_from_dense(w), b, 31), F.linear(x, w, b), **TOL)
    torch.testing.assert_close(csr_linear(x, *csr_from_dense(w), None, 31), F.linear(x, w), **TOL)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("n,per_call", [(0, None), (1, None), (3, None), (5, 2)])  # images per kernel call
def test_csr_conv1x1(stride, n, per_call, monkeypatch):
    if per_call:
        monkeypatch.setattr(functional, "conv_group", lambda n, image_bytes: per_call)
    w, b = sparse_weight(24, 13, 0.3).reshape(24, 13, 1, 1), torch.randn(24)
    x = torch.randn(n, 13, 9, 7)
    y = csr_conv1x1(x, *csr_from_dense(w.reshape(24, 13)), b, 24, stride)
    torch.testing.assert_close(y, F.conv2d(x, w, b, stride=stride), **TOL)


@pytest.mark.parametrize("order", ["ascending", "descending", "shuffled"])
@pytest.mark.parametrize("n", [16, 20, 70])
@pytest.mark.parametrize("transpose_out", [False, True])
@pytest.mark.parametrize("relu", [False, True])
def test_csr_mm_input_chunks(order, n, transpose_out, relu):
    """The C++ kernel's reduction in chunks of x rows over blocks of many rows (1100 rows; in
    >= 2000 and large enough that a 64-column tile's slice of x, in·256 bytes, exceeds half this
    CPU's L2, below which the kernel does not chunk), a last column tile shifted left (n = 20,
    70), columns in any order within a row; the fused ReLU and residual apply to the whole sum
    (the last chunk), not to partial sums, and equal the unfused add bit for bit (same sum, then
    the same add)."""
    l2 = os.sysconf("SC_LEVEL2_CACHE_SIZE") if "SC_LEVEL2_CACHE_SIZE" in os.sysconf_names else 0
    inp = max(2000, max(l2, 0) // 128 + 64)
    w, b = sparse_weight(1100, inp, 0.3), torch.randn(1100)
    rowptr, col, val = csr_from_dense(w)
    if order != "ascending":
        row = torch.repeat_interleave(torch.arange(1100), rowptr.diff())
        within = 1 - col / inp if order == "descending" else torch.rand(col.numel())  # in [0, 1]
        perm = torch.argsort(row * 2 + within.double())
        col, val = col[perm].contiguous(), val[perm].contiguous()
    x = torch.randn(inp, n)
    expect = w @ x + b[:, None]
    expect = expect.relu() if relu else expect
    y = torch.ops.sparsekern.csr_mm(rowptr, col, val, b, x, 1100, transpose_out, relu)
    torch.testing.assert_close(y, expect.t() if transpose_out else expect, **TOL)
    residual = torch.randn(n, 1100) if transpose_out else torch.randn(1100, n)
    y = torch.ops.sparsekern.csr_mm(rowptr, col, val, b, x, 1100, transpose_out, relu, residual)
    unfused = torch.ops.sparsekern.csr_mm(rowptr, col, val, b, x, 1100, transpose_out, False) + residual
    assert torch.equal(y, unfused.relu() if relu else unfused)


@pytest.mark.parametrize("n,inp", [(2, 3), (9, 17), (70, 130), (16, 1000)])
def test_csr_mm_transposed_input(n, inp):
    """x given as the transpose of a contiguous [n, in] (a Linear's input): the C++ kernel's
    blocked transpose copy, 8×8 blocks and odd edges."""
    w = sparse_weight(21, inp, 0.3)
    xt = torch.randn(n, inp)
    y = torch.ops.sparsekern.csr_mm(*csr_from_dense(w), torch.empty(0), xt.t(), 21, False)
    torch.testing.assert_close(y, w @ xt.t(), **TOL)


def test_large_multithreaded():
    w, b = sparse_weight(1000, 512, 0.1), torch.randn(1000)
    for batch in (1, 64, 70):
        x = torch.randn(batch, 512)
        torch.testing.assert_close(csr_linear(x, *csr_from_dense(w), b, 1000), F.linear(x, w, b), **TOL)


def test_opcheck():
    w = sparse_weight(9, 11, 0.4)
    rowptr, col, val = csr_from_dense(w)
    for x, tr in ((torch.randn(11, 5), True), (torch.randn(11, 1), False)):
        torch.library.opcheck(torch.ops.sparsekern.csr_mm, (rowptr, col, val, torch.randn(9), x, 9, tr))
        torch.library.opcheck(torch.ops.sparsekern.csr_mm, (rowptr, col, val, torch.randn(9), x, 9, tr, True))
        residual = torch.randn((x.shape[1], 9) if tr else (9, x.shape[1]))
        for relu in (False, True):
            torch.library.opcheck(torch.ops.sparsekern.csr_mm, (rowptr, col, val, torch.randn(9), x, 9, tr, relu, residual))


def test_compile_fullgraph():
    w = sparse_weight(16, 8, 0.3)
    rowptr, col, val = csr_from_dense(w)
    f = torch.compile(lambda x: csr_linear(x, rowptr, col, val, None, 16), fullgraph=True, backend="eager")
    x = torch.randn(4, 8)
    torch.testing.assert_close(f(x), F.linear(x, w), **TOL)


def test_bad_inputs():
    rowptr, col, val = csr_from_dense(sparse_weight(4, 3, 0.5))
    ops = kernel_backend("cpp", "spmm")[0]
    with pytest.raises(RuntimeError, match="float32"):  # one dtype, but the C++ kernels take fp32 only
        ops.csr_mm(rowptr, col, val.half(), torch.empty(0), torch.randn(3, 2, dtype=torch.float16), 4, True)
    with pytest.raises(RuntimeError, match="rowptr"):
        ops.csr_mm(rowptr, col, val, torch.empty(0), torch.randn(3, 2), 5, True)
    with pytest.raises(RuntimeError, match="bias"):
        ops.csr_mm(rowptr, col, val, torch.randn(3), torch.randn(3, 2), 4, True)
    for n in (1, 2):  # batch 1 checks inside the mat-vec
        with pytest.raises(RuntimeError, match=r"column index \d+ outside \[0, 3\)"):
            ops.csr_mm(rowptr, col + 3, val, torch.empty(0), torch.randn(3, n), 4, True)
        with pytest.raises(RuntimeError, match=r"column index -\d+ outside \[0, 3\)"):
            ops.csr_mm(rowptr, col - col.max() - 1, val, torch.empty(0), torch.randn(3, n), 4, True)
    with pytest.raises(RuntimeError, match="rowptr must run"):
        ops.csr_mm(rowptr + 1, col, val, torch.empty(0), torch.randn(3, 2), 4, True)
    rowptr, col, val = csr_from_dense(sparse_weight(1100, 300, 0.3))  # many row tasks, each checks its own
    for bad in (300, -1):
        for at in (0, col.numel() - 1):  # the first task's rows, the last one's
            wrong = col.clone()
            wrong[at] = bad
            for n in (20, 64):
                with pytest.raises(RuntimeError, match=rf"column index {bad} outside \[0, 300\)"):
                    ops.csr_mm(rowptr, wrong, val, torch.empty(0), torch.randn(300, n), 1100, False)
    with pytest.raises(ValueError, match="float32"):
        csr_from_dense(torch.ones(2, 2, dtype=torch.float16))
    with pytest.raises(ValueError, match="2-D"):
        csr_from_dense(torch.ones(2))


#: (batch, images per kernel call): the whole batch stacked in one call, or groups of 2, 2, 1.
BATCHES = [(1, None), (2, None), (5, None), (5, 2)]


@pytest.mark.parametrize("cfg", [
    # (out, in, kernel, stride, padding, dilation, H, W)
    (8, 3, (3, 3), (1, 1), (1, 1), (1, 1), 7, 9),
    (5, 4, (3, 3), (2, 2), (1, 1), (1, 1), 11, 6),
    (6, 2, (5, 3), (1, 2), (2, 0), (1, 1), 9, 10),
    (4, 3, (3, 3), (1, 1), (2, 2), (2, 2), 8, 8),
    (70, 5, (1, 1), (1, 1), (1, 1), (1, 1), 5, 5),
    (3, 2, (3, 3), (1, 1), (0, 0), (1, 1), 3, 3),
    (4, 3, (3, 3), (2, 2), (2, 2), (2, 2), 11, 10),  # strided phases with dilation
    (5, 2, (3, 3), (3, 3), (1, 1), (1, 1), 10, 11),
    (3, 2, (3, 3), (2, 2), (3, 3), (1, 1), 5, 6),  # padding wider than the kernel
    (4, 3, (7, 7), (2, 2), (3, 3), (1, 1), 13, 12),  # ResNet stem-like
])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("batch,per_call", BATCHES)
@pytest.mark.parametrize("relu", [False, True])
def test_csr_conv2d(kern, cfg, density, has_bias, batch, per_call, relu, monkeypatch):
    out, inp, k, stride, padding, dilation, h, w = cfg
    wt = sparse_weight(out, inp * k[0] * k[1], density).reshape(out, inp, *k)
    bias = torch.randn(out) if has_bias else None
    x = torch.randn(batch, inp + 1, h, w)[:, 1:]  # non-contiguous
    monkeypatch.setattr(functional, "csr_conv", kern.csr_conv)
    if per_call:
        monkeypatch.setattr(functional, "conv_group", lambda n, image_bytes: per_call)
    args = (*csr_from_dense(wt.reshape(out, -1)), bias, out, k, stride, padding, dilation)
    cache = {}
    y = functional.csr_conv2d(x, *args, cache=cache, relu=relu)
    expect = F.conv2d(x, wt, bias, stride, padding, dilation)
    expect = expect.relu() if relu else expect
    torch.testing.assert_close(y, expect, **TOL)
    y = functional.csr_conv2d(x.flip(0), *args, cache=cache, relu=relu)  # reused offsets and buffers
    torch.testing.assert_close(y, expect.flip(0), **TOL)


@pytest.mark.parametrize("batch", [0, 1, 3])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("broadcast", [False, True])
@pytest.mark.parametrize("one_image_groups", [False, True])
def test_layers_residual(batch, relu, broadcast, one_image_groups, monkeypatch):
    """The layers' ``residual``: ``max(layer(x) + residual, 0)``, fused into the kernel for one
    image (or any Linear batch; a batched 1×1 conv's groups of one image) with a residual of the
    output's shape, added in place to each group's output for larger groups, the add (broadcast
    as ``+``) after the kernel otherwise; the same either way."""
    if one_image_groups:
        monkeypatch.setattr(functional, "CONV_GROUP_BYTES", 1)
    w, b = sparse_weight(12, 18, 0.4), torch.randn(12)
    rowptr, col, val = csr_from_dense(w)

    def mm(xt, transpose_out, relu=False, residual=None):
        return spmm.csr_mm(rowptr, col, val, b, xt, 12, transpose_out, relu=relu, residual=residual)

    x = torch.randn(batch, 5, 18)
    expect = F.linear(x, w, b)
    residual = torch.randn(1, 1, 12) if broadcast else torch.randn_like(expect)
    y = functional.sparse_linear(x, mm, 12,
                                 relu, residual)
    torch.testing.assert_close(y, (expect + residual).relu() if relu else expect + residual, **TOL)
    x = torch.randn(batch, 18, 7, 6)
    expect = F.conv2d(x, w[:, :, None, None], b, stride=2)
    residual = torch.randn(1, 12, 1, 1) if broadcast else torch.randn_like(expect)
    y = functional.sparse_conv1x1(x, mm, 12, 2,
                                  relu, residual)
    torch.testing.assert_close(y, (expect + residual).relu() if relu else expect + residual, **TOL)
    wt = sparse_weight(12, 2 * 9, 0.5).reshape(12, 2, 3, 3)
    x = torch.randn(batch, 2, 7, 6)
    expect = F.conv2d(x, wt, b, 2, 1)
    residual = torch.randn(1, 12, 1, 1) if broadcast else torch.randn_like(expect)
    expect = (expect + residual).relu() if relu else expect + residual
    geometry = (12, (3, 3), (2, 2), (1, 1), (1, 1))
    torch.testing.assert_close(functional.csr_conv2d(x, *csr_from_dense(wt.reshape(12, -1)), b, *geometry,
                                                     relu=relu, residual=residual), expect, **TOL)
    torch.testing.assert_close(functional.ck_conv2d(x, *ck_from_dense(wt), b, *geometry, relu=relu,
                                                    residual=residual), expect, **TOL)


def test_csr_conv_opcheck_and_bounds():
    rowptr, col, val = csr_from_dense(sparse_weight(6, 4, 0.5))
    off = (col * 3).int()
    x = torch.randn(4 * 3 + 6)
    for relu in (False, True):
        torch.library.opcheck(torch.ops.sparsekern.csr_conv, (rowptr, off, val, torch.randn(6), x, 6, 6, 7, 3, 2, relu))
        torch.library.opcheck(torch.ops.sparsekern.csr_conv,
                              (rowptr, off, val, torch.randn(6), x, 6, 6, 7, 3, 2, relu, torch.randn(6, 2, 2)))
    ops = kernel_backend("cpp", "spmm")[0]  # the C++ kernel's checks
    for slab, wp, wv in ((4, 3, 2), (100, 6, 6), (1, 2, 0)):
        torch.testing.assert_close(
            ops.csr_conv(rowptr, off, val, torch.empty(0), x, 6, 6, slab, wp, wv),
            reference.csr_conv(rowptr, off, val, torch.empty(0), x, 6, 6, slab, wp, wv), **TOL)
    with pytest.raises(RuntimeError, match="reads past"):
        ops.csr_conv(rowptr, off, val, torch.empty(0), x, x.numel() - int(off.max()) + 1, 6, 9, 1, 1)
    with pytest.raises(RuntimeError, match="dividing n"):
        ops.csr_conv(rowptr, off, val, torch.empty(0), x, 5, 6, 9, 3, 2)


@pytest.mark.parametrize("slack", [0, 7, 15, 40])
@pytest.mark.parametrize("n,wp,wv", [(45, 9, 7), (63, 9, 7), (70, 10, 10), (200, 40, 33)])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("has_residual", [False, True])
def test_direct_conv_tail_columns(n, wp, wv, slack, relu, has_residual):
    """The last n % 16 wide columns: lane by lane when x ends at the furthest read (slack 0), as a
    whole vector whose extra columns are dropped when x has 15 more elements (slack >= 15;
    in between: a partial fit), for csr_conv and ck_conv, 3×3 taps over 3 channels; a residual
    ``[out, n / wp, wv]`` added to the kept columns only."""
    ops = kernel_backend("cpp", "spmm")[0]
    e = torch.empty(0)
    wt = sparse_weight(70, 3 * 9, 0.4).reshape(70, 3, 3, 3)
    plane = 3 * wp + n
    taps = functional.conv_taps((3, 3), (1, 1), (1, 1), plane // wp + 1, wp)
    rowptr, col, val = csr_from_dense(wt.reshape(70, -1))
    off = ((col // 9).long() * plane + taps.long()[col.long() % 9]).int()
    x = torch.randn(int(off.max()) + n + slack)
    residual = torch.randn(70, n // wp, wv + 1)[..., 1:] if has_residual else None  # non-contiguous
    args = (rowptr, off, val, torch.randn(70), x, n, 70, 2 * plane, wp, wv, relu, residual)
    torch.testing.assert_close(ops.csr_conv(*args), reference.csr_conv(*args), **TOL)
    x = torch.randn(2 * plane + int(taps.max()) + n + slack)
    args = (*ck_from_dense(wt), taps, torch.randn(70), x, n, 70, plane, 2, wp, wv, relu, residual)
    torch.testing.assert_close(ops.ck_conv(*args), reference.ck_conv(*args), **TOL)


# --- grouped / depthwise conv ---------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [
    # (in, groups, out, kernel, stride, padding, dilation, H, W): groups from 1 to C, multipliers
    (8, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1), 7, 9),  # depthwise
    (6, 6, 12, (3, 3), (2, 2), (1, 1), (1, 1), 11, 6),  # depthwise, multiplier 2, stride 2
    (6, 3, 9, (5, 3), (1, 2), (2, 0), (1, 1), 9, 10),
    (4, 1, 5, (3, 3), (1, 1), (2, 2), (2, 2), 8, 8),  # groups 1
    (6, 2, 4, (3, 3), (2, 2), (2, 2), (2, 2), 11, 10),  # strided phases with dilation
    (5, 5, 5, (3, 3), (3, 3), (3, 3), (1, 1), 5, 6),  # stride 3, padding wider than the kernel
    (3, 3, 3, (3, 3), (1, 1), (0, 0), (1, 1), 3, 3),  # one output pixel
    (16, 16, 16, (3, 3), (2, 1), (1, 1), (1, 1), 70, 37),  # 64/32/16-column tiles and tails
    (4, 4, 4, (1, 1), (2, 2), (0, 0), (1, 1), 9, 9),
    # several bands of output rows per group (input of a band ~16 KB), with padding rows
    (32, 2, 8, (3, 3), (1, 1), (1, 1), (1, 1), 40, 21),
    (24, 1, 4, (3, 3), (2, 2), (2, 2), (2, 2), 45, 30),
    (3, 1, 8, (3, 3), (2, 2), (1, 1), (1, 1), 64, 64),  # a stem
    # groups 1, at most 8 output columns: one image in wide rows (csr_conv's leaf), channel slabs
    (70, 1, 6, (3, 3), (2, 2), (1, 1), (1, 1), 14, 13),
    (5, 1, 7, (5, 3), (3, 2), (2, 1), (1, 2), 17, 9),
    (130, 1, 3, (3, 3), (1, 1), (1, 1), (1, 1), 5, 6),
])
@pytest.mark.parametrize("density", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("relu", [False, True])
def test_csr_group_conv(kern, cfg, density, has_bias, batch, relu):
    inp, groups, out, k, stride, padding, dilation, h, w = cfg
    wt = sparse_weight(out, inp // groups * k[0] * k[1], density).reshape(out, inp // groups, *k)
    bias = torch.randn(out) if has_bias else torch.empty(0)
    x = torch.randn(batch, inp + 1, h, w)[:, 1:]  # non-contiguous
    y = kern.csr_group_conv(*csr_from_dense(wt.reshape(out, -1)), bias, x, out, groups, list(k), list(stride),
                            list(padding), list(dilation), relu)
    expect = F.conv2d(x, wt, bias if has_bias else None, stride, padding, dilation, groups)
    torch.testing.assert_close(y, expect.relu() if relu else expect, **TOL)


def test_csr_group_conv_large_multithreaded_empty_and_opcheck():
    wt = torch.randn(96, 1, 3, 3)
    wt = wt * (torch.rand(wt.shape) < 0.5)
    args = (*csr_from_dense(wt.reshape(96, -1)), torch.randn(96))
    for x, stride in ((torch.randn(3, 96, 30, 30), [1, 1]), (torch.randn(2, 96, 57, 57).transpose(2, 3), [2, 2])):
        y = spmm.csr_group_conv(*args, x, 96, 96, [3, 3], stride, [1, 1], [1, 1])
        torch.testing.assert_close(y, F.conv2d(x, wt, args[-1], stride, 1, 1, 96), **TOL)
    assert spmm.csr_group_conv(*args, torch.randn(0, 96, 5, 5), 96, 96, [3, 3], [2, 2], [1, 1], [1, 1]).shape == \
        (0, 96, 3, 3)
    wt = sparse_weight(6, 2 * 9, 0.5)
    x = torch.randn(2, 4, 7, 6)
    for bias, geometry in ((torch.randn(6), ([3, 3], [1, 1], [1, 1], [1, 1])),
                           (torch.empty(0), ([3, 3], [2, 1], [0, 2], [2, 1]))):
        for relu in (False, True):
            torch.library.opcheck(torch.ops.sparsekern.csr_group_conv,
                                  (*csr_from_dense(wt), bias, x, 6, 2, *geometry, relu))


def test_csr_group_conv_bad_inputs():
    ops = kernel_backend("cpp", "spmm")[0]
    rowptr, col, val = csr_from_dense(sparse_weight(6, 2 * 9, 1.0))
    e, x, g = torch.empty(0), torch.randn(1, 4, 5, 5), ([3, 3], [1, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="groups"):
        ops.csr_group_conv(rowptr, col, val, e, x, 6, 4, *g)
    with pytest.raises(RuntimeError, match="column index"):
        ops.csr_group_conv(rowptr, col + 9, val, e, x, 6, 2, *g)
    with pytest.raises(RuntimeError, match="rowptr"):
        ops.csr_group_conv(rowptr[:-1], col, val, e, torch.randn(1, 4, 5, 5), 6, 2, *g)
    with pytest.raises(RuntimeError, match="smaller than the dilated kernel"):
        ops.csr_group_conv(rowptr, col, val, e, torch.randn(1, 4, 2, 5), 6, 2, [3, 3], [1, 1], [0, 0], [1, 1])
    with pytest.raises(RuntimeError, match=r"x must be a float32 CPU tensor \[N, C, H, W\]"):
        ops.csr_group_conv(rowptr, col, val, e, torch.randn(4, 5, 5), 6, 2, *g)
    with pytest.raises(RuntimeError, match="bias"):
        ops.csr_group_conv(rowptr, col, val, torch.randn(5), x, 6, 2, *g)


# --- block CSR ------------------------------------------------------------------------------------

@pytest.mark.parametrize("out,inp,n", SHAPES)
@pytest.mark.parametrize("block", [(1, 1), (4, 4), (3, 5), (8, 1), (1, 8), (16, 16)])
@pytest.mark.parametrize("density", [0.0, 0.1, 1.0])
def test_bsr_mm_matches_dense(kern, out, inp, n, block, density):
    w = sparse_weight(out, inp, density)
    w[::3] = 0  # empty rows (and block rows)
    x = torch.randn(inp, n)
    rowptr, col, val = bsr_from_dense(w, block)
    for bias, transpose_out in ((torch.randn(out), False), (torch.empty(0), True)):
        y = kern.bsr_mm(rowptr, col, val, bias, x, out, transpose_out)
        expect = w @ x + (bias[:, None] if bias.numel() else 0)
        torch.testing.assert_close(y, expect.t() if transpose_out else expect, **TOL)


def test_bsr_from_dense_layout():
    w = sparse_weight(10, 7, 0.2)
    w[4:8] = 0
    rowptr, col, val = bsr_from_dense(w, (4, 3))
    assert rowptr.dtype == torch.int64 and col.dtype == torch.int32 and val.shape[1:] == (4, 3)
    assert rowptr.numel() == 3 + 1 and rowptr[1] == rowptr[2]  # block row 1 is empty
    assert rowptr[-1] == val.shape[0] == col.numel()
    assert (val != 0).sum() == (w != 0).sum()
    torch.testing.assert_close(reference.bsr_to_dense(rowptr, col, val, w.shape), w, rtol=0, atol=0)
    assert torch.equal(formats.bsr_to_dense(rowptr, col, val, w.shape), w)
    # a block-pruned weight fills its blocks
    bw = torch.randn(32, 32) * sk.block_mask(torch.randn(32, 32), 4, 0.75)
    assert formats.block_fill(bw, (4, 4)) == 1.0 and formats.block_fill(bw, (2, 2)) == 1.0
    assert formats.block_fill(bw, (8, 8)) < 1.0


# --- N:M ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("out,inp,n", [(1, 8, 1), (7, 8, 1), (7, 8, 3), (33, 16, 16), (65, 128, 100), (19, 296, 47)])
@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8), (3, 8), (1, 1)])
@pytest.mark.parametrize("transpose_out", [False, True])
def test_nm_mm_matches_dense(kern, out, inp, n, nm, transpose_out):
    k, m = nm  # every inp is a multiple of every m
    w0 = sparse_weight(out, inp, 0.9)
    w = w0 * sk.nm_mask(w0, k, m)
    w[::4] = 0  # groups with fewer than n nonzeros, empty rows
    x = torch.randn(inp, n)
    val, idx = nm_from_dense(w, k, m)
    assert val.shape == idx.shape == (out, inp // m * k) and idx.dtype == torch.uint8
    torch.testing.assert_close(reference.nm_to_dense(val, idx, k, m, inp), w, rtol=0, atol=0)
    assert torch.equal(formats.nm_to_dense(val, idx, k, m, inp), w)
    for bias in (torch.randn(out), torch.empty(0)):
        y = kern.nm_mm(val, idx, bias, x, k, m, out, transpose_out)
        expect = w @ x + (bias[:, None] if bias.numel() else 0)
        torch.testing.assert_close(y, expect.t() if transpose_out else expect, **TOL)


def test_nm_pattern_and_not_nm():
    w0 = torch.randn(16, 32)
    assert nm_pattern(w0 * sk.nm_mask(w0, 2, 4)) == (2, 4)
    assert nm_pattern(w0 * sk.nm_mask(w0, 1, 8)) == (1, 8)
    assert nm_pattern(w0) is None  # dense: not N:M
    assert nm_pattern(torch.randn(4, 6)) is None  # in not a multiple of any m
    with pytest.raises(ValueError, match="not 2:4"):
        nm_from_dense(w0, 2, 4)
    with pytest.raises(ValueError, match="multiple of m"):
        nm_from_dense(torch.zeros(3, 6), 2, 4)


# --- CK -------------------------------------------------------------------------------------------

CONV_CFGS = [
    # (out, in, kernel, stride, padding, dilation, H, W)
    (8, 3, (3, 3), (1, 1), (1, 1), (1, 1), 7, 9),
    (5, 4, (3, 3), (2, 2), (1, 1), (1, 1), 11, 6),
    (6, 2, (5, 3), (1, 2), (2, 0), (1, 1), 9, 10),
    (4, 3, (3, 3), (1, 1), (2, 2), (2, 2), 8, 8),
    (70, 40, (3, 3), (1, 1), (1, 1), (1, 1), 6, 5),
    (3, 2, (3, 3), (1, 1), (0, 0), (1, 1), 3, 3),
    (4, 3, (3, 3), (2, 2), (2, 2), (2, 2), 11, 10),
    (5, 2, (3, 3), (3, 3), (1, 1), (1, 1), 10, 11),
    (3, 2, (3, 3), (2, 2), (3, 3), (1, 1), 5, 6),
]


@pytest.mark.parametrize("cfg", CONV_CFGS)
@pytest.mark.parametrize("sparsity", [0.0, 0.6, 1.0])
@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("batch,per_call", BATCHES)
@pytest.mark.parametrize("relu", [False, True])
def test_ck_conv2d(kern, cfg, sparsity, has_bias, batch, per_call, relu, monkeypatch):
    out, inp, k, stride, padding, dilation, h, w = cfg
    wt = torch.randn(out, inp, *k)
    wt = wt * sk.ck_mask(wt, sparsity)
    wt[:, :, 0, 0] = 0  # partly zero kernels are stored whole
    wt[1] = 0  # an output channel with no kernel
    bias = torch.randn(out) if has_bias else None
    x = torch.randn(batch, inp, h, w + 2)[..., 1:-1]  # non-contiguous
    monkeypatch.setattr(functional, "ck_conv", kern.ck_conv)
    if per_call:
        monkeypatch.setattr(functional, "conv_group", lambda n, image_bytes: per_call)
    rowptr, chan, val = ck_from_dense(wt)
    assert val.shape[1] == k[0] * k[1] and rowptr[2] == rowptr[1]
    assert torch.equal(formats.ck_to_dense(rowptr, chan, val, wt.shape), wt)
    args = (rowptr, chan, val, bias, out, k, stride, padding, dilation)
    cache = {}
    y = functional.ck_conv2d(x, *args, cache=cache, relu=relu)
    expect = F.conv2d(x, wt, bias, stride, padding, dilation)
    expect = expect.relu() if relu else expect
    torch.testing.assert_close(y, expect, **TOL)
    y = functional.ck_conv2d(x.flip(0), *args, cache=cache, relu=relu)
    torch.testing.assert_close(y, expect.flip(0), **TOL)


# --- every new op: opcheck, compile, bad input -----------------------------------------------------

def test_new_ops_large_multithreaded():  # many parallel_for chunks
    w = sparse_weight(1000, 512, 0.1)
    wn = w * sk.nm_mask(w, 1, 4)
    ops = kernel_backend("cpp", "spmm")[0]
    for n in (1, 64, 70):
        x, b = torch.randn(512, n), torch.randn(1000)
        torch.testing.assert_close(ops.bsr_mm(*bsr_from_dense(w, (4, 4)), b, x, 1000, True), (w @ x + b[:, None]).t(), **TOL)
        torch.testing.assert_close(ops.nm_mm(*nm_from_dense(wn, 1, 4), b, x, 1, 4, 1000, False), wn @ x + b[:, None], **TOL)
    wt = torch.randn(300, 64, 3, 3)
    wt = wt * sk.ck_mask(wt, 0.8)
    x = torch.randn(3, 64, 20, 20)  # grid of row blocks × column chunks over the stacked images
    y = functional.ck_conv2d(x, *ck_from_dense(wt), None, 300, (3, 3), (1, 1), (1, 1), (1, 1))
    torch.testing.assert_close(y, F.conv2d(x, wt, padding=1), **TOL)
    y = functional.csr_conv2d(x, *csr_from_dense(wt.reshape(300, -1)), None, 300, (3, 3), (1, 1), (1, 1), (1, 1))
    torch.testing.assert_close(y, F.conv2d(x, wt, padding=1), **TOL)


def test_new_ops_opcheck():
    w = sparse_weight(9, 12, 0.4)
    wn = w * sk.nm_mask(w, 2, 4)
    val, idx = nm_from_dense(wn, 2, 4)
    for x, tr in ((torch.randn(12, 5), True), (torch.randn(12, 1), False), (torch.randn(12, 33), False)):
        torch.library.opcheck(torch.ops.sparsekern.bsr_mm, (*bsr_from_dense(w, (4, 4)), torch.randn(9), x, 9, tr))
        torch.library.opcheck(torch.ops.sparsekern.nm_mm, (val, idx, torch.empty(0), x, 2, 4, 9, tr))
    x = torch.randn(33, 12).t()  # non-contiguous [in, n]
    torch.testing.assert_close(torch.ops.sparsekern.bsr_mm(*bsr_from_dense(w, (2, 3)), torch.empty(0), x, 9, True),
                               F.linear(x.t(), w), **TOL)
    torch.testing.assert_close(torch.ops.sparsekern.nm_mm(val, idx, torch.empty(0), x, 2, 4, 9, False), wn @ x, **TOL)
    wt = torch.randn(6, 4, 3, 3)
    rowptr, chan, val = ck_from_dense(wt * sk.ck_mask(wt, 0.5))
    taps = functional.conv_taps((3, 3), (1, 1), (1, 1), 5, 5)
    for relu in (False, True):
        torch.library.opcheck(torch.ops.sparsekern.ck_conv,
                              (rowptr, chan, val, taps, torch.randn(6), torch.randn(4 * 25 + 2), 15, 6, 25, 2, 5, 3, relu))
        torch.library.opcheck(torch.ops.sparsekern.ck_conv,
                              (rowptr, chan, val, taps, torch.randn(6), torch.randn(4 * 25 + 2), 15, 6, 25, 2, 5, 3, relu,
                               torch.randn(6, 3, 3)))


def test_new_ops_compile_fullgraph():
    w = sparse_weight(16, 8, 0.3)
    rowptr, col, val = bsr_from_dense(w, (4, 2))
    f = torch.compile(lambda x: functional.sparse_linear(
        x, lambda xt, tr: spmm._bsr_mm(rowptr, col, val, torch.empty(0), xt, 16, tr), 16), fullgraph=True, backend="eager")
    x = torch.randn(4, 8)
    torch.testing.assert_close(f(x), F.linear(x, w), **TOL)


def test_conv2d_empty_batch():
    wt = sparse_weight(4, 3 * 9, 0.5).reshape(4, 3, 3, 3)
    x = torch.randn(0, 3, 6, 5)
    y = functional.csr_conv2d(x, *csr_from_dense(wt.reshape(4, -1)), None, 4, (3, 3), (2, 2), (1, 1), (1, 1))
    assert y.shape == (0, 4, 3, 3)
    y = functional.ck_conv2d(x, *ck_from_dense(wt), None, 4, (3, 3), (1, 1), (0, 0), (1, 1))
    assert y.shape == (0, 4, 4, 3)


def test_conv_group():
    assert functional.conv_group(256, functional.CONV_GROUP_BYTES // 16) == 16
    assert functional.conv_group(20, functional.CONV_GROUP_BYTES // 16) == 10  # two equal calls, not 16 + 4
    assert functional.conv_group(3, functional.CONV_GROUP_BYTES * 4) == 1
    assert functional.conv_group(5, 1) == 5


#: Positions of val, bias and x in each spmm op's arguments.
ARG_POS = spmm.ARG_POS


def _op_cases():
    """(name, arguments) of each spmm op on small valid inputs."""
    w = sparse_weight(9, 8, 0.4)
    x, e = torch.randn(8, 5), torch.empty(0)
    rowptr, col, val = csr_from_dense(w)
    wn = w * sk.nm_mask(w, 2, 4)
    wt = torch.randn(6, 4, 3, 3)
    ck = ck_from_dense(wt * sk.ck_mask(wt, 0.5))
    return [("csr_mm", (rowptr, col, val, torch.randn(9), x, 9, True)),
            ("csr_mm", (rowptr, col, val, e, x[:, :1].contiguous(), 9, False)),
            ("csr_conv", (rowptr, (col * 3).int(), val, e, torch.randn(8 * 3 + 6), 6, 9, 7, 3, 2)),
            ("bsr_mm", (*bsr_from_dense(w, (2, 3)), e, x, 9, False)),
            ("nm_mm", (*nm_from_dense(wn, 2, 4), e, x, 2, 4, 9, True)),
            ("ck_conv", (*ck, functional.conv_taps((3, 3), (1, 1), (1, 1), 5, 5), torch.randn(6),
                         torch.randn(4 * 25 + 2), 15, 6, 25, 2, 5, 3)),
            ("csr_group_conv", (*csr_from_dense(wt.reshape(6, -1)[:, :18]), torch.randn(6), torch.randn(2, 4, 7, 6),
                                6, 2, [3, 3], [2, 1], [1, 1], [1, 1]))]


@pytest.mark.parametrize("case", range(7))
def test_public_function_equals_registered_op(case):
    """spmm.<op> checks the dtypes and calls the registered op (no eager fast path): identical
    results in eager mode, on fake tensors (the op's fake kernel) and under torch.compile."""
    name, args = _op_cases()[case]
    fn, registered = getattr(spmm, name), getattr(torch.ops.sparsekern, name)
    y = fn(*args)
    assert torch.equal(y, registered(*args))
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = fn(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    assert fake.shape == y.shape
    compiled = torch.compile(lambda *a: fn(*a), fullgraph=True, backend="eager")
    assert torch.equal(compiled(*args), y)
    val, bias, x = (args[i] for i in ARG_POS[name])
    grad_x = x.detach().requires_grad_()  # no autograd formula: an error, not a silent no-gradient
    # (the C++ library's Autograd kernel; without the library, define()'s Python one)
    with pytest.raises(RuntimeError, match=rf"derivative for sparsekern::{name} is not implemented|autograd formula"):
        fn(*(grad_x if a is x else a for a in args)).sum().backward()


def test_new_ops_bad_inputs():
    ops = kernel_backend("cpp", "spmm")[0]
    rowptr, col, val = bsr_from_dense(sparse_weight(8, 6, 0.5), (4, 2))
    e = torch.empty(0)
    with pytest.raises(RuntimeError, match="float32"):  # one dtype, but the C++ kernels take fp32 only
        ops.bsr_mm(rowptr, col, val.half(), e, torch.randn(6, 2, dtype=torch.float16), 8, True)
    with pytest.raises(RuntimeError, match="rowptr"):
        ops.bsr_mm(rowptr, col, val, e, torch.randn(6, 2), 9, True)
    with pytest.raises(RuntimeError, match="block column"):
        ops.bsr_mm(rowptr, col + 3, val, e, torch.randn(6, 2), 8, True)
    with pytest.raises(RuntimeError, match="val"):
        ops.bsr_mm(rowptr, col, val.reshape(-1, 2), e, torch.randn(6, 2), 8, True)
    with pytest.raises(RuntimeError, match="bias"):
        ops.bsr_mm(rowptr, col, val, torch.randn(3), torch.randn(6, 2), 8, True)
    w = sparse_weight(4, 8, 1.0)
    val, idx = nm_from_dense(w * sk.nm_mask(w, 2, 4), 2, 4)
    with pytest.raises(RuntimeError, match="idx value"):
        ops.nm_mm(val, idx + 4, e, torch.randn(8, 3), 2, 4, 4, False)
    with pytest.raises(RuntimeError, match="multiple of m"):
        ops.nm_mm(val, idx, e, torch.randn(6, 3), 2, 4, 4, False)
    with pytest.raises(RuntimeError, match="val must be"):
        ops.nm_mm(val, idx, e, torch.randn(8, 3), 1, 4, 4, False)
    with pytest.raises(RuntimeError, match="idx must be"):
        ops.nm_mm(val, idx.int(), e, torch.randn(8, 3), 2, 4, 4, False)
    wt = torch.randn(3, 2, 3, 3)
    rowptr, chan, val = ck_from_dense(wt)
    taps = functional.conv_taps((3, 3), (1, 1), (1, 1), 4, 4)
    x = torch.randn(2 * 16 + 2)
    torch.testing.assert_close(ops.ck_conv(rowptr, chan, val, taps, e, x, 8, 3, 16, 1, 4, 2),
                               reference.ck_conv(rowptr, chan, val, taps, e, x, 8, 3, 16, 1, 4, 2), **TOL)
    with pytest.raises(RuntimeError, match="reads past"):
        ops.ck_conv(rowptr, chan, val, taps, e, x, 12, 3, 16, 1, 4, 2)
    with pytest.raises(RuntimeError, match="ascending"):
        ops.ck_conv(rowptr, chan.flip(0), val, taps, e, x, 8, 3, 16, 1, 4, 2)
    with pytest.raises(RuntimeError, match="taps"):
        ops.ck_conv(rowptr, chan, val, taps[:4], e, x, 8, 3, 16, 1, 4, 2)
    with pytest.raises(ValueError, match="float32"):
        ck_from_dense(wt.double())
    with pytest.raises(ValueError, match="block"):
        bsr_from_dense(w, (0, 2))


def test_registered_ops_on_meta_tensors():
    """Shapes without data: every registered spmm op runs on meta tensors (the C ops' fake
    kernels) and gives the shape the CPU kernel gives."""
    w = sparse_weight(12, 8, 0.5)
    w24 = w * sk.nm_mask(w, 2, 4)
    x, e = torch.randn(8, 5), torch.empty(0)
    wc = torch.randn(4, 3, 3, 3) * sk.ck_mask(torch.randn(4, 3, 3, 3), 0.5)
    rowptr, chan, val = ck_from_dense(wc)
    taps = functional.conv_taps((3, 3), (1, 1), (1, 1), 6, 6)
    crowptr, ccol, cval = csr_from_dense(wc.reshape(4, -1))
    off = functional.conv_offsets(ccol, (3, 3), (1, 1), (1, 1), 3, 6, 6)
    flat = torch.randn(3 * 36 + 14)
    cases = [
        (torch.ops.sparsekern.csr_mm, (*csr_from_dense(w), e, x, 12, True)),
        (torch.ops.sparsekern.bsr_mm, (*bsr_from_dense(w, (4, 4)), e, x, 12, False)),
        (torch.ops.sparsekern.nm_mm, (*nm_from_dense(w24, 2, 4), e, x, 2, 4, 12, True)),
        (torch.ops.sparsekern.csr_conv, (crowptr, off, cval, e, flat, 24, 4, 108, 6, 4)),
        (torch.ops.sparsekern.ck_conv, (rowptr, chan, val, taps, e, flat, 24, 4, 36, 108, 6, 4)),
        (torch.ops.sparsekern.csr_group_conv, (*csr_from_dense(wc.reshape(4, -1)[:, :9]), e, torch.randn(2, 4, 6, 5),
                                               4, 4, [3, 3], [2, 1], [1, 1], [2, 1])),
    ]
    for op, args in cases:
        meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
        y = op(*meta)
        assert y.device.type == "meta" and y.shape == op(*args).shape, op


def _dtype_cases():
    """Each spmm op's arguments on small fp32 inputs with a bias."""
    w = sparse_weight(12, 8, 0.5)
    x, b = torch.randn(8, 5), torch.randn(12)
    wc = torch.randn(4, 3, 3, 3) * sk.ck_mask(torch.randn(4, 3, 3, 3), 0.5)
    crowptr, ccol, cval = csr_from_dense(wc.reshape(4, -1))
    off = functional.conv_offsets(ccol, (3, 3), (1, 1), (1, 1), 3, 6, 6)
    flat, bc = torch.randn(3 * 36 + 14), torch.randn(4)
    taps = functional.conv_taps((3, 3), (1, 1), (1, 1), 6, 6)
    return {"csr_mm": [*csr_from_dense(w), b, x, 12, True],
            "bsr_mm": [*bsr_from_dense(w, (4, 4)), b, x, 12, False],
            "nm_mm": [*nm_from_dense(w * sk.nm_mask(w, 2, 4), 2, 4), b, x, 2, 4, 12, True],
            "csr_conv": [crowptr, off, cval, bc, flat, 24, 4, 108, 6, 4],
            "ck_conv": [*ck_from_dense(wc), taps, bc, flat, 24, 4, 36, 108, 6, 4],
            "csr_group_conv": [*csr_from_dense(wc.reshape(4, -1)[:, :9]), bc, torch.randn(1, 4, 6, 6), 4, 4, [3, 3],
                               [1, 1], [1, 1], [1, 1]]}


@pytest.mark.parametrize("name", list(ARG_POS))
@pytest.mark.parametrize("path", ["eager", "registered", "meta"])
def test_mixed_dtypes_raise_naming_the_arguments(name, path):
    """val, x and a non-empty bias of different dtypes: a TypeError naming both, whichever way the
    op is reached (eager CPU: the C++ op straight; the registered op, which CUDA takes: its body
    checks before choosing C++ or Triton; meta). Before, the C++ op raised "x must be ... float32",
    meta gave a result and the Triton kernels failed obscurely."""
    args, (iv, ib, ix) = _dtype_cases()[name], ARG_POS[name]
    fn = {"eager": getattr(spmm, name)}.get(path, getattr(torch.ops.sparsekern, name))
    if path == "meta":
        args = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
    fn(*args)  # one dtype: fine
    for i, dtype, match in [
            (ix, torch.float16, f"{name}: x is torch.float16 but val is torch.float32"),
            (ix, torch.bfloat16, f"{name}: x is torch.bfloat16 but val is torch.float32"),
            (iv, torch.float16, f"{name}: x is torch.float32 but val is torch.float16"),
            (ib, torch.float16, f"{name}: bias is torch.float16 but val is torch.float32"),
            (iv, torch.float64, f"{name}: val must be float32, float16 or bfloat16, got torch.float64")]:
        bad = list(args)
        bad[i] = bad[i].to(dtype)
        with pytest.raises(TypeError, match=match):
            fn(*bad)


@pytest.mark.parametrize("name", spmm.RELU_OPS)
def test_public_function_relu(name):
    """``relu=True`` of the public function: the registered op with its fused ReLU, equal to
    ``relu`` of the op's result without it; a non-bool ``relu`` is a TypeError naming it."""
    for case, args in _op_cases():
        if case == name:
            fn = getattr(spmm, name)
            y = fn(*args, relu=True)
            assert torch.equal(y, getattr(torch.ops.sparsekern, name)(*args, True))
            assert torch.equal(y, fn(*args).relu()) and (y == 0).any()
            with pytest.raises(TypeError, match="relu must be a bool"):
                fn(*args, relu="True")


@pytest.mark.parametrize("name", spmm.RESIDUAL_OPS)
@pytest.mark.parametrize("path", ["eager", "registered", "meta", "reference"])
def test_residual_epilogue_and_bad_residuals(name, path):
    """``residual`` (the output's shape): ``max(y + residual, 0)`` equal to the op's result plus the
    residual, bit for bit, whichever way the op is reached; a residual of another shape, dtype or
    device is a ValueError naming it (the Python checks, and C++'s own)."""
    for case, args in _op_cases():
        if case != name:
            continue
        fn = {"eager": getattr(spmm, name), "reference": getattr(reference, name)}.get(
            path, getattr(torch.ops.sparsekern, name))
        y0 = (getattr(reference, name) if path == "reference" else getattr(spmm, name))(*args)
        residual = torch.randn_like(y0)
        if path == "meta":
            args = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
            residual = residual.to("meta")
        for relu in (False, True):
            kw = {"relu": relu, "residual": residual}
            y = fn(*args, **kw) if path in ("eager", "reference") else fn(*args, relu, residual)
            assert y.shape == y0.shape
            if path != "meta":
                assert torch.equal(y, (y0 + residual).relu() if relu else y0 + residual)
        if path == "reference":
            continue
        for bad in (residual[:-1], residual.double(), residual.reshape(-1)):
            with pytest.raises(ValueError, match="residual"):
                fn(*args, residual=bad) if path == "eager" else fn(*args, False, bad)
    ops = kernel_backend("cpp", "spmm")[0]  # the C++ op's own check
    args = next(a for c, a in _op_cases() if c == name)
    with pytest.raises(ValueError, match="residual"):
        getattr(ops, name)(*args, False, torch.zeros(3))


def _huge_page_advised(t):
    """Whether the mapping holding ``t``'s first 2 MB-aligned byte carries MADV_HUGEPAGE (``hg`` in
    its /proc/self/smaps VmFlags), read before anything faults it in."""
    addr = -(-t.data_ptr() // (2 << 20)) * (2 << 20)
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(v, 16) for v in head.split("-"))
            if lo <= addr < hi:
                flags = next(ln for ln in lines[i + 1:] if ln.startswith("VmFlags:"))
                return "hg" in flags.split()[1:]
    raise AssertionError(f"no mapping holds {addr:#x}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise / smaps: Linux only")
@pytest.mark.parametrize("env", [None, "0"])
def test_large_outputs_advised_huge_pages(env):
    """Outputs of >= 8 MB (functional.new_output; csr_mm's and csr_conv's outputs in C++) ask for
    transparent huge pages; smaller ones, and every one under SPARSEKERN_HUGE_PAGES=0, do not.
    In a subprocess: the switch is read once per process."""
    code = """
import torch, sparsekern
from sparsekern.inference import functional
from sparsekern.inference.formats import csr_from_dense
from tests.test_spmm import _huge_page_advised
on = %r
big = functional.new_output(torch.empty(1), 3, 1024, 1024)  # 12 MB
assert _huge_page_advised(big) == on
assert not _huge_page_advised(functional.new_output(torch.empty(1), 1024, 1024))  # 4 MB
rowptr, col, val = csr_from_dense(torch.eye(64))
y = torch.ops.sparsekern.csr_mm(rowptr, col, val, torch.empty(0), torch.randn(64, 40000), 64, False)  # 10 MB
assert _huge_page_advised(y) == on
assert torch.equal(y, torch.ops.sparsekern.csr_mm(rowptr, col, val, torch.empty(0), y, 64, False))
""" % (env != "0")
    env_vars = {k: v for k, v in os.environ.items() if k != "SPARSEKERN_HUGE_PAGES"}
    if env is not None:
        env_vars["SPARSEKERN_HUGE_PAGES"] = env
    env_vars["PYTHONPATH"] = os.pathsep.join([REPO, os.path.join(REPO, "tests")])
    subprocess.run([sys.executable, "-c", code], env=env_vars, check=True, cwd=REPO)


@pytest.fixture
def output_cache():
    """functional's output cache, empty, with outputs of any size going through it."""
    functional.empty_output_cache()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(functional, "OUTPUT_CACHE_MIN_BYTES", 0)
        yield functional._OUTPUTS
    functional.empty_output_cache()


def test_output_cache_reuses_only_unreferenced_buffers(output_cache):
    """A large output's memory is handed out again once nothing references it (no tensor, no view);
    while a view of it lives, a new buffer is made; empty_output_cache releases them."""
    like = torch.empty(1)
    a = functional.new_output(like, 2, 3, 5)
    ptr = a.data_ptr()
    del a
    b = functional.new_output(like, 5, 6)  # same size, other shape: the same memory
    assert b.data_ptr() == ptr and b.shape == (5, 6)
    view = b[1:]
    del b
    c = functional.new_output(like, 30)
    assert c.data_ptr() != ptr and view.data_ptr() == ptr + 6 * 4
    assert functional.new_output(like.double(), 30).dtype == torch.float64  # dtype is part of the key
    assert output_cache.nbytes == 30 * 4 * 2 + 30 * 8
    assert functional.empty_output_cache() == 30 * 4 * 2 + 30 * 8 and output_cache.nbytes == 0
    assert torch.equal(view, view.clone())  # still valid: its memory stays with it


def test_output_cache_bound_and_eviction(output_cache, monkeypatch):
    """At most OUTPUT_CACHE_BYTES: a free buffer is evicted (least recently used first) for a new
    size; with no free buffer to evict the output is a plain allocation; 0 turns the cache off."""
    monkeypatch.setattr(functional, "OUTPUT_CACHE_BYTES", 100 * 4)
    like = torch.empty(1)
    keep = functional.new_output(like, 60)
    a = functional.new_output(like, 40)
    assert output_cache.nbytes == 400
    b = functional.new_output(like, 10)  # no room, nothing free: not cached
    assert output_cache.nbytes == 400 and b.numel() == 10
    del a
    c = functional.new_output(like, 30)  # the free 40 evicted for it
    assert output_cache.nbytes == 60 * 4 + 30 * 4 and len(output_cache.buffers) == 2
    monkeypatch.setattr(functional, "OUTPUT_CACHE_BYTES", 0)
    del keep, c
    functional.empty_output_cache()
    functional.new_output(like, 8)
    assert output_cache.nbytes == 0


def test_output_cache_keeps_earlier_outputs_intact(output_cache):
    """A converted model's outputs from the cache: an earlier call's output, still held, is not
    overwritten by later calls (batched 1×1 and 3×3 convs write their outputs through new_output)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 8, 1)).eval()
    with torch.no_grad():
        for m in model:
            if isinstance(m, torch.nn.Conv2d):
                m.weight.mul_(torch.rand_like(m.weight) < 0.3)
        x = torch.randn(4, 8, 10, 10)
        sparse = sk.inference.convert(model, example_input=x, formats=("csr",), min_speedup=0.0)
        ref = model(x)
        y1 = sparse(x)
        assert output_cache.nbytes > 0
        y2 = sparse(-x)
        torch.testing.assert_close(y1, ref, **TOL)
        torch.testing.assert_close(y2, model(-x), **TOL)


def test_output_cache_across_inference_mode(output_cache):
    """A buffer first made under torch.inference_mode is reused outside it (and the other way) and
    written in place there (an inference tensor would refuse that)."""
    like = torch.empty(1)
    for first, then in ((torch.inference_mode, torch.no_grad), (torch.no_grad, torch.inference_mode)):
        functional.empty_output_cache()
        with first():
            a = functional.new_output(like, 10)
            a.fill_(1)
        ptr = a.data_ptr()
        del a
        with then():
            b = functional.new_output(like, 10)
            b[2:5] = 3.0
        assert b.data_ptr() == ptr and b[2] == 3.0


@pytest.mark.parametrize("env,expect", [("0", 0), ("1.5", 3 << 19), (None, None), ("-3", "error"), ("lots", "error")])
def test_output_cache_size_switch(env, expect, monkeypatch):
    """SPARSEKERN_OUTPUT_CACHE_MB: megabytes (0 off); unset: 2 GB or an eighth of the RAM; anything
    else a ValueError naming the variable."""
    if env is None:
        monkeypatch.delenv("SPARSEKERN_OUTPUT_CACHE_MB", raising=False)
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        assert functional._output_cache_bytes() == min(2 << 30, ram // 8)
        return
    monkeypatch.setenv("SPARSEKERN_OUTPUT_CACHE_MB", env)
    if expect == "error":
        with pytest.raises(ValueError, match="SPARSEKERN_OUTPUT_CACHE_MB"):
            functional._output_cache_bytes()
    else:
        assert functional._output_cache_bytes() == expect


@pytest.mark.skipif(functional._glibc() is None, reason="mallopt's parameters: glibc only")
def test_retain_freed_memory_stops_page_faults():
    """After retain_freed_memory(), tensors of up to 32 MB allocated and freed repeatedly (3 × 4 MB
    live at once, as a residual block's activations) reuse the heap: no page faults. glibc's default
    trims the heap under that pattern in some runs (20,160 faults over 10 rounds in one of three
    here), so only the setting's side is asserted. In a subprocess: the setting is process-wide."""
    code = """
import resource, torch
import sparsekern as sk
assert sk.inference.retain_freed_memory() is True
def step():
    ts = [torch.ones(1 << 20) for _ in range(3)]
    del ts
for _ in range(3):
    step()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
assert faults < 100, faults  # 3 × 1,024 pages per round if the memory went back to the OS
"""
    subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": REPO}, check=True, cwd=REPO)


@pytest.mark.parametrize("bad", [-1, 2048, "256", True, None, float("nan")])
def test_retain_freed_memory_rejects_bad_threshold(bad):
    with pytest.raises(ValueError, match="trim_threshold_mb"):
        functional.retain_freed_memory(bad)


def test_retain_freed_memory_elsewhere_changes_nothing(monkeypatch):
    """Where the C library is not glibc, it returns False without calling anything."""
    monkeypatch.setattr(functional, "_glibc", lambda: None)
    assert functional.retain_freed_memory() is False
