"""Adaptive sparsity loss of ASL (SPEC §4): per-layer sparsity modelled as ``erf(r/√2)``."""
import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

MODES = ("avg", "wavg", "budget", "hinge")
CONTRIBUTIONS = ("params", "flops")


def erf_sparsity(r: Tensor) -> Tensor:
    """Modelled sparsity of one layer, ``s = erf(r/√2)`` (SPEC §4): the fraction of a zero-mean
    Gaussian within ``±r·σ``. ``r``: 0-d (per layer) or ``[K]`` (per channel: the mean over the
    channels, which are equally sized). 0-d result in fp32 (fp64 if ``r`` is), differentiable:
    torch's ``erf`` backward is the closed form ``∂s/∂r = √(2/π)·e^{−r²/2}``."""
    r = r.to(torch.promote_types(r.dtype, torch.float32))
    return torch.erf(r / math.sqrt(2.0)).mean()


def _real(value, name: str, low: float, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not (low <= value <= high and math.isfinite(value)):  # also rejects NaN
        raise ValueError(f"{name} must be a finite number in [{low}, {high}], got {value}")
    return value


def _contributions(counts, name: str) -> list[float] | None:
    """``counts`` normalised to sum 1 (SPEC §4 ``c_l``)."""
    if counts is None:
        return None
    counts = [_real(c, f"{name}[{i}]", 0.0) for i, c in enumerate(counts)]
    total = sum(counts)
    if not counts or total == 0 or math.isinf(total):
        raise ValueError(f"{name} must be non-negative finite counts with a positive sum, got {counts}")
    return [c / total for c in counts]


class AdaptiveSparsityLoss:
    """The sparsity loss added to the task loss (SPEC §4). ``L_s(c) = 1 − Σ_l c_l·s_l`` is the
    modelled *density*, ``s_l = erf_sparsity(r_l)``.

    mode:
      ``"avg"``: ``lam·(1 − mean_l s_l)``;
      ``"wavg"``: ``lam·L_s(c)``, ``c`` from ``params`` or ``flops`` (``contribution``);
      ``"budget"``: ``lam_params·(L_s(c_p) − param_budget)² + lam_flops·(L_s(c_f) − flop_budget)²``;
      ``"hinge"``: ``lam_params·max(L_s(c_p) − param_budget, 0) + lam_flops·max(L_s(c_f) − flop_budget, 0)``.
      A budget left as None drops its term; budget modes need at least one.
    params / flops: per-layer weight counts ``#W_l`` / dense FLOPs (``sk.count_flops`` rows'
      ``dense_macs``), in the order of the ``r`` list; normalised here to ``c_p``, ``c_f``.
    param_budget / flop_budget: density budgets ``B`` in [0, 1] (kept fraction, not sparsity).
    lam, lam_params, lam_flops: ≥ 0. The authors' code uses 10 for the budget weight.
    """

    def __init__(self, mode: str = "budget", *, params: Sequence[int] | None = None,
                 flops: Sequence[int] | None = None, contribution: str = "params",
                 param_budget: float | None = None, flop_budget: float | None = None,
                 lam: float = 1.0, lam_params: float = 10.0, lam_flops: float = 10.0):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if contribution not in CONTRIBUTIONS:
            raise ValueError(f"contribution must be one of {CONTRIBUTIONS}, got {contribution!r}")
        self.mode, self.contribution = mode, contribution
        self.c_params = _contributions(params, "params")
        self.c_flops = _contributions(flops, "flops")
        self.param_budget = None if param_budget is None else _real(param_budget, "param_budget", 0.0, 1.0)
        self.flop_budget = None if flop_budget is None else _real(flop_budget, "flop_budget", 0.0, 1.0)
        self.lam = _real(lam, "lam", 0.0)
        self.lam_params = _real(lam_params, "lam_params", 0.0)
        self.lam_flops = _real(lam_flops, "lam_flops", 0.0)
        if mode in ("budget", "hinge"):
            if self.param_budget is None and self.flop_budget is None:
                raise ValueError(f"mode {mode!r} needs param_budget= and/or flop_budget=")
            if self.param_budget is not None and self.c_params is None:
                raise ValueError("param_budget needs params= (per-layer weight counts)")
            if self.flop_budget is not None and self.c_flops is None:
                raise ValueError("flop_budget needs flops= (per-layer FLOPs)")
        elif mode == "wavg" and self._weights(contribution) is None:
            raise ValueError(f"mode 'wavg' with contribution {contribution!r} needs {contribution}= (per-layer counts)")
        lengths = {len(c) for c in (self.c_params, self.c_flops) if c is not None}
        if len(lengths) > 1:
            raise ValueError(f"params and flops list different numbers of layers: {sorted(lengths)}")
        self.num_layers = lengths.pop() if lengths else None

    def _weights(self, contribution: str) -> list[float] | None:
        return self.c_params if contribution == "params" else self.c_flops

    def density(self, r: Sequence[Tensor], contribution: str | None = "params") -> Tensor:
        """Modelled density ``L_s(c)`` (0-d) with contributions ``"params"``/``"flops"``, or the plain
        mean over layers for ``None``."""
        return self._density(self._sparsities(r), contribution)

    def _density(self, s: Tensor, contribution: str | None) -> Tensor:
        if contribution is None:
            return 1.0 - s.mean()
        c = self._weights(contribution)
        if c is None:
            raise ValueError(f"no {contribution}= counts were given")
        return 1.0 - (torch.tensor(c, dtype=s.dtype, device=s.device) * s).sum()

    def _sparsities(self, r: Sequence[Tensor]) -> Tensor:
        r = list(r)
        if not r:
            raise ValueError("r must list at least one layer's tensor")
        if self.num_layers is not None and len(r) != self.num_layers:
            raise ValueError(f"got {len(r)} r tensors for {self.num_layers} layers")
        s = torch.stack([erf_sparsity(t) for t in r])
        if s.device.type == "cpu" and torch.isnan(s).any():  # free to check on the host only
            raise FloatingPointError(f"r[{int(torch.isnan(s).nonzero()[0, 0])}] is NaN")
        return s

    def __call__(self, r: Sequence[Tensor]) -> Tensor:
        """The loss (0-d, differentiable w.r.t. every ``r``) for the layers' ``r`` tensors."""
        s = self._sparsities(r)
        if self.mode in ("avg", "wavg"):
            return self.lam * self._density(s, None if self.mode == "avg" else self.contribution)
        loss = s.new_zeros(())
        for budget, lam, contribution in ((self.param_budget, self.lam_params, "params"),
                                          (self.flop_budget, self.lam_flops, "flops")):
            if budget is not None:
                gap = self._density(s, contribution) - budget
                loss = loss + lam * (gap.square() if self.mode == "budget" else torch.relu(gap))
        return loss

    def __repr__(self) -> str:
        opts = {"avg": f"lam={self.lam}", "wavg": f"contribution={self.contribution}, lam={self.lam}"}.get(
            self.mode, f"param_budget={self.param_budget}, flop_budget={self.flop_budget}, "
                       f"lam_params={self.lam_params}, lam_flops={self.lam_flops}")
        return f"AdaptiveSparsityLoss(mode={self.mode}, {opts})"
