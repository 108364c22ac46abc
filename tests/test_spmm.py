"""spmm family: the CSR kernels (C++ and reference) against dense F.linear / F.conv2d, opcheck,
torch.compile, bad inputs."""
import pytest
import torch
import torch.nn.functional as F

import sparsekern  # noqa: F401  (registers torch.ops.sparsekern.*)
from sparsekern import reference
from sparsekern.ops.spmm import REFERENCE_KERNELS, csr_conv1x1, csr_from_dense, csr_linear
from utils import kernel_backend

TOL = dict(atol=1e-4, rtol=1e-4)


def sparse_weight(out, inp, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    return w * (torch.rand(out, inp, generator=g) < density)


@pytest.fixture(params=["cpp", "reference"])
def kern(request):
    return kernel_backend("cpp")[0] if request.param == "cpp" else REFERENCE_KERNELS


# (out, in, n): odd shapes, n = 1 (mat-vec), n crossing the 64/32/16/tail column tiles
SHAPES = [(1, 1, 1), (7, 5, 1), (7, 5, 3), (33, 17, 16), (65, 129, 100), (130, 77, 64), (19, 300, 47)]


@pytest.mark.parametrize("out,inp,n", SHAPES)
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("transpose_out", [False, True])
@pytest.mark.parametrize("has_bias", [False, True])
def test_csr_mm_matches_dense(kern, out, inp, n, density, transpose_out, has_bias):
    w = sparse_weight(out, inp, density)
    x = torch.randn(inp, n)
    bias = torch.randn(out) if has_bias else torch.empty(0)
    rowptr, col, val = csr_from_dense(w)
    y = kern.csr_mm(rowptr, col, val, bias, x, out, transpose_out)
    expect = w @ x + (bias[:, None] if has_bias else 0)
    torch.testing.assert_close(y, expect.t() if transpose_out else expect, **TOL)
    assert y.is_contiguous()


def test_csr_from_dense_roundtrip_and_empty_rows():
    w = sparse_weight(40, 23, 0.3)
    w[::3] = 0  # empty rows
    rowptr, col, val = csr_from_dense(w)
    assert rowptr.dtype == torch.int64 and col.dtype == torch.int32 and val.dtype == torch.float32
    assert rowptr[-1] == val.numel() == int((w != 0).sum())
    torch.testing.assert_close(reference.csr_to_dense(rowptr, col, val, w.shape), w, rtol=0, atol=0)


@pytest.mark.parametrize("lead", [(), (1,), (3,), (2, 5)])
def test_csr_linear_leading_dims(lead):
    w, b = sparse_weight(31, 45, 0.2), torch.randn(31)
    x = torch.randn(*lead, 45)
    torch.testing.assert_close(csr_linear(x, *csr_from_dense(w), b, 31), F.linear(x, w, b), **TOL)
    torch.testing.assert_close(csr_linear(x, *csr_from_dense(w), None, 31), F.linear(x, w), **TOL)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("n", [1, 3])
def test_csr_conv1x1(stride, n):
    w, b = sparse_weight(24, 13, 0.3).reshape(24, 13, 1, 1), torch.randn(24)
    x = torch.randn(n, 13, 9, 7)
    y = csr_conv1x1(x, *csr_from_dense(w.reshape(24, 13)), b, 24, stride)
    torch.testing.assert_close(y, F.conv2d(x, w, b, stride=stride), **TOL)


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


def test_compile_fullgraph():
    w = sparse_weight(16, 8, 0.3)
    rowptr, col, val = csr_from_dense(w)
    f = torch.compile(lambda x: csr_linear(x, rowptr, col, val, None, 16), fullgraph=True, backend="eager")
    x = torch.randn(4, 8)
    torch.testing.assert_close(f(x), F.linear(x, w), **TOL)


def test_bad_inputs():
    rowptr, col, val = csr_from_dense(sparse_weight(4, 3, 0.5))
    ops = kernel_backend("cpp")[0]
    with pytest.raises(RuntimeError, match="float32"):
        ops.csr_mm(rowptr, col, val, torch.empty(0), torch.randn(3, 2, dtype=torch.float64), 4, True)
    with pytest.raises(RuntimeError, match="rowptr"):
        ops.csr_mm(rowptr, col, val, torch.empty(0), torch.randn(3, 2), 5, True)
    with pytest.raises(RuntimeError, match="bias"):
        ops.csr_mm(rowptr, col, val, torch.randn(3), torch.randn(3, 2), 4, True)
    with pytest.raises(RuntimeError, match="column index"):
        ops.csr_mm(rowptr, col + 3, val, torch.empty(0), torch.randn(3, 2), 4, True)
    with pytest.raises(RuntimeError, match="rowptr must run"):
        ops.csr_mm(rowptr + 1, col, val, torch.empty(0), torch.randn(3, 2), 4, True)
    with pytest.raises(ValueError, match="float32"):
        csr_from_dense(torch.ones(2, 2, dtype=torch.float16))
    with pytest.raises(ValueError, match="2-D"):
        csr_from_dense(torch.ones(2))


@pytest.mark.parametrize("cfg", [
    # (out, in, kernel, stride, padding, dilation, H, W)
    (8, 3, (3, 3), (1, 1), (1, 1), (1, 1), 7, 9),
    (5, 4, (3, 3), (2, 2), (1, 1), (1, 1), 11, 6),
    (6, 2, (5, 3), (1, 2), (2, 0), (1, 1), 9, 10),
    (4, 3, (3, 3), (1, 1), (2, 2), (2, 2), 8, 8),
    (70, 5, (1, 1), (1, 1), (1, 1), (1, 1), 5, 5),
    (3, 2, (3, 3), (1, 1), (0, 0), (1, 1), 3, 3),
])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("has_bias", [False, True])
def test_csr_conv2d(kern, cfg, density, has_bias, monkeypatch):
    from sparsekern.ops import spmm

    out, inp, k, stride, padding, dilation, h, w = cfg
    wt = sparse_weight(out, inp * k[0] * k[1], density).reshape(out, inp, *k)
    bias = torch.randn(out) if has_bias else None
    x = torch.randn(2, inp, h, w)
    monkeypatch.setattr(spmm, "_k", lambda x: kern)
    args = (*csr_from_dense(wt.reshape(out, -1)), bias, out, k, stride, padding, dilation)
    y, scratch = spmm.csr_conv2d(x, *args)
    expect = F.conv2d(x, wt, bias, stride, padding, dilation)
    torch.testing.assert_close(y, expect, **TOL)
    y, _ = spmm.csr_conv2d(x.flip(0), *args, scratch=scratch)  # reused buffer
    torch.testing.assert_close(y, expect.flip(0), **TOL)


def test_csr_conv_opcheck_and_bounds():
    rowptr, col, val = csr_from_dense(sparse_weight(6, 4, 0.5))
    off = (col * 3).int()
    x = torch.randn(4 * 3 + 6)
    torch.library.opcheck(torch.ops.sparsekern.csr_conv, (rowptr, off, val, torch.randn(6), x, 6, 6, 7, 3, 2))
    for slab, wp, wv in ((4, 3, 2), (100, 6, 6), (1, 2, 0)):
        torch.testing.assert_close(
            torch.ops.sparsekern_C.csr_conv(rowptr, off, val, torch.empty(0), x, 6, 6, slab, wp, wv),
            reference.csr_conv(rowptr, off, val, torch.empty(0), x, 6, 6, slab, wp, wv), **TOL)
    with pytest.raises(RuntimeError, match="reads past"):
        torch.ops.sparsekern_C.csr_conv(rowptr, off, val, torch.empty(0), x, x.numel() - int(off.max()) + 1, 6, 9, 1, 1)
    with pytest.raises(RuntimeError, match="dividing n"):
        torch.ops.sparsekern_C.csr_conv(rowptr, off, val, torch.empty(0), x, 5, 6, 9, 3, 2)
