"""Eager-PyTorch reference of every sparsekern op, written straight from the math (docs/methods.md, SPEC §n).

This module is the test oracle and the "eager" benchmark baseline: plain, unfused PyTorch with
the autograd behaviour the math prescribes. All threshold math runs in fp32 whatever the storage
dtype (SPEC §0); results are cast back to the weight's dtype.

Shapes: ``w`` is any weight, dim 0 is the output channel (``K = w.shape[0]``, ``K = 1`` for a
0-d ``w``). A threshold ``t`` is a Python number, a 1-element tensor (per layer), a tensor with
``K`` elements (per output channel: ``[K]`` or ``[K, 1, ..]``), or one with ``w.numel()``
elements (per weight).
"""
import math

import torch

ACTIVATIONS = ("identity", "sigmoid", "exp")


def _channels(w):
    return w.shape[0] if w.dim() > 0 else 1


def _channel_view(w):
    """Shape that broadcasts a ``[K]`` tensor along dim 0 of ``w``."""
    return (_channels(w),) + (1,) * (w.dim() - 1) if w.dim() else ()


def _rows(x, k):
    """View ``x`` as ``[K, inner]`` (works for empty tensors)."""
    return x.reshape(k, x.numel() // k if k else 0)


def std(x, dim=None):
    """Unbiased std of fp32 ``x`` (all of it, or along ``dim`` with the dim kept), in fp32.

    ``torch.std`` in fp32 overflows (inf, NaN) once its sums pass the fp32 range (|x| ≳ 1e34 over
    many elements) although σ (≤ √2·max|x|) fits: ``x`` is first scaled by the power of two
    ``2^-e`` that brings ``max|x|`` into [0.5, 1) (``e ≥ 0``: never scaled up) and σ scaled back.
    Power-of-two scaling is exact short of subnormals, so ordinary weights get torch's σ bit for
    bit. A NaN or inf gives NaN.
    """
    if x.numel() == 0:  # nothing to scale (amax of nothing is an error): NaN, as torch.std
        return x.std() if dim is None else x.std(dim, keepdim=True)
    top = x.abs().amax() if dim is None else x.abs().amax(dim, keepdim=True)
    e = torch.frexp(top).exponent.clamp(min=0)
    scale = torch.ldexp(torch.ones_like(top), -e)
    y = x * scale
    return (y.std() if dim is None else y.std(dim, keepdim=True)) / scale


def broadcast_threshold(t, w):
    """``t`` (number or tensor, see module doc) as an fp32 tensor broadcastable to ``w``."""
    t = torch.as_tensor(t, device=w.device).float()
    k = _channels(w)
    if t.numel() == 1:
        return t.reshape(())
    if t.numel() == k:
        return t.reshape(_channel_view(w))
    if t.numel() == w.numel():
        return t.reshape(w.shape)
    raise ValueError(f"threshold with {t.numel()} elements does not fit a weight of shape {tuple(w.shape)}")


def reduce_to_threshold(x, t, w):
    """Sum ``x`` (shaped like ``w``) over the elements that share each entry of ``t``."""
    t = torch.as_tensor(t)
    if t.numel() == 1:
        return x.sum().reshape(t.shape)
    if t.numel() == _channels(w):
        return _rows(x, _channels(w)).sum(1).reshape(t.shape)
    return x.reshape(t.shape)


def activate(s, name):
    """``g(s)`` of SPEC §1: ``identity`` (plain soft threshold), ``sigmoid`` or ``exp`` (k = 1)."""
    s = torch.as_tensor(s).float()
    if name == "identity":
        return s
    if name == "sigmoid":
        return torch.sigmoid(s)
    if name == "exp":
        return torch.exp(s)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def _activation_grad(s, name):
    s = torch.as_tensor(s).float()
    if name == "identity":
        return torch.ones_like(s)
    if name == "sigmoid":
        g = torch.sigmoid(s)
        return g * (1 - g)
    return torch.exp(s)


# --- SPEC §1: soft threshold (STR) -------------------------------------------------------------

def soft_threshold(w, t):
    """``sign(w)·max(|w| − t, 0)``; true sub-gradients for ``w`` and ``t`` (SPEC §1, g = id)."""
    wf = w.float()
    thr = broadcast_threshold(t, w)
    return (torch.sign(wf) * torch.relu(wf.abs() - thr)).to(w.dtype)


def str_threshold(w, s, activation="sigmoid"):
    """STR forward ``sign(w)·max(|w| − g(s), 0)`` with learnable ``s`` (SPEC §1)."""
    return soft_threshold(w, activate(s, activation))


def soft_threshold_backward(grad, w, t, activation="identity"):
    """SPEC §1 sub-gradients of ``sign(w)·max(|w| − g(t), 0)``.

    Returns ``(grad_w, grad_t)``: ``grad_w = grad·1[|w| > g(t)]`` (w's dtype) and
    ``grad_t = −g'(t)·Σ_kept grad·sign(w)`` over the elements sharing each ``t`` (fp32, t's shape).
    """
    wf, gf = w.float(), grad.float()
    thr = broadcast_threshold(activate(t, activation), w)
    kept = wf.abs() > thr
    grad_w = (gf * kept).to(w.dtype)
    t = torch.as_tensor(t, device=w.device).float()
    grad_t = -_activation_grad(t, activation) * reduce_to_threshold(gf * torch.sign(wf) * kept, t, w)
    return grad_w, grad_t


# --- SPEC §2: soft threshold with per-channel rescale (ST-3) -----------------------------------

def st3_scale(w, t):
    """Per-output-channel rescale ``1.01 / (ρ + 0.01)`` of SPEC §2, fp32 ``[K]``.

    The means of ``|w|`` and of the kept ``|w|`` are summed in float64 and rounded to fp32 (an
    fp32 sum overflows for huge weights although the mean fits), ρ in fp32. A channel with a kept
    infinite weight gets ρ = 1, the limit of ρ as that weight grows (both means are dominated by
    it), so scale 1 instead of ``inf/inf = NaN`` over the whole channel; a NaN weight gives NaN.
    """
    k = _channels(w)
    a = w.float().abs()
    kept = torch.where(a > broadcast_threshold(t, w), a, 0.0)
    n = a.numel() // k if k else 0
    mean_all = (_rows(a, k).sum(1, dtype=torch.float64) / n).float()
    mean_kept = (_rows(kept, k).sum(1, dtype=torch.float64) / n).float()
    rho = (mean_kept + 1e-6) / (mean_all + 1e-6)
    rho = torch.where(mean_kept.isinf() & mean_all.isinf(), 1.0, rho)
    return 1.01 / (rho + 0.01)


def st3_threshold_forward(w, t, rescale=True):
    """ST-3 forward ``scale_o·sign(w)·max(|w| − t, 0)`` in w's dtype (SPEC §2), no autograd."""
    wf = w.detach().float()
    q = torch.sign(wf) * torch.relu(wf.abs() - broadcast_threshold(t, w))
    if rescale:
        q = st3_scale(w, t).reshape(_channel_view(w)) * q
    return q.to(w.dtype)


# Straight-through estimators are autograd Functions, not ``q.detach() + (w − w.detach())``: that
# sum is ``inf − inf = NaN`` in the forward for an infinite weight.
class _ST3Threshold(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, t, rescale):
        return st3_threshold_forward(w, t, rescale)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def st3_threshold(w, t, rescale=True):
    """ST-3 (SPEC §2): :func:`st3_threshold_forward`; dense straight-through backward
    (``∂L/∂w = grad`` for every weight; no gradient to t)."""
    return _ST3Threshold.apply(w, t, rescale)


# --- SPEC §3: power threshold (Feather) --------------------------------------------------------

def power_threshold_forward(w, t, p=3.0):
    """Feather ``sign(w)·(|w|^p − t^p)^(1/p)`` where ``|w| > t``, else 0, in w's dtype (SPEC §3).

    Evaluated in float64 as ``|w|·δ^(1/p)``, ``δ = 1 − (t/|w|)^p = −expm1(p·ln(t/|w|))``: no power
    of |w| (which overflows or underflows), and ``ln(t/|w|) = log1p(−(|w| − t)/|w|)`` for
    ``|w| ≤ 2t``, where ``|w| − t`` is exact and ``t/|w|`` would round next to 1. t = 0 and
    |w| = inf give w; NaN gives NaN.
    """
    wf = w.detach().float()
    a = wf.abs().double()
    thr = broadcast_threshold(t, w).double()
    log_ratio = torch.where(a <= 2 * thr, torch.log1p(-(a - thr) / a), torch.log(thr / a))
    delta = -torch.expm1(p * log_ratio)
    q = torch.sign(wf) * torch.where(a > thr, a * delta.pow(1.0 / p), 0.0).float()
    return torch.where(wf.isnan(), wf, q).to(w.dtype)


class _PowerThreshold(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, t, p, theta):
        ctx.save_for_backward(w, t)
        ctx.theta = theta
        return power_threshold_forward(w, t, p)

    @staticmethod
    def backward(ctx, grad):
        w, t = ctx.saved_tensors
        return power_threshold_backward(grad, w, t, ctx.theta), None, None, None


def power_threshold(w, t, p=3.0, theta=1.0):
    """Feather (SPEC §3): :func:`power_threshold_forward`; backward ``grad·(1 if |w| > t else θ)``
    (:func:`power_threshold_backward`; no gradient to t)."""
    return _PowerThreshold.apply(w, torch.as_tensor(t, dtype=torch.float32, device=w.device), p, theta)


def power_threshold_backward(grad, w, t, theta=1.0):
    """``grad·(1 if |w| > t else θ)`` in w's dtype (SPEC §3)."""
    kept = w.float().abs() > broadcast_threshold(t, w)
    return (grad.float() * torch.where(kept, 1.0, theta)).to(w.dtype)


# --- SPEC §6: hard threshold (GMP) --------------------------------------------------------------

def hard_threshold_forward(w, t):
    """``w·1[|w| > t]`` in w's dtype (SPEC §6), no autograd."""
    wf = w.detach().float()
    return (wf * (wf.abs() > broadcast_threshold(t, w))).to(w.dtype)


class _HardThreshold(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, t, ste):
        ctx.ste = ste
        if not ste:
            ctx.save_for_backward(w, t)
        return hard_threshold_forward(w, t)

    @staticmethod
    def backward(ctx, grad):
        if ctx.ste:
            return grad, None, None
        w, t = ctx.saved_tensors
        return hard_threshold_backward(grad, w, t), None, None


def hard_threshold(w, t, ste=True):
    """``w·1[|w| > t]`` (:func:`hard_threshold_forward`); backward dense straight-through
    (``ste``) or masked (GMP, SPEC §6: :func:`hard_threshold_backward`); no gradient to t."""
    return _HardThreshold.apply(w, torch.as_tensor(t, dtype=torch.float32, device=w.device), ste)


def hard_threshold_backward(grad, w, t):
    """Masked gradient ``grad·1[|w| > t or t = 0]`` (``ste=False``; ``t = 0``: nothing pruned yet)."""
    tb = broadcast_threshold(t, w)
    kept = (w.float().abs() > tb) | (tb == 0)
    return (grad.float() * kept).to(w.dtype)


# --- SPEC §9: exact magnitude quantiles (select family) -----------------------------------------

INTERPOLATIONS = ("linear", "lower", "higher", "nearest")


def quantile_ranks(n, q, interpolation="linear"):
    """numpy's order statistics for ``np.quantile(x, q, method=interpolation)`` of ``n`` values.

    Returns ``(k0, k1, gamma)``: the quantile is ``numpy_lerp(x_(k0), x_(k1), gamma)`` for
    ``linear``, else ``x_(k0)`` (0-based ranks of the sorted values). Mirrors numpy >= 2.4's
    ``_quantile`` (SPEC §9): virtual index ``(n−1)·q`` in float64; at or beyond the last index
    both ranks are ``n−1`` and gamma is ``v + 1`` (numpy's ``v − (−1)``); ``nearest`` rounds half
    to even.
    """
    v = (n - 1) * q
    if interpolation == "linear":
        if v >= n - 1:
            return n - 1, n - 1, v + 1.0
        k = math.floor(v)
        return k, k + 1, v - k
    k = {"lower": math.floor, "higher": math.ceil, "nearest": round}[interpolation](v)
    return k, k, 0.0


def numpy_lerp(a, b, gamma):
    """numpy's ``_lerp`` in fp32: ``a + (b−a)·γ``, or ``b − (b−a)·(1−γ)`` if ``γ ≥ 0.5``.

    a, b: 0-d fp32 tensors; gamma: a Python float, rounded to fp32 as numpy >= 2.4 does for a
    weak Python scalar (numpy < 2.4 interpolated in fp64). Each step is one fp32 op (no FMA), so
    inf − inf and inf·0 give NaN as in numpy.
    """
    d = b - a
    if gamma >= 0.5:
        return b - d * torch.tensor(1.0 - gamma, dtype=torch.float32, device=d.device)
    return a + d * torch.tensor(gamma, dtype=torch.float32, device=d.device)


def magnitudes(tensors, scales=None):
    """``[fp32 |w|·c, flattened]`` per tensor (c = 1 without ``scales``; the product is fp32)."""
    out = []
    for i, w in enumerate(tensors):
        a = w.detach().float().abs().reshape(-1)
        if scales is not None and scales[i] != 1.0:
            a = a * torch.tensor(float(scales[i]), dtype=torch.float32, device=a.device)
        out.append(a)
    return out


def _check_no_nan(mags):
    for i, a in enumerate(mags):
        if torch.isnan(a).any():
            raise FloatingPointError(f"tensors[{i}] contains NaN (|w|·c is NaN)")


def _sorted_quantile(x, q, interpolation):
    k0, k1, gamma = quantile_ranks(x.numel(), q, interpolation)
    x = x.sort().values
    return numpy_lerp(x[k0], x[k1], gamma) if interpolation == "linear" else x[k0].clone()


def global_magnitude_threshold(tensors, sparsity, scales=None, interpolation="linear"):
    """``np.quantile(np.concatenate([|w|·c ...]), sparsity, method=interpolation)`` (SPEC §9).

    The authors' way: concatenate and sort. tensors: non-empty list of fp32/fp16/bf16 tensors
    (any shapes); scales: one multiplier per tensor or None. Returns a 0-d fp32 tensor.
    Raises FloatingPointError naming the first tensor whose |w|·c has a NaN.
    """
    mags = magnitudes(tensors, scales)
    _check_no_nan(mags)
    return _sorted_quantile(torch.cat(mags), sparsity, interpolation)


def magnitude_thresholds(tensors, sparsities, interpolation="linear"):
    """One exact quantile of |w| per tensor: fp32 ``[len(tensors)]`` (SPEC §9, per-layer GMP).

    sparsities: one number for all tensors or one per tensor; every tensor must be non-empty.
    """
    if isinstance(sparsities, (int, float)):
        sparsities = [sparsities] * len(tensors)
    mags = magnitudes(tensors)
    _check_no_nan(mags)
    return torch.stack([_sorted_quantile(a, s, interpolation) for a, s in zip(mags, sparsities)])


# --- SPEC §4: Gaussian, exact and trainable (ASL) bounds ---------------------------------------

def gaussian_bound(w, sparsity):
    """Gaussian bound ``σ·√2·erfinv(s)`` (SPEC §4, ASL paper Eq. 3): 0-d fp32.

    σ = unbiased std of w in fp32 (:func:`std`: eager ``std``, safe from fp32 overflow), the
    product in float64 rounded once to fp32. ``s = 1`` gives +inf (every weight pruned, also for
    σ = 0); a NaN or inf weight gives NaN.
    """
    sigma = std(w.detach().float())
    if sparsity == 1:
        return torch.where(sigma.isnan(), sigma, math.inf)
    c = math.sqrt(2) * torch.erfinv(torch.tensor(float(sparsity), dtype=torch.float64, device=w.device))
    return (sigma.double() * c).float()


def gaussian_bounds(tensors, sparsities):
    """One :func:`gaussian_bound` per tensor, per layer in a loop: fp32 ``[len(tensors)]``.

    sparsities: one number for all tensors or one per tensor.
    """
    if isinstance(sparsities, (int, float)):
        sparsities = [sparsities] * len(tensors)
    return torch.stack([gaussian_bound(w, s) for w, s in zip(tensors, sparsities)])


def exact_bound(w, sparsity):
    """Exact bound of SPEC §4: the smallest ``b ≥ 0`` with ``#{|w| ≤ b}/#W ≥ s`` (sort-based).

    That is the ``ceil(s·n)``-th smallest |w| (0 when ``s·n < 1``); 0-d fp32.
    """
    a = w.detach().float().abs().reshape(-1)
    k = math.ceil(sparsity * a.numel())
    return a.sort().values[k - 1] if k > 0 else a.new_zeros(())


def bisection_bound(w, sparsity, eps=1e-3):
    """The ASL paper's baseline for the exact bound (SPEC §4, paper Eq. 2): bisection on b.

    Keeps ``frac(lo) < s ≤ frac(hi)`` with ``frac(b) = #{|w| ≤ b}/#W`` (fp32 |w|), starting from
    ``[0, max|w|]``, and returns ``hi`` once ``frac(hi) − s ≤ eps`` or ``[lo, hi]`` holds no fp32
    value in between (``hi`` is then :func:`exact_bound`). One counting pass per step; 0-d fp32.
    """
    a = w.detach().float().abs().reshape(-1)
    n = a.numel()
    lo, hi = a.new_zeros(()), a.max()
    if (a <= lo).sum().item() >= sparsity * n:
        return lo
    while True:
        if ((a <= hi).sum().item() / n - sparsity <= eps
                or torch.nextafter(lo, hi).item() >= hi.item()):
            return hi
        mid = lo + (hi - lo) / 2
        if (a <= mid).sum().item() >= sparsity * n:
            hi = mid
        else:
            lo = mid


def _group_sigma(w, r):
    """Unbiased fp32 std of w over the elements sharing each entry of r (whole layer for one r,
    output channel for one r per channel), shaped to broadcast against w; detached."""
    wf = w.detach().float()
    if r.numel() == 1:
        return std(wf)
    k = _channels(w)
    return std(_rows(wf, k), 1).reshape(_channel_view(w))


def asl_bound(w, r):
    """The ASL bound ``clamp(r, 0, 5)·σ`` (SPEC §4) in fp32, broadcastable to w; detached."""
    r = torch.as_tensor(r, device=w.device).detach().float()
    return broadcast_threshold(r, w).clamp(0, 5) * _group_sigma(w, r)


def asl_threshold_forward(w, r):
    """``w·1[|w| > clamp(r, 0, 5)·σ + 1e-6]`` in w's dtype (SPEC §4), no autograd."""
    wf = w.detach().float()
    return (wf * (wf.abs() > asl_bound(w, r) + 1e-6)).to(w.dtype)


def asl_threshold_backward(grad, w, r):
    """``∂L/∂r`` of SPEC §4 (paper Eq. 18): ``Σ g·(ŵ − w)/r`` over the elements sharing each r.

    Only pruned weights contribute; 0 where the clamp is active (``r ≤ 0`` or ``r ≥ 5``).
    Returns fp32 shaped like r.
    """
    r = torch.as_tensor(r, device=w.device).detach().float()
    wf, gf = w.detach().float(), grad.float()
    # g·(ŵ − w): 0 where kept, −g·w where pruned (a select: no inf·0 = NaN from either side)
    contrib = torch.where(wf.abs() > asl_bound(w, r) + 1e-6, 0.0, gf * -wf)
    total = reduce_to_threshold(contrib, r, w)
    active = (r > 0) & (r < 5)
    return torch.where(active, total / torch.where(active, r, 1.0), 0.0)


class _ASLThreshold(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, r):
        ctx.save_for_backward(w, r)
        return asl_threshold_forward(w, r)

    @staticmethod
    def backward(ctx, grad):
        w, r = ctx.saved_tensors
        grad_r = asl_threshold_backward(grad, w, r).to(r.dtype) if ctx.needs_input_grad[1] else None
        return grad, grad_r


def asl_threshold(w, r):
    """ASL trainable bound (SPEC §4): ``ŵ = w·1[|w| > clamp(r, 0, 5)·σ + 1e-6]``, σ detached.

    r: number, one value (per layer) or one per output channel (``[K]`` / ``[K, 1, ..]``); σ is
    the unbiased std over the elements sharing r. Backward: ``∂L/∂w = g`` (dense
    straight-through), ``∂L/∂r`` = :func:`asl_threshold_backward`.
    """
    return _ASLThreshold.apply(w, torch.as_tensor(r, dtype=torch.float32, device=w.device)
                               if not isinstance(r, torch.Tensor) else r)


# --- SPEC §5: structured masks (STARFIRE, N:M) -------------------------------------------------

def spec_round(x):
    """SPEC §5 ``round``: ``floor(x + 0.5)`` (halves round up)."""
    return math.floor(x + 0.5)


def keep_top(scores, keep):
    """Bool mask keeping the ``keep`` largest of each row of ``scores`` ``[G, n]``.

    Equal scores: lower index kept first (stable descending sort); NaN counts as the largest.
    """
    order = scores.sort(dim=-1, descending=True, stable=True).indices
    kept = torch.zeros_like(scores, dtype=torch.bool)
    return kept.scatter_(-1, order[:, :keep], True)


def nm_mask(w, n, m):
    """N:M mask (SPEC §5): keep the ``n`` largest |w| of every ``m`` consecutive weights along
    dim 1 (``in`` of ``[out, in]``; ``C`` of ``[K, C, R, S]`` at each fixed ``(k, r, s)``)."""
    a = w.detach().float().abs()
    k, c = a.shape[0], a.shape[1]
    g = a.reshape(k, c // m, m, -1).permute(0, 1, 3, 2)  # [K, C/m, inner, m]
    kept = keep_top(g.reshape(-1, m), n).reshape(g.shape)
    return kept.permute(0, 1, 3, 2).reshape(w.shape)


def window_keep(rs, sparsity, max_nonzero=None):
    keep = rs - spec_round(rs * sparsity)
    return keep if max_nonzero is None else min(keep, max_nonzero)


def window_mask(w, sparsity, max_nonzero=None):
    """Window mask (SPEC §5) of ``w`` ``[K, C, R, S]``: in every ``R×S`` kernel keep the
    ``RS − round(RS·s)`` largest |w| (at most ``max_nonzero``)."""
    k, c, r, s = w.shape
    a = w.detach().float().abs().reshape(k * c, r * s)
    return keep_top(a, window_keep(r * s, sparsity, max_nonzero)).reshape(w.shape)


def ck_mask(w, sparsity, group="in"):
    """CK mask (SPEC §5, paper Alg. 1) of ``w`` ``[K, C, R, S]``: kernel score ``max |w|`` over
    ``R×S``; per input channel (``"in"``: its ``K`` kernels) or per output filter (``"out"``:
    its ``C`` kernels) prune the ``round(n·s)`` lowest-scoring kernels whole."""
    k, c, r, s = w.shape
    a = w.detach().float().abs().reshape(k, c, r * s)
    score = a.amax(-1) if r * s else a.new_zeros(k, c)  # [K, C]; empty kernels: nothing to score
    if group == "in":
        kept = keep_top(score.t(), k - spec_round(k * sparsity)).t()
    else:
        kept = keep_top(score, c - spec_round(c * sparsity))
    return kept[:, :, None, None].expand(w.shape).clone()


def intra_ck_sparsity(rs, sparsity, window_fraction):
    """CK sparsity of :func:`intra_mask`: ``1 − (1 − s)/d_w`` (clamped to [0, 1]) where
    ``d_w = (RS − round(RS·f·s))/RS`` is the window step's actual density; 0 if ``d_w = 0`` or
    the kernels are empty (``RS = 0``: nothing to prune, the mask is empty)."""
    if rs == 0:
        return 0.0
    d_w = window_keep(rs, window_fraction * sparsity) / rs
    return min(max(1.0 - (1.0 - sparsity) / d_w, 0.0), 1.0) if d_w > 0 else 0.0


def intra_mask(w, sparsity, window_fraction=0.5, group="in"):
    """Intra-epoch mask (SPEC §5): window mask at ``f·s``, then CK on the window-masked weights
    at :func:`intra_ck_sparsity`, combined with AND (total density ≈ ``1 − s``)."""
    wm = window_mask(w, window_fraction * sparsity)
    s_ck = intra_ck_sparsity(w.shape[2] * w.shape[3], sparsity, window_fraction)
    return wm & ck_mask(masked_weight(w.detach(), wm), s_ck, group)


def block_scores(w, block):
    """Σ|w| of each ``block×block`` block of ``w`` ``[out, in]``: fp32 ``[⌈out/b⌉, ⌈in/b⌉]``.

    Edge blocks are partial (sums over their elements). Summed in fp32 in row-major order of
    the block's elements (the kernels' order, so scores agree bit for bit).
    """
    o, i = w.shape
    a = w.detach().float().abs()
    a = torch.nn.functional.pad(a, (0, -i % block, 0, -o % block))
    a = a.reshape(a.shape[0] // block, block, a.shape[1] // block, block)
    total = torch.zeros(a.shape[0], a.shape[2], dtype=torch.float32, device=w.device)
    for r in range(block):
        for c in range(block):
            total = total + a[:, r, :, c]
    return total


def block_mask(w, block, sparsity):
    """Block FC mask (SPEC §5) of ``w`` ``[out, in]``: prune the ``round(nb·s)`` lowest-Σ|w|
    blocks of ``nb``; then every block row with no kept block gets its best block back (so
    every output row keeps at least one weight)."""
    nb = ((w.shape[0] + block - 1) // block) * ((w.shape[1] + block - 1) // block)
    return block_mask_keep(w, block, nb - spec_round(nb * sparsity))


def block_mask_keep(w, block, keep):
    """:func:`block_mask` keeping the ``keep`` best blocks (before the row rule)."""
    score = block_scores(w, block)
    kept = keep_top(score.reshape(1, -1), keep).reshape(score.shape)
    empty = ~kept.any(1)
    best = score.argmax(1)  # first maximal block of each block row
    kept[empty, best[empty]] = True
    full = kept.repeat_interleave(block, 0).repeat_interleave(block, 1)
    return full[: w.shape[0], : w.shape[1]].contiguous()


def prune_fc_inputs(conv, fc_weight):
    """FC input mask (SPEC §5): ``[out, in]`` bool, False on the inputs fed by dead conv output
    channels (all kernels zero in ``conv``, a ``[K, C, R, S]`` weight or mask). Inputs follow
    ``flatten`` of ``[N, K, H, W]``: input ``j`` comes from channel ``j // (in / K)``."""
    k = conv.shape[0]
    alive = (conv.detach().reshape(k, -1) != 0).any(1)
    cols = alive.repeat_interleave(fc_weight.shape[1] // k)
    return cols[None, :].expand(fc_weight.shape).clone()


def masked_weight(w, mask):
    """``w`` where ``mask`` else 0 (SPEC §5); autograd gives ``grad·mask`` (pruned: exactly 0)."""
    return torch.where(mask, w, torch.zeros((), dtype=w.dtype, device=w.device))


def pack_mask(mask):
    """Bit-packed ``mask`` (SPEC §5 storage): uint8 ``[ceil(numel/8)]``; bit ``i % 8`` (least
    significant first) of byte ``i // 8`` is flat element ``i`` (row-major)."""
    flat = mask.reshape(-1).to(torch.uint8)
    bits = torch.nn.functional.pad(flat, (0, -flat.numel() % 8)).reshape(-1, 8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=mask.device)
    return (bits * weights).sum(1, dtype=torch.uint8)


def unpack_mask(packed, shape):
    """Inverse of :func:`pack_mask`: bool tensor of ``shape`` from uint8 ``packed``."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed[:, None] >> shifts) & 1
    return bits.reshape(-1)[: math.prod(shape)].reshape(shape).bool()


# --- spmm family (sparse inference) -------------------------------------------------------------

def _epilogue(y, relu, residual):
    """``y + residual`` (a tensor of ``y``'s shape, or None), then ``torch.relu`` when ``relu``."""
    y = y + residual if residual is not None else y
    return torch.relu(y) if relu else y


def csr_mm(rowptr, col, val, bias, x, out_features, transpose_out, relu=False, residual=None):
    """``W·x + bias[:, None]`` for W in CSR (``rowptr [out+1]``, ``col [nnz]``, ``val [nnz]``)
    and ``x [in, n]``; bias ``[out]`` or empty. Returns ``[out, n]``, or its transpose
    ``[n, out]`` (contiguous) when ``transpose_out``; plus ``residual`` (None or a tensor of the
    output's shape), then ``torch.relu`` when ``relu``."""
    w = csr_to_dense(rowptr, col, val, (out_features, x.shape[0]))
    y = w @ x
    if bias.numel():
        y = y + bias[:, None]
    y = y.t().contiguous() if transpose_out else y
    return _epilogue(y, relu, residual)


def csr_to_dense(rowptr, col, val, shape):
    """Dense ``shape`` = ``[out, in]`` matrix of a CSR weight (``rowptr``, ``col``, ``val``)."""
    rows = torch.repeat_interleave(torch.arange(shape[0], device=val.device), rowptr.diff())
    w = val.new_zeros(shape)
    w[rows, col.long()] = val
    return w


def csr_conv(rowptr, off, val, bias, x, n, out_features, slab, wp, wv, relu=False, residual=None):
    """``z[o, j] = bias[o] + Σ val[i]·x[off[i] + j]`` over row ``o``'s nonzeros, ``j < n``, kept
    as ``y[o, h, c] = z[o, h·wp + c]`` for ``c < wv``: ``[out, n / wp, wv]`` (the direct sparse
    convolution of ``sparsekern.inference.functional.csr_conv2d``; ``slab`` only blocks the kernel's loops);
    plus ``residual`` (None or ``[out, n / wp, wv]``), then ``torch.relu`` when ``relu``."""
    rows = torch.repeat_interleave(torch.arange(out_features, device=val.device), rowptr.diff())
    cols = x[off.long()[:, None] + torch.arange(n, device=x.device)]
    y = x.new_zeros(out_features, n).index_add_(0, rows, val[:, None] * cols)
    y = y + bias[:, None] if bias.numel() else y
    return _epilogue(y.view(out_features, n // wp, wp)[:, :, :wv].contiguous(), relu, residual)



def csr_group_conv(rowptr, col, val, bias, x, out_features, groups, kernel_size, stride, padding, dilation,
                   relu=False):
    """Grouped convolution (``F.conv2d`` with ``groups``, zero padding) of ``x [N, C, H, W]`` with a
    CSR weight ``[out, (C / groups)·R·S]`` (``col = c·R·S + r·S + s``, ``c`` within the group);
    bias ``[out]`` or empty. Returns ``[N, out, H', W']``; ``torch.relu`` of it when ``relu``."""
    w = csr_to_dense(rowptr, col, val, (out_features, x.shape[1] // groups * kernel_size[0] * kernel_size[1]))
    y = torch.nn.functional.conv2d(x, w.view(out_features, -1, *kernel_size), bias if bias.numel() else None,
                                   stride, padding, dilation, groups)
    return _epilogue(y, relu, None)

def bsr_to_dense(rowptr, col, val, shape):
    """Dense ``shape`` = ``[out, in]`` matrix of a block-CSR weight: ``val [nnzb, bo, bi]``,
    ``col [nnzb]`` block columns, ``rowptr [⌈out/bo⌉+1]``; the zero padding of edge blocks is cropped."""
    nb, bo, bi = val.shape
    brows = -(-shape[0] // bo)
    bcols = -(-shape[1] // bi)
    rows = torch.repeat_interleave(torch.arange(brows, device=val.device), rowptr.diff())
    w = val.new_zeros(brows, bcols, bo, bi)
    w[rows, col.long()] = val
    return w.permute(0, 2, 1, 3).reshape(brows * bo, bcols * bi)[: shape[0], : shape[1]]


def bsr_mm(rowptr, col, val, bias, x, out_features, transpose_out):
    """:func:`csr_mm` for a block-CSR weight (:func:`bsr_to_dense`); same ``x`` / bias / output."""
    y = bsr_to_dense(rowptr, col, val, (out_features, x.shape[0])) @ x
    if bias.numel():
        y = y + bias[:, None]
    return y.t().contiguous() if transpose_out else y


def nm_to_dense(val, idx, n, m, in_features):
    """Dense ``[out, in]`` of an N:M-compressed weight: stored value ``j`` of row ``r``
    (``val [out, in·n/m]``) is ``W[r, (j // n)·m + idx[r, j]]``."""
    cols = torch.arange(val.shape[1], device=val.device) // n * m + idx.long()
    w = val.new_zeros(val.shape[0], in_features)
    return w.scatter_add_(1, cols, val)


def nm_mm(val, idx, bias, x, n, m, out_features, transpose_out):
    """:func:`csr_mm` for an N:M-compressed weight (:func:`nm_to_dense`); same ``x`` / output."""
    y = nm_to_dense(val, idx, n, m, x.shape[0]) @ x
    if bias.numel():
        y = y + bias[:, None]
    return y.t().contiguous() if transpose_out else y


def ck_conv(rowptr, chan, val, taps, bias, x, n, out_features, plane, slab, wp, wv, relu=False, residual=None):
    """:func:`csr_conv` of a kernel-skipping weight: row ``o``'s kernel ``i`` (input channel
    ``chan[i]``, taps ``val[i, t]``) reads ``x[chan[i]·plane + taps[t] + j]``."""
    off = (chan.long()[:, None] * plane + taps.long()[None, :]).reshape(-1)
    return csr_conv(rowptr * taps.numel(), off, val.reshape(-1), bias, x, n, out_features, slab, wp, wv, relu,
                    residual)


def bitmap_to_dense(rowptr, mask, val, shape):
    """Dense ``shape = [out, in]`` weight of a bitmap weight: bit ``j`` of ``mask[r, g]`` marks
    column ``8g + j`` of row ``r`` nonzero; ``val`` holds the nonzeros row-major (then slack)."""
    bits = (mask[..., None].to(torch.int32) >> torch.arange(8, device=mask.device)) & 1
    alive = bits.reshape(shape[0], mask.shape[1] * 8).bool()
    w = val.new_zeros(alive.shape)
    w[alive] = val[:int(rowptr[-1])]
    return w[:, :shape[1]]


def bitmap_mm(rowptr, mask, val, bias, x, out_features):
    """``x·Wᵀ + bias`` for a bitmap bf16/fp16 weight (:func:`bitmap_to_dense`) and ``x [B, in]``,
    computed in fp32 and rounded once to ``x``'s dtype: ``[B, out]``."""
    w = bitmap_to_dense(rowptr, mask, val, (out_features, x.shape[1]))
    y = x.float() @ w.float().t()
    if bias.numel():
        y = y + bias.float()
    return y.to(x.dtype)


# --- max pooling (pool family: the converted models' MaxPool2d) ---------------------------------

def max_pool2d(x, kernel_size, stride, padding):
    """``y[n, c, i, j] = max over r < kh, s < kw of x[n, c, i·sh + r − ph, j·sw + s − pw]``, the
    positions outside ``x`` being ``−inf`` (``x [N, C, H, W]`` → ``[N, C, H', W']``, ``H' = (H + 2ph −
    kh) // sh + 1``); a NaN in a window gives NaN."""
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    xp = torch.nn.functional.pad(x, (pw, pw, ph, ph), value=float("-inf"))
    return xp.unfold(2, kh, sh).unfold(3, kw, sw).amax(dim=(-2, -1))
