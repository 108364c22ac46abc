"""STR: soft threshold with a learned threshold g(s) (SPEC §1)."""
import math
import warnings

import torch
from torch import Tensor, nn

from ..ops import str_threshold
from .base import Method

_GRANULARITIES = ("layer", "channel", "weight")


class STR(Method):
    """``str_threshold(weight, s, activation)``: ``sign(w)·max(|w| − g(s), 0)``.

    Layer state: ``s``, an fp32 Parameter: shape ``()`` for ``granularity="layer"`` (the paper's
    default), ``[K_out]`` for ``"channel"``, ``weight.shape`` for ``"weight"``, filled with ``s_init``.
    Nothing happens at ``Sparsifier.step()``: put the ``s`` parameters in the optimizer *with
    weight decay* — decay on ``s`` is what raises the threshold (SPEC §1). ``s_init``: paper
    −3200 (ResNet-50), small models ≈ −100…−5; ``s_init > 0`` warns (``sigmoid(s) > 0.5``).
    """

    name = "str"

    def __init__(self, s_init: float = -5.0, activation: str = "sigmoid", granularity: str = "layer"):
        if not (isinstance(s_init, (int, float)) and math.isfinite(s_init)):
            raise ValueError(f"s_init must be a finite number, got {s_init!r}")
        if s_init > 0:
            warnings.warn(f"STR s_init={s_init} > 0 prunes every |w| < g(s_init) at the start; "
                          "the paper uses large negative values (SPEC §1)", UserWarning, stacklevel=3)
        if activation not in ("sigmoid", "exp"):
            raise ValueError(f"activation must be 'sigmoid' or 'exp', got {activation!r}")
        if granularity not in _GRANULARITIES:
            raise ValueError(f"granularity must be one of {_GRANULARITIES}, got {granularity!r}")
        self.s_init = float(s_init)
        self.activation = activation
        self.granularity = granularity

    def init_state(self, layer) -> None:
        w = layer.weight
        shape = {"layer": (), "channel": w.shape[:1], "weight": w.shape}[self.granularity]
        layer.s = nn.Parameter(torch.full(shape, self.s_init, dtype=torch.float32, device=w.device))

    def sparse_weight(self, layer) -> Tensor:
        return str_threshold(layer.weight, layer.s, activation=self.activation)

    def options(self) -> dict:
        return {"s_init": self.s_init, "activation": self.activation, "granularity": self.granularity}
