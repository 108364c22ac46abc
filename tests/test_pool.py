"""pool family: ``sparsekern::max_pool2d`` (C++ on CPU, the reference) against ``F.max_pool2d`` and
the math, over dtypes, odd / empty shapes, strides, non-contiguous inputs, NaN and infinities;
argument errors; opcheck; the converted models' ``SeparableMaxPool2d`` running it."""
import pytest
import torch
import torch.nn.functional as F

import sparsekern  # noqa: F401  (registers torch.ops.sparsekern.*)
from sparsekern import reference
from sparsekern.inference import SeparableMaxPool2d
from sparsekern.ops.pool import max_pool2d
from utils import DTYPES, kernel_backend

GEOMETRIES = [((3, 3), (2, 2), (1, 1)), ((2, 2), (2, 2), (0, 0)), ((3, 3), (1, 1), (1, 1)), ((3, 2), (2, 1), (1, 0)),
              ((5, 5), (3, 3), (2, 2)), ((1, 1), (1, 1), (0, 0)), ((4, 4), (3, 3), (2, 2)), ((2, 3), (3, 2), (1, 1))]
SIZES = [(1, 1, 7, 7), (2, 3, 12, 9), (1, 2, 5, 3), (1, 64, 112, 112), (0, 3, 8, 8), (2, 0, 8, 8)]


@pytest.fixture(params=["cpp", "reference"])
def ops(request):
    return kernel_backend(request.param, "pool")[0]


def _input(size, dtype, seed=0, nan=True):
    x = torch.randn(size, generator=torch.Generator().manual_seed(seed)).to(dtype)
    if x.numel():
        flat = x.view(-1)
        if nan:
            flat[::97] = float("nan")
        flat[5::89] = float("-inf")
        flat[7::101] = float("inf")
    return x


def _torch_pool(x, k, s, p):
    """torch's own pool; CPU fp16 through fp32 where this torch lacks it (max is exact in fp32)."""
    try:
        return F.max_pool2d(x, k, s, p)
    except RuntimeError:
        return F.max_pool2d(x.float(), k, s, p).to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("k,s,p", GEOMETRIES)
def test_max_pool2d_equals_torch_and_the_math(ops, dtype, size, k, s, p):
    x = _input(size, dtype)  # every window fits every size (too small: test_max_pool2d_rejects_bad_arguments)
    y = ops.max_pool2d(x, list(k), list(s), list(p))
    expect = reference.max_pool2d(x, k, s, p)
    assert y.dtype == dtype and y.shape == expect.shape and y.is_contiguous()
    torch.testing.assert_close(y, expect, equal_nan=True, atol=0, rtol=0)  # a max is exact
    if size[1]:  # torch refuses zero channels; the op gives [N, 0, H', W'] (the reference's shape)
        torch.testing.assert_close(y, _torch_pool(x, k, s, p), equal_nan=True, atol=0, rtol=0)


@pytest.mark.parametrize("layout", ["transposed", "channels_last", "sliced"])
def test_max_pool2d_any_strides(ops, layout):
    base = _input((3, 2, 13, 11), torch.float32)
    x = {"transposed": base.transpose(0, 1), "channels_last": base.contiguous(memory_format=torch.channels_last),
         "sliced": base[:, :, 1::2, ::3]}[layout]
    assert not x.is_contiguous()
    torch.testing.assert_close(ops.max_pool2d(x, [3, 3], [2, 2], [1, 1]), F.max_pool2d(x.contiguous(), 3, 2, 1),
                               equal_nan=True, atol=0, rtol=0)


def test_max_pool2d_nan_and_infinities_per_window():
    """A window with a NaN gives NaN wherever it sits (first, middle, last tap, border); one of only
    −inf gives −inf; +inf wins over finite values."""
    x = torch.zeros(1, 1, 6, 6)
    x[0, 0, 0, 0] = float("nan")    # corner: only window (0, 0) with padding 1
    x[0, 0, 3, 5] = float("nan")    # last column
    x[0, 0, 4, 2] = float("inf")
    x[0, 0, 5, :] = float("-inf")
    for impl in (kernel_backend("cpp", "pool")[0], kernel_backend("reference", "pool")[0]):
        y = impl.max_pool2d(x, [3, 3], [2, 2], [1, 1])
        torch.testing.assert_close(y, F.max_pool2d(x, 3, 2, 1), equal_nan=True, atol=0, rtol=0)
        assert y[0, 0, 0, 0].isnan() and y[0, 0, 2, 1] == float("inf")
    y = max_pool2d(torch.full((1, 1, 2, 2), float("-inf")), 2)
    assert y.item() == float("-inf")


@pytest.mark.parametrize("args,match,err", [
    (((3, 8, 8), 3), r"\[N, C, H, W\]", ValueError),
    (((1, 1, 8, 8), 0), "kernel_size and stride", ValueError),
    (((1, 1, 8, 8), 3, 0), "kernel_size and stride", ValueError),
    (((1, 1, 8, 8), 3, 2, 2), "padding", ValueError),
    (((1, 1, 8, 8), 3, 2, -1), "padding", ValueError),
    (((1, 1, 2, 8), 5, 1, 1), "smaller than the 5×5 window", ValueError),
    (((1, 1, 8, 8), (3, 3, 3)), "kernel_size must be an int or a pair", ValueError),
    (((1, 1, 8, 8), 3.0), "kernel_size must be an int or a pair", ValueError),
    (((1, 1, 8, 8), 3, True), "stride must be an int or a pair", ValueError),
])
def test_max_pool2d_rejects_bad_arguments(args, match, err):
    size, *rest = args
    with pytest.raises(err, match=match):
        max_pool2d(torch.randn(size), *rest)


def test_max_pool2d_rejects_integer_inputs():
    with pytest.raises(TypeError, match="x must be float32"):
        max_pool2d(torch.ones(1, 1, 4, 4, dtype=torch.int32), 2)


@pytest.mark.parametrize("bad,match", [([0, 3], "kernel_size and stride must be > 0"), ([3, 3, 3], "2 values each")])
def test_max_pool2d_cpp_checks_its_arguments(bad, match):
    """The raw C++ op (no Python checks in front) refuses what would read out of bounds."""
    ops = kernel_backend("cpp", "pool")[0]
    with pytest.raises(RuntimeError, match=match):
        ops.max_pool2d(torch.randn(1, 1, 8, 8), bad, [1, 1], [0, 0])
    with pytest.raises(RuntimeError, match="padding must be >= 0 and at most half"):
        ops.max_pool2d(torch.randn(1, 1, 8, 8), [3, 3], [1, 1], [2, 0])
    with pytest.raises(RuntimeError, match="smaller than"):
        ops.max_pool2d(torch.randn(1, 1, 2, 8), [5, 5], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="x must be float32"):
        ops.max_pool2d(torch.ones(1, 1, 8, 8, dtype=torch.int64), [3, 3], [1, 1], [1, 1])


def test_max_pool2d_has_no_gradient():
    x = torch.randn(1, 2, 6, 6, requires_grad=True)
    with pytest.raises(RuntimeError):
        max_pool2d(x, 3, 2, 1).sum().backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_max_pool2d_opcheck(dtype):
    """(No NaN in the inputs: opcheck compares its runs' outputs without equal_nan.)"""
    for size, (k, s, p) in [((2, 3, 9, 7), GEOMETRIES[0]), ((1, 2, 5, 6), GEOMETRIES[3]), ((0, 2, 5, 6), GEOMETRIES[1])]:
        torch.library.opcheck(torch.ops.sparsekern.max_pool2d.default, (_input(size, dtype, nan=False), list(k), list(s), list(p)))


def test_separable_maxpool_module_runs_the_op_and_compiles():
    """On CPU the converted models' pool is the C++ op (same values as torch's); under
    torch.compile(fullgraph=True) and export too."""
    pool = SeparableMaxPool2d(3, 2, 1)
    x = _input((2, 8, 15, 14), torch.float32)
    ref = F.max_pool2d(x, 3, 2, 1)
    with torch.profiler.profile() as prof:
        y = pool(x)
    assert any(e.name == "sparsekern::max_pool2d" for e in prof.events())
    torch.testing.assert_close(y, ref, equal_nan=True, atol=0, rtol=0)
    torch.testing.assert_close(torch.compile(pool, fullgraph=True, backend="eager")(x), ref, equal_nan=True, atol=0,
                               rtol=0)
    torch.testing.assert_close(torch.export.export(pool, (x,)).module()(x), ref, equal_nan=True, atol=0, rtol=0)


def test_separable_maxpool_module_float64():
    """A dtype the op does not take (float64) still pools, by the separable max."""
    pool = SeparableMaxPool2d(3, 2, 1)
    x = _input((2, 3, 9, 8), torch.float64)
    with torch.profiler.profile() as prof:
        y = pool(x)
    assert not any(e.name == "sparsekern::max_pool2d" for e in prof.events())
    torch.testing.assert_close(y, F.max_pool2d(x, 3, 2, 1), equal_nan=True, atol=0, rtol=0)
