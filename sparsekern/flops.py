"""Parameter and FLOP accounting as the papers count (SPEC §8): ``count_flops(model, input_size)``."""
import math
import numbers
import types
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .nn import SparseLayer

#: Layers whose weights are counted (SparseConv2d / SparseLinear are subclasses).
_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
#: Average pools and their number of spatial dims; global ones (one output per channel) are counted.
_POOLS = {nn.AdaptiveAvgPool1d: 1, nn.AvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AvgPool2d: 2,
          nn.AdaptiveAvgPool3d: 3, nn.AvgPool3d: 3}


@dataclass(frozen=True)
class LayerFlops:
    """One row of a ``FlopReport``. ``shape``: the weight's shape (a pool: its input ``(C, H, W)``).
    ``params``/``nonzero``: weight elements / nonzero ones (biases are not counted; a pool has 0).
    ``dense_macs``/``macs``: multiply-accumulates per image, dense / scaled by the weight density."""

    name: str
    type: str
    shape: tuple[int, ...]
    params: int
    nonzero: int
    dense_macs: int
    macs: int


@dataclass(frozen=True)
class FlopReport:
    """``count_flops`` result: per-layer ``rows`` and their totals (SPEC §8)."""

    rows: tuple[LayerFlops, ...]

    @property
    def params(self) -> int:
        """Prunable weights (Conv/Linear weights; not biases, not norms): the papers' parameter count."""
        return sum(r.params for r in self.rows)

    @property
    def nonzero_params(self) -> int:
        return sum(r.nonzero for r in self.rows)

    @property
    def dense_macs(self) -> int:
        return sum(r.dense_macs for r in self.rows)

    @property
    def macs(self) -> int:
        return sum(r.macs for r in self.rows)

    def __str__(self) -> str:
        lines = [f"{'layer':<32} {'type':<18} {'params':>12} {'nonzero':>12} {'dense MACs':>15} {'MACs':>15}"]
        lines += [f"{r.name:<32} {r.type:<18} {r.params:>12,} {r.nonzero:>12,} {r.dense_macs:>15,} {r.macs:>15,}"
                  for r in self.rows]
        lines.append(f"{'total':<51} {self.params:>12,} {self.nonzero_params:>12,} {self.dense_macs:>15,} "
                     f"{self.macs:>15,}")
        return "\n".join(lines)


def _check_input_size(input_size) -> tuple[int, ...]:
    if isinstance(input_size, numbers.Integral):
        input_size = (input_size,)
    try:
        size = tuple(input_size)
    except TypeError:
        raise TypeError(f"input_size must be a sequence of ints, got {type(input_size).__name__}") from None
    if not size or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and d > 0 for d in size):
        raise ValueError(f"input_size must be positive ints (one sample, no batch dim), got {input_size!r}")
    return tuple(int(d) for d in size)


@torch.no_grad()
def count_flops(model: nn.Module, input_size: Sequence[int] | int, *, count_pool: bool = True) -> FlopReport:
    """Parameters and multiply-accumulates per image of ``model`` (SPEC §8).

    input_size: one sample's shape without the batch dim, e.g. ``(3, 224, 224)`` or, for a
      Linear model, ``(seq, features)``. The forward runs once on the meta device with batch 1
      (shapes only, no compute, ``model`` untouched; sparse layers run their dense forward there).
    Counted: Conv1d/2d/3d ``K_out·(C_in/groups)·R·S·H_out·W_out`` (stride, padding, dilation,
      groups all enter through the output shape), Linear ``in·out`` per output row (rows = the
      product of the leading dims, batch excluded), each per call (a module run twice counts
      twice); ``macs`` scales each by its weight density: exact zeros of the *effective* weight
      for sparse layers, of ``weight`` otherwise (weights on the meta device count as dense).
      With ``count_pool``, a global average pool (``AvgPool``/``AdaptiveAvgPool`` with a 1-element
      output per channel) adds ``C·H·W`` of its input to both ``dense_macs`` and ``macs``.
      Nothing else is counted (no biases, norms, activations, functional ops).
    ResNet-50 at 224: 25,502,912 params, 4,089,284,608 dense MACs, the papers' totals. MobileNetV1:
      4,209,088 params and 568,790,528; the published 568,740,352 (STR, Table 8) leaves out the
      50,176 of the pool that the same table lists (``count_pool=False`` gives it).
    """
    size = _check_input_size(input_size)
    first = next(iter(model.parameters()), None)
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    counted = {}  # id → (name, module, spatial dims: None for Conv/Linear, else the pool's)
    for name, m in model.named_modules():
        if isinstance(m, _WEIGHTED):
            counted[id(m)] = (name, m, None)
        elif count_pool and type(m) in _POOLS:
            counted[id(m)] = (name, m, _POOLS[type(m)])
    positions = dict.fromkeys(counted, 0)  # Conv/Linear: output positions per image; pool: input elements
    pool_inputs = {}  # id → the pool's input shape (C, H, W…) when it pooled globally

    def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
        key = id(module)
        dims = counted[key][2]
        if isinstance(module, nn.Linear):
            positions[key] += out.numel() // max(out.shape[-1], 1)
        elif dims is None:
            positions[key] += math.prod(out.shape[2:])
        elif math.prod(out.shape[-dims:]) == 1:
            pool_inputs[key] = tuple(args[0].shape[1:])
            positions[key] += args[0].numel()

    meta = {k: torch.empty_like(v, device="meta") for k, v in (*model.named_parameters(), *model.named_buffers())}
    handles = [m.register_forward_hook(hook) for _, m, _ in counted.values()]
    sparse = [m for _, m, _ in counted.values() if isinstance(m, SparseLayer)]
    for m in sparse:  # same output shapes without the threshold op (its checks read values)
        m.forward = types.MethodType(m._dense_cls.forward, m)
    try:
        torch.func.functional_call(model, meta, (torch.empty((1, *size), dtype=dtype, device="meta"),))
    finally:
        for m in sparse:
            del m.forward
        for h in handles:
            h.remove()

    rows = []
    for key, (name, m, dims) in counted.items():
        if dims is None:
            w = m.effective_weight() if isinstance(m, SparseLayer) else m.weight
            nonzero = w.numel() if w.is_meta else int(torch.count_nonzero(w))
            rows.append(LayerFlops(name, type(m).__name__, tuple(m.weight.shape), m.weight.numel(), nonzero,
                                   m.weight.numel() * positions[key], nonzero * positions[key]))
        elif key in pool_inputs:
            rows.append(LayerFlops(name, type(m).__name__, pool_inputs[key], 0, 0, positions[key], positions[key]))
    return FlopReport(tuple(rows))
