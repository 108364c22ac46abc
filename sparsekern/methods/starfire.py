"""STARFIRE structured pruning and N:M: masks rebuilt over a pruning era, then frozen (SPEC §5, §7)."""
import math
import numbers
from abc import abstractmethod

import torch
from torch import Tensor

import sparsekern as sk

from .base import Method

RAMPS = ("cubic", "linear")
CONV_PATTERNS = ("intra", "window", "ck")
FC_PATTERNS = ("fine", "block")


def _round(x: float) -> int:
    """SPEC §5's ``round``: ``floor(x + 0.5)``."""
    return math.floor(x + 0.5)


def _check_era(era) -> tuple[int, int]:
    if not (isinstance(era, (tuple, list)) and len(era) == 2
            and all(isinstance(e, numbers.Integral) and not isinstance(e, bool) for e in era)
            and 0 <= era[0] < era[1]):
        raise ValueError(f"era must be (start_step, end_step), integers with 0 <= start_step < end_step, got {era!r}")
    return int(era[0]), int(era[1])


def _keep_one_per_row(mask: Tensor, w: Tensor) -> Tensor:
    """``mask`` with every output row (dim 0) that kept nothing keeping its largest ``|w|`` (first
    on ties): SPEC §5's FC rule. No host sync."""
    flat = mask.flatten(1)
    empty = ~flat.any(1, keepdim=True)
    top = w.detach().abs().flatten(1).argmax(1, keepdim=True)
    return (flat | torch.zeros_like(flat).scatter_(1, top, empty)).view_as(mask)


class MaskMethod(Method):
    """Methods whose layers carry a persistent bool buffer ``mask`` (shape of ``weight``), rebuilt
    by mask ops over a pruning era ``(start, end)`` of optimizer steps, then frozen (SPEC §5).

    The Sparsifier's target ramps 0 → ``final_sparsity`` over the era (``ramp``: ``"cubic"``,
    SPEC §7, or ``"linear"``) and calls ``update`` after every optimizer step ``t``:
    ``t ≤ start``: nothing (mask all True); ``start < t ≤ end``: each mask is rebuilt from the
    current weights at the target, ANDed with the old one; ``t > end``: frozen. From ``t > start``
    the pruned weights are also zeroed in place each step, undoing what momentum and weight decay
    did to them in ``optimizer.step()``: a pruned weight stays exactly 0 and, being the smallest
    magnitude, stays pruned. Forward ``sk.masked_weight(weight, mask)``: pruned weights are zero
    in the forward and get zero gradient (no straight-through).
    """

    def __init__(self, final_sparsity: float, era, ramp: str):
        if era is None:
            raise ValueError(f"method {self.name!r} needs era=(start_step, end_step), the pruning era in optimizer steps")
        self.era = _check_era(era)
        if ramp not in RAMPS:
            raise ValueError(f"ramp must be one of {RAMPS}, got {ramp!r}")
        self.ramp = ramp
        self.final_sparsity = final_sparsity

    def select(self, layers: list[tuple[str, "SparseWeight"]]) -> None:
        """Called by ``sparsify`` with the chosen ``(name, SparseWeight)`` pairs before any state
        exists (nothing here; STARFIRE resolves ``fc_inputs``)."""

    @abstractmethod
    def masks(self, weights: list[Tensor], sparsity: float) -> list[Tensor]:
        """One bool keep-mask per weight (same shape) at target ``sparsity`` in (0, 1]."""

    def init_state(self, layer) -> None:
        layer.register_buffer("mask", torch.ones(layer.weight.shape, dtype=torch.bool, device=layer.weight.device))
        if self.final_sparsity > 0:  # a shape or option the mask op refuses fails now, not at the era
            self.masks([layer.weight.detach()], self.final_sparsity)

    def sparse_weight(self, layer) -> Tensor:
        return sk.masked_weight(layer.weight, layer.mask)

    @torch.no_grad()
    def update(self, layers: list, step: int, sparsity: float) -> None:
        """After optimizer step ``step`` with target ``sparsity``: rebuild (in the era) and apply the masks."""
        start, end = self.era
        if step <= start:
            return
        if step <= end and sparsity > 0:
            for layer in layers:  # score pruned weights as 0, not where the optimizer moved them
                layer.weight.masked_fill_(~layer.mask, 0)
            for layer, mask in zip(layers, self.masks([m.weight for m in layers], sparsity)):
                layer.mask &= mask
            self.link_masks(layers)
        for layer in layers:
            layer.weight.masked_fill_(~layer.mask, 0)

    def link_masks(self, layers: list) -> None:
        """After each rebuild in the era: adjust masks that depend on other layers' (none here)."""

    def options(self) -> dict:
        return {"era": self.era, "ramp": self.ramp}


class Starfire(MaskMethod):
    """STARFIRE (SPEC §5): per-layer structured magnitude masks at the ramped target sparsity.

    Conv2d with a kernel larger than 1×1 (``[K_out, C_in/groups, R, S]``; 3×3 in ResNets) gets
    ``conv3x3``: ``"intra"`` (``sk.intra_mask``; options ``window_fraction``, default 0.5, and
    ``ck_group``), ``"window"`` (``sk.window_mask``; option ``max_nonzero``) or ``"ck"``
    (``sk.ck_mask``; option ``ck_group``: ``"in"``, the paper's Algorithm 1 and the default, or
    ``"out"``). 1×1 Conv2d and Linear (as ``[out, in]``) get ``fc``: ``"fine"`` (``|w| > t``,
    ``t`` each layer's exact quantile from one ``sk.magnitude_thresholds`` call, plus the rule
    that every output row keeps its largest ``|w|``) or ``"block"`` (``sk.block_mask``,
    ``block×block`` blocks, ``block`` in 1…4 required; it keeps every output row alive itself).
    An option that does not apply to the chosen pattern is a ValueError, not silently ignored.

    ``fc_inputs={fc_name: conv_name}`` (SPEC §5 FC-input pruning; the graph is not traced, so the
    mapping is explicit): after every rebuild the Linear ``fc_name`` also drops the inputs fed by
    dead output channels of the Conv2d ``conv_name`` (all its kernels pruned), via
    ``sk.prune_fc_inputs`` (inputs = ``flatten`` of ``[N, K, H, W]``, or ``K`` after a global
    pool). Both must be sparsified layers. A channel that a bias or BatchNorm keeps non-zero still
    counts as dead: map only convs whose dead channels really output 0.
    """

    name = "starfire"

    def __init__(self, sparsity: float, era=None, ramp: str = "cubic", conv3x3: str = "intra", fc: str = "fine",
                 block: int | None = None, window_fraction: float | None = None, max_nonzero: int | None = None,
                 ck_group: str | None = None, fc_inputs: dict[str, str] | None = None):
        if conv3x3 not in CONV_PATTERNS:
            raise ValueError(f"conv3x3 must be one of {CONV_PATTERNS}, got {conv3x3!r}")
        if fc not in FC_PATTERNS:
            raise ValueError(f"fc must be one of {FC_PATTERNS}, got {fc!r}")
        for option, value, applies, where in [
                ("window_fraction", window_fraction, conv3x3 == "intra", "conv3x3='intra'"),
                ("max_nonzero", max_nonzero, conv3x3 == "window", "conv3x3='window'"),
                ("ck_group", ck_group, conv3x3 != "window", "conv3x3='ck' or 'intra'"),
                ("block", block, fc == "block", "fc='block'")]:
            if value is not None and not applies:
                raise ValueError(f"starfire: {option}= applies only with {where}")
        if fc == "block" and block is None:
            raise ValueError("starfire: fc='block' needs block=n (n×n blocks, n < 5 in the paper)")
        self.conv3x3, self.fc, self.block = conv3x3, fc, block
        self.window_fraction = 0.5 if window_fraction is None else window_fraction
        self.max_nonzero = max_nonzero
        self.ck_group = "in" if ck_group is None else ck_group
        if fc_inputs is not None and not (isinstance(fc_inputs, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in fc_inputs.items())):
            raise ValueError(f"starfire: fc_inputs must be a dict {{fc_name: conv_name}} of layer names, got {fc_inputs!r}")
        self.fc_inputs = dict(fc_inputs or {})
        self._fc_pairs: list[tuple[int, int]] = []  # (fc, conv) indices into the layer list
        super().__init__(sparsity, era, ramp)

    def unsupported(self, weight: Tensor) -> str | None:
        if weight.dim() not in (2, 4) and math.prod(weight.shape[2:]) > 1:
            return "STARFIRE's conv patterns are defined on R×S kernels (Conv2d); this kernel is not"
        return None

    def select(self, layers: list[tuple[str, "SparseWeight"]]) -> None:
        """Resolves ``fc_inputs`` to positions in ``layers`` (the order ``update`` gets them in)."""
        index = {name: i for i, (name, _) in enumerate(layers)}
        pairs = []
        for fc, conv in self.fc_inputs.items():
            for name, dims, kind in ((fc, 2, "Linear [out, in]"), (conv, 4, "Conv2d [K, C, R, S]")):
                if name not in index:
                    raise ValueError(f"starfire: fc_inputs names {name!r}, not a sparsified layer "
                                     f"(those are {list(index)})")
                if layers[index[name]][1].weight.dim() != dims:
                    raise ValueError(f"starfire: fc_inputs maps a Linear to a Conv2d; {name!r} is not a {kind} "
                                     f"(weight {tuple(layers[index[name]][1].weight.shape)})")
            sk.prune_fc_inputs(layers[index[conv]][1].weight.detach(), layers[index[fc]][1].weight.detach())
            pairs.append((index[fc], index[conv]))
        self._fc_pairs = pairs

    def link_masks(self, layers: list) -> None:
        for fc, conv in self._fc_pairs:
            layers[fc].mask &= sk.prune_fc_inputs(layers[conv].mask, layers[fc].weight)

    @classmethod
    def from_options(cls, final_sparsity, **options) -> "Starfire":
        if final_sparsity is None:
            raise ValueError("method 'starfire' needs a target: pass sparsity=")
        return cls(final_sparsity, **options)

    def _conv_mask(self, w: Tensor, sparsity: float) -> Tensor:
        if self.conv3x3 == "window":
            return sk.window_mask(w, sparsity, max_nonzero=self.max_nonzero)
        if self.conv3x3 == "ck":
            return sk.ck_mask(w, sparsity, group=self.ck_group)
        return sk.intra_mask(w, sparsity, window_fraction=self.window_fraction, group=self.ck_group)

    def masks(self, weights: list[Tensor], sparsity: float) -> list[Tensor]:
        out: list[Tensor | None] = [None] * len(weights)
        fine = []
        for i, w in enumerate(weights):
            if w.dim() == 4 and w.shape[2] * w.shape[3] > 1:
                out[i] = self._conv_mask(w, sparsity)
            elif self.fc == "block":
                out[i] = sk.block_mask(w.flatten(1), self.block, sparsity).view_as(w)
            else:
                fine.append(w)
        if fine:
            ts = sk.magnitude_thresholds(fine, sparsity, check_nan=fine[0].device.type == "cpu")
            kept = iter(_keep_one_per_row(w.abs().float() > t, w) for w, t in zip(fine, ts.unbind()))
            out = [m if m is not None else next(kept) for m in out]
        return out

    def options(self) -> dict:
        opts = {"conv3x3": self.conv3x3, "fc": self.fc}
        if self.conv3x3 == "window":
            opts["max_nonzero"] = self.max_nonzero
        else:
            opts["ck_group"] = self.ck_group
        if self.conv3x3 == "intra":
            opts["window_fraction"] = self.window_fraction
        if self.fc == "block":
            opts["block"] = self.block
        if self.fc_inputs:
            opts["fc_inputs"] = dict(self.fc_inputs)
        return {**opts, **super().options()}


class NM(MaskMethod):
    """N:M (SPEC §5): in every group of ``m`` consecutive weights along the reduction dim (Linear:
    ``in``; Conv2d: ``C_in/groups`` at each ``(k, r, s)``) keep the ``n`` largest ``|w|``;
    final sparsity ``1 − n/m`` (2:4 is what sparse tensor cores run).

    The era ramps the pattern: at target ``s`` each group prunes ``round(m·s)`` weights
    (``sk.nm_mask(w, m − round(m·s), m)``), so 2:4 passes through 3:4 and
    reaches 2:4 at the era's end, then freezes. Layers whose reduction dim is not divisible by
    ``m`` (typically the first conv, ``C_in = 3``) are skipped with a warning and stay dense.
    """

    name = "nm"

    def __init__(self, n: int = 2, m: int = 4, era=None, ramp: str = "cubic"):
        if not (isinstance(n, numbers.Integral) and isinstance(m, numbers.Integral) and not isinstance(n, bool)
                and not isinstance(m, bool) and 0 < n < m):
            raise ValueError(f"nm needs integers 0 < n < m, got n={n!r}, m={m!r}")
        self.n, self.m = int(n), int(m)
        super().__init__(1.0 - self.n / self.m, era, ramp)

    @classmethod
    def from_options(cls, final_sparsity, **options) -> "NM":
        meth = cls(**options)
        if final_sparsity is not None and not math.isclose(final_sparsity, meth.final_sparsity):
            raise ValueError(f"sparsity={final_sparsity} disagrees with {meth.n}:{meth.m} "
                             f"(sparsity {meth.final_sparsity}); leave sparsity out for nm")
        return meth

    def unsupported(self, weight: Tensor) -> str | None:
        if weight.shape[1] % self.m:
            return f"reduction dim (in, C_in/groups) {weight.shape[1]} not divisible by m={self.m}"
        return None

    def masks(self, weights: list[Tensor], sparsity: float) -> list[Tensor]:
        pruned = _round(self.m * sparsity)  # per group of m: 0 … m − n
        return [sk.nm_mask(w, self.m - pruned, self.m) for w in weights]

    def options(self) -> dict:
        return {"n": self.n, "m": self.m, **super().options()}
