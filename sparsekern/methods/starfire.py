"""STARFIRE structured pruning: masks rebuilt over a pruning era, then frozen (SPEC §5, §7)."""
import math

import torch
from torch import Tensor

from .. import reference
from ..ops import block_mask, ck_mask, distributed, intra_mask, magnitude_thresholds, prune_fc_inputs, window_mask
from .base import MaskMethod, local_rows

CONV_PATTERNS = ("intra", "window", "ck")
FC_PATTERNS = ("fine", "block")


def _keep_one_per_row(mask: Tensor, w: Tensor) -> Tensor:
    """``mask`` with every output row (dim 0) that kept nothing keeping its largest ``|w|`` (first
    on ties): SPEC §5's FC rule. No host sync."""
    flat = mask.flatten(1)
    empty = ~flat.any(1, keepdim=True)
    top = w.detach().abs().flatten(1).argmax(1, keepdim=True)
    return (flat | torch.zeros_like(flat).scatter_(1, top, empty)).view_as(mask)


class Starfire(MaskMethod):
    """STARFIRE (SPEC §5): per-layer structured magnitude masks at the ramped target sparsity.

    Conv2d with a kernel larger than 1×1 (``[K_out, C_in/groups, R, S]``; 3×3 in ResNets) gets
    ``conv3x3``: ``"intra"`` (``intra_mask``; options ``window_fraction``, default 0.5, and
    ``ck_group``), ``"window"`` (``window_mask``; option ``max_nonzero``) or ``"ck"``
    (``ck_mask``; option ``ck_group``: ``"in"``, the paper's Algorithm 1 and the default, or
    ``"out"``). 1×1 Conv2d and Linear (as ``[out, in]``) get ``fc``: ``"fine"`` (``|w| > t``,
    ``t`` each layer's exact quantile from one ``magnitude_thresholds`` call, plus the rule
    that every output row keeps its largest ``|w|``) or ``"block"`` (``block_mask``,
    ``block×block`` blocks, ``block`` in 1…4 required; it keeps every output row alive itself).
    An option that does not apply to the chosen pattern is a ValueError, not silently ignored.

    ``fc_inputs={fc_name: conv_name}`` (SPEC §5 FC-input pruning; the graph is not traced, so the
    mapping is explicit): after every rebuild the Linear ``fc_name`` also drops the inputs fed by
    dead output channels of the Conv2d ``conv_name`` (all its kernels pruned), via
    ``prune_fc_inputs`` (inputs = ``flatten`` of ``[N, K, H, W]``, or ``K`` after a global
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
            prune_fc_inputs(layers[index[conv]][1].weight.detach(), layers[index[fc]][1].weight.detach())
            pairs.append((index[fc], index[conv]))
        self._fc_pairs = pairs

    @classmethod
    def from_options(cls, final_sparsity, **options) -> "Starfire":
        if final_sparsity is None:
            raise ValueError("method 'starfire' needs a target: pass sparsity=")
        return cls(final_sparsity, **options)

    def _conv_mask(self, w: Tensor, sparsity: float) -> Tensor:
        if self.conv3x3 == "window":
            return window_mask(w, sparsity, max_nonzero=self.max_nonzero)
        if self.conv3x3 == "ck":
            return ck_mask(w, sparsity, group=self.ck_group)
        return intra_mask(w, sparsity, window_fraction=self.window_fraction, group=self.ck_group)

    def masks(self, weights: list[Tensor], sparsity: float) -> list[Tensor]:
        out: list[Tensor | None] = [None] * len(weights)
        fine = []
        for i, w in enumerate(weights):
            if w.dim() == 4 and w.shape[2] * w.shape[3] > 1:
                out[i] = self._conv_mask(w, sparsity)
            elif self.fc == "block":
                out[i] = block_mask(w.flatten(1), self.block, sparsity).view_as(w)
            else:
                fine.append(w)
        if fine:
            ts = magnitude_thresholds(fine, sparsity, check_nan=fine[0].device.type == "cpu")
            kept = iter(_keep_one_per_row(w.abs().float() > t, w) for w, t in zip(fine, ts.unbind()))
            out = [m if m is not None else next(kept) for m in out]
        return out

    def _sharded_conv_mask(self, w: Tensor, off: int, rows: int, sparsity: float, group) -> Tensor:
        """This rank's rows of ``_conv_mask`` of the whole weight (``w``: its local rows from
        ``off``). Windows, and CK groups per output filter, lie in one row; CK groups per input
        channel span the rows: only the ``[K, C]`` kernel scores (max kept |w|) are gathered."""
        k, c, r, s = w.shape
        if self.conv3x3 == "window" or self.ck_group == "out":
            return self._conv_mask(w, sparsity) if k else w.new_zeros(w.shape, dtype=torch.bool)
        if self.conv3x3 == "ck":
            window, s_ck = 0.0, sparsity
        else:
            window = self.window_fraction * sparsity
            s_ck = reference.intra_ck_sparsity(r * s, sparsity, self.window_fraction)
        wm = window_mask(w, window) if k else w.new_zeros(w.shape, dtype=torch.bool)
        a = w.float().abs()
        score = torch.where(wm, a, 0.0).amax((2, 3)) if r * s else a.new_zeros(k, c)
        score = distributed.gather_rows(score, rows, group)  # [K, C] over all ranks
        alive = reference.keep_top(score.t(), rows - reference.spec_round(rows * s_ck)).t()
        return wm & alive[off:off + k, :, None, None]

    def sharded_masks(self, layers: list, sparsity: float, group) -> list[Tensor]:
        """Per-row patterns (windows, CK per output filter, N:M-like FC rows) on the local rows;
        CK per input channel from gathered kernel scores; ``fine``'s thresholds exact over the
        shards (``ops.distributed``); ``block`` (blocks may straddle shards) gathers the weight.
        Only masks (and scores) travel, except for ``block``."""
        out: list[Tensor | None] = [None] * len(layers)
        fine = []
        for i, layer in enumerate(layers):
            local = local_rows(layer)
            w = layer.weight  # canonical DTensor (shape only)
            if local is None or (w.dim() != 4 and self.fc == "block"):
                out[i] = super().sharded_masks([layer], sparsity, group)[0]
                continue
            lw, off, rows = local
            if w.dim() == 4 and w.shape[2] * w.shape[3] > 1:
                mask = self._sharded_conv_mask(lw, off, rows, sparsity, group)
                out[i] = distributed.gather_rows(mask, rows, group)
            else:
                fine.append((i, lw, rows))
        if fine:
            numels = [layers[i].weight.numel() for i, _, _ in fine]
            ts = distributed.magnitude_thresholds([lw for _, lw, _ in fine], numels, sparsity, group=group)
            for (i, lw, rows), t in zip(fine, ts.unbind()):
                kept = (_keep_one_per_row(lw.abs().float() > t, lw) if lw.shape[0]
                        else lw.new_zeros(lw.shape, dtype=torch.bool))
                out[i] = distributed.gather_rows(kept, rows, group)
        return out

    def link_masks(self, layers: list) -> None:
        for fc, conv in self._fc_pairs:
            w = layers[fc].weight
            if distributed.is_dtensor(w):  # FSDP2 shard: prune_fc_inputs reads only the FC's shape
                w = torch.zeros(w.shape, dtype=w.dtype)
            layers[fc].mask &= prune_fc_inputs(layers[conv].mask, w)

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
