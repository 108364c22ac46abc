"""What every sparse-training method provides to the layers and to the Sparsifier."""
import numbers
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from ..ops import masked_weight
from ..ops import distributed
from ..schedules import RAMPS


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


class MaskedWeights(Method):
    """Methods whose layers carry a persistent bool buffer ``mask`` (the weight's canonical
    shape): forward ``masked_weight(weight, mask)`` (pruned weights are zero and get zero
    gradient, no straight-through), and ``zero_pruned`` after each optimizer step."""

    def init_state(self, layer) -> None:
        layer.register_buffer("mask", torch.ones(layer.weight.shape, dtype=torch.bool, device=layer.weight.device))

    def sparse_weight(self, layer) -> Tensor:
        return masked_weight(layer.weight, layer.mask)

    @staticmethod
    @torch.no_grad()
    def zero_pruned(layers: list) -> None:
        """Set the pruned weights to exactly 0 in place (undoing momentum and weight decay); an
        FSDP2-sharded weight zeroes its local rows (the mask is whole on every rank)."""
        for layer in layers:
            p = layer.param
            if distributed.is_dtensor(p):
                off, rows = distributed.shard_rows(p)
                mask = layer.mask.t() if layer.transposed else layer.mask  # stored layout, sharded on dim 0
                p.to_local().masked_fill_(~mask[off:off + rows], 0)
            else:
                layer.weight.masked_fill_(~layer.mask, 0)


class FixedMask(MaskedWeights):
    """Fine-tuning under a fixed mask (``Sparsifier.freeze()``): ``w·mask``; pruned weights get
    zero gradient and ``Sparsifier.step()`` re-zeroes them (momentum or weight decay cannot regrow
    them)."""

    name = "frozen"


def _canonical(layer, stored: Tensor) -> Tensor:
    """``stored`` (a tensor in ``layer.param``'s layout) in the canonical layout ``[out, in, *kernel]``."""
    return stored.t() if layer.transposed else stored


def local_rows(layer) -> tuple[Tensor, int, int] | None:
    """``(local canonical rows, global row offset, global rows)`` of an FSDP2-sharded layer whose
    canonical output rows are what ``Shard(0)`` splits (not a transposed kind), else None."""
    if layer.transposed:
        return None
    off, rows = distributed.shard_rows(layer.param)
    return layer.param.to_local().detach(), off, layer.param.shape[0]


def _check_era(era) -> tuple[int, int]:
    if not (isinstance(era, (tuple, list)) and len(era) == 2
            and all(isinstance(e, numbers.Integral) and not isinstance(e, bool) for e in era)
            and 0 <= era[0] < era[1]):
        raise ValueError(f"era must be (start_step, end_step), integers with 0 <= start_step < end_step, got {era!r}")
    return int(era[0]), int(era[1])


class MaskMethod(MaskedWeights):
    """Methods whose ``mask`` is rebuilt by mask ops over a pruning era ``(start, end)`` of
    optimizer steps, then frozen (SPEC §5).

    The Sparsifier's target ramps 0 → ``final_sparsity`` over the era (``ramp``: ``"cubic"``,
    SPEC §7, or ``"linear"``) and calls ``update`` after every optimizer step ``t``:
    ``t ≤ start``: nothing (mask all True); ``start < t ≤ end``: each mask is rebuilt from the
    current weights at the target, ANDed with the old one; ``t > end``: frozen. From ``t > start``
    the pruned weights are also zeroed in place each step, undoing what momentum and weight decay
    did to them in ``optimizer.step()``: a pruned weight stays exactly 0 and, being the smallest
    magnitude, stays pruned.
    """

    def __init__(self, final_sparsity: float, era, ramp: str):
        if era is None:
            raise ValueError(f"method {self.name!r} needs era=(start_step, end_step), the pruning era in optimizer steps")
        self.era = _check_era(era)
        if ramp not in RAMPS:
            raise ValueError(f"ramp must be one of {tuple(RAMPS)}, got {ramp!r}")
        self.ramp = ramp
        self.final_sparsity = final_sparsity

    def select(self, layers: list[tuple[str, "SparseWeight"]]) -> None:
        """Called by ``sparsify`` with the chosen ``(name, SparseWeight)`` pairs before any state
        exists (nothing here; STARFIRE resolves ``fc_inputs``)."""

    @abstractmethod
    def masks(self, weights: list[Tensor], sparsity: float) -> list[Tensor]:
        """One bool keep-mask per weight (same shape) at target ``sparsity`` in (0, 1]."""

    def init_state(self, layer) -> None:
        super().init_state(layer)
        if self.final_sparsity > 0:  # a shape or option the mask op refuses fails now, not at the era
            self.masks([layer.weight.detach()], self.final_sparsity)

    def sharded_masks(self, layers: list, sparsity: float, group) -> list[Tensor]:
        """``masks`` of FSDP2-sharded layers (``Shard(0)`` DTensors), whole and the same on every
        rank. This default gathers each weight (``full_tensor``); methods whose groups are
        shard-local compute on the local rows and gather only the masks (or small scores)."""
        return [m for layer in layers for m in self.masks([_canonical(layer, layer.param.full_tensor())], sparsity)]

    @torch.no_grad()
    def update(self, layers: list, step: int, sparsity: float) -> None:
        """After optimizer step ``step`` with target ``sparsity``: rebuild (in the era) and apply the masks.

        From ``step > start`` a NaN weight raises ``FloatingPointError`` naming the layer on CPU
        (where reading the flag is free), before anything changes, as the magnitude methods'
        thresholds do. Elsewhere nothing is read back (no host sync): the masks rank NaN above
        every number, so a NaN weight stays kept and shows in the forward.
        """
        start, end = self.era
        if step <= start:
            return
        group = layers[0].param.device_mesh.get_group() if distributed.is_dtensor(layers[0].param) else None
        local = [layer.param.to_local() if group is not None else layer.weight for layer in layers]
        if local[0].device.type == "cpu":
            nan = [bool(torch.isnan(w).any()) for w in local]
            if group is not None:  # FSDP2: every rank raises together (one all_reduce of the flags)
                nan = distributed.any_rank_each(nan, local[0].device, group)
            for layer, bad in zip(layers, nan):
                if bad:
                    raise FloatingPointError(f"weight {layer.name!r} contains NaN: its mask is undefined "
                                             f"(step {step}; nothing was changed)")
        if step <= end and sparsity > 0:
            self.zero_pruned(layers)  # score pruned weights as 0, not where the optimizer moved them
            masks = (self.sharded_masks(layers, sparsity, group) if group is not None
                     else self.masks([m.weight for m in layers], sparsity))
            for layer, mask in zip(layers, masks):
                layer.mask &= mask
            self.link_masks(layers)
        self.zero_pruned(layers)

    def link_masks(self, layers: list) -> None:
        """After each rebuild in the era: adjust masks that depend on other layers' (none here)."""

    def schedule(self):
        """The target over optimizer steps: ``ramp`` from 0 to ``final_sparsity`` over the era."""
        return RAMPS[self.ramp](*self.era, self.final_sparsity)

    def options(self) -> dict:
        return {"era": self.era, "ramp": self.ramp}
