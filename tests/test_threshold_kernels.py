"""Every implementation of the threshold ops (C++, Triton, reference fallback) against
``sparsekern.reference``.

The ops' schemas are documented in ``sparsekern/ops/threshold.py``: flat fp32 ``t`` (per layer,
per output channel or per weight), math in fp32.
"""
import decimal
import math
from decimal import Decimal

import numpy as np
import pytest
import torch

from sparsekern import reference
from utils import DTYPES, SHAPES, TOL, f32, kernel_backend, make_threshold, make_weight

BACKENDS = ["cpp", "triton", "reference"]
MODES = ["scalar", "channel", "element"]
ACTS = {0: "identity", 1: "sigmoid", 2: "exp"}


def _inv_act(thr, act):
    """Pre-activation s with g(s) ≈ thr, so ~half the weights stay."""
    if act == 1:
        return torch.logit(thr.clamp(1e-6, 1 - 1e-6))
    if act == 2:
        return torch.log(thr.clamp_min(1e-6))
    return thr


def _close(actual, expected, dtype, atol=None, rtol=None):
    a, r = TOL[dtype]
    a, r = (a if atol is None else atol), (r if rtol is None else rtol)
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(actual.cpu(), expected.cpu(), atol=a, rtol=r)


def _case(backend, shape, dtype, mode, ties=True):
    k, dev = kernel_backend(backend)
    w = make_weight(shape, dtype, dev)
    return k, w, make_threshold(w, mode, ties=ties)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_hard_and_st3(backend, shape, dtype, mode):
    k, w, t = _case(backend, shape, dtype, mode)
    _close(k.hard_threshold(w, t, False), reference.hard_threshold(w, t, ste=False), dtype, atol=0, rtol=0)
    g = make_weight(shape, dtype, w.device, seed=3)
    _close(k.hard_threshold_backward(g, w, t), reference.hard_threshold_backward(g, w, t), dtype, atol=0, rtol=0)
    for rescale in (True, False):
        _close(k.st3_threshold(w, t, rescale), reference.st3_threshold(w, t, rescale), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", [0, 1, 2])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_soft(backend, shape, dtype, mode, act):
    k, w, t = _case(backend, shape, dtype, mode, ties=act == 0)
    s = _inv_act(t, act)
    thr = reference.activate(s, ACTS[act])
    fwd = k.soft_threshold(w, s) if act == 0 else k.str_threshold(w, s, ACTS[act])
    _close(fwd, reference.soft_threshold(w, thr), dtype)
    g = make_weight(shape, dtype, w.device, seed=3)
    gw, gs = k.soft_threshold_backward(g, w, s, act, True)
    ew, es = reference.soft_threshold_backward(g, w, s, ACTS[act])
    _close(gw, ew, dtype)
    # grad_s sums up to ~75k fp32 terms; summation order differs between backends (and on a GPU,
    # g'(s) from ex2.approx + div.full: a few ulp, far below this; see utils.TOL).
    assert gs.dtype == torch.float32
    torch.testing.assert_close(gs.cpu(), es.cpu(), atol=1e-4 * math.sqrt(max(w.numel(), 1)), rtol=1e-5)
    gw2, gs2 = k.soft_threshold_backward(g, w, s, act, False)
    assert torch.equal(gw2.cpu(), gw.cpu()) and gs2.numel() == 0
    assert torch.equal(k.soft_threshold_backward(g, w, s, act, True)[1].cpu(), gs.cpu()), "grad_t must be deterministic"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [1.0, 3.0, 7.5])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_power(backend, shape, dtype, mode, p):
    k, w, t = _case(backend, shape, dtype, mode)
    _check_power(k.power_threshold(w, t, p, 1.0), w, t, p)
    _check_power(reference.power_threshold(w, t, p), w, t, p)
    g = make_weight(shape, dtype, w.device, seed=3)
    for theta in (1.0, 0.5, 0.0):
        _close(k.power_threshold_backward(g, w, t, theta), reference.power_threshold_backward(g, w, t, theta), dtype)


def _power_rel_bound(delta, p):
    """Relative error of power_fwd's fp32 result that holds on a GPU (SPEC §3; δ = 1 − (t/|w|)^p).

    On sm90 the Triton kernel's tl.log2 is libdevice's log2f (<= 1 ulp, subnormal-safe),
    tl.exp2 is ex2.approx.ftz.f32 (2 ulp), quotients are div.rn. ln(t/|w|): atanh series of an
    IEEE quotient (|w| <= 2t) or log2 of t/|w| <= 1/2: ~2 ulp. δ = −expm1(p·ln(t/|w|)) (Taylor
    series for δ < 1/2, else 1 − ex2; condition number <= 1): ~5.5 ulp. δ^(1/p) =
    ex2(log2(δ) / p): δ's error over p, log2's and the quotient's roundings scaled by
    |log2 δ|/p, ex2's 2 ulp: in all <= 2.5 + (5.5 + 1.1·|log2 δ|)/p ulp; the bound allows about
    twice that. C++ and the reference compute in float64: <= 1 ulp.
    """
    return 2.0 ** -24 * (4 + (8 + 2 * delta.log2().abs()) / p)


def _check_power(out, w, t, p):
    """Compare with the exact value (float64: 1 − (t/|w|)^p loses at most 2^-52/δ ≈ 2^-28
    relative) within the GPU bound of :func:`_power_rel_bound` plus one rounding to the storage
    dtype."""
    a = w.double().abs().cpu()
    thr = reference.broadcast_threshold(t, w).double().cpu()
    kept = a > thr
    delta = torch.where(kept, 1 - (thr / a).pow(p), torch.ones_like(a))
    exact = torch.sign(w.double().cpu()) * a * delta.pow(1 / p) * kept
    err = exact.abs() * (_power_rel_bound(delta, p) + TOL[w.dtype][1]) + TOL[w.dtype][0]
    diff = (out.double().cpu() - exact).abs()
    assert out.dtype == w.dtype and out.shape == w.shape
    assert bool((diff <= err).all()), f"max excess {(diff - err).max().item():.3g}"


def _power_oracle(a, t, p):
    """(|out|, δ) for |w| = a > t: SPEC §3's ``(a^p − t^p)^(1/p)`` and ``1 − (t/a)^p`` in 80-digit
    decimal arithmetic (no overflow; the cancellation costs at most ~10 digits), as floats."""
    with decimal.localcontext() as ctx:
        ctx.prec = 80
        a_, t_, p_ = Decimal(a), Decimal(t), Decimal(p)
        return float((a_ ** p_ - t_ ** p_) ** (1 / p_)), float(1 - (t_ / a_) ** p_)


def _power_battery(t):
    """fp32 weights for threshold t: 1 to 10^4 ulp above t, 1e-4 and 1 % above, both sides of
    |w| = 2t (where the Triton kernel switches from its atanh series to lg2), 1e3·t, 1e13·t."""
    t32 = np.float32(t)
    up = [t32]
    for _ in range(10_000):
        up.append(np.nextafter(up[-1], np.float32(np.inf)))
    two = np.float32(2) * t32
    mags = [up[k] for k in (1, 2, 3, 10, 100, 10_000)]
    mags += [t32 * np.float32(f) for f in (1 + 1e-4, 1.01, 1.5, 3, 1e3, 1e13)]
    mags += [np.nextafter(two, np.float32(0)), two, np.nextafter(two, np.float32(np.inf))]
    return [float(m) for m in mags if np.isfinite(m)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.5, 1.0, 2.0, 3.0, 7.5, 100.0])
def test_power_accuracy(backend, p):
    """Issue 14: against the definition (decimal oracle), for weights just above t (where
    |w|^p − t^p cancels in fp32: ~1 % off before), far above (|w|^p overflowed fp32: p = 100 and
    |w| = 2.5, or |w| = 1e13 and p = 3, gave inf; 0.3^100 underflowed to 0) and thresholds from
    1e-30 to 1e20. C++ and the reference are correctly rounded (<= 1 ulp: one double rounding);
    Triton is within the GPU bound of :func:`_power_rel_bound`."""
    k, dev = kernel_backend(backend)
    for t in (1e-30, 3e-5, 0.1, 1.0, 1e20):
        mags = _power_battery(t)
        w = torch.tensor([m * s for m in mags for s in (1, -1)], dtype=torch.float32)
        exact = torch.tensor([s * _power_oracle(m, f32(t), p)[0] for m in mags for s in (1, -1)],
                             dtype=torch.float64)
        delta = torch.tensor([_power_oracle(m, f32(t), p)[1] for m in mags for _ in (1, -1)],
                             dtype=torch.float64)
        out = k.power_threshold(w.to(dev), torch.tensor([t], device=dev), p, 1.0).cpu().double()
        rel = 2.0 ** -23 if backend != "triton" else _power_rel_bound(delta, p)
        bad = (out - exact).abs() > rel * exact.abs() + 2.0 ** -149  # a subnormal result: its ulp
        assert not bad.any(), (t, w[bad].tolist(), out[bad].tolist(), exact[bad].tolist())


@pytest.mark.parametrize("backend", BACKENDS)
def test_power_special_values(backend):
    """Issue 14's overflow case, t = 0 (the identity, bit for bit), infinite and NaN weights
    (SPEC §3's value: (inf^p − t^p)^(1/p) = inf), ties at t pruned, for several p."""
    k, dev = kernel_backend(backend)
    w = torch.tensor([0.3, 1.0, 2.5], device=dev)
    torch.testing.assert_close(k.power_threshold(w, torch.tensor([0.1], device=dev), 100.0, 1.0).cpu(),
                               torch.tensor([0.3, 1.0, 2.5]), atol=0, rtol=1e-6)
    w = torch.tensor([math.inf, -math.inf, math.nan, 0.5, -0.5, 1e-45, 0.0, 3.4e38, -1e13], device=dev)
    for p in (1.0, 2.0, 3.0, 7.5, 100.0):
        assert torch.equal(k.power_threshold(w, torch.zeros(1, device=dev), p, 1.0).cpu()[[0, 1, 3, 4, 5, 6, 7, 8]],
                           w.cpu()[[0, 1, 3, 4, 5, 6, 7, 8]]), p
        out = k.power_threshold(w, torch.tensor([0.5], device=dev), p, 1.0).cpu()
        assert out[:2].tolist() == [math.inf, -math.inf] and out[2].isnan(), p
        assert out[3:7].tolist() == [0.0, 0.0, 0.0, 0.0], p
        torch.testing.assert_close(out[7:], w.cpu()[7:], atol=0, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_power_never_nan(backend):
    """Weights at, just above and far below t must not produce NaN (no root of a negative)."""
    k, dev = kernel_backend(backend)
    t = torch.tensor([0.5])
    w = torch.tensor([0.5, -0.5, 0.50000006, 1e-30, 0.0, -0.0, 3.0, 1e-3]).to(dev)
    out = k.power_threshold(w, t.to(dev), 3.0, 1.0).cpu()
    assert not out.isnan().any()
    assert torch.equal(out[:2], torch.zeros(2)) and out[3:6].eq(0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_weights_stay_nan(backend):
    """A NaN weight gives NaN in every forward (as the reference does), never a silent 0 that
    would hide a diverged run; the other weights are unaffected (ST-3's rescale spreads it over
    its output channel, as the reference's channel norm does)."""
    k, dev = kernel_backend(backend)
    w = make_weight((6, 9), torch.float32, dev)
    w[1, 2] = w[4, 0] = math.nan
    t = torch.tensor([0.05], device=dev)
    outs = {"soft": (k.soft_threshold(w, t), reference.soft_threshold(w, t)),
            "st3": (k.st3_threshold(w, t, False), reference.st3_threshold(w, t, False)),
            "power": (k.power_threshold(w, t, 3.0, 1.0), reference.power_threshold(w, t)),
            "hard": (k.hard_threshold(w, t, False), reference.hard_threshold(w, t, ste=False)),
            "st3 rescaled": (k.st3_threshold(w, t, True), reference.st3_threshold(w, t, True))}
    for name, (got, expect) in outs.items():
        nan_rows = w.isnan().any(1, keepdim=True).expand_as(w)
        assert torch.equal(got.isnan().cpu(), (nan_rows if "rescaled" in name else w.isnan()).cpu()), name
        torch.testing.assert_close(got.cpu(), expect.cpu(), atol=TOL[torch.float32][0],
                                   rtol=TOL[torch.float32][1], equal_nan=True)


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
def test_st3_infinite_weight(backend):
    """Issue 14: one kept infinite weight made its whole output channel NaN (the rescale's
    ρ = inf/inf). ρ → 1 as that weight grows (it dominates both channel means), so the channel
    gets scale 1: the inf stays ±inf and the other weights are shrunk but not rescaled; other
    channels are unaffected. Rows of one element (inner = 1) and fp16 (where 1e5 is inf) too."""
    k, dev = kernel_backend(backend)
    w = make_weight((6, 9), torch.float32, dev)
    w[1, 2], w[4, 0] = math.inf, -math.inf
    t = torch.tensor([0.3], device=dev)
    out = k.st3_threshold(w, t, True).cpu()
    finite = torch.tensor([0, 2, 3, 5])
    wc = w.cpu()
    shrunk = torch.sign(wc) * torch.relu(wc.abs() - 0.3)
    assert not out.isnan().any()
    assert out[1, 2] == math.inf and out[4, 0] == -math.inf
    torch.testing.assert_close(out[[1, 4]], shrunk[[1, 4]], atol=0, rtol=0)  # scale exactly 1
    torch.testing.assert_close(out[finite], reference.st3_threshold(wc[finite], t.cpu()), atol=1e-6, rtol=1e-6)
    one = torch.tensor([math.inf, -0.1, 2.0, -math.inf], device=dev)  # inner = 1: ρ = 1 if kept
    expect = torch.tensor([math.inf, -0.0, 1.7, -math.inf]) * torch.tensor([1.0, 1.01 / (1e-6 / (0.1 + 1e-6) + 0.01), 1.0, 1.0])
    torch.testing.assert_close(k.st3_threshold(one, t, True).cpu(), expect, atol=0, rtol=1e-6)
    h = torch.tensor([[1e5, 0.5, -0.2, 1.0]], dtype=torch.float16, device=dev)  # 1e5 -> inf in fp16
    assert k.st3_threshold(h, t, True).cpu().tolist() == [[math.inf, 0.199951171875, -0.0, 0.7001953125]]


def _st3_float64(w, t):
    """SPEC §2 in float64 (means of fp32 |w| that an fp32 sum would overflow), rounded to fp32."""
    a = w.double().abs().reshape(w.shape[0], -1)
    kept = torch.where(a > t, a, 0.0)
    rho = (kept.mean(1) + 1e-6) / (a.mean(1) + 1e-6)
    q = torch.sign(w.double()).reshape(a.shape) * torch.relu(a - t) * (1.01 / (rho + 0.01))[:, None]
    return q.reshape(w.shape).float()


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_extreme_values_cpp_and_reference_agree_with_the_math(backend):
    """Issue 14 (SPARSEKERN_NO_EXT=1 serves CPU with the reference): on huge weights (|w| up to
    3.4e38: fp32 sums of |w| overflow, so ST-3's channel means were inf and ρ NaN in the
    reference, and in C++ once 64 terms met in a lane), huge thresholds and infinite weights
    (the reference's straight-through ``q + (w − w.detach())`` was ``inf − inf = NaN`` for hard
    and ST-3), both backends give SPEC §2/§6's values."""
    k, dev = kernel_backend(backend)
    for shape in [(2, 4), (4, 4096), (1, 100_003)]:
        w = torch.full(shape, 3e38)
        w[:, ::2] = -1e38
        w[:, 1::7] = 1e-45
        for t in (0.0, 1e-39, 0.5, 2e38, 3.4e38):
            exp = _st3_float64(w, t)
            out = k.st3_threshold(w, torch.tensor([t]), True)
            torch.testing.assert_close(out, exp, atol=0, rtol=1e-6)
            torch.testing.assert_close(k.st3_threshold(w, torch.tensor([t]), False),
                                       (torch.sign(w) * torch.relu(w.abs() - t)), atol=0, rtol=0)
            torch.testing.assert_close(k.hard_threshold(w, torch.tensor([t]), False), w * (w.abs() > t), atol=0, rtol=0)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):  # infinite weights
        w = torch.tensor([[math.inf, 1.0, -2.0, 0.3], [-math.inf, 0.1, 5.0, 0.2]], dtype=dtype)
        t = torch.tensor([0.25])
        assert k.hard_threshold(w, t, False).tolist() == [[math.inf, 1.0, -2.0, 0.30078125 if dtype == torch.bfloat16
                                              else w[0, 3].item()], [-math.inf, 0.0, 5.0, 0.0]]
        out = k.st3_threshold(w, t, False)
        assert out[:, 0].tolist() == [math.inf, -math.inf] and not out.isnan().any()
        wr = w.clone().requires_grad_()  # the public reference ops with autograd, too
        for ref_out in (reference.hard_threshold(wr, t, ste=False), reference.hard_threshold(wr, t),
                        reference.st3_threshold(wr, t), reference.st3_threshold(wr, t, False)):
            assert not ref_out.isnan().any() and ref_out[:, 0].tolist() == [math.inf, -math.inf]
            ref_out.sum().backward()
        assert wr.grad.tolist() == [[4.0] * 4, [4.0, 3.0, 4.0, 3.0]]  # 3 straight-through + 1 masked


@pytest.mark.parametrize("backend", BACKENDS)
def test_st3_zero_threshold_is_identity(backend):
    k, dev = kernel_backend(backend)
    w = make_weight((8, 5, 3, 3), torch.float32, dev)
    w[0, 0] = 0
    assert torch.equal(k.st3_threshold(w, torch.zeros(1, device=dev), True).cpu(), w.cpu())


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_rows_and_many_rows(backend):
    """One long row (K=1) and many 1-element rows (inner=1) exercise both parallel splits."""
    k, dev = kernel_backend(backend)
    for shape in [(1, 200_003), (200_003,)]:
        w = make_weight(shape, torch.float32, dev)
        t = make_threshold(w, "scalar", q=0.9)
        _close(k.st3_threshold(w, t, True), reference.st3_threshold(w, t), torch.float32)
        g = make_weight(shape, torch.float32, dev, seed=4)
        gs = k.soft_threshold_backward(g, w, t, 0, True)[1]
        es = reference.soft_threshold_backward(g, w, t)[1]
        torch.testing.assert_close(gs.cpu(), es.cpu(), atol=1e-4 * math.sqrt(w.numel()), rtol=1e-5)
