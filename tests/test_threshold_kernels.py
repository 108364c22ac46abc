"""Every threshold kernel backend (C++, Triton, reference fallback) against ``sparsekern.reference``.

The kernel contract is documented in ``sparsekern/ops/threshold.py``: contiguous ``w``, flat
fp32 ``t`` (per layer, per output channel or per weight), math in fp32.
"""
import math

import pytest
import torch

from sparsekern import reference
from utils import DTYPES, SHAPES, TOL, kernel_backend, make_threshold, make_weight

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
    _close(k.hard_fwd(w, t), reference.hard_threshold(w, t, ste=False), dtype, atol=0, rtol=0)
    g = make_weight(shape, dtype, w.device, seed=3)
    _close(k.hard_bwd(g, w, t), reference.hard_threshold_backward(g, w, t), dtype, atol=0, rtol=0)
    for rescale in (True, False):
        _close(k.st3_fwd(w, t, rescale), reference.st3_threshold(w, t, rescale), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", [0, 1, 2])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_soft(backend, shape, dtype, mode, act):
    k, w, t = _case(backend, shape, dtype, mode, ties=act == 0)
    s = _inv_act(t, act)
    thr = reference.activate(s, ACTS[act])
    _close(k.soft_fwd(w, s, act), reference.soft_threshold(w, thr), dtype)
    g = make_weight(shape, dtype, w.device, seed=3)
    gw, gs = k.soft_bwd(g, w, s, act, True)
    ew, es = reference.soft_threshold_backward(g, w, s, ACTS[act])
    _close(gw, ew, dtype)
    # grad_s sums up to ~75k fp32 terms; summation order differs between backends.
    assert gs.dtype == torch.float32
    torch.testing.assert_close(gs.cpu(), es.cpu(), atol=1e-4 * math.sqrt(max(w.numel(), 1)), rtol=1e-5)
    gw2, gs2 = k.soft_bwd(g, w, s, act, False)
    assert torch.equal(gw2.cpu(), gw.cpu()) and gs2.numel() == 0
    assert torch.equal(k.soft_bwd(g, w, s, act, True)[1].cpu(), gs.cpu()), "grad_t must be deterministic"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [1.0, 3.0, 7.5])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_power(backend, shape, dtype, mode, p):
    k, w, t = _case(backend, shape, dtype, mode)
    _check_power(k.power_fwd(w, t, p), w, t, p)
    _check_power(reference.power_threshold(w, t, p), w, t, p)
    g = make_weight(shape, dtype, w.device, seed=3)
    for theta in (1.0, 0.5, 0.0):
        _close(k.power_bwd(g, w, t, theta), reference.power_threshold_backward(g, w, t, theta), dtype)


def _check_power(out, w, t, p):
    """Compare with the exact value (float64) within the error any fp32 evaluation has.

    For |w| just above t, ``|w|^p − t^p`` cancels: relative input errors of ~ε in the p-th
    powers become ε/(p·δ) in the result, δ = 1 − (t/|w|)^p. The bound allows 8ε of that
    (fp32 pow/exp2/log2 are a few ulp) plus one rounding to the storage dtype.
    """
    a = w.double().abs().cpu()
    thr = reference.broadcast_threshold(t, w).double().cpu()
    kept = a > thr
    delta = torch.where(kept, 1 - (thr / a).pow(p), torch.zeros_like(a))
    exact = torch.sign(w.double().cpu()) * a * delta.clamp_min(0).pow(1 / p)
    eps32 = 2.0 ** -24
    err = exact.abs() * 8 * eps32 * (1 + 1 / (p * delta.clamp_min(1e-300)))
    err = err + exact.abs() * TOL[w.dtype][1] + TOL[w.dtype][0]
    diff = (out.double().cpu() - exact).abs()
    assert out.dtype == w.dtype and out.shape == w.shape
    assert bool((diff <= err).all()), f"max excess {(diff - err).max().item():.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_power_never_nan(backend):
    """Weights at, just above and far below t must not produce NaN (no root of a negative)."""
    k, dev = kernel_backend(backend)
    t = torch.tensor([0.5])
    w = torch.tensor([0.5, -0.5, 0.50000006, 1e-30, 0.0, -0.0, 3.0, 1e-3]).to(dev)
    out = k.power_fwd(w, t.to(dev), 3.0).cpu()
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
    outs = {"soft": (k.soft_fwd(w, t, 0), reference.soft_threshold(w, t)),
            "st3": (k.st3_fwd(w, t, False), reference.st3_threshold(w, t, False)),
            "power": (k.power_fwd(w, t, 3.0), reference.power_threshold(w, t)),
            "hard": (k.hard_fwd(w, t), reference.hard_threshold(w, t, ste=False)),
            "st3 rescaled": (k.st3_fwd(w, t, True), reference.st3_threshold(w, t, True))}
    for name, (got, expect) in outs.items():
        nan_rows = w.isnan().any(1, keepdim=True).expand_as(w)
        assert torch.equal(got.isnan().cpu(), (nan_rows if "rescaled" in name else w.isnan()).cpu()), name
        torch.testing.assert_close(got.cpu(), expect.cpu(), atol=TOL[torch.float32][0],
                                   rtol=TOL[torch.float32][1], equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_st3_zero_threshold_is_identity(backend):
    k, dev = kernel_backend(backend)
    w = make_weight((8, 5, 3, 3), torch.float32, dev)
    w[0, 0] = 0
    assert torch.equal(k.st3_fwd(w, torch.zeros(1, device=dev), True).cpu(), w.cpu())


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_rows_and_many_rows(backend):
    """One long row (K=1) and many 1-element rows (inner=1) exercise both parallel splits."""
    k, dev = kernel_backend(backend)
    for shape in [(1, 200_003), (200_003,)]:
        w = make_weight(shape, torch.float32, dev)
        t = make_threshold(w, "scalar", q=0.9)
        _close(k.st3_fwd(w, t, True), reference.st3_threshold(w, t), torch.float32)
        g = make_weight(shape, torch.float32, dev, seed=4)
        gs = k.soft_bwd(g, w, t, 0, True)[1]
        es = reference.soft_threshold_backward(g, w, t)[1]
        torch.testing.assert_close(gs.cpu(), es.cpu(), atol=1e-4 * math.sqrt(w.numel()), rtol=1e-5)
