"""Feather: power threshold with gradient scale θ on pruned weights (SPEC §3)."""
import math

from torch import Tensor

from ..ops import power_threshold
from .base import MagnitudeMethod


class Feather(MagnitudeMethod):
    """``power_threshold(weight, threshold, p, theta)``.

    p: exponent (> 0; 1 = soft, ∞ = hard threshold). theta ∈ [0, 1]: gradient scale of pruned
    weights. Through ``sparsify()``, ``theta=None`` picks the authors' rule: 0.5 if the final
    sparsity > 0.95, else 1.
    """

    name = "feather"

    def __init__(self, p: float = 3.0, theta: float = 1.0):
        if not (isinstance(p, (int, float)) and p > 0 and math.isfinite(p)):
            raise ValueError(f"p must be a finite number > 0, got {p!r}")
        if not (isinstance(theta, (int, float)) and 0.0 <= theta <= 1.0):
            raise ValueError(f"theta must be in [0, 1], got {theta!r}")
        self.p = float(p)
        self.theta = float(theta)

    @classmethod
    def from_options(cls, final_sparsity, p: float = 3.0, theta: float | None = None) -> "Feather":
        if theta is None:
            if final_sparsity is None:
                raise ValueError("feather: pass theta, or a final sparsity (sparsity= or a schedule "
                                 "with .final_sparsity) for the authors' rule")
            theta = 0.5 if final_sparsity > 0.95 else 1.0
        return cls(p=p, theta=theta)

    def sparse_weight(self, layer) -> Tensor:
        return power_threshold(layer.weight, layer.threshold, p=self.p, theta=self.theta)

    def options(self) -> dict:
        return {"p": self.p, "theta": self.theta}
