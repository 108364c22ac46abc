"""GMP: hard magnitude threshold, pruned weights get no gradient (SPEC §6)."""
from torch import Tensor, nn

import sparsekern as sk

from .base import MagnitudeMethod


class GMP(MagnitudeMethod):
    """``sk.hard_threshold(weight, threshold, ste=False)``: ``w·1[|w| > t]`` with masked gradient."""

    name = "gmp"

    def sparse_weight(self, layer: nn.Module) -> Tensor:
        return sk.hard_threshold(layer.weight, layer.threshold, ste=False)
