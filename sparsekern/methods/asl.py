"""ASL: hard threshold at a trainable Gaussian bound ``clamp(r, 0, 5)·σ``, sparsity loss (SPEC §4)."""
import math
import numbers

import torch
from torch import Tensor, nn

from ..losses import AdaptiveSparsityLoss
from ..ops import asl_threshold
from .base import Method

_GRANULARITIES = ("layer", "channel")


def initial_r(sparsity: float) -> float:
    """The authors' init ``√2·erfinv(0.6·s_target)``: modelled sparsity 0.6·s_target at the start."""
    return math.sqrt(2.0) * torch.erfinv(torch.tensor(0.6 * sparsity, dtype=torch.float64)).item()


class ASL(Method):
    """``asl_threshold(weight, r)``: ``w·1[|w| > clamp(r, 0, 5)·σ + 1e-6]``, σ the weight's
    (detached) std; dense straight-through gradient for ``w``, paper Eq. 18 for ``r``.

    Layer state: ``r``, an fp32 Parameter of shape ``()`` (``granularity="layer"``, the paper's)
    or ``[K_out]`` (``"channel"``), filled with ``r_init``. Nothing happens at ``Sparsifier.step()``:
    add ``Sparsifier.loss()`` to the task loss and train ``r`` at lr/100 without weight decay
    (``Sparsifier.param_groups``).

    The remaining options configure the ``AdaptiveSparsityLoss`` the Sparsifier builds over the
    chosen layers (``loss`` is its ``mode``; the others keep their names there). ``input_size``
    (one sample's shape) is needed when FLOPs enter the loss, to count them (``sk.count_flops``).
    """

    name = "asl"

    def __init__(self, r_init: float = 0.0, granularity: str = "layer", loss: str = "budget",
                 contribution: str = "params", param_budget: float | None = None, flop_budget: float | None = None,
                 lam: float = 1.0, lam_params: float = 10.0, lam_flops: float = 10.0, input_size=None):
        if isinstance(r_init, bool) or not isinstance(r_init, numbers.Real) or not math.isfinite(r_init):
            raise ValueError(f"r_init must be a finite number, got {r_init!r}")
        if granularity not in _GRANULARITIES:
            raise ValueError(f"granularity must be one of {_GRANULARITIES}, got {granularity!r}")
        self.r_init = float(r_init)
        self.granularity = granularity
        self.loss_options = dict(mode=loss, contribution=contribution, param_budget=param_budget,
                                 flop_budget=flop_budget, lam=lam, lam_params=lam_params, lam_flops=lam_flops)
        self.input_size = input_size

    @classmethod
    def from_options(cls, final_sparsity, r_init: float | None = None, loss: str = "budget",
                     param_budget: float | None = None, flop_budget: float | None = None, **options) -> "ASL":
        """``sparsify(model, "asl", sparsity=s)``: ``r_init = initial_r(s)`` and, for the budget
        losses with no budget given, ``param_budget = 1 − s``."""
        if final_sparsity is None and (r_init is None or (loss in ("budget", "hinge") and
                                                          param_budget is None and flop_budget is None)):
            raise ValueError("method 'asl' needs a target: pass sparsity= (or r_init= and the loss's budgets)")
        if r_init is None:
            r_init = initial_r(final_sparsity)
        if loss in ("budget", "hinge") and param_budget is None and flop_budget is None:
            param_budget = 1.0 - final_sparsity
        return cls(r_init=r_init, loss=loss, param_budget=param_budget, flop_budget=flop_budget, **options)

    def flop_input_size(self):
        """One sample's shape to count the layers' dense FLOPs at, or None when FLOPs do not
        enter the loss (ValueError when they do and ``input_size`` was not given)."""
        opts = self.loss_options
        if opts["flop_budget"] is None and not (opts["mode"] == "wavg" and opts["contribution"] == "flops"):
            return None
        if self.input_size is None:
            raise ValueError("asl: FLOPs in the loss need input_size= (one sample's shape) to count them")
        return self.input_size

    def make_loss(self, layers: dict, flops: list[int] | None) -> AdaptiveSparsityLoss:
        """The loss over ``layers`` (name → ``SparseWeight``, in ``r`` order) with their weight
        counts and ``flops``, their dense FLOPs (needed when ``flop_input_size()`` is not None)."""
        return AdaptiveSparsityLoss(params=[m.weight.numel() for m in layers.values()], flops=flops,
                                    **self.loss_options)

    def init_state(self, layer) -> None:
        w = layer.weight
        shape = w.shape[:1] if self.granularity == "channel" else ()
        layer.r = nn.Parameter(torch.full(shape, self.r_init, dtype=torch.float32, device=w.device))

    def sparse_weight(self, layer) -> Tensor:
        return asl_threshold(layer.weight, layer.r)

    def options(self) -> dict:
        return {"r_init": self.r_init, "granularity": self.granularity}
