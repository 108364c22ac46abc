"""GMP: hard magnitude threshold, pruned weights get no gradient (SPEC §6)."""
from torch import Tensor

from ..ops import hard_threshold
from .base import MagnitudeMethod


class GMP(MagnitudeMethod):
    """``hard_threshold(weight, threshold, ste=False)``: ``w·1[|w| > t]`` with masked gradient.

    Uniform per-layer pruning (``scope="layer"``, Zhu & Gupta) is the default; ``"global"`` too.
    """

    name = "gmp"
    default_scope = "layer"

    def sparse_weight(self, layer) -> Tensor:
        return hard_threshold(layer.weight, layer.threshold, ste=False)
