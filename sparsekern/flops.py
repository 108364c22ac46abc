"""Parameter and FLOP accounting as the papers count (SPEC §8): ``count_flops(model, input_size)``
for image models, ``count_flops(model, example_inputs=batch)`` for any model (token ids, several inputs)."""
import math
import numbers
from collections import Counter
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map_only
from torch.utils.weak import WeakIdKeyDictionary

from .nn import prunable_weights, raw_weights

aten = torch.ops.aten
#: Matrix products and the position of their first operand ``a``: MACs = ``a.numel()·b.shape[-1]``
#: (``b`` a vector: ``a.numel()``).
_MATMULS = {aten.mm: 0, aten.bmm: 0, aten.mv: 0, aten.addmm: 1, aten.baddbmm: 1, aten.addmv: 1}
#: Average pools and their number of spatial dims; global ones (one output per channel) are counted.
_POOLS = {nn.AdaptiveAvgPool1d: 1, nn.AvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AvgPool2d: 2,
          nn.AdaptiveAvgPool3d: 3, nn.AvgPool3d: 3}
#: Label of the tensors that depend on the inputs (or are the product of a counted op).
_ACT = "<activation>"


@dataclass(frozen=True)
class LayerFlops:
    """One row of a ``FlopReport``. ``shape``: the weight's shape (a pool: its input ``(C, H, W)``;
    attention: ``()``). ``params``/``nonzero``: weight elements / nonzero ones (biases are not counted;
    pools and attention have 0). ``dense_macs``/``macs``: multiply-accumulates per sample, dense /
    scaled by the weight density (``dense_macs·nonzero // params``)."""

    name: str
    type: str
    shape: tuple[int, ...]
    params: int
    nonzero: int
    dense_macs: int
    macs: int


@dataclass(frozen=True)
class FlopReport:
    """``count_flops`` result: per-layer ``rows`` and their totals (SPEC §8). The totals leave out
    the ``"attention"`` rows (products of two activations), summed apart in ``attention_macs``."""

    rows: tuple[LayerFlops, ...]

    @property
    def _weight_rows(self) -> list[LayerFlops]:
        return [r for r in self.rows if r.type != "attention"]

    @property
    def params(self) -> int:
        """Prunable weights (Conv/Linear/attention projections; not biases, not norms, not
        embeddings unless tied to a counted weight): the papers' parameter count."""
        return sum(r.params for r in self._weight_rows)

    @property
    def nonzero_params(self) -> int:
        return sum(r.nonzero for r in self._weight_rows)

    @property
    def dense_macs(self) -> int:
        return sum(r.dense_macs for r in self._weight_rows)

    @property
    def macs(self) -> int:
        return sum(r.macs for r in self._weight_rows)

    @property
    def attention_macs(self) -> int:
        """MACs of the ``"attention"`` rows (QKᵀ and AV per sample), not in ``dense_macs``/``macs``."""
        return sum(r.dense_macs for r in self.rows if r.type == "attention")

    def __str__(self) -> str:
        n = max([32, *(len(r.name) for r in self.rows)])
        t = max([18, *(len(r.type) for r in self.rows)])
        lines = [f"{'layer':<{n}} {'type':<{t}} {'params':>12} {'nonzero':>12} {'dense MACs':>15} {'MACs':>15}"]
        lines += [f"{r.name:<{n}} {r.type:<{t}} {r.params:>12,} {r.nonzero:>12,} {r.dense_macs:>15,} {r.macs:>15,}"
                  for r in self.rows]
        lines.append(f"{'total':<{n + t + 1}} {self.params:>12,} {self.nonzero_params:>12,} {self.dense_macs:>15,} "
                     f"{self.macs:>15,}")
        if self.attention_macs:
            lines.append(f"{'attention (not in total)':<{n + t + 27}} {self.attention_macs:>15,} "
                         f"{self.attention_macs:>15,}")
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


def _check_example_inputs(example_inputs) -> tuple[tuple, dict, int]:
    """``(args, kwargs, batch size)`` of ``example_inputs``."""
    if isinstance(example_inputs, Tensor):
        args, kwargs = (example_inputs,), {}
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    elif isinstance(example_inputs, dict) and all(isinstance(k, str) for k in example_inputs):
        args, kwargs = (), dict(example_inputs)
    else:
        raise TypeError("example_inputs must be a tensor, a tuple of positional inputs or a dict of keyword "
                        f"inputs, got {type(example_inputs).__name__}")
    first = next((t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)), None)
    if first is None or first.dim() == 0 or first.shape[0] == 0:
        raise ValueError("example_inputs needs a tensor with a batch dim (the first dim of the first tensor), got "
                         f"{'no tensor' if first is None else f'shape {tuple(first.shape)}'}")
    return args, kwargs, first.shape[0]


class _MacCounter(TorchDispatchMode):
    """Counts the MACs of every matrix product and convolution by operand (see ``count_flops``).

    ``labels``: tensor → a weight's row name or ``_ACT``. An op's outputs take ``_ACT`` when an
    input has it, else the one weight name among its inputs (views, ``t()``, casts, splits of a
    weight stay that weight), else no label; a counted product is ``_ACT``.
    """

    def __init__(self, labels: WeakIdKeyDictionary, scope: list[str]):
        super().__init__()
        self.labels, self.scope = labels, scope
        self.weights, self.attention = Counter(), Counter()  # row name / module name → MACs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        packet = func.overloadpacket
        label = None
        if packet in _MATMULS or packet is aten.convolution:
            label = self._count(packet, args, out)
        if label is None:
            ins = {self.labels.get(t) for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)} - {None}
            label = _ACT if _ACT in ins else ins.pop() if len(ins) == 1 else None
        for t in tree_leaves(out):
            if isinstance(t, Tensor):
                if label is None:
                    self.labels.pop(t, None)
                else:
                    self.labels[t] = label
        return out

    def _count(self, packet, args: tuple, out: Tensor) -> str | None:
        """Adds a product's MACs to its weight or to attention; ``_ACT`` if counted, else None."""
        if packet is aten.convolution:  # (input, weight, bias, stride, padding, dilation, transposed, …)
            weight = self.labels.get(args[1])
            if weight is None or weight == _ACT:
                return None
            self.weights[weight] += (args[0] if args[6] else out).numel() * math.prod(args[1].shape[1:])
            return _ACT
        i = _MATMULS[packet]
        a, b = args[i], args[i + 1]
        macs = a.numel() * (b.shape[-1] if b.dim() > 1 else 1)
        la, lb = self.labels.get(a), self.labels.get(b)
        weight = next((w for w in (la, lb) if w is not None and w != _ACT), None)
        if weight is not None:
            self.weights[weight] += macs
        elif la == lb == _ACT:
            self.attention[self.scope[-1]] += macs
        else:
            return None
        return _ACT


@torch.no_grad()
def count_flops(model: nn.Module, input_size=None, *, example_inputs=None, count_pool: bool = True) -> FlopReport:
    """Parameters and multiply-accumulates per sample of ``model`` (SPEC §8). Exactly one of:

    input_size: one sample's shape without the batch dim, e.g. ``(3, 224, 224)`` or, for a
      Linear model, ``(seq, features)``; the input is batch 1 of the model's float dtype.
    example_inputs: a real batch: a tensor, a tuple of positional inputs or a dict of keyword
      inputs (``{"input_ids": ids, "attention_mask": am}``; T5: ``{"input_ids": …,
      "decoder_input_ids": …}``), any dtype. Counts are per sample: the totals divided by the batch
      size, taken as the first dim of the first tensor (a sequence-first model: pass batch 1).
    The forward runs once on the meta device under a ``FakeTensorMode``: shapes only, nothing
      computed, ``model`` untouched, sparse weights read raw (``sk.nn.raw_weights``); libraries skip
      their value checks on fake tensors (transformers' masks). Value-dependent code (``.item()``,
      ``nonzero``) cannot run there: the ValueError names the input argument and chains the error.
    Counted by intercepting the ATen ops (a ``TorchDispatchMode``), not by module hooks, so a weight
      counts wherever its tensor is an operand — its module's forward, ``F.linear(x, self.qkv.weight)``
      in a parent, ``nn.MultiheadAttention``'s functional ``in_proj_weight`` and ``out_proj.weight``,
      a tied ``lm_head`` — once per use (a module run twice counts twice). Rows, in module order:
      - one per prunable weight (``sk.nn.prunable_weights``: Linear and subclasses, Conv1d/2d/3d,
        MultiheadAttention's in-projection, transformers' ``Conv1D``), named as the Sparsifier names
        it (``fc``, ``attn.in_proj_weight``), type: its module's class: the MACs of every matrix
        product (mm/addmm/bmm/baddbmm/mv/addmv: ``rows·in·out``) and convolution
        (``K_out·(C_in/groups)·R·S·H_out·W_out``: stride, padding, dilation, groups enter through
        the output shape) with that weight — or a view, cast or split of it — as an operand; an
        unused weight has 0 MACs. ``macs`` scales them by the density of the effective weight
        ``getattr(module, pname)`` (sparse or not; exact zeros; a weight on the meta device is dense);
      - type ``"attention"``, named after the innermost module running it, shape ``()``, no
        params: products of two activations (tensors that depend on the inputs: QKᵀ and AV, SDPA
        running its math path on meta). Only in ``attention_macs``, not in ``dense_macs``/``macs``;
      - with ``count_pool``, a global average pool module (``AvgPool``/``AdaptiveAvgPool`` with a
        1-element output per channel): ``C·H·W`` of its input in both ``dense_macs`` and ``macs``.
      Nothing else: not biases, norms, activations, embedding lookups (a tied embedding's weight
      counts as its ``lm_head``), products with a buffer or a non-prunable parameter.
    ResNet-50 at 224: 25,502,912 params, 4,089,284,608 dense MACs, the papers' totals. MobileNetV1:
      4,209,088 params and 568,790,528; the published 568,740,352 (STR, Table 8) leaves out the
      50,176 of the pool that the same table lists (``count_pool=False`` gives it).
    """
    if (input_size is None) == (example_inputs is None):
        raise TypeError("count_flops takes exactly one of input_size (one sample's shape) and example_inputs "
                        f"(a batch), got {'both' if input_size is not None else 'neither'}")
    if example_inputs is None:
        size = _check_input_size(input_size)
        first = next(iter(model.parameters()), None)
        dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
        args, kwargs, batch = (torch.empty((1, *size), dtype=dtype, device="meta"),), {}, 1
    else:
        args, kwargs, batch = _check_example_inputs(example_inputs)

    weights = prunable_weights(model)
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    tensors, by_param = {}, {}  # functional_call's {name: fake meta tensor}; id(param) → that tensor
    for name, p in (*model.named_parameters(), *model.named_buffers()):
        tensors[name] = by_param[id(p)] = fake.from_tensor(torch.empty_like(p, device="meta"))
    labels = WeakIdKeyDictionary({by_param[id(m._parameters[pname])]: name for name, m, pname, _ in weights})
    args, kwargs = tree_map_only(Tensor, lambda t: fake.from_tensor(t.to("meta")), (args, kwargs))
    labels.update((t, _ACT) for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor))

    scope = []  # names of the modules running, innermost last
    pools = {}  # global pool's name → (its input shape (C, H, W…), input elements of its calls)

    def leave(name: str, module: nn.Module, inputs: tuple, out) -> None:
        scope.pop()
        dims = _POOLS.get(type(module)) if count_pool else None
        if dims is not None and math.prod(out.shape[-dims:]) == 1:
            pools[name] = (tuple(inputs[0].shape[1:]), pools.get(name, ((), 0))[1] + inputs[0].numel())

    modules = dict(model.named_modules())
    handles = []
    for name, m in modules.items():
        handles += [m.register_forward_pre_hook(lambda mod, inputs, name=name: scope.append(name)),
                    m.register_forward_hook(lambda mod, inputs, out, name=name: leave(name, mod, inputs, out))]
    counter = _MacCounter(labels, scope)
    try:
        with raw_weights(), fake, counter:
            torch.func.functional_call(model, tensors, args, kwargs)
    except Exception as e:
        given = (f"input_size={size!r} (input shape {(1, *size)}: one sample, a batch dim added)"
                 if example_inputs is None else "example_inputs")
        raise ValueError(f"count_flops: the model's forward on the meta device failed with {given} (values are "
                         f"unknown there: value-dependent code cannot run): {type(e).__name__}: {e}") from e
    finally:
        for h in handles:
            h.remove()

    order = {id(m): i for i, m in enumerate(modules.values())}
    rows = []  # (module's position in named_modules, row): weights, then attention, then pools
    for name, m, pname, _ in weights:
        p, w = m._parameters[pname], getattr(m, pname)
        nonzero = p.numel() if w.is_meta else int(torch.count_nonzero(w))
        dense = counter.weights[name] // batch
        macs = dense * nonzero // p.numel() if p.numel() else 0
        row = LayerFlops(name, type(m).__name__, tuple(p.shape), p.numel(), nonzero, dense, macs)
        rows.append((order[id(m)], row))
    for name, n in counter.attention.items():
        rows.append((order[id(modules[name])], LayerFlops(name, "attention", (), 0, 0, n // batch, n // batch)))
    for name, (shape, n) in pools.items():
        m = modules[name]
        rows.append((order[id(m)], LayerFlops(name, type(m).__name__, shape, 0, 0, n // batch, n // batch)))
    return FlopReport(tuple(row for _, row in sorted(rows, key=lambda r: r[0])))
