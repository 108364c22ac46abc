"""Bound family (SPEC §4): Gaussian bounds, exact/bisection references, the ASL bound.

Every kernel backend (C++, Triton under TRITON_INTERPRET=1 without a GPU, reference fallback)
against ``sparsekern.reference``; the public ops (``sk.gaussian_bound(s)``, ``sk.asl_threshold``)
for values, SPEC gradients incl. the clamp edges and ties, opcheck, torch.compile and bad inputs.

σ computed by different summation orders may differ in its last bit, which can flip the mask of
a weight within an ulp of the bound: masks are compared exactly outside that band, and ∂L/∂r is
checked against Eq. 18 evaluated with the kernel's own forward mask.
"""
import math

import pytest
import torch

import sparsekern as sk
from sparsekern import reference
from sparsekern.ops.bound import sqrt2_erfinv
from utils import DTYPES, kernel_backend, make_weight

BACKENDS = ["cpp", "triton", "reference"]
SHAPES = [(2,), (7,), (769,), (64, 32, 3, 3), (5, 123, 123)]


#: The sparsity whose Gaussian multiplier √2·erfinv(s) is 1 (to double rounding): bounds = σ.
S1 = math.erf(1 / math.sqrt(2))


def _backend(name):
    return kernel_backend(name, "bound")


def _r_values(k, mode):
    """Flat fp32 r: one value, or per channel cycling through the clamp edges and the interior."""
    if mode == "layer":
        return torch.tensor([0.8])
    edges = torch.tensor([-1.0, 0.0, 0.3, 1.0, 2.5, 4.999, 5.0, 6.5])
    return edges.repeat(k // len(edges) + 1)[:k].contiguous()


def _assert_mask(out, w, r):
    """out = reference forward, except that weights within ~2 ulp of the bound may go either way."""
    w, r, out = w.cpu(), r.cpu(), out.cpu()
    assert out.shape == w.shape and out.dtype == w.dtype
    exp = reference.asl_threshold_forward(w, r)
    b = (reference.asl_bound(w, r) + 1e-6).expand(w.shape)
    near = (w.float().abs() - b).abs() <= b * 2.0 ** -21
    assert torch.equal(out[~near], exp[~near])
    assert bool(((out == w) | (out == 0))[near].all())


def _check_grad_r(grad_r, g, w, out, r):
    """Eq. 18 in float64 with the kernel's own forward mask; 0 outside 0 < r < 5."""
    g, w, out, r = g.cpu().double(), w.cpu().double(), out.cpu().double(), r.cpu().double()
    groups = r.numel()
    rows = lambda x: x.reshape(groups, -1)  # noqa: E731
    contrib = rows(g * (out - w))
    scale = rows(g * w).abs().sum(1)
    active = (r > 0) & (r < 5)
    exp = torch.where(active, contrib.sum(1) / torch.where(active, r, 1.0), 0.0)
    tol = torch.where(active, 1e-5 * scale / r.abs().clamp_min(1e-30), 0.0) + 1e-6
    assert grad_r.dtype == torch.float32 and grad_r.shape == (groups,)
    diff = (grad_r.cpu().double() - exp).abs()
    assert bool((diff <= tol).all()), f"max excess {(diff - tol).max().item():.3g}"


# --- kernels ------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gaussian_bounds_kernel(backend, dtype):
    k, dev = _backend(backend)
    ws = [make_weight(s, dtype, dev, seed=i) * (i + 1) for i, s in enumerate(SHAPES)]
    ss = [0.0, 0.3, 0.5, 0.9, 0.999]
    bounds, nan_index = k.gaussian_bounds(ws, ss)
    exp = reference.gaussian_bounds([w.cpu() for w in ws], ss)
    assert bounds.dtype == torch.float32 and bounds.shape == (len(ws),) and int(nan_index) == -1
    # Triton: fp32 moments (sum order); holds on a GPU too, div.full acts at second order (utils.TOL)
    torch.testing.assert_close(bounds.cpu(), exp, atol=0, rtol=4e-6 if backend == "triton" else 2e-7)


@pytest.mark.filterwarnings("ignore:std.*degrees of freedom:UserWarning")
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on NaN/inf
@pytest.mark.parametrize("backend", BACKENDS)
def test_gaussian_bounds_special(backend):
    """s = 1 gives inf even for σ = 0; a NaN/inf weight or a single element gives σ = NaN, and
    nan_index names the first such tensor."""
    k, dev = _backend(backend)
    ok = make_weight((50,), torch.float32, dev)
    const = torch.full((9,), 0.25, device=dev)
    bounds, nan_index = k.gaussian_bounds([ok, const, const], [1.0, 1.0, 0.0])
    assert bounds.cpu().tolist() == [math.inf, math.inf, 0.0] and int(nan_index) == -1
    for bad in (float("nan"), float("inf")):
        x = ok.clone()
        x[7] = bad
        bounds, nan_index = k.gaussian_bounds([ok, x, x], [S1, S1, 1.0])
        assert int(nan_index) == 1 and bounds[1:].isnan().all()
    assert int(k.gaussian_bounds([ok, ok[:1]], [S1, S1])[1]) == 1


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_gaussian_bounds_extreme_values(backend):
    """σ without overflow, underflow or cancellation: |w| ~ 1e30 and ~ 1e-30 (fp32 squares would
    overflow / underflow), a large mean, and all-zero blocks before the data."""
    k, dev = _backend(backend)
    x = make_weight((70_001,), torch.float32, dev)
    ws = [x * 1e30, x * 1e-30, x + 1000.0, torch.cat([torch.zeros(5000, device=dev), x])]
    bounds, _ = k.gaussian_bounds(ws, [S1] * len(ws))
    exp = torch.stack([w.double().std() for w in ws]).float()
    torch.testing.assert_close(bounds, exp, atol=0, rtol=2e-7)


# per-channel r needs ≥ 2 weights per channel (σ); 1-D weights have one (the public op refuses it)
ASL_CASES = [(shape, mode) for shape in SHAPES[1:] for mode in ("layer", "channel")
             if not (mode == "channel" and len(shape) == 1)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, mode", ASL_CASES)
def test_asl_kernels(backend, shape, dtype, mode):
    k, dev = _backend(backend)
    w = make_weight(shape, dtype, dev)
    r = _r_values(shape[0], mode).to(dev)
    out = k.asl_threshold(w, r)
    _assert_mask(out, w, r)
    g = make_weight(shape, dtype, dev, seed=3)
    grad_r = k.asl_threshold_backward(g, w, r)
    _check_grad_r(grad_r, g, w, out, r)
    assert torch.equal(k.asl_threshold_backward(g, w, r).cpu(), grad_r.cpu()), "grad_r must be deterministic"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 70_001), (100, 700)])
def test_asl_long_and_many_rows(backend, shape):
    """One long group (tiles merged across threads) and many cache-sized per-channel groups."""
    k, dev = _backend(backend)
    w = make_weight(shape, torch.float32, dev)
    g = make_weight(shape, torch.float32, dev, seed=4)
    for r in (torch.tensor([1.2]), _r_values(shape[0], "channel")):
        r = r.to(dev)
        out = k.asl_threshold(w, r)
        _assert_mask(out, w, r)
        _check_grad_r(k.asl_threshold_backward(g, w, r), g, w, out, r)


@pytest.mark.filterwarnings("ignore:std.*degrees of freedom:UserWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_asl_empty(backend):
    k, dev = _backend(backend)
    for shape, groups in [((0,), 1), ((0, 3), 0), ((4, 0), 4), ((4, 0), 1)]:
        w = torch.empty(shape, device=dev)
        r = torch.full((groups,), 0.5, device=dev)
        assert k.asl_threshold(w, r).shape == shape
        grad_r = k.asl_threshold_backward(w, w, r)
        assert grad_r.shape == (groups,) and bool((grad_r == 0).all())


def _sigma_one(dtype, k=1):
    """k rows of [2, -2, 1, -1, 0 × 7]: mean 0 and unbiased std exactly 1 in any summation order."""
    row = torch.tensor([2.0, -2.0, 1.0, -1.0] + [0.0] * 7)
    return row.repeat(k, 1).squeeze(0).to(dtype)


def _tie_r():
    """The fp32 r with fp32(r·1) + 1e-6 == 1 exactly: a weight of magnitude 1 sits on the bound."""
    r = torch.tensor(1.0) - 1e-6
    for _ in range(64):
        if (r + 1e-6).item() == 1.0:
            return r.reshape(1)
        r = torch.nextafter(r, torch.tensor(1.0) if (r + 1e-6).item() < 1.0 else torch.tensor(0.0))
    raise AssertionError("no fp32 r puts the bound on 1.0")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_asl_formula_clamp_edges_and_ties(backend, dtype):
    """SPEC §4 on σ = 1: kept iff |w| > clamp(r, 0, 5) + 1e-6 (ties pruned); ∂L/∂r = Σ g·(ŵ − w)/r,
    only pruned weights, 0 for r ≤ 0 and r ≥ 5."""
    k, dev = _backend(backend)
    w = _sigma_one(dtype).to(dev)
    g = torch.arange(1.0, 12.0).to(dtype).to(dev)  # distinct per element
    wd, gd = w.double().cpu(), g.double().cpu()
    tie = _tie_r()
    # (r, cut): kept iff |w| > cut; the tie's bound is exactly 1.0, so |w| = 1 is pruned
    cases = [(torch.tensor([r]), rc + 1e-6) for r, rc in
             [(-3.0, 0.0), (0.0, 0.0), (0.5, 0.5), (1.5, 1.5), (5.0, 5.0), (7.0, 5.0)]] + [(tie, 1.0)]
    for r, cut in cases:
        r = r.to(dev)
        out = k.asl_threshold(w, r)
        kept = wd.abs() > cut
        assert torch.equal(out.cpu(), (wd * kept).to(dtype)), (r, out)
        grad_r = k.asl_threshold_backward(g, w, r).cpu()
        rv = r.item()
        exp = float((gd * (wd * kept - wd)).sum() / rv) if 0 < rv < 5 else 0.0
        assert grad_r.shape == (1,)
        assert grad_r.item() == pytest.approx(exp, rel=1e-6, abs=0), (rv, grad_r, exp)
    # per channel: each row is its own group with σ = 1
    w3 = _sigma_one(dtype, k=3).to(dev)
    r3 = torch.tensor([0.0, 1.5, 6.0], device=dev)
    out = k.asl_threshold(w3, r3).cpu()
    kept = w3.cpu().double().abs() > torch.tensor([0.0, 1.5, 5.0])[:, None] + 1e-6
    assert torch.equal(out, (w3.cpu().double() * kept).to(dtype))
    grad_r = k.asl_threshold_backward(w3, w3, r3).cpu()
    assert grad_r[0] == 0 and grad_r[2] == 0 and grad_r[1].item() == pytest.approx(-2.0 / 1.5, rel=1e-6)


# --- public ops ---------------------------------------------------------------------------------

def _noncontig(w):
    big = torch.zeros((w.shape[0], 2) + w.shape[1:], dtype=w.dtype)
    big[:, 1] = w
    return big[:, 1]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("contiguous", [True, False])
def test_gaussian_bound_public(dtype, contiguous):
    ws = [make_weight(s, dtype, seed=i) for i, s in enumerate([(7, 3), (64, 32, 3, 3), (300, 400)])]
    if not contiguous:
        ws = [_noncontig(w) for w in ws]
        assert not ws[0].is_contiguous()
    ss = [0.5, 0.9, 0.99]
    batched = sk.gaussian_bounds(ws, ss)
    single = torch.stack([sk.gaussian_bound(w, s) for w, s in zip(ws, ss)])
    assert torch.equal(batched, single), "batched must equal per-layer bit for bit"
    assert sk.gaussian_bound(ws[0], 0.5).shape == ()
    torch.testing.assert_close(batched, reference.gaussian_bounds(ws, ss), atol=0, rtol=2e-7)
    assert torch.equal(sk.gaussian_bounds(ws, 0.9), sk.gaussian_bounds(ws, [0.9] * 3))


def test_gaussian_bounds_thread_independent():
    ws = [make_weight((1, 500_000), torch.float32), make_weight((40, 9), torch.bfloat16)]
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = sk.gaussian_bounds(ws, 0.9)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, sk.gaussian_bounds(ws, 0.9))


@pytest.mark.parametrize("s", [0.5, 0.9, 0.99])
def test_gaussian_bound_attained_sparsity(s):
    """On Gaussian weights the bound prunes s of them (SPEC §4), within 0.5 % of s."""
    w = make_weight((1 << 20,), torch.float32) * 0.05
    b = sk.gaussian_bound(w, s)
    attained = (w.abs() <= b).double().mean().item()
    assert abs(attained - s) <= 0.005 * s, attained


def test_sqrt2_erfinv():
    xs = torch.tensor([1e-12, 1e-4, 0.1, 0.5, 0.6827, 0.9, 0.99, 0.999999, 1 - 1e-12], dtype=torch.float64)
    exp = math.sqrt(2) * torch.erfinv(xs)
    got = torch.tensor([sqrt2_erfinv(float(x)) for x in xs], dtype=torch.float64)
    torch.testing.assert_close(got, exp, atol=0, rtol=1e-12)
    assert sqrt2_erfinv(0.0) == 0.0 and sqrt2_erfinv(1.0) == math.inf


def test_cpp_multiplier_equals_python():
    """The C++ op computes √2·erfinv(s) itself (csrc/cpu/bound.cpp: AS241 and two Newton steps,
    the double operations of :func:`sqrt2_erfinv`): with σ = 1 exactly the bounds are the fp32
    multipliers, equal to the Python ones over a grid of sparsities (both branches, near 0, ½, 1)."""
    k, dev = _backend("cpp")
    ss = sorted({j / 1000 for j in range(1001)} | {1e-300, 1e-12, 1e-6, 0.425, 0.5 + 1e-12, 0.85, 0.925,
                                                   1 - 1e-6, 1 - 1e-12, 1 - 2 ** -52, S1})
    x = torch.tensor([-1.0, 0.0, 1.0])  # unbiased σ = 1
    got, _ = k.gaussian_bounds([x] * len(ss), ss)
    want = torch.tensor([sqrt2_erfinv(s) for s in ss], dtype=torch.float64).float()
    assert torch.equal(got, want), [(s, g, w) for s, g, w in zip(ss, got.tolist(), want.tolist()) if g != w]


def test_exact_and_bisection_references():
    """Exact bound: the smallest b with #{|w| ≤ b}/#W ≥ s; bisection within eps above it; the
    select family's exact quantile agrees up to one rank."""
    w = make_weight((10_007,), torch.float32)
    a = w.abs()
    n = w.numel()
    for s in (0.1, 0.5, 0.9, 0.99):
        exact = reference.exact_bound(w, s)
        assert (a <= exact).sum() >= s * n > (a < exact).sum()
        bis = reference.bisection_bound(w, s, eps=1e-3)
        frac = (a <= bis).double().mean().item()
        assert bis >= exact and s <= frac <= s + 1e-3
        sel = sk.magnitude_thresholds([w], s)[0]
        assert abs((a <= sel).double().mean().item() - s) <= 1.0 / n
    assert reference.bisection_bound(torch.zeros(10), 0.5) == 0


def _asl_r(kind, w):
    k = w.shape[0]
    vals = torch.linspace(0.2, 1.6, k)
    return {"0d": torch.tensor(0.9), "one": torch.tensor([0.9]), "channel": vals,
            "channel_view": vals.reshape((k,) + (1,) * (w.dim() - 1)),
            "f64": torch.tensor(0.9, dtype=torch.float64)}[kind]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["0d", "one", "channel", "channel_view", "f64"])
@pytest.mark.parametrize("shape", [(7, 3), (16, 8, 3, 3)])
@pytest.mark.parametrize("contiguous", [True, False])
def test_asl_public_vs_reference(dtype, kind, shape, contiguous):
    w0 = make_weight(shape, dtype)
    r0 = _asl_r(kind, w0)
    w = (w0.clone() if contiguous else _noncontig(w0)).requires_grad_(True)
    r = r0.clone().requires_grad_(True)
    out = sk.asl_threshold(w, r)
    w_r, r_r = w0.clone().requires_grad_(True), r0.clone().requires_grad_(True)
    exp = reference.asl_threshold(w_r, r_r)
    _assert_mask(out.detach(), w0, r0.float().reshape(-1))
    g = make_weight(shape, dtype, seed=5)
    out.backward(g)
    exp.backward(g)
    assert torch.equal(w.grad, g), "dense straight-through"
    assert r.grad.shape == r.shape and r.grad.dtype == r.dtype
    torch.testing.assert_close(r.grad, r_r.grad, atol=1e-4, rtol=1e-5)


def test_asl_no_full_size_tensor_saved():
    """Backward recomputes σ and the mask from (w, r): only w (no copy) and r are saved."""
    w = make_weight((64, 32, 3, 3), torch.float32).requires_grad_(True)
    r = torch.full((64,), 0.7, requires_grad=True)
    saved = []

    def pack(x):
        saved.append(x)
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        sk.asl_threshold(w, r).sum().backward()
    full = [x for x in saved if x.numel() == w.numel()]
    assert full and all(x.untyped_storage().data_ptr() == w.untyped_storage().data_ptr() for x in full)


def test_asl_empty_public():
    w = torch.empty(0, 5, requires_grad=True)
    r = torch.tensor(0.5, requires_grad=True)
    out = sk.asl_threshold(w, r)
    out.sum().backward()
    assert out.shape == (0, 5) and r.grad.item() == 0 and w.grad.shape == (0, 5)


def _opcheck_samples():
    w = make_weight((6, 5, 3, 3), torch.float32)
    wb = make_weight((17, 9), torch.bfloat16)
    r1, rk = torch.tensor([0.7]), torch.linspace(-0.5, 5.5, 6)
    ops = torch.ops.sparsekern
    return [
        (ops.gaussian_bounds, ([w, wb, make_weight((40,), torch.float16)], [0.5, 0.9, 1.0])),
        (ops.asl_threshold, (w.clone().requires_grad_(), rk.clone().requires_grad_())),
        (ops.asl_threshold, (wb.clone().requires_grad_(), r1.clone().requires_grad_())),
        (ops.asl_threshold_backward, (torch.ones_like(w), w, rk)),
    ]


@pytest.mark.parametrize("case", range(len(_opcheck_samples())))
def test_opcheck(case):
    op, args = _opcheck_samples()[case]
    torch.library.opcheck(op, args)


def test_compile_fullgraph_matches_eager():
    def f(w, r, g):
        return ((sk.asl_threshold(w, r) * g).sum() + sk.gaussian_bound(w, 0.9)
                + sk.gaussian_bounds([w, g], 0.5).sum())

    w = make_weight((16, 8, 3, 3), torch.float32).requires_grad_(True)
    r = torch.linspace(0.1, 1.5, 16).requires_grad_(True)
    g = make_weight((16, 8, 3, 3), torch.float32, seed=1)
    val = f(w, r, g)
    val.backward()
    gw, gr = w.grad.clone(), r.grad.clone()
    w.grad = r.grad = None
    cval = torch.compile(f, fullgraph=True)(w, r, g)
    cval.backward()
    torch.testing.assert_close(cval, val)
    torch.testing.assert_close(w.grad, gw)
    torch.testing.assert_close(r.grad, gr)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_huge_and_infinite_values_agree_with_the_math(backend):
    """Issue 14 (SPARSEKERN_NO_EXT=1 serves CPU with the reference): σ of weights up to 3.4e38
    is representable, but fp32 sums overflow: torch's fp32 ``std`` (the reference) gave inf/NaN,
    and C++ gave NaN once a first block's fp32 lane sum for its mean overflowed. Both now give
    the float64 σ, the ASL bound and mask from it; and the reference's ASL ∂r no longer turns
    ``g·(ŵ − w)`` into ``inf·0 = NaN`` for a kept weight with an infinite gradient."""
    k, dev = _backend(backend)
    for shape in [(8,), (5000,), (3, 70_001)]:
        w = torch.full(shape, 3e38)
        w[..., ::2] = -1e38
        w[..., 1::5] = 2e36
        exp = w.double().std().float()
        bounds, nan_index = k.gaussian_bounds([w, w * 1e-30], [S1, S1])
        torch.testing.assert_close(bounds, torch.stack([exp, exp * 1e-30]), atol=0, rtol=1e-6)
        assert nan_index.item() == -1
        for r in ([0.5], [0.0]):
            rt = torch.tensor(r)
            b = (rt.clamp(0, 5) * exp).float() + 1e-6
            assert torch.equal(k.asl_threshold(w, rt), w * (w.abs() > b))
    w = torch.tensor([[0.1, -0.1, 5.0, 0.2], [1.0, 2.0, -3.0, 0.5]])
    g = torch.tensor([[-1.0, 2.0, math.inf, 1.0], [1.0, 1.0, 1.0, 1.0]])  # inf·(ŵ − w) for a kept w is 0
    r = torch.tensor([2.0, 0.5])
    exp = reference.asl_threshold_backward(g[1:], w[1:], r[1:])
    out = k.asl_threshold_backward(g, w, r)
    assert out[0].item() == pytest.approx(-(-1.0 * 0.1 + 2.0 * -0.1 + 1.0 * 0.2) / 2.0, rel=1e-6)
    torch.testing.assert_close(out[1:], exp, atol=0, rtol=1e-6)


@pytest.mark.parametrize("bad", ["False", "True", 0, 1, None])
def test_check_nan_must_be_a_bool(bad):
    """Issue 14: a truthy string was taken as True; now a TypeError naming the flag."""
    with pytest.raises(TypeError, match="check_nan must be a bool"):
        sk.gaussian_bound(W, 0.5, check_nan=bad)
    with pytest.raises(TypeError, match="check_nan must be a bool"):
        sk.gaussian_bounds([W, W], 0.5, check_nan=bad)


def test_meta_tensors_give_shapes():
    """Issue 14: meta tensors raised ``Tensor.item() cannot be called on meta tensors`` from the
    NaN check of the Gaussian bounds; now shapes only (the check is skipped: no value to read).
    ASL already worked on meta (its r check is an async assert there)."""
    w = torch.empty(16, 8, 3, 3, device="meta")
    b = sk.gaussian_bound(w, 0.9)
    assert b.device.type == "meta" and b.shape == () and b.dtype == torch.float32
    bs = sk.gaussian_bounds([w, torch.empty(7, device="meta", dtype=torch.float16)], [0.5, 0.1])
    assert bs.device.type == "meta" and bs.shape == (2,) and bs.dtype == torch.float32
    out = sk.asl_threshold(w, torch.full((16,), 0.5, device="meta"))
    assert out.device.type == "meta" and out.shape == w.shape


# --- validation ---------------------------------------------------------------------------------

W = make_weight((4, 3), torch.float32)


@pytest.mark.parametrize("bad, exc, match", [
    (-0.1, ValueError, "sparsity must be in"),
    (1.5, ValueError, "sparsity must be in"),
    (float("nan"), ValueError, "sparsity must be in"),
    ("0.5", TypeError, "sparsity must be a real number"),
])
def test_bad_sparsity(bad, exc, match):
    with pytest.raises(exc, match=match):
        sk.gaussian_bound(W, bad)
    with pytest.raises(exc, match=match.replace("sparsity", r"sparsities\[1\]")):
        sk.gaussian_bounds([W, W], [0.5, bad])


def test_bad_weights_for_gaussian():
    for bad in (float("nan"), float("inf")):
        x = W.clone()
        x[1, 2] = bad
        with pytest.raises(FloatingPointError, match="w contains NaN or inf"):
            sk.gaussian_bound(x, 0.5)
        with pytest.raises(FloatingPointError, match=r"tensors\[1\] contains NaN or inf"):
            sk.gaussian_bounds([W, x], 0.5)
        assert sk.gaussian_bound(x, 0.5, check_nan=False).isnan()
    with pytest.raises(TypeError, match="w must be float32"):
        sk.gaussian_bound(torch.ones(4, dtype=torch.int32), 0.5)
    with pytest.raises(TypeError, match=r"tensors\[0\] must be float32"):
        sk.gaussian_bounds([torch.ones(4, dtype=torch.int64)], 0.5)
    with pytest.raises(ValueError, match="w has 0 element"):
        sk.gaussian_bound(torch.empty(0), 0.5)
    with pytest.raises(ValueError, match="w has 1 element"):
        sk.gaussian_bound(torch.ones(1), 0.5)
    with pytest.raises(ValueError, match="tensors must not be empty"):
        sk.gaussian_bounds([], 0.5)
    with pytest.raises(ValueError, match=r"tensors\[1\] is on meta"):
        sk.gaussian_bounds([W, W.to("meta")], 0.5)
    with pytest.raises(ValueError, match="sparsities has 3 entries"):
        sk.gaussian_bounds([W, W], [0.1, 0.2, 0.3])


@pytest.mark.parametrize("w, r, exc, match", [
    (torch.ones(4, 3, dtype=torch.int32), torch.tensor(0.5), TypeError, "w must be float32"),
    (W, 0.5, TypeError, "r must be a float tensor"),
    (W, torch.tensor(1, dtype=torch.int64), TypeError, "r must be a floating-point tensor"),
    (W, torch.ones(3), ValueError, r"r has shape \(3,\)"),
    (W, torch.ones(4, 3), ValueError, r"r has shape \(4, 3\)"),
    (W, torch.ones(4, 2), ValueError, r"r has shape \(4, 2\)"),
    (W, torch.tensor(float("nan")), ValueError, "r contains NaN"),
    (W, torch.ones(4, device="meta"), ValueError, "r is on meta but the weight is on cpu"),
    (torch.ones(1), torch.tensor(0.5), ValueError, "w has 1 element"),
    (torch.ones(5), torch.ones(5), ValueError, "w has 1 element"),
])
def test_bad_asl_inputs(w, r, exc, match):
    with pytest.raises(exc, match=match):
        sk.asl_threshold(w, r)
