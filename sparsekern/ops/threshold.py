"""Threshold family (SPEC §1–3, §6): ``torch.ops.sparsekern.*`` ops, autograd and the public API.

Raw ops take a validated weight and a flat fp32 threshold ``t`` with 1, ``K = w.shape[0]`` or
``w.numel()`` elements (per layer / output channel / weight); the public functions below
validate and normalise their arguments first. Kernels (C++ on CPU, Triton on CUDA, the
reference as fallback) share one contract:

    soft_fwd(w, t, act) / soft_bwd(grad, w, t, act, t_grad) -> (grad_w, grad_t)
    st3_fwd(w, t, rescale)
    power_fwd(w, t, p) / power_bwd(grad, w, t, theta)
    hard_fwd(w, t) / hard_bwd(grad, w, t)

``act`` indexes ``reference.ACTIVATIONS`` (identity, sigmoid, exp). Backward recomputes the
mask from ``(w, t)``; no full-size mask is saved.
"""
from types import SimpleNamespace

import torch

from .. import reference
from ._common import KernelFamily, as_threshold, check_bool, check_number, check_weight, define_op


def _ref_soft_bwd(grad, w, t, act, t_grad):
    gw, gt = reference.soft_threshold_backward(grad, w, t, reference.ACTIVATIONS[act])
    return gw, gt if t_grad else t.new_empty(0)


#: The kernel contract implemented by ``sparsekern.reference`` (CPU without the C++ library).
REFERENCE_KERNELS = SimpleNamespace(
    soft_fwd=lambda w, t, act: reference.soft_threshold(w, reference.activate(t, reference.ACTIVATIONS[act])),
    soft_bwd=_ref_soft_bwd,
    st3_fwd=lambda w, t, rescale: reference.st3_threshold_forward(w, t, rescale),
    power_fwd=lambda w, t, p: reference.power_threshold(w, t, p),
    power_bwd=lambda grad, w, t, theta: reference.power_threshold_backward(grad, w, t, theta),
    hard_fwd=lambda w, t: reference.hard_threshold_forward(w, t),
    hard_bwd=lambda grad, w, t: reference.hard_threshold_backward(grad, w, t),
)


KERNELS = KernelFamily("threshold", REFERENCE_KERNELS, {
    "soft_fwd": lambda w, t, act: torch.empty_like(w),
    "soft_bwd": lambda grad, w, t, act, t_grad: (torch.empty_like(w), t.new_empty(t.shape if t_grad else (0,))),
    "st3_fwd": lambda w, t, rescale: torch.empty_like(w),
    "power_fwd": lambda w, t, p: torch.empty_like(w),
    "power_bwd": lambda grad, w, t, theta: torch.empty_like(w),
    "hard_fwd": lambda w, t: torch.empty_like(w),
    "hard_bwd": lambda grad, w, t: torch.empty_like(w),
})


def _k(w):
    return KERNELS(w.device)


# --- raw ops ------------------------------------------------------------------------------------

@define_op("soft_threshold")
def _soft(w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return _k(w).soft_fwd(w.contiguous(), t, 0)


@define_op("str_threshold")
def _str(w: torch.Tensor, s: torch.Tensor, activation: str) -> torch.Tensor:
    return _k(w).soft_fwd(w.contiguous(), s, reference.ACTIVATIONS.index(activation))


@define_op("soft_threshold_backward")
def _soft_bwd(grad: torch.Tensor, w: torch.Tensor, t: torch.Tensor, act: int,
              t_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _k(w).soft_bwd(grad.contiguous(), w.contiguous(), t, act, t_grad)


@define_op("st3_threshold")
def _st3(w: torch.Tensor, t: torch.Tensor, rescale: bool) -> torch.Tensor:
    return _k(w).st3_fwd(w.contiguous(), t, rescale)


@define_op("power_threshold")
def _power(w: torch.Tensor, t: torch.Tensor, p: float, theta: float) -> torch.Tensor:
    return _k(w).power_fwd(w.contiguous(), t, p)


@define_op("power_threshold_backward")
def _power_bwd(grad: torch.Tensor, w: torch.Tensor, t: torch.Tensor, theta: float) -> torch.Tensor:
    return _k(w).power_bwd(grad.contiguous(), w.contiguous(), t, theta)


@define_op("hard_threshold")
def _hard(w: torch.Tensor, t: torch.Tensor, ste: bool) -> torch.Tensor:
    return _k(w).hard_fwd(w.contiguous(), t)


@define_op("hard_threshold_backward")
def _hard_bwd(grad: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    # t = 0 (before pruning starts) passes every gradient: exact zeros (a zero-initialised head) train
    return _k(w).hard_bwd(grad.contiguous(), w.contiguous(), t.masked_fill(t == 0, -1.0))


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


_soft.register_autograd(_soft_backward, setup_context=_save_wt)
_str.register_autograd(_soft_backward, setup_context=_save_wt)
_st3.register_autograd(_st3_backward, setup_context=lambda ctx, inputs, output: None)
_power.register_autograd(_power_backward, setup_context=_save_wt)
_hard.register_autograd(_hard_backward, setup_context=_save_wt)


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
