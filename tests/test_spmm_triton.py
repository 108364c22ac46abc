"""spmm family, Triton kernels (``sparsekern/triton/spmm.py``; the interpreter on CPU): CSR, block
(BSR) and N:M sparse matmul and the direct sparse conv against the dense product built from each
format, and csr_mm / csr_conv against ``sparsekern.reference``."""
import contextlib
import os

import pytest
import torch
import torch.nn.functional as F

from sparsekern import reference
from sparsekern.inference.formats import ck_from_dense, csr_from_dense
from sparsekern.inference.functional import conv_offsets, conv_taps
from sparsekern.triton import _common, aot
from sparsekern.triton import spmm as T
from utils import TOL as DTYPE_TOL, TRITON_DEVICE

TOL = dict(atol=1e-4, rtol=1e-4)  # fp32 dot products: IEEE fma / mma chains on a GPU too (utils.TOL)
NO_BIAS = torch.empty(0)
# (out, in, n): odd shapes, batch 1, n crossing the 64-column tile, out crossing the 8-row programs
SHAPES = [(1, 1, 1), (7, 5, 1), (9, 17, 3), (33, 20, 16), (19, 70, 65)]


def tol16(dtype):
    """16-bit results accumulated in fp32: within an ulp of the rounded fp32 product (utils.TOL)."""
    atol, rtol = DTYPE_TOL[dtype]
    return dict(atol=atol, rtol=rtol)


def dev(*tensors):
    return [t.to(TRITON_DEVICE) for t in tensors]


def sparse_weight(out, inp, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    w = w * (torch.rand(out, inp, generator=g) < density)
    if out > 2 and density < 1:
        w[1::3] = 0  # empty rows
    return w


def expected(w, x, bias, transpose_out):
    y = w.double() @ x.double() + (bias.double()[:, None] if bias.numel() else 0)
    return (y.t() if transpose_out else y).float()


def bsr_from_dense(w, bo, bi):
    """Block rows of ``w`` [out, in]: (rowptr int64, col int32, val [nnzb, bo, bi]), all-zero
    blocks dropped, edge blocks zero-padded."""
    (o, i), (br, bc) = w.shape, (-(-w.shape[0] // bo), -(-w.shape[1] // bi))
    padded = w.new_zeros(br * bo, bc * bi)
    padded[:o, :i] = w
    blocks = padded.view(br, bo, bc, bi).transpose(1, 2)  # [br, bc, bo, bi]
    keep = blocks.ne(0).flatten(2).any(2)
    rowptr = torch.cat([torch.zeros(1, dtype=torch.int64), keep.sum(1).cumsum(0)])
    nz = keep.nonzero()
    return rowptr, nz[:, 1].to(torch.int32), blocks[nz[:, 0], nz[:, 1]].contiguous()


def bsr_to_dense(rowptr, col, val, shape):
    _, bo, bi = val.shape
    br, bc = -(-shape[0] // bo), -(-shape[1] // bi)
    blocks = val.new_zeros(br, bc, bo, bi)
    rows = torch.repeat_interleave(torch.arange(br), rowptr.diff())
    blocks[rows, col.long()] = val
    return blocks.transpose(1, 2).reshape(br * bo, bc * bi)[:shape[0], :shape[1]]


def nm_from_dense(w, n, m):
    """(val [out, in·n/m], idx uint8) of ``w`` [out, in] with at most n nonzeros per group of m
    (in % m == 0): per group, its nonzeros and then its first zeros, in ascending position."""
    o, i = w.shape
    groups = w.reshape(o, i // m, m)
    rank = groups.eq(0).to(torch.int64) * m + torch.arange(m)  # nonzeros first, then by position
    pos = rank.argsort(-1)[..., :n].sort(-1).values
    assert torch.gather(groups, 2, pos).ne(0).sum() == w.ne(0).sum(), "more than n nonzeros per group"
    k = i // m * n
    return torch.gather(groups, 2, pos).reshape(o, k).contiguous(), pos.reshape(o, k).to(torch.uint8)


def nm_to_dense(val, idx, n, m, in_features):
    o, k = val.shape
    col = (torch.arange(k) // n) * m + idx.long()
    w = val.new_zeros(o, k // n * m)
    w.scatter_(1, col, val)
    return w[:, :in_features]


def nm_weight(out, inp, n, m, density=1.0, seed=0):
    """Random weight with at most n of every m inputs nonzero (and fewer where density < 1)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    keep = torch.rand(out, inp // m, m, generator=g).argsort(-1).argsort(-1) < n
    w = w * keep.reshape(out, inp) * (torch.rand(out, inp, generator=g) < density)
    if out > 2:
        w[1::3] = 0
    return w


# ----------------------------------------------------------------------------- CSR


@pytest.mark.parametrize("out,inp,n", SHAPES)
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("transpose_out,has_bias", [(False, True), (True, False), (True, True)])
def test_csr_mm_matches_dense(out, inp, n, density, transpose_out, has_bias):
    w = sparse_weight(out, inp, density)
    x, bias = torch.randn(inp, n), torch.randn(out) if has_bias else NO_BIAS
    y = T.csr_mm(*dev(*csr_from_dense(w), bias, x), out, transpose_out)
    assert y.is_contiguous() and y.device.type == TRITON_DEVICE
    torch.testing.assert_close(y.cpu(), expected(w, x, bias, transpose_out), **TOL)


@pytest.mark.parametrize("lead", [(1,), (5,)])
def test_csr_mm_matches_reference_linear_layout(lead):
    """Inputs as ``inference.functional.sparse_linear`` builds them: x [B, in] transposed to [in, B]."""
    w, b = sparse_weight(24, 45, 0.2), torch.randn(24)
    xt = torch.randn(*lead, 45).reshape(-1, 45).t().contiguous()
    args = (*csr_from_dense(w), b, xt, 24, True)
    torch.testing.assert_close(T.csr_mm(*dev(*args[:5]), *args[5:]).cpu(), reference.csr_mm(*args), **TOL)


@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 0, 1), (1, 2, 2)])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_csr_conv_matches_reference_and_conv2d(stride, padding, dilation, density):
    """Inputs as ``inference.functional.csr_conv2d`` builds them (zero-padded flat image, wide rows)."""
    c, o, k, h, w_ = 5, 11, 3, 7, 6
    w = sparse_weight(o, c * k * k, density).reshape(o, c, k, k)
    b, img = torch.randn(o), torch.randn(1, c, h, w_)
    hp, wp = h + 2 * padding, w_ + 2 * padding
    h1, w1 = hp - dilation * (k - 1), wp - dilation * (k - 1)
    rowptr, col, val = csr_from_dense(w.reshape(o, -1))
    off = conv_offsets(col, (k, k), (1, 1), (dilation, dilation), c, hp, wp)
    flat = torch.zeros(c * hp * wp + dilation * (k - 1))
    flat[:c * hp * wp].view(c, hp, wp)[:, padding:padding + h, padding:padding + w_] = img[0]
    args = (rowptr, off, val, b, flat, h1 * wp, o, 32 * hp * wp, wp, w1)
    y = T.csr_conv(*dev(*args[:5]), *args[5:]).cpu()
    assert y.shape == (o, h1, w1) and y.is_contiguous()
    torch.testing.assert_close(y, reference.csr_conv(*args), **TOL)
    conv = F.conv2d(img, w, b, stride=1, padding=padding, dilation=dilation)[0]
    torch.testing.assert_close(y, conv, **TOL)
    strided = F.conv2d(img, w, b, stride=stride, padding=padding, dilation=dilation)[0]
    torch.testing.assert_close(y[:, ::stride, ::stride], strided, **TOL)


# ----------------------------------------------------------------------------- BSR


# (bo, bi): tensor-core blocks (tl.dot; 16 x 64 and 24 x 40 take several BK slices of a block,
# 24 x 40 a partial last one) and the small CPU blocks (broadcast product)
BLOCKS = [(16, 16), (32, 16), (16, 64), (24, 40), (1, 4), (4, 4), (8, 1), (16, 8)]


@pytest.mark.parametrize("bo,bi", BLOCKS)
@pytest.mark.parametrize("out,inp,n", [(1, 1, 1), (37, 45, 1), (40, 33, 20), (21, 38, 70)])
@pytest.mark.parametrize("transpose_out,has_bias", [(False, True), (True, False)])
def test_bsr_mm_matches_dense(bo, bi, out, inp, n, transpose_out, has_bias):
    g = torch.Generator().manual_seed(bo * 100 + bi)
    br, bc = -(-out // bo), -(-inp // bi)
    keep = torch.rand(br, bc, generator=g) < 0.5
    keep[::3] = False  # empty block rows
    keep[-1, -1] = True  # an edge block
    mask = keep.repeat_interleave(bo, 0)[:out].repeat_interleave(bi, 1)[:, :inp]
    w = torch.randn(out, inp, generator=g) * mask
    rowptr, col, val = bsr_from_dense(w, bo, bi)
    torch.testing.assert_close(bsr_to_dense(rowptr, col, val, w.shape), w, rtol=0, atol=0)
    x, bias = torch.randn(inp, n), torch.randn(out) if has_bias else NO_BIAS
    y = T.bsr_mm(*dev(rowptr, col, val, bias, x), out, transpose_out)
    assert y.is_contiguous()
    torch.testing.assert_close(y.cpu(), expected(w, x, bias, transpose_out), **TOL)


@pytest.mark.parametrize("bo,bi", [(16, 16), (4, 4)])
@pytest.mark.parametrize("density", [0.0, 1.0])
def test_bsr_mm_all_zero_and_dense(bo, bi, density):
    w, b, x = torch.randn(35, 50) * density, torch.randn(35), torch.randn(50, 9)
    rowptr, col, val = bsr_from_dense(w, bo, bi)
    assert val.shape[0] == (0 if density == 0 else -(-35 // bo) * -(-50 // bi))
    y = T.bsr_mm(*dev(rowptr, col, val, b, x), 35, False)
    torch.testing.assert_close(y.cpu(), expected(w, x, b, False), **TOL)


# ----------------------------------------------------------------------------- N:M


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (1, 2), (3, 5)])
@pytest.mark.parametrize("out,inp,cols", [(1, 40, 1), (7, 40, 1), (19, 40, 70), (33, 80, 16)])
@pytest.mark.parametrize("transpose_out,has_bias", [(False, True), (True, False)])
def test_nm_mm_matches_dense(n, m, out, inp, cols, transpose_out, has_bias):
    w = nm_weight(out, inp, n, m, density=0.8)
    val, idx = nm_from_dense(w, n, m)
    assert val.shape == (out, inp * n // m) and idx.dtype == torch.uint8
    torch.testing.assert_close(nm_to_dense(val, idx, n, m, inp), w, rtol=0, atol=0)
    x, bias = torch.randn(inp, cols), torch.randn(out) if has_bias else NO_BIAS
    y = T.nm_mm(*dev(val, idx, bias, x), n, m, out, transpose_out)
    assert y.is_contiguous()
    torch.testing.assert_close(y.cpu(), expected(w, x, bias, transpose_out), **TOL)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 5), (1, 16)])
@pytest.mark.parametrize("out,inp,cols", [(7, 80, 16), (40, 80, 70)])
def test_nm_mm_dot_path(monkeypatch, n, m, out, inp, cols):
    """16-bit inputs with >= 16 columns expand the weight in registers and use tl.dot."""
    monkeypatch.setattr(T, "_gather", lambda *a, **k: pytest.fail("gather kernel used"))
    w = nm_weight(out, inp, n, m, density=0.8).half()
    val, idx = nm_from_dense(w.float(), n, m)
    x, b = torch.randn(inp, cols).half(), torch.randn(out)
    y = T.nm_mm(*dev(val.half(), idx, b, x), n, m, out, True).cpu()
    ref = (w.float() @ x.float() + b[:, None]).t().half()
    torch.testing.assert_close(y.float(), ref.float(), **tol16(torch.float16))


@pytest.mark.parametrize("density", [0.0, 1.0])
def test_nm_mm_all_zero_and_full_groups(density):
    w = nm_weight(21, 48, 2, 4) * density
    val, idx = nm_from_dense(w, 2, 4)
    x, b = torch.randn(48, 5), torch.randn(21)
    y = T.nm_mm(*dev(val, idx, b, x), 2, 4, 21, False)
    torch.testing.assert_close(y.cpu(), expected(w, x, b, False), **TOL)


def test_nm_mm_padded_last_group():
    """in = 10 with m = 4: positions 2, 3 of the last group lie past the input and read as 0."""
    w = nm_weight(6, 12, 2, 4)
    w[:, 9:] = 0  # the last group holds at most one nonzero (position 0): its second slot is 0
    val, idx = nm_from_dense(w, 2, 4)
    assert val[:, -1].eq(0).all()
    idx[:, -1] = 3  # input 11, past in = 10
    x = torch.randn(10, 3)
    y = T.nm_mm(*dev(val, idx, NO_BIAS, x), 2, 4, 6, False)
    torch.testing.assert_close(y.cpu(), expected(w[:, :10], x, NO_BIAS, False), **TOL)


# ----------------------------------------------------------------------------- all formats


def formats(w):
    """name -> call(x, bias, transpose_out) of each format holding w [out, in] (2:4 sparse)."""
    out, w32 = w.shape[0], w.float()
    cast = (lambda *ts: [t.to(w.dtype) if t.is_floating_point() else t for t in ts])
    csr, nm = cast(*csr_from_dense(w32)), cast(*nm_from_dense(w32, 2, 4))
    bsr16, bsr4 = cast(*bsr_from_dense(w32, 16, 16)), cast(*bsr_from_dense(w32, 4, 4))
    return {
        "csr": lambda x, b, t: T.csr_mm(*dev(*csr, b, x), out, t),
        "bsr16": lambda x, b, t: T.bsr_mm(*dev(*bsr16, b, x), out, t),
        "bsr4": lambda x, b, t: T.bsr_mm(*dev(*bsr4, b, x), out, t),
        "nm": lambda x, b, t: T.nm_mm(*dev(*nm, b, x), 2, 4, out, t),
    }


@pytest.mark.parametrize("fmt", ["csr", "bsr16", "bsr4", "nm"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_inputs(fmt, dtype):
    """16-bit values and x (fp32 accumulation) round to the fp32 product of the same values."""
    if fmt in ("bsr16", "nm") and dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter's tl.dot multiplies bf16 bit patterns (triton-lang/triton#11584)")
    w = nm_weight(40, 48, 2, 4).to(dtype)
    x, b = torch.randn(48, 20).to(dtype), torch.randn(40)
    y = formats(w)[fmt](x, b, False).cpu()
    assert y.dtype == dtype
    ref = (w.float() @ x.float() + b[:, None]).to(dtype)
    torch.testing.assert_close(y.float(), ref.float(), **tol16(dtype))


def test_noncontiguous_x():
    w = nm_weight(9, 16, 2, 4)
    x = torch.randn(5, 16).t()  # [16, 5], not contiguous
    for name, call in formats(w).items():
        y = call(x, NO_BIAS, True).cpu()
        torch.testing.assert_close(y, expected(w, x, NO_BIAS, True), **TOL, msg=name)


def test_empty_shapes_launch_nothing(monkeypatch):
    """n = 0, out = 0 and formats storing no values give the right shapes (bias or 0) without a
    kernel. An all-zero N:M weight still stores n of every m values: only in = 0 stores none."""
    monkeypatch.setattr(T, "_wrap", lambda kernel: pytest.fail("a kernel was launched"))
    b = torch.randn(6)
    for inp, cols in ((8, 0), (0, 0), (8, 3), (0, 3)):
        w, x = torch.zeros(6, inp), torch.randn(inp, cols)
        for name, call in formats(w).items():
            if name == "nm" and inp and cols:
                continue
            for t in (False, True):
                for bias in (b, NO_BIAS):
                    y = call(x, bias, t).cpu()
                    torch.testing.assert_close(y, expected(w, x, bias, t), rtol=0, atol=0, msg=name)
    for name, call in formats(torch.zeros(0, 8)).items():  # out = 0
        assert call(torch.randn(8, 3), NO_BIAS, True).shape == (3, 0), name
    rowptr, col, val = csr_from_dense(torch.zeros(4, 9))
    y = T.csr_conv(*dev(rowptr, col, val, torch.ones(4), torch.randn(30)), 12, 4, 0, 6, 5).cpu()
    torch.testing.assert_close(y, torch.ones(4, 2, 5), rtol=0, atol=0)
    assert T.csr_conv(*dev(rowptr, col, val, NO_BIAS, torch.randn(30)), 0, 4, 0, 6, 5).shape == (4, 0, 5)


@pytest.mark.parametrize("sparsity", [0.0, 0.6, 1.0])
@pytest.mark.parametrize("has_bias", [False, True])
def test_ck_conv_matches_reference_and_conv2d(sparsity, has_bias):
    """CK kernel skipping (alive kernels' dense taps) on a zero-padded stride-1 image."""
    import sparsekern as sk
    c, o, k, h, w_, padding = 5, 7, 3, 6, 7, 1
    w = torch.randn(o, c, k, k)
    w = w * sk.ck_mask(w, sparsity)
    w[1] = 0  # an output channel with no kernel
    b, img = torch.randn(o) if has_bias else NO_BIAS, torch.randn(1, c, h, w_)
    hp, wp = h + 2 * padding, w_ + 2 * padding
    h1, w1 = hp - (k - 1), wp - (k - 1)
    rowptr, chan, val = ck_from_dense(w)
    taps = conv_taps((k, k), (1, 1), (1, 1), hp, wp)
    flat = torch.zeros(c * hp * wp + k - 1)
    flat[:c * hp * wp].view(c, hp, wp)[:, padding:padding + h, padding:padding + w_] = img[0]
    args = (rowptr, chan, val, taps, b, flat, h1 * wp, o, hp * wp, 32 * hp * wp, wp, w1)
    y = T.ck_conv(*dev(*args[:6]), *args[6:]).cpu()
    assert y.shape == (o, h1, w1)
    torch.testing.assert_close(y, reference.ck_conv(*args), **TOL)
    conv = F.conv2d(img, w, b if has_bias else None, padding=padding)[0]
    torch.testing.assert_close(y, conv, **TOL)


# ----------------------------------------------------------------------------- launch geometry


def meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


def recorded(call):
    """[(kernel name, grid, constexprs)] of the launches of call() (nothing runs: meta tensors)."""
    launches = []
    with _common.recording(lambda k, g, a, kw: launches.append((k.__name__, g, kw)) or False):
        call()
    return launches


def huge_launches(cols, out, transpose_out):
    """Launches of csr_mm, nm_mm (gather and tl.dot paths) and bsr_mm (broadcast and tl.dot)
    with x [64, cols] -> y of out·cols elements."""
    x, b = meta(64, cols), meta(0)
    csr = meta(out + 1, dtype=torch.int64), meta(4096, dtype=torch.int32), meta(4096)
    nm = meta(out, 32), meta(out, 32, dtype=torch.uint8)
    launches = recorded(lambda: T.csr_mm(*csr, b, x, out, transpose_out))
    for precision in ("ieee", "tf32"):
        with fp32_matmul(precision):
            launches += recorded(lambda: T.nm_mm(*nm, b, x, 2, 4, out, transpose_out))
            for bo in (4, 16):
                bsr = meta(out // bo + 1, dtype=torch.int64), meta(64, dtype=torch.int32), meta(64, bo, bo)
                launches += recorded(lambda: T.bsr_mm(*bsr, b, x, out, transpose_out))
    return launches


def test_grids_within_cuda_limits():
    """5e6 columns (a 2048x2048 image, a big batch) put > 65535 column blocks on grid y before."""
    launches = huge_launches(5_000_000, 512, False)
    launches += recorded(lambda: T.csr_conv(meta(513, dtype=torch.int64), meta(4096, dtype=torch.int32),
                                            meta(4096), meta(0), meta(64 * 2050 * 2050), 2048 * 2050,
                                            512, 0, 2050, 2048))
    assert {name for name, _, _ in launches} == {"_gather_kernel", "_bsr_kernel", "_nm_dot_kernel"}
    for name, grid, _ in launches:
        assert aot.grid_problem(grid) is None, (name, grid)


@pytest.mark.parametrize("transpose_out", [False, True])
def test_int64_offsets_from_2_31_outputs(transpose_out):
    """Outputs of 2^31 elements or more are addressed in int64 (int32 offsets wrapped)."""
    for cols, out, int64 in ((2**20, 2**11 - 8, False), (2**20, 2**11, True)):
        launches = huge_launches(cols, out, transpose_out)
        assert len(launches) == 7
        assert all(kw["INT64"] is int64 for _, _, kw in launches), (cols, out)


@pytest.mark.parametrize("fmt", ["csr", "bsr16", "bsr4", "nm"])
def test_int64_offsets_compute_the_same(monkeypatch, fmt):
    monkeypatch.setattr(T, "_int64", lambda y: True)
    w = nm_weight(40, 48, 2, 4)
    x, b = torch.randn(48, 20), torch.randn(40)
    for t in (False, True):
        y = formats(w)[fmt](x, b, t).cpu()
        torch.testing.assert_close(y, expected(w, x, b, t), **TOL)


@contextlib.contextmanager
def fp32_matmul(precision, legacy=False):
    """torch's fp32 matmul precision within the block, set with the new API (or allow_tf32)."""
    matmul = torch.backends.cuda.matmul
    previous = matmul.fp32_precision
    if legacy:
        matmul.allow_tf32 = precision == "tf32"
    else:
        matmul.fp32_precision = precision
    try:
        yield
    finally:
        matmul.fp32_precision = previous


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("precision", ["ieee", "tf32"])
def test_fp32_precision_of_either_api(legacy, precision):
    """fp32 bsr_mm / nm_mm follow torch's matmul setting, set with fp32_precision (reading
    allow_tf32 then raised) or allow_tf32: tf32 tl.dot, else ieee (nm_mm: the gather kernel)."""
    w = nm_weight(40, 48, 2, 4)
    x, b = torch.randn(48, 20), torch.randn(40)
    with fp32_matmul(precision, legacy):
        y = formats(w)["bsr16"](x, b, False).cpu()
        launches = recorded(lambda: formats(w)["bsr16"](x, b, False)) + recorded(
            lambda: formats(w)["nm"](x, b, False))
    # tf32 keeps 10 mantissa bits of each input (on a GPU; the interpreter multiplies in fp32)
    tol = TOL if precision == "ieee" else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(y, expected(w, x, b, False), **tol)
    assert [(name, kw.get("PRECISION")) for name, _, kw in launches] == [
        ("_bsr_kernel", precision), ("_nm_dot_kernel" if precision == "tf32" else "_gather_kernel",
                                     precision if precision == "tf32" else None)]


def test_relu_ops_cuda_implementation():
    """The ops' CUDA implementations (``ops.spmm``'s adapters: the Triton launch, then the residual
    and the ReLU) with ``relu`` True / False / left out and a residual or none, against the reference."""
    from sparsekern.ops._common import IMPLS

    w = sparse_weight(9, 8, 0.5)
    rowptr, col, val = csr_from_dense(w)
    wt = torch.randn(6, 4, 3, 3)
    ck = ck_from_dense(wt * (torch.rand(6, 4, 1, 1) < 0.5))
    cases = {"csr_mm": ((rowptr, col, val, torch.randn(9), torch.randn(8, 5)), (9, True)),
             "csr_conv": ((rowptr, (col * 3).int(), val, NO_BIAS, torch.randn(8 * 3 + 6)), (6, 9, 7, 3, 2)),
             "ck_conv": ((*ck, conv_taps((3, 3), (1, 1), (1, 1), 5, 5), torch.randn(6), torch.randn(4 * 25 + 2)),
                         (15, 6, 25, 2, 5, 3))}
    for name, (tensors, rest) in cases.items():
        launch, ref = IMPLS[name].cuda, getattr(reference, name)
        for relu in (False, True):
            y = launch(*dev(*tensors), *rest, relu).cpu()
            torch.testing.assert_close(y, ref(*tensors, *rest, relu), **TOL)
            assert (y.min() >= 0) == relu
            residual = torch.randn_like(y)
            y = launch(*dev(*tensors), *rest, relu, *dev(residual)).cpu()
            torch.testing.assert_close(y, ref(*tensors, *rest, relu, residual), **TOL)
        torch.testing.assert_close(launch(*dev(*tensors), *rest).cpu(), ref(*tensors, *rest), **TOL)
