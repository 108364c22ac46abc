"""The public threshold ops (``sk.*`` and ``torch.ops.sparsekern.*``): values, SPEC gradients,
opcheck, torch.compile, memory, and input validation."""
import pytest
import torch

import sparsekern as sk
from sparsekern import reference
from utils import DTYPES, TOL, make_weight

OPS = {
    "soft": (sk.soft_threshold, reference.soft_threshold, {}),
    "str_sigmoid": (sk.str_threshold, reference.str_threshold, {"activation": "sigmoid"}),
    "str_exp": (sk.str_threshold, reference.str_threshold, {"activation": "exp"}),
    "st3": (sk.st3_threshold, reference.st3_threshold, {}),
    "st3_norescale": (sk.st3_threshold, reference.st3_threshold, {"rescale": False}),
    "power": (sk.power_threshold, reference.power_threshold, {"p": 3.0, "theta": 0.5}),
    "hard_ste": (sk.hard_threshold, reference.hard_threshold, {"ste": True}),
    "hard_masked": (sk.hard_threshold, reference.hard_threshold, {"ste": False}),
}


def _threshold_arg(name, w, kind):
    """t (or STR's s) as a user passes it: float, 0-d, [K], [K,1,..] or per-weight."""
    k = w.shape[0]
    base = -0.7 if name.startswith("str") else 0.4  # sigmoid(-0.7) ≈ 0.33, exp(-0.7) ≈ 0.5
    if kind == "float":
        return base
    if kind == "0d":
        return torch.tensor(base)
    if kind == "channel":
        return base + 0.1 * torch.rand(k, generator=torch.Generator().manual_seed(2))
    if kind == "channel_view":
        return (base + 0.1 * torch.rand(k, generator=torch.Generator().manual_seed(2))).reshape(
            (k,) + (1,) * (w.dim() - 1))
    return base + 0.2 * torch.rand(w.shape, generator=torch.Generator().manual_seed(2))


def _noncontig(w):
    """A non-contiguous view with the same values as ``w``."""
    big = torch.zeros((w.shape[0], 2) + w.shape[1:], dtype=w.dtype)
    big[:, 1] = w
    v = big[:, 1]
    assert not v.is_contiguous()
    return v


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["float", "0d", "channel", "channel_view", "weight"])
@pytest.mark.parametrize("shape", [(7,), (33, 17), (16, 8, 3, 3)])
@pytest.mark.parametrize("contiguous", [True, False])
def test_forward_backward_vs_reference(name, dtype, kind, shape, contiguous):
    op, ref, kw = OPS[name]
    w0 = make_weight(shape, dtype)
    t0 = _threshold_arg(name, w0, kind)
    t_grad = name.startswith(("soft", "str")) and isinstance(t0, torch.Tensor)
    w = (w0.clone() if contiguous else _noncontig(w0)).requires_grad_(True)
    t = t0.clone().requires_grad_(t_grad) if isinstance(t0, torch.Tensor) else t0
    out = op(w, t, **kw)
    w_r = w0.clone().requires_grad_(True)
    t_r = t0.clone().requires_grad_(t_grad) if isinstance(t0, torch.Tensor) else t0
    exp = ref(w_r, t_r, **kw)
    atol, rtol = TOL[dtype]  # C++ kernels vs the reference, on CPU (see TOL)
    torch.testing.assert_close(out, exp, atol=atol, rtol=rtol)
    g = make_weight(shape, dtype, seed=5)
    out.backward(g)
    exp.backward(g)
    torch.testing.assert_close(w.grad, w_r.grad, atol=atol, rtol=rtol)
    if t_grad:
        assert t.grad.shape == t.shape and t.grad.dtype == t.dtype
        torch.testing.assert_close(t.grad, t_r.grad, atol=1e-4, rtol=1e-5)


def _kept(w, thr):
    return w.float().abs() > thr


def test_spec_gradients_soft_and_str():
    """SPEC §1: ∂w = g·1[|w| > g(s)], ∂s = −g'(s)·Σ_kept g·sign(w), per scalar/channel/weight."""
    w = make_weight((6, 4, 3), torch.float32).requires_grad_(True)
    g = make_weight((6, 4, 3), torch.float32, seed=1)
    for s0 in [torch.tensor(-0.5), torch.linspace(-1, 0, 6), torch.linspace(-1, 0, 72).reshape(6, 4, 3)]:
        s = s0.clone().requires_grad_(True)
        w.grad = None
        sk.str_threshold(w, s).backward(g)
        thr = torch.sigmoid(s0)
        kept = _kept(w, thr.reshape((6, 1, 1) if s0.numel() == 6 else s0.shape))
        assert torch.equal(w.grad, g * kept)
        contrib = g * torch.sign(w.detach()) * kept
        red = contrib.sum() if s0.numel() == 1 else (contrib.sum((1, 2)) if s0.numel() == 6 else contrib)
        torch.testing.assert_close(s.grad, -thr * (1 - thr) * red, atol=1e-5, rtol=1e-5)


def test_str_grad_is_exactly_zero_at_init():
    """s_init = −3200: sigmoid and its derivative are 0 in fp32, so ∂s = 0 and nothing is pruned."""
    w = make_weight((10, 10), torch.float32).requires_grad_(True)
    s = torch.tensor(-3200.0, requires_grad=True)
    out = sk.str_threshold(w, s)
    out.sum().backward()
    assert torch.equal(out, w.detach()) and s.grad.item() == 0.0 and torch.equal(w.grad, torch.ones(10, 10))


def test_spec_st3_forward_and_ste():
    """SPEC §2: per-channel ρ and scale from raw |w|; backward is g for every weight."""
    w = make_weight((5, 3, 3, 3), torch.float32).requires_grad_(True)
    t = 0.6
    out = sk.st3_threshold(w, t)
    a = w.detach().abs()
    m = a > t
    rho = ((a * m).mean((1, 2, 3)) + 1e-6) / (a.mean((1, 2, 3)) + 1e-6)
    scale = (1.01 / (rho + 0.01)).reshape(5, 1, 1, 1)
    torch.testing.assert_close(out, scale * torch.sign(w.detach()) * (a - t).clamp_min(0))
    assert (scale >= 1).all() and (scale <= 101).all()
    g = make_weight((5, 3, 3, 3), torch.float32, seed=2)
    out.backward(g)
    assert torch.equal(w.grad, g)


def test_spec_power_and_hard_gradients():
    w = make_weight((9, 11), torch.float32).requires_grad_(True)
    g = make_weight((9, 11), torch.float32, seed=2)
    t = 0.5
    kept = _kept(w, t)
    sk.power_threshold(w, t, p=3.0, theta=0.25).backward(g)
    assert torch.equal(w.grad, torch.where(kept, g, 0.25 * g))
    w.grad = None
    sk.hard_threshold(w, t, ste=False).backward(g)
    assert torch.equal(w.grad, g * kept)
    w.grad = None
    sk.hard_threshold(w, t, ste=True).backward(g)
    assert torch.equal(w.grad, g)
    # t = 0: nothing is pruned yet, every weight gets its gradient, exact zeros included
    z = torch.zeros(4, 3, requires_grad=True)
    gz = make_weight((4, 3), torch.float32, seed=3)
    sk.hard_threshold(z, 0.0, ste=False).backward(gz)
    assert torch.equal(z.grad, gz)
    w.grad = None  # per-channel t, one channel at 0: that row passes everything, the others are masked
    tc = torch.full((9,), t)
    tc[2] = 0.0
    sk.hard_threshold(w, tc, ste=False).backward(g)
    expected = g * kept
    expected[2] = g[2]
    assert torch.equal(w.grad, expected)
    torch.testing.assert_close(w.grad, reference.hard_threshold_backward(g, w.detach(), tc), rtol=0, atol=0)


def test_power_limits():
    w = make_weight((50,), torch.float32)
    torch.testing.assert_close(sk.power_threshold(w, 0.3, p=1.0), sk.soft_threshold(w, 0.3))
    hard = sk.hard_threshold(w, 0.3)
    torch.testing.assert_close(sk.power_threshold(w, 0.3, p=64.0), hard, atol=0.05, rtol=0.0)


@pytest.mark.parametrize("shape", [(0,), (0, 3), (4, 0)])
def test_empty(shape):
    w = torch.empty(shape, requires_grad=True)
    for name, (op, _, kw) in OPS.items():
        t = -0.5 if name.startswith("str") else 0.1
        out = op(w, t, **kw)
        assert out.shape == w.shape
        out.sum().backward()
        assert w.grad.shape == w.shape


def test_zero_dim_weight():
    w = torch.tensor(0.8, requires_grad=True)
    torch.testing.assert_close(sk.soft_threshold(w, 0.3), torch.tensor(0.5))
    torch.testing.assert_close(sk.hard_threshold(w, 0.9), torch.tensor(0.0))


def test_no_full_size_tensor_saved_for_backward():
    """Backward recomputes the mask from (w, t): autograd saves only w and t (views, no copies)."""
    w = make_weight((64, 32, 3, 3), torch.float32).requires_grad_(True)
    s = torch.tensor(-1.0, requires_grad=True)
    saved = []

    def pack(x):
        saved.append(x)
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        for out in [sk.str_threshold(w, s), sk.st3_threshold(w, 0.5), sk.power_threshold(w, 0.5),
                    sk.hard_threshold(w, 0.5, ste=False)]:
            out.sum().backward()
    full = [x for x in saved if x.numel() == w.numel()]
    assert all(x.untyped_storage().data_ptr() == w.untyped_storage().data_ptr() for x in full)


def _opcheck_samples():
    w = make_weight((6, 5, 3, 3), torch.float32)
    wb = make_weight((17, 9), torch.bfloat16)
    t1, tk = torch.tensor([0.5]), torch.linspace(0.1, 0.9, 6)
    g = torch.ones_like(w)
    ops = torch.ops.sparsekern
    return [
        (ops.soft_threshold, (w.requires_grad_(), tk.clone().requires_grad_())),
        (ops.str_threshold, (wb.requires_grad_(), torch.tensor([-1.0], requires_grad=True), "sigmoid")),
        (ops.str_threshold, (w, torch.full((w.numel(),), -0.5), "exp")),
        (ops.soft_threshold_backward, (g, w.detach(), tk, 1, True)),
        (ops.st3_threshold, (w, t1, True)),
        (ops.st3_threshold, (wb, torch.linspace(0.1, 0.9, 17), False)),
        (ops.power_threshold, (w, tk, 3.0, 0.5)),
        (ops.power_threshold_backward, (g, w.detach(), tk, 0.5)),
        (ops.hard_threshold, (w, t1, True)),
        (ops.hard_threshold, (wb, t1, False)),
        (ops.hard_threshold_backward, (g, w.detach(), t1)),
    ]


@pytest.mark.parametrize("case", range(len(_opcheck_samples())))
def test_opcheck(case):
    op, args = _opcheck_samples()[case]
    torch.library.opcheck(op, args)


def test_compile_fullgraph_matches_eager():
    def f(w, s, t):
        return (sk.str_threshold(w, s).sum() + sk.st3_threshold(w, t).square().sum()
                + sk.power_threshold(w, t).sum() + sk.hard_threshold(w, t, ste=False).sum()
                + sk.soft_threshold(w, t).sum())

    w = make_weight((16, 8, 3, 3), torch.float32).requires_grad_(True)
    s = torch.tensor(-1.0, requires_grad=True)
    t = torch.tensor(0.4)
    f(w, s, t).backward()
    gw, gs = w.grad.clone(), s.grad.clone()
    w.grad = s.grad = None
    torch.compile(f, fullgraph=True)(w, s, t).backward()
    torch.testing.assert_close(w.grad, gw)
    torch.testing.assert_close(s.grad, gs)


# --- validation ---------------------------------------------------------------------------------

W = make_weight((4, 3), torch.float32)


@pytest.mark.parametrize("bad, exc, match", [
    (torch.ones(4, 3, dtype=torch.int32), TypeError, "w must be float32"),
    (torch.ones(4, 3, dtype=torch.complex64), TypeError, "w must be float32"),
    (torch.ones(4, 3, dtype=torch.float64), TypeError, "w must be float32"),
    ([1.0, 2.0], TypeError, "w must be a torch.Tensor"),
])
def test_bad_weight(bad, exc, match):
    for name, (op, _, kw) in OPS.items():
        with pytest.raises(exc, match=match):
            op(bad, 0.1, **kw)


@pytest.mark.parametrize("bad, exc, match", [
    (-0.1, ValueError, "t must be in"),
    (float("nan"), ValueError, "t must be in"),
    (torch.tensor(-0.1), ValueError, "t must be non-negative"),
    (torch.tensor([0.1, float("nan"), 0.1, 0.1]), ValueError, "t contains NaN"),
    (torch.ones(3), ValueError, r"t has shape \(3,\)"),
    (torch.ones(4, 2), ValueError, r"t has shape \(4, 2\)"),
    (torch.ones(4, dtype=torch.int64), TypeError, "t must be a floating-point tensor"),
    (torch.ones(4, device="meta"), ValueError, "t is on meta but the weight is on cpu"),
    ("0.1", TypeError, "t must be a number or a tensor"),
    (True, TypeError, "t must be a real number"),
])
def test_bad_threshold(bad, exc, match):
    w = W.clone()
    for op in (sk.soft_threshold, sk.st3_threshold, sk.power_threshold, sk.hard_threshold):
        with pytest.raises(exc, match=match):
            op(w, bad)
    assert torch.equal(w, W), "a failed call must not modify the weight"


class _OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    """The aten / custom ops run under it, by name."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


#: Ops that copy a value to the host (``bool()``, ``.item()``, ``.tolist()``): a sync on CUDA.
HOST_READS = {"aten._local_scalar_dense.default", "aten.is_nonzero.default", "aten.item.default"}


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("kind", ["0d", "channel", "weight"])
def test_threshold_check_off_the_cpu_reads_no_value(name, kind):
    """Off the CPU the NaN / sign check of a tensor threshold is one device-side assert: no value
    goes to the host (on CUDA a sync per layer and forward). Meta stands in for CUDA (same branch;
    no GPU here), and a meta tensor has no value to read."""
    op, _, kw = OPS[name]
    w = W.to("meta")
    t = _threshold_arg(name, W, kind).to("meta")
    with _OpLog() as log:
        out = op(w, t, **kw)
    assert out.device.type == "meta" and out.shape == w.shape
    assert log.ops.count("aten._assert_async.msg") == 1, log.ops
    assert not HOST_READS & set(log.ops), log.ops


@pytest.mark.parametrize("bad", ["False", "True", "", 0, 1, None, torch.tensor(False), 0.0])
def test_bool_flags_must_be_bools(bad):
    """Issue 14: ``ste``/``rescale`` are bools; anything else (``"False"`` is truthy) is a
    TypeError naming the flag, before any work (the weight is untouched)."""
    w = W.clone().requires_grad_()
    for op, flag in ((sk.hard_threshold, "ste"), (sk.st3_threshold, "rescale")):
        with pytest.raises(TypeError, match=f"{flag} must be a bool"):
            op(w, 0.1, **{flag: bad})
    assert torch.equal(w.detach(), W) and w.grad is None
    for flag in (True, False):  # real bools still work
        sk.hard_threshold(w, 0.1, ste=flag)
        sk.st3_threshold(w, 0.1, rescale=flag)


def test_bad_str_and_power_args():
    with pytest.raises(ValueError, match="s contains NaN"):
        sk.str_threshold(W, torch.tensor(float("nan")))
    with pytest.raises(ValueError, match="s has shape"):
        sk.str_threshold(W, torch.ones(2))
    sk.str_threshold(W, -3.0)  # negative s is the normal case
    with pytest.raises(ValueError, match="activation must be"):
        sk.str_threshold(W, -3.0, activation="relu")
    for p in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="p must be"):
            sk.power_threshold(W, 0.1, p=p)
    for theta in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="theta must be"):
            sk.power_threshold(W, 0.1, theta=theta)


# --- the compiled library ------------------------------------------------------------------------

_FAILED_LOAD = """
import warnings, torch
def broken(path):
    raise OSError("undefined symbol: _ZN3c10 (simulated ABI mismatch)")
torch.ops.load_library = broken
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import sparsekern as sk
msg = " ".join(str(w.message) for w in caught)
assert not sk._ext.LOADED
assert "built with torch" in msg and f"running torch {torch.__version__}" in msg, msg
assert "simulated ABI mismatch" in msg, msg
w = torch.randn(8, 4, requires_grad=True)
out = sk.st3_threshold(w, 0.5)
torch.testing.assert_close(out, sk.reference.st3_threshold(w, 0.5))
out.sum().backward()
print("ok")
"""


def test_import_survives_a_library_that_fails_to_load():
    """A broken _C (e.g. built for another torch): import warns with both torch versions and the
    ops fall back to the reference."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "SPARSEKERN_NO_EXT"}  # the load must be tried
    res = subprocess.run([sys.executable, "-c", _FAILED_LOAD], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_extension_is_loaded():
    """The build this suite runs against must have its C++ kernels (unless disabled on purpose)."""
    import os

    from sparsekern import _ext

    assert _ext.LOADED or os.environ.get("SPARSEKERN_NO_EXT") == "1", _ext.ERROR
