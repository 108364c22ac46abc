"""Threshold family (SPEC §1–3, §6): the ``torch.ops.sparsekern.*`` ops, autograd and the public API.

Ops (schemas below, each defined once with :func:`._common.define`)::

    soft_threshold(w, t) / str_threshold(w, s, activation)
    soft_threshold_backward(grad, w, t, act, t_grad) -> (grad_w, grad_t)
    st3_threshold(w, t, rescale)
    power_threshold(w, t, p, theta) / power_threshold_backward(grad, w, t, theta)
    hard_threshold(w, t, ste) / hard_threshold_backward(grad, w, t)

``w`` / ``grad``: fp32/fp16/bf16 of any shape and strides (results contiguous, w's dtype); ``t``
/ ``s``: flat fp32 with 1, ``K = w.shape[0]`` or ``w.numel()`` elements (per layer / output
channel / weight); the public functions below validate and normalise their arguments first.
``act`` indexes ``reference.ACTIVATIONS`` (identity, sigmoid, exp). Implementations: C++ on CPU
(``csrc/cpu/threshold.cpp``), Triton on CUDA (``sparsekern/triton/threshold.py``, through the
adapters below), the reference elsewhere. Backward recomputes the mask from ``(w, t)``; no
full-size mask is saved.
"""
from .. import reference
from ._common import as_threshold, check_bool, check_cpp, check_number, check_weight, define, triton_module


# --- autograd -----------------------------------------------------------------------------------

def _save_wt(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])
    ctx.args = inputs[2:]


def _soft_backward(ctx, grad):
    w, t = ctx.saved_tensors
    act = reference.ACTIVATIONS.index(ctx.args[0]) if ctx.args else 0
    gw, gt = _soft_bwd(grad, w, t, act, ctx.needs_input_grad[1])
    return (gw if ctx.needs_input_grad[0] else None,
            gt if ctx.needs_input_grad[1] else None) + (None,) * len(ctx.args)


def _st3_backward(ctx, grad):
    return grad, None, None


def _power_backward(ctx, grad):
    w, t = ctx.saved_tensors
    return _power_bwd(grad, w, t, ctx.args[1]), None, None, None


def _hard_backward(ctx, grad):
    w, t = ctx.saved_tensors
    return (grad if ctx.args[0] else _hard_bwd(grad, w, t)), None, None



# --- ops ----------------------------------------------------------------------------------------

def _tk():
    return triton_module("threshold")


def _like(w, *args):
    return w.new_empty(w.shape)


def _soft_bwd_fake(grad, w, t, act, t_grad):
    return w.new_empty(w.shape), t.new_empty(t.shape if t_grad else (0,))


def _ref_soft_bwd(grad, w, t, act, t_grad):
    gw, gt = reference.soft_threshold_backward(grad.contiguous(), w.contiguous(), t, reference.ACTIVATIONS[act])
    return gw, gt if t_grad else t.new_empty(0)


def _cuda_soft_bwd(grad, w, t, act, t_grad):
    return _tk().soft_bwd(grad.contiguous(), w.contiguous(), t.contiguous(), act, t_grad)


def _cuda_hard_bwd(grad, w, t):
    # t = 0 (before pruning starts) passes every gradient: exact zeros (a zero-initialised head) train
    return _tk().hard_bwd(grad.contiguous(), w.contiguous(), t.masked_fill(t == 0, -1.0))


_soft = define(
    "soft_threshold(Tensor w, Tensor t) -> Tensor", "threshold", cpp=True, fake=_like,
    reference=lambda w, t: reference.soft_threshold(w.contiguous(), t),
    cuda=lambda w, t: _tk().soft_fwd(w.contiguous(), t.contiguous(), 0),
    backward=_soft_backward, setup_context=_save_wt)
_str = define(
    "str_threshold(Tensor w, Tensor s, str activation) -> Tensor", "threshold", cpp=True, fake=_like,
    reference=lambda w, s, activation: reference.str_threshold(w.contiguous(), s, activation),
    cuda=lambda w, s, activation: _tk().soft_fwd(w.contiguous(), s.contiguous(),
                                                  reference.ACTIVATIONS.index(activation)),
    backward=_soft_backward, setup_context=_save_wt)
_soft_bwd = define(
    "soft_threshold_backward(Tensor grad, Tensor w, Tensor t, SymInt act, bool t_grad) -> (Tensor, Tensor)",
    "threshold", cpp=True, fake=_soft_bwd_fake, reference=_ref_soft_bwd, cuda=_cuda_soft_bwd)
_st3 = define(
    "st3_threshold(Tensor w, Tensor t, bool rescale) -> Tensor", "threshold", cpp=True, fake=_like,
    reference=lambda w, t, rescale: reference.st3_threshold_forward(w.contiguous(), t, rescale),
    cuda=lambda w, t, rescale: _tk().st3_fwd(w.contiguous(), t.contiguous(), rescale),
    backward=_st3_backward, setup_context=lambda ctx, inputs, output: None)
_power = define(
    "power_threshold(Tensor w, Tensor t, float p, float theta) -> Tensor", "threshold", cpp=True, fake=_like,
    reference=lambda w, t, p, theta: reference.power_threshold_forward(w.contiguous(), t, p),
    cuda=lambda w, t, p, theta: _tk().power_fwd(w.contiguous(), t.contiguous(), p),
    backward=_power_backward, setup_context=_save_wt)
_power_bwd = define(
    "power_threshold_backward(Tensor grad, Tensor w, Tensor t, float theta) -> Tensor", "threshold",
    cpp=True, fake=lambda grad, w, t, theta: _like(w),
    reference=lambda grad, w, t, theta: reference.power_threshold_backward(grad.contiguous(), w.contiguous(), t,
                                                                           theta),
    cuda=lambda grad, w, t, theta: _tk().power_bwd(grad.contiguous(), w.contiguous(), t.contiguous(), theta))
_hard = define(
    "hard_threshold(Tensor w, Tensor t, bool ste) -> Tensor", "threshold", cpp=True, fake=_like,
    reference=lambda w, t, ste: reference.hard_threshold_forward(w.contiguous(), t),
    cuda=lambda w, t, ste: _tk().hard_fwd(w.contiguous(), t.contiguous()),
    backward=_hard_backward, setup_context=_save_wt)
_hard_bwd = define(
    "hard_threshold_backward(Tensor grad, Tensor w, Tensor t) -> Tensor", "threshold", cpp=True,
    fake=lambda grad, w, t: _like(w),
    reference=lambda grad, w, t: reference.hard_threshold_backward(grad.contiguous(), w.contiguous(), t),
    cuda=_cuda_hard_bwd)
check_cpp("threshold")


# --- public API ---------------------------------------------------------------------------------

def soft_threshold(w, t):
    """Soft threshold ``sign(w)·max(|w| − t, 0)`` (SPEC §1 with g = identity).

    w: ``[K, ...]`` fp32/fp16/bf16. t: number, or tensor per layer / ``[K]`` / ``w.shape``, ≥ 0.
    Returns w's shape and dtype. Gradients: ``∂w = g·1[|w| > t]``, ``∂t = −Σ_kept g·sign(w)``.
    """
    check_weight(w)
    return _soft(w, as_threshold(t, w))


def str_threshold(w, s, activation="sigmoid"):
    """STR (SPEC §1): ``sign(w)·max(|w| − g(s), 0)`` with learnable ``s``; g = sigmoid or exp.

    s: number or tensor per layer / ``[K]`` / ``w.shape`` (any real, not NaN). True
    sub-gradients: ``∂w = g_out·1[|w| > g(s)]``, ``∂s = −g'(s)·Σ_kept g_out·sign(w)``.
    """
    check_weight(w)
    if activation not in ("sigmoid", "exp"):
        raise ValueError(f"activation must be 'sigmoid' or 'exp', got {activation!r}")
    return _str(w, as_threshold(s, w, "s", nonnegative=False), activation)


def st3_threshold(w, t, rescale=True):
    """ST-3 (SPEC §2): ``scale_o·sign(w)·max(|w| − t, 0)``, per-channel rescale in the kernel.

    w: ``[K, ...]``; t ≥ 0 per layer / ``[K]`` / ``w.shape`` (t = 0: identity). rescale: bool.
    A channel with a kept infinite weight gets scale 1 (ρ's limit; not inf/inf = NaN).
    Backward: dense straight-through (``∂w = g`` for every weight); t gets no gradient.
    """
    check_weight(w)
    rescale = check_bool(rescale, "rescale")
    return _st3(w, as_threshold(t, w), rescale)


def power_threshold(w, t, p=3.0, theta=1.0):
    """Feather (SPEC §3): ``sign(w)·(|w|^p − t^p)^(1/p)`` where ``|w| > t``, else 0.

    p > 0 (1: soft, → ∞: hard); backward ``g·(1 if |w| > t else θ)``, θ ∈ [0, 1].
    """
    check_weight(w)
    p = check_number(p, "p", lo=0.0, hi=1e6)
    if p == 0.0:
        raise ValueError("p must be > 0")
    theta = check_number(theta, "theta", lo=0.0, hi=1.0)
    return _power(w, as_threshold(t, w), p, theta)


def hard_threshold(w, t, ste=True):
    """Hard threshold ``w·1[|w| > t]`` (SPEC §6).

    ste (a bool) True: dense straight-through backward; False: pruned weights get zero gradient (GMP):
    ``∂w = g·1[|w| > t or t = 0]`` — where ``t = 0`` nothing is pruned yet and every weight, exact
    zeros included, gets its gradient (a zero-initialised layer still trains).
    """
    check_weight(w)
    ste = check_bool(ste, "ste")
    return _hard(w, as_threshold(t, w), ste)
