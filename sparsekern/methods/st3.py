"""ST-3: soft threshold with per-output-channel rescale and straight-through backward (SPEC §2)."""
from torch import Tensor, nn

import sparsekern as sk

from .base import MagnitudeMethod


class ST3(MagnitudeMethod):
    """``sk.st3_threshold(weight, threshold, rescale)``; ``threshold = 0`` is the identity."""

    name = "st3"

    def __init__(self, rescale: bool = True):
        if not isinstance(rescale, bool):
            raise TypeError(f"rescale must be a bool, got {rescale!r}")
        self.rescale = rescale

    def sparse_weight(self, layer: nn.Module) -> Tensor:
        return sk.st3_threshold(layer.weight, layer.threshold, rescale=self.rescale)

    def options(self) -> dict:
        return {"rescale": self.rescale}
