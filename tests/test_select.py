"""Select family (SPEC §9): every kernel backend and the public ops against the exact quantile.

Exactness means bit-equality with :func:`expected_quantile`, SPEC §9's value computed here from the
sorted fp32 magnitudes ``|w|·c`` (neither sparsekern.reference nor ``np.quantile``, whose linear
interpolation changed in numpy 2.4: before, it ran in fp64).
"""
import importlib.util
import math
import os
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsekern as sk
from sparsekern import reference
from utils import expected_quantile, f32, kernel_backend, magnitudes

METHODS = reference.INTERPOLATIONS
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
QS = [0.0, 0.1, 0.5, 0.9, 0.999, 1.0]


def _backend(name):
    return kernel_backend(name, "select")


def assert_same(actual, expected):
    """Bit-exact equality (NaN equals NaN)."""
    a = float(actual)
    e = float(expected)
    assert (np.isnan(a) and np.isnan(e)) or (a == e and np.signbit(a) == np.signbit(e)), (a, e)


def make_list(seed, sizes, dtypes=None, kind="normal"):
    """Seeded tensors with ``sizes`` elements; kind: normal, ties (few distinct values), zeros,
    special (±0, subnormals, ±inf mixed in), tiny (all subnormal in fp32)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(sizes):
        x = torch.randn(n, generator=g) * 0.05
        if kind == "ties":
            x = torch.randint(-3, 4, (n,), generator=g).float() * 0.25
        elif kind == "zeros":
            x = torch.zeros(n) * torch.sign(torch.randn(n, generator=g))  # ±0
        elif kind == "tiny":
            x = x * 1e-38
        elif kind == "special" and n:
            pool = torch.tensor([0.0, -0.0, 1e-45, -3e-42, 1e-39, float("inf"), float("-inf"), 7.0])
            idx = torch.randint(0, n, (max(1, n // 8),), generator=g)
            x[idx] = pool[torch.randint(0, len(pool), (len(idx),), generator=g)]
        dt = (dtypes or DTYPES)[i % len(dtypes or DTYPES)]
        out.append(x.to(dt))
    return out


# --- the rule itself ------------------------------------------------------------------------------

ORACLE_CASES = list(enumerate(["normal", "ties", "zeros", "special", "tiny"] * 4))  # (seed, kind)


@pytest.mark.parametrize("method", METHODS)
def test_reference_matches_spec(method):
    for seed, kind in ORACLE_CASES:
        ts = make_list(seed, [seed % 7 + 1, 13], kind=kind)
        for q in QS + [0.37]:
            assert_same(reference.global_magnitude_threshold(ts, q, interpolation=method),
                        expected_quantile(ts, q, method=method))


def test_linear_rounds_each_step_to_fp32():
    """(b−a)·γ and a + … are rounded to fp32 one by one: 0.14921618, where the lerp in fp64
    rounded once (numpy < 2.4) is the next fp32 up, 0.14921619."""
    ts = [torch.tensor([0.0011428193, 0.4947207])]
    a, b = ts[0].tolist()
    assert f32(a + 0.3 * (b - a)) == float(np.float32(0.14921619))
    assert expected_quantile(ts, 0.3) == float(np.float32(0.14921618))
    assert_same(reference.global_magnitude_threshold(ts, 0.3), expected_quantile(ts, 0.3))
    assert_same(sk.global_magnitude_threshold(ts, 0.3), expected_quantile(ts, 0.3))


@pytest.mark.skipif(np.lib.NumpyVersion(np.__version__) < "2.4.0",
                    reason="numpy < 2.4 interpolates in fp64, not SPEC §9's fp32 steps")
@pytest.mark.parametrize("method", METHODS)
def test_oracle_is_numpy_quantile(method):
    """With numpy >= 2.4, expected_quantile is np.quantile (SPEC §9's wording)."""
    for seed, kind in ORACLE_CASES:
        ts = make_list(seed, [seed % 7 + 1, 13], kind=kind)
        for q in QS + [0.37, 0.3]:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # numpy's inf − inf in _lerp
                want = np.quantile(magnitudes(ts), q, method=method)
            assert_same(expected_quantile(ts, q, method=method), want)


def test_inf_quirks_are_reproduced():
    """numpy's lerp turns inf − inf and inf·0 into NaN; so do the references and kernels."""
    x = [torch.tensor([0.0, float("inf")])]
    assert np.isnan(expected_quantile(x, 0.0))
    assert torch.isnan(reference.global_magnitude_threshold(x, 0.0))
    assert torch.isnan(sk.global_magnitude_threshold(x, 0.0))
    assert sk.global_magnitude_threshold(x, 0.0, interpolation="lower").item() == 0.0


# --- kernel backends ------------------------------------------------------------------------------

def _check_global(k, dev, tensors, qs, scales=None, methods=METHODS):
    n = sum(t.numel() for t in tensors)
    ts = [t.to(dev) for t in tensors]
    sc = scales or [1.0] * len(ts)
    for q in qs:
        for m in methods:
            value, nan = k.global_magnitude_threshold(ts, q, sc, m)
            assert value.shape == () and value.dtype == torch.float32 and value.device.type == dev
            assert nan.dtype == torch.int64 and int(nan) == -1
            assert_same(value.cpu(), expected_quantile(tensors, q, scales, m))


CPP_CASES = {  # sizes straddle the small path (≤ 2^14 keys: nth_element) and the radix passes
    "small_mixed": ([5, 1, 700], "normal"),
    "large_mixed": ([30000, 0, 20001, 7], "normal"),
    "large_ties": ([40000, 3000], "ties"),
    "large_zeros": ([20000, 20000], "zeros"),
    "large_special": ([30000, 5000], "special"),
    "large_tiny": ([25000], "tiny"),
}


@pytest.mark.parametrize("case", list(CPP_CASES))
@pytest.mark.parametrize("scaled", [False, True])
def test_cpp_global(case, scaled):
    k, dev = _backend("cpp")
    sizes, kind = CPP_CASES[case]
    ts = make_list(3, sizes, kind=kind)
    scales = [0.5 + i for i in range(len(ts))] if scaled else None
    _check_global(k, dev, ts, QS + [0.2718], scales)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpp_global_one_dtype(dtype):
    """All-bf16 lists skip pass 2 (keys are exact in their high 16 bits)."""
    k, dev = _backend("cpp")
    _check_global(k, dev, make_list(4, [30000, 12345], dtypes=[dtype]), QS)
    _check_global(k, dev, make_list(5, [30000, 12345], dtypes=[dtype], kind="ties"), QS)


def test_cpp_neighbour_in_next_bucket():
    """k0 is the last key of its 16-bit bucket and k1 the first of a later non-empty bucket."""
    k, dev = _backend("cpp")
    x = torch.cat([torch.full((20000,), 1.0), torch.full((20001,), 3.0)])
    x[5] = 1.0000001  # same bucket as 1.0, different low bits
    x[-1] = 3.0000002
    ts = [x[:15000], x[15000:]]
    n = x.numel()
    _check_global(k, dev, ts, [19999 / (n - 1), 19999.5 / (n - 1), 0.5, 20000 / (n - 1)])


@pytest.mark.parametrize("layout", ["transposed", "channels_last", "strided"])
def test_cpp_non_contiguous(layout):
    k, dev = _backend("cpp")
    w = make_list(6, [64 * 32 * 3 * 3])[0].reshape(64, 32, 3, 3)
    v = {"transposed": w.transpose(0, 1), "channels_last": w.to(memory_format=torch.channels_last),
         "strided": w[:, ::2]}[layout]
    _check_global(k, dev, [v, w[:3]], [0.3, 0.9])


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_select_each(backend):
    k, dev = _backend(backend)
    ts = make_list(7, [1, 2, 999, 20000, 33000], kind="ties") + make_list(8, [17, 40000])
    for q in [0.0, 0.5, 0.93, 1.0]:
        values, nan = k.magnitude_thresholds(ts, [q] * len(ts), "linear")
        assert values.shape == (len(ts),) and values.dtype == torch.float32 and int(nan) == -1
        for v, t in zip(values, ts):
            assert_same(v, expected_quantile([t], q))


def test_cpp_ranks_equal_python():
    """The C++ ops' ranks (csrc/cpu/common.h quantile_ranks: virtual index (n−1)·q in double,
    floor / ceil / round half to even) equal reference.quantile_ranks': over a grid of sizes and
    quantiles including exact halves of the virtual index, on distinct keys (equal values are
    equal ranks and weights), against the sort-based reference implementation."""
    k, dev = _backend("cpp")
    ref = _backend("reference")[0]
    for n in (1, 2, 3, 4, 5, 7, 10, 33, 1000, 20001):
        x = (torch.randperm(n, generator=torch.Generator().manual_seed(n)) + 1).float()
        halves = range(2 * n - 1) if n <= 33 else range(1, 2 * n - 2, 97)
        qs = {j / (2 * (n - 1)) for j in halves} if n > 1 else set()
        qs |= {0.0, 0.1, 1 / 3, 0.5, 0.999, 1.0}
        qs |= {math.nextafter(q, 0.0) for q in qs if q > 0} | {math.nextafter(q, 1.0) for q in qs if q < 1}
        for q in sorted(qs):
            for m in METHODS:
                assert_same(k.global_magnitude_threshold([x], q, [1.0], m)[0],
                            ref.global_magnitude_threshold([x], q, [1.0], m)[0])
            assert_same(k.magnitude_thresholds([x, x[: n // 2 + 1]], [q, q], "nearest")[0][1],
                        ref.magnitude_thresholds([x, x[: n // 2 + 1]], [q, q], "nearest")[0][1])


TRITON_CASES = {
    "mixed": ([70, 1, 300], "normal"),
    "ties": ([500, 33], "ties"),
    "zeros": ([64, 64], "zeros"),
    "special": ([400, 9], "special"),
    "tiny": ([300], "tiny"),
}


@pytest.mark.parametrize("case", list(TRITON_CASES))
def test_triton_global(case):
    k, dev = _backend("triton")
    sizes, kind = TRITON_CASES[case]
    ts = make_list(9, sizes, kind=kind)
    _check_global(k, dev, ts, [0.0, 0.5, 0.9, 1.0], methods=("linear",))
    _check_global(k, dev, ts, [0.3], scales=[0.5 + i for i in range(len(ts))])
    _check_global(k, dev, ts, [0.7], methods=("lower", "higher", "nearest"))


def test_triton_neighbour_in_next_bucket_and_each():
    k, dev = _backend("triton")
    x = torch.cat([torch.full((60,), 1.0), torch.full((61,), 3.0)])
    x[5] = 1.0000001
    _check_global(k, dev, [x[:50], x[50:]], [59 / 120, 59.5 / 120, 60 / 120])
    ts = [t.to(dev) for t in make_list(10, [1, 50, 333], kind="ties")]
    values, nan = k.magnitude_thresholds(ts, [0.6] * len(ts), "linear")
    assert int(nan) == -1
    for v, t in zip(values.cpu(), ts):
        assert_same(v, expected_quantile([t], 0.6))


def test_triton_many_tensors_grouped():
    """19 tensors of mixed dtypes and scales: several launch groups of up to 8, padded slots."""
    k, dev = _backend("triton")
    ts = [t * (i + 1) for i, t in enumerate(make_list(19, [(37 * i) % 200 for i in range(19)]))]
    scales = [1.0 if i % 3 else 0.5 + i for i in range(19)]
    _check_global(k, dev, ts, [0.0, 0.35, 1.0], scales, methods=("linear",))
    ts[17] = torch.tensor([float("nan")])
    value, nan = k.global_magnitude_threshold([t.to(dev) for t in ts], 0.5, scales, "linear")
    assert int(nan) == 17 and torch.isnan(value)


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
def test_nan_index(backend):
    k, dev = _backend(backend)
    big = 20000 if backend == "cpp" else 100  # cpp: radix path; NaN bits sort above +inf
    for nan_at, payload in [(2, float("nan")), (1, -float("nan"))]:
        ts = [torch.randn(big), torch.randn(big), torch.randn(big)]
        ts[0][0] = float("inf")
        ts[nan_at][7] = payload
        ts = [t.to(dev) for t in ts]
        value, nan = k.global_magnitude_threshold(ts, 0.5, [1.0] * 3, "linear")
        assert int(nan) == nan_at and torch.isnan(value)
        values, nan = k.magnitude_thresholds(ts, [0.3] * 3, "linear")
        assert int(nan) == nan_at and torch.isnan(values[nan_at]) and not torch.isnan(values[0])


# --- public ops ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["normal", "ties", "zeros", "special", "tiny"])
def test_public_global_vs_spec(kind):
    ts = make_list(11, [3, 17000, 64, 1], kind=kind)
    for q in QS:
        for m in METHODS:
            value = sk.global_magnitude_threshold(ts, q, interpolation=m)
            assert value.shape == () and value.dtype == torch.float32
            assert_same(value, expected_quantile(ts, q, method=m))
    scales = [2.0, 0.1, 1.0, 3.0]
    assert_same(sk.global_magnitude_threshold(ts, 0.6, scales=scales), expected_quantile(ts, 0.6, scales))
    assert_same(sk.global_magnitude_threshold(ts, 0.6, scales=torch.tensor(scales)),
                expected_quantile(ts, 0.6, scales))


def test_public_single_element_and_extremes():
    for x in [torch.tensor(-2.5), torch.tensor([float("-inf")]), torch.zeros(1, 1)]:
        for q in [0.0, 0.5, 1.0]:
            assert_same(sk.global_magnitude_threshold([x], q), expected_quantile([x], q))
    ts = make_list(12, [100, 200])
    assert sk.global_magnitude_threshold(ts, 0.0).item() == min(t.abs().min().item() for t in ts)
    assert sk.global_magnitude_threshold(ts, 1.0).item() == max(t.abs().max().item() for t in ts)


def test_public_more_than_2_24_elements():
    """Over 2^24 elements (torch.quantile refuses them up to torch 2.13), exact; fp16 keeps it fast."""
    g = torch.Generator().manual_seed(13)
    ts = [torch.randn(n, generator=g).half() for n in (9_000_000, 8_000_000, 777)]
    n = sum(t.numel() for t in ts)
    assert n > 2 ** 24
    for q in [0.5, 0.9]:
        assert_same(sk.global_magnitude_threshold(ts, q), expected_quantile(ts, q))


def test_public_magnitude_thresholds():
    ts = make_list(14, [1, 9, 5000, 30000], kind="ties") + make_list(15, [40000, 3])
    for sp in [0.0, 0.5, [0.1, 0.2, 0.3, 0.9, 0.99, 1.0]]:
        out = sk.magnitude_thresholds(ts, sp)
        assert out.shape == (len(ts),) and out.dtype == torch.float32
        for i, t in enumerate(ts):
            s = sp if isinstance(sp, float) else sp[i]
            assert_same(out[i], expected_quantile([t], s))
    torch.testing.assert_close(sk.magnitude_thresholds(ts, 0.4), reference.magnitude_thresholds(ts, 0.4),
                               atol=0, rtol=0)
    assert_same(sk.magnitude_thresholds(ts[:2], 0.3, interpolation="higher")[1],
                expected_quantile(ts[1:2], 0.3, method="higher"))


def test_parameters_and_generators_are_accepted():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(8, 4))
    ws = [model[0].weight, model[1].weight]
    value = sk.global_magnitude_threshold((w for w in ws), 0.5)
    assert not value.requires_grad
    assert_same(value, expected_quantile(ws, 0.5))


finite = st.floats(allow_nan=False, width=32)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arrays=st.lists(st.lists(finite, min_size=0, max_size=40), min_size=1, max_size=4).filter(
           lambda a: sum(map(len, a)) > 0),
       dtypes=st.lists(st.sampled_from(DTYPES), min_size=4, max_size=4),
       q=st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.floats(0.0, 1.0)),
       method=st.sampled_from(METHODS),
       scaled=st.booleans())
def test_property_matches_spec(arrays, dtypes, q, method, scaled):
    ts = [torch.tensor(a, dtype=torch.float32).to(d) for a, d in zip(arrays, dtypes)]
    scales = [0.5 + 0.75 * i for i in range(len(ts))] if scaled else None
    assert_same(sk.global_magnitude_threshold(ts, q, scales=scales, interpolation=method),
                expected_quantile(ts, q, scales, method))


# --- NaN and bad inputs ---------------------------------------------------------------------------

def test_nan_raises_with_index():
    ts = make_list(16, [10, 30000, 5])
    ts[1][123] = float("nan")
    with pytest.raises(FloatingPointError, match=r"tensors\[1\] contains NaN"):
        sk.global_magnitude_threshold(ts, 0.5)
    with pytest.raises(FloatingPointError, match=r"tensors\[1\] contains NaN"):
        sk.magnitude_thresholds(ts, 0.5)
    with pytest.raises(FloatingPointError, match=r"tensors\[1\] contains NaN"):
        reference.global_magnitude_threshold(ts, 0.5)
    assert torch.isnan(sk.global_magnitude_threshold(ts, 0.5, check_nan=False))
    with pytest.raises(FloatingPointError, match=r"tensors\[0\]"):  # inf·0 is NaN too
        sk.global_magnitude_threshold([torch.tensor([float("inf")]), ts[0]], 0.5, scales=[0.0, 1.0])


W = torch.ones(4, 3)


@pytest.mark.parametrize("args, kwargs, exc, match", [
    (([], 0.5), {}, ValueError, "tensors must not be empty"),
    ((W, 0.5), {}, TypeError, "tensors must be a list or tuple"),
    ((3.0, 0.5), {}, TypeError, "tensors must be a list or tuple"),
    (([W, [1.0]], 0.5), {}, TypeError, r"tensors\[1\] must be a torch.Tensor"),
    (([W, torch.ones(3, dtype=torch.int32)], 0.5), {}, TypeError, r"tensors\[1\] must be float32"),
    (([torch.ones(3, dtype=torch.float64)], 0.5), {}, TypeError, r"tensors\[0\] must be float32"),
    (([W, torch.ones(3, device="meta")], 0.5), {}, ValueError, r"tensors\[1\] is on meta"),
    (([torch.empty(0), torch.empty(2, 0)], 0.5), {}, ValueError, "tensors hold no elements"),
    (([W], 1.5), {}, ValueError, "sparsity must be in"),
    (([W], -0.1), {}, ValueError, "sparsity must be in"),
    (([W], float("nan")), {}, ValueError, "sparsity must be in"),
    (([W], True), {}, TypeError, "sparsity must be a real number"),
    (([W], "0.5"), {}, TypeError, "sparsity must be a real number"),
    (([W, W], 0.5), {"scales": [1.0]}, ValueError, "scales has 1 entries; expected 2"),
    (([W, W], 0.5), {"scales": torch.ones(2, 1)}, ValueError, "scales must be a number or 1-D"),
    (([W, W], 0.5), {"scales": [1.0, -1.0]}, ValueError, r"scales\[1\] must be in"),
    (([W, W], 0.5), {"scales": [float("inf"), 1.0]}, ValueError, r"scales\[0\] must be in"),
    (([W], 0.5), {"interpolation": "midpoint"}, ValueError, "interpolation must be one of"),
])
def test_bad_global_inputs(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        sk.global_magnitude_threshold(*args, **kwargs)


@pytest.mark.parametrize("args, exc, match", [
    (([W, torch.empty(0)], 0.5), ValueError, r"tensors\[1\] is empty"),
    (([W, W], [0.5]), ValueError, "sparsities has 1 entries; expected 2"),
    (([W, W], [0.5, 2.0]), ValueError, r"sparsities\[1\] must be in"),
    (([], 0.5), ValueError, "tensors must not be empty"),
])
def test_bad_per_tensor_inputs(args, exc, match):
    with pytest.raises(exc, match=match):
        sk.magnitude_thresholds(*args)


@pytest.mark.parametrize("bad", ["False", "True", 0, 1, None])
def test_check_nan_must_be_a_bool(bad):
    """Issue 14: a truthy string was taken as True; now a TypeError naming the flag."""
    with pytest.raises(TypeError, match="check_nan must be a bool"):
        sk.global_magnitude_threshold([W], 0.5, check_nan=bad)
    with pytest.raises(TypeError, match="check_nan must be a bool"):
        sk.magnitude_thresholds([W], 0.5, check_nan=bad)


def test_meta_tensors_give_shapes():
    """Issue 14: meta tensors (shapes without data, as torch.compile's fake tensors) raised
    ``Tensor.item() cannot be called on meta tensors`` from the NaN check; now the result's
    shape, dtype and device, like the ops' fake kernels, and the check is skipped (no value)."""
    ts = [torch.empty(6, 5, 3, 3, device="meta"), torch.empty(7, device="meta", dtype=torch.bfloat16)]
    t = sk.global_magnitude_threshold(ts, 0.5, scales=[1.0, 2.0])
    assert t.device.type == "meta" and t.shape == () and t.dtype == torch.float32
    v = sk.magnitude_thresholds(ts, [0.5, 0.1], interpolation="nearest")
    assert v.device.type == "meta" and v.shape == (2,) and v.dtype == torch.float32
    assert sk.global_magnitude_threshold(ts, 0.5, check_nan=False).device.type == "meta"


# --- registration ---------------------------------------------------------------------------------

def test_opcheck():
    ts = make_list(17, [6 * 5 * 3 * 3, 17 * 9, 3], dtypes=[torch.float32, torch.bfloat16, torch.float16])
    ts[0] = ts[0].reshape(6, 5, 3, 3)
    ops = torch.ops.sparsekern
    torch.library.opcheck(ops.global_magnitude_threshold, (ts, 0.7, [1.0, 2.0, 0.5], "linear"))
    torch.library.opcheck(ops.global_magnitude_threshold, (ts[1:], 0.2, [1.0, 1.0], "nearest"))
    torch.library.opcheck(ops.magnitude_thresholds, (ts, [0.1, 0.5, 1.0], "linear"))


def test_compile_fullgraph():
    def f(ws):
        t = sk.global_magnitude_threshold(ws, 0.75, scales=[1.0, 2.0])
        return t, sk.magnitude_thresholds(ws, [0.5, 0.25]), sk.hard_threshold(ws[0], t)

    ws = make_list(18, [300, 40])
    got = torch.compile(f, fullgraph=True)(ws)
    for a, b in zip(got, f(ws)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_bench_suites_match_paper_parameter_counts():
    """bench/suites.py: ResNet-50's 54 and MobileNetV1's 28 prunable weights, the papers' totals."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "bench", "suites.py")
    spec = importlib.util.spec_from_file_location("bench_suites", path)
    suites = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suites)
    assert len(suites.resnet50()) == 54 and suites.numel(suites.resnet50()) == 25_502_912
    assert len(suites.mobilenet_v1()) == 28 and suites.numel(suites.mobilenet_v1()) == 4_209_088
    assert suites.TOTALS == {"resnet50": 25_502_912, "mobilenet_v1": 4_209_088}
