"""ST-3 / ST-3σ: soft threshold with per-output-channel rescale and straight-through backward (SPEC §2)."""
import math

from torch import Tensor

from ..ops import st3_threshold
from .base import MagnitudeMethod


class ST3(MagnitudeMethod):
    """``st3_threshold(weight, threshold, rescale)``; ``threshold = 0`` is the identity."""

    name = "st3"

    def __init__(self, rescale: bool = True):
        if not isinstance(rescale, bool):
            raise TypeError(f"rescale must be a bool, got {rescale!r}")
        self.rescale = rescale

    def sparse_weight(self, layer) -> Tensor:
        return st3_threshold(layer.weight, layer.threshold, rescale=self.rescale)

    def options(self) -> dict:
        return {"rescale": self.rescale}


class ST3Sigma(ST3):
    """ST-3σ: ST-3's forward; the global quantile weighs each layer by ``c_l = sqrt(sum of
    W_l's shape)`` (Conv ``K_out + C_in/groups + R + S``, Linear ``out + in``) and ``t_l = T / c_l``.

    Global scope only: a per-layer quantile of ``|w|·c_l`` divided by ``c_l`` is plain ``st3``.
    """

    name = "st3_sigma"
    scopes = ("global",)

    def scale(self, layer) -> float:
        return math.sqrt(sum(layer.weight.shape))
