"""What every sparse-training method provides to the layers and to the Sparsifier."""
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from ..ops import masked_weight


class Method(ABC):
    """One sparse-training method: its options, the state it puts on a layer, and the op its
    forward calls. An instance holds options only, so one instance can serve every layer.

    ``MagnitudeMethod`` subclasses get their threshold from ``Sparsifier.step()``; others
    (STR) learn theirs.
    """

    name: str

    @classmethod
    def from_options(cls, final_sparsity: float | None, **options) -> "Method":
        """Build from ``sparsify()`` options; ``final_sparsity`` fills defaults that depend on it."""
        return cls(**options)

    @abstractmethod
    def init_state(self, layer) -> None:
        """Register this method's parameters/buffers on ``layer`` (a ``SparseWeight``: canonical
        ``weight [out, in, *kernel]``, ``register_buffer``, attribute assignment for Parameters)."""

    @abstractmethod
    def sparse_weight(self, layer) -> Tensor:
        """The effective weight the forward uses: one op on ``layer.weight`` (canonical layout)."""

    def unsupported(self, weight: Tensor) -> str | None:
        """Why this method cannot prune a canonical ``weight`` (``sparsify`` leaves it dense and
        warns), or None: every shape ``[out, in, *kernel]`` unless the method says."""
        return None

    def options(self) -> dict:
        """Options shown in ``extra_repr``."""
        return {}

    def extra_repr(self) -> str:
        return ", ".join([f"method={self.name}"] + [f"{k}={v}" for k, v in self.options().items()])


class MagnitudeMethod(Method):
    """Methods driven by a magnitude threshold ``t`` set each step by the Sparsifier.

    Layer state: ``threshold``, a 0-d fp32 buffer (persistent, so a resumed run is bit-identical).
    ``t = 0`` prunes nothing but exact zeros.

    ``scopes``: where the Sparsifier may pick the threshold — ``"global"``: one quantile ``T`` of
    ``|w|·c_l`` over all layers, ``t_l = T / c_l`` (SPEC §2, §3, §9); ``"layer"``: each layer's own
    quantile. ``default_scope`` is what the method's paper does.
    """

    scopes: tuple[str, ...] = ("global", "layer")
    default_scope = "global"

    def scale(self, layer) -> float:
        """``c_l``, the multiplier of ``|w|`` in the global quantile (1 unless the method says)."""
        return 1.0

    def init_state(self, layer) -> None:
        layer.register_buffer("threshold", torch.zeros((), dtype=torch.float32, device=layer.weight.device))

    @staticmethod
    def set_threshold(layer, t: Tensor) -> None:
        layer.threshold.copy_(t)


class FixedMask(Method):
    """Fine-tuning under a fixed mask (``Sparsifier.freeze()``): ``w·mask``; pruned weights get
    zero gradient and ``Sparsifier.step()`` re-zeroes them (momentum or weight decay cannot regrow
    them). Layer state: ``mask``, bool, the weight's canonical shape."""

    name = "frozen"

    def init_state(self, layer) -> None:
        layer.register_buffer("mask", torch.ones(layer.weight.shape, dtype=torch.bool, device=layer.weight.device))

    def sparse_weight(self, layer) -> Tensor:
        return masked_weight(layer.weight, layer.mask)
