"""Training API: ``sparsify()`` makes a model's weights sparse in place, ``Sparsifier`` drives them per step."""
import gc
import math
import numbers
import os
import sys
import warnings
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from .flops import count_flops
from .losses import AdaptiveSparsityLoss, erf_sparsity
from .methods import ASL, STR, MagnitudeMethod, MaskMethod, Method, method_class
from .methods.base import FixedMask
from .nn import SparseWeight, prunable_weights
from .nn.layers import _State, disable, enable, holders
from .ops import distributed, global_magnitude_threshold, magnitude_thresholds
from .schedules import CubicSchedule, LinearSchedule, check_sparsity  # noqa: F401  (public here too)




class _Whole:
    """A ``SparseWeight`` whose ``weight`` is a given whole tensor (an FSDP2 weight gathered)."""

    def __init__(self, sw: SparseWeight, weight: Tensor):
        self.__dict__.update(_sw=sw, weight=weight)

    def __getattr__(self, name: str):
        return getattr(self.__dict__["_sw"], name)


#: STR/ASL learn their thresholds; every this many steps ``step()`` thresholds each weight once
#: more (no_grad) to warn about layers at 100 % (magnitude methods check every step, from max |w|).
LEARNED_DEAD_CHECK_EVERY = 50


def _check_scope(scope: str | None, method: Method) -> str | None:
    """The scope a Sparsifier for ``method`` runs with (None: the method's default)."""
    if not isinstance(method, MagnitudeMethod):
        return None
    if scope is None:
        return method.default_scope
    if scope not in method.scopes:
        raise ValueError(f"scope must be one of {method.scopes} for method {method.name!r}, got {scope!r}")
    return scope


class Sparsifier:
    """Drives the sparse weights of one model; returned by ``sparsify()``.

    Call ``step()`` after every ``optimizer.step()``. Checkpoint ``state_dict()`` next to the
    model's and the optimizer's (thresholds live in the model's state_dict), and resume is exact.
    ``layers``: ``{name: SparseWeight}`` (canonical ``weight``, the method's state,
    ``effective_weight()``). ``dense``: ``{name: reason}`` of the prunable weights left dense
    (excluded, or a kind the method cannot prune). ``scope``: see ``sparsify()``; None for
    learned-threshold methods (STR, ASL). ``scales``: each layer's ``c_l`` in the global quantile
    (None unless ``scope="global"``). ``sparsity_loss``: ASL's loss over the layers' ``r``
    (``loss()``), else None.
    """

    def __init__(self, model: nn.Module, method: Method, layers: dict[str, SparseWeight],
                 schedule: Callable[[int], float] | None, final_sparsity: float | None, scope: str | None = None,
                 sparsity_loss: AdaptiveSparsityLoss | None = None, *, min_density: float | None = None,
                 dense: dict[str, str] | None = None, dense_weights: dict[str, Tensor] | None = None,
                 holders: dict[str, list[tuple[nn.Module, str]]] | None = None):
        self.scope = _check_scope(scope, method)
        self.model, self.method, self.layers = model, method, layers
        self.sparsity_loss = sparsity_loss
        #: ASL's ``r`` Parameters by layer name (kept after ``finalize()`` for the modelled sparsity)
        self.r = {name: m.r for name, m in layers.items()} if isinstance(method, ASL) else {}
        self.schedule, self.final_sparsity = schedule, final_sparsity
        self.scales = [method.scale(m) for m in layers.values()] if self.scope == "global" else None
        self.min_density = min_density
        self.dense = dict(dense or {})
        self._dense_weights = dict(dense_weights or {})
        self._holders = holders or {name: [(sw.module, sw.pname)] for name, sw in layers.items()}
        self.step_count = 0
        self._finalized = self._frozen = False
        self._dead: set[str] = set()  # layers already warned about (100 % sparse)
        self._pending = None  # (flags on the host, CUDA event) of the last step's dead-layer check
        self._sharded_key = None  # ids of the FSDP2-sharded Parameters last validated (_shard_group)
        self._grad_hooks: list = []  # replicated_params(): gradient averaging of STR's s / ASL's r
        self._update(0)

    def target(self, step: int | None = None) -> float | None:
        """Target sparsity at ``step`` (default: now); ASL: the requested sparsity (``sparsify``'s
        ``sparsity``); None for STR, which learns it. STARFIRE/N:M: the ramp over the pruning era."""
        if not isinstance(self.method, (MagnitudeMethod, MaskMethod)):
            return self.final_sparsity
        step = self.step_count if step is None else step
        if self.schedule is None:
            return self.final_sparsity
        return check_sparsity(self.schedule(step), f"schedule({step})")

    def step(self) -> None:
        """Advance one optimizer step and recompute the thresholds from the updated weights:
        one selection call over all layers, results copied into the ``threshold`` buffers on
        the weights' device. No host sync (unless ``min_density`` is set), so on accelerators a
        NaN weight is not raised here: it makes the thresholds NaN (on CPU: ``FloatingPointError``
        naming its index in ``layers``). STARFIRE/N:M (``MaskMethod.update``): masks rebuilt in the
        era, frozen after it, pruned weights zeroed in place (so call it after every
        ``optimizer.step()``); after ``freeze()``: pruned weights zeroed in place. A step that
        raises leaves the Sparsifier at the step it was."""
        if self._finalized:
            raise RuntimeError("Sparsifier.step() after finalize()")
        self._update(self.step_count + 1)
        self.step_count += 1

    @torch.no_grad()
    def _update(self, step: int) -> None:
        layers = list(self.layers.values())
        group = self._shard_group()
        if self._frozen:
            FixedMask.zero_pruned(layers)
            return
        if isinstance(self.method, MaskMethod):
            self.method.update(layers, step, self.target(step))
            return
        if not isinstance(self.method, MagnitudeMethod):  # STR, ASL: learned thresholds
            if step % LEARNED_DEAD_CHECK_EVERY == 0:
                self._check_dead(torch.stack([~(self._full_effective(sw) != 0).any() & (sw.param.numel() > 0)
                                              for sw in layers]))
            return
        weights = [sw.param for sw in layers]  # FSDP2: DTensors; the selections run over the shards
        s = self.target(step)                   # (ops.distributed: the weights never travel)
        check_nan = weights[0].device.type == "cpu"  # reading the NaN flag back is free only there
        if s == 0.0:  # t = 0 keeps every nonzero (the quantile would prune the smallest |w|)
            thresholds = [torch.zeros((), dtype=torch.float32, device=w.device) for w in weights]
        elif self.scope == "global":
            thresholds = self._global_thresholds(weights, s, check_nan)
        else:
            levels = s if self.min_density is None else [min(s, f) for f in self._floor_levels(weights)]
            thresholds = magnitude_thresholds(weights, levels, check_nan=check_nan).unbind()
        for sw, t in zip(layers, thresholds):
            self.method.set_threshold(sw, t)
        if s > 0.0:  # a layer is dead when its largest |w| is at or below its threshold
            if group is None:
                top = torch._foreach_norm([w.detach() for w in weights], float("inf"))
            else:  # the largest |w| of every rank's shard (one all_reduce of a float per layer)
                local = [w.to_local().detach() for w in weights]
                top = torch.stack([w.abs().amax().float() if w.numel() else w.new_zeros((), dtype=torch.float32)
                                   for w in local])
                torch.distributed.all_reduce(top, op=torch.distributed.ReduceOp.MAX, group=group)
            self._check_dead(torch.stack([(a.float() <= t) & (w.numel() > 0)
                                          for a, t, w in zip(top, thresholds, weights)]))

    def _shard_group(self):
        """The process group of the FSDP2-sharded weights, or None when no weight is a DTensor.
        Validated whenever the sharded Parameters change: all sparse weights sharded, by
        ``fully_shard`` as ``Shard(0)`` on a 1-D mesh (tensor parallel is refused, naming the
        weight), learned thresholds (STR's s, ASL's r) managed by FSDP2 or ``replicated_params()``."""
        params = [sw.param for sw in self.layers.values()]
        sharded = [distributed.is_dtensor(p) for p in params]
        if not any(sharded):
            from torch.distributed.fsdp import FSDPModule
            if isinstance(self.model, FSDPModule) or any(isinstance(sw.module, FSDPModule)
                                                         for sw in self.layers.values()):
                raise RuntimeError("the sparse weights are unsharded (inside FSDP2's unshard() or a forward): "
                                   "what this call writes would not reach the shards; call it with the "
                                   "parameters sharded (after optimizer.step())")
            return None
        key = tuple(id(p) for p in params)
        if key != self._sharded_key:
            fsdp = distributed.fsdp_params(self.model)
            for name, sw in self.layers.items():
                if distributed.is_dtensor(sw.param):
                    distributed.check_sharded(name, sw.param, fsdp)
            plain = [name for name, d in zip(self.layers, sharded) if not d]
            if plain:
                raise ValueError(f"some sparse weights are sharded (FSDP2) and these are not: {plain}; "
                                 "fully_shard every sparsified layer (e.g. fully_shard the root module too)")
            hooked = {id(p) for p in self._learned_params()} if self._grad_hooks else set()
            loose = [name for name, p in zip(self.layers, self._learned_params()) if id(p) not in fsdp | hooked]
            if loose:
                raise RuntimeError(f"the learned thresholds of {loose} ({self.method.name}) are neither sharded by "
                                   "FSDP2 nor synchronised: pass sparsifier.replicated_params() to "
                                   "fully_shard(..., ignored_params=...) (it also averages their gradients)")
            self._sharded_key = key
        return params[0].device_mesh.get_group()

    def _learned_params(self) -> list[nn.Parameter]:
        """STR's ``s`` / ASL's ``r`` of every layer (layer order); empty for the other methods."""
        state = "s" if isinstance(self.method, STR) else "r" if isinstance(self.method, ASL) else None
        return [getattr(sw, state) for sw in self.layers.values()] if state and not self._frozen else []

    def replicated_params(self, group=None) -> set[nn.Parameter]:
        """STR's ``s`` / ASL's ``r`` Parameters for ``fully_shard(..., ignored_params=...)``
        (FSDP2 cannot shard 0-d Parameters): they stay whole on every rank, and from this call on
        each one's gradient is averaged over ``group`` (default: all ranks) after every backward
        (one all_reduce per Parameter), so they stay identical on every rank. Empty for the other
        methods. Call it on every rank, after ``sparsify`` and before training."""
        params = self._learned_params()
        if params and not self._grad_hooks:
            world = torch.distributed.get_world_size(group)

            def average(p: Tensor) -> None:
                torch.distributed.all_reduce(p.grad, group=group)
                p.grad.div_(world)
            self._grad_hooks = [p.register_post_accumulate_grad_hook(average) for p in params]
        return set(params)

    def _full_effective(self, sw: SparseWeight) -> Tensor:
        """``sw.effective_weight()`` (canonical layout, no grad); of an FSDP2-sharded weight computed
        from its gathered whole (``full_tensor``, one weight at a time: reporting and rare checks)."""
        if not distributed.is_dtensor(sw.param):
            return sw.effective_weight().detach()
        full = sw.param.full_tensor().detach()
        return sw.method.sparse_weight(_Whole(sw, full.t() if sw.transposed else full)).detach()

    def _global_thresholds(self, weights: list[Tensor], s: float, check_nan: bool) -> list[Tensor]:
        """``t_l = T / c_l`` with ``T`` the exact global quantile; with ``min_density = d``, layers
        that ``T`` would leave with fewer than ``ceil(d·n_l)`` weights are held at the threshold
        keeping exactly that many, and ``T`` is the quantile of the others at the sparsity that
        keeps the model-wide target (repeated until no layer falls below: each round only adds
        held layers)."""
        scales = self.scales
        T = lambda idx, q: global_magnitude_threshold([weights[i] for i in idx], q,  # noqa: E731
                                                         scales=[scales[i] for i in idx], check_nan=check_nan)
        if self.min_density is None:
            t = T(range(len(weights)), s)
            return [t if c == 1.0 else t / c for c in scales]
        floor = magnitude_thresholds(weights, self._floor_levels(weights), check_nan=check_nan)
        floor_host = floor.tolist()
        n = [w.numel() for w in weights]
        kept = [math.ceil(self.min_density * k) for k in n]
        held: set[int] = set()
        while True:
            rest = [i for i in range(len(weights)) if i not in held]
            if not rest:
                return list(floor.unbind())
            q = (s * sum(n) - sum(n[i] - kept[i] for i in held)) / sum(n[i] for i in rest)
            if q >= 1.0:
                held.update(rest)
                continue
            t = T(rest, max(q, 0.0))
            t_host = t.item()
            new = [i for i in rest if t_host / scales[i] > floor_host[i]]
            if not new:
                out = list(floor.unbind())
                for i in rest:
                    out[i] = t if scales[i] == 1.0 else t / scales[i]
                return out
            held.update(new)

    def _floor_levels(self, weights: list[Tensor]) -> list[float]:
        """Per layer, the quantile level whose threshold keeps exactly ``ceil(min_density·n)``
        weights (``|w| > t``, no ties): the sorted value at index ``n − 1 − ceil(d·n)``."""
        levels = []
        for w in weights:
            n = w.numel()
            levels.append(max(0.0, (n - 1 - math.ceil(self.min_density * n)) / (n - 1)) if n > 1 else 0.0)
        return levels

    def _check_dead(self, flags: Tensor) -> None:
        """Warn once per layer that is 100 % pruned. CUDA: the flags are copied to the host without
        a sync and read at the next step; elsewhere: now."""
        if flags.device.type != "cuda":  # CPU (other devices: read now too)
            self._warn_dead(flags.tolist())
            return
        if self._pending is not None:
            host, event = self._pending
            event.synchronize()
            self._warn_dead(host.tolist())
        host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
        host.copy_(flags, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending = (host, event)

    def _warn_dead(self, flags: list[bool]) -> None:
        dead = [name for name, f in zip(self.layers, flags) if f and name not in self._dead]
        if dead:
            self._dead.update(dead)
            _warn(f"sparsekern: {len(dead)} layer(s) are 100 % pruned (all weights zero): {dead}. "
                  "sparsify(..., min_density=d) keeps at least a fraction d of every layer, or exclude= them")

    def loss(self) -> Tensor:
        """The sparsity loss to add to the task loss (0-d): ASL's ``AdaptiveSparsityLoss`` over
        the layers' ``r`` (SPEC §4); a constant 0 for methods without one and after ``freeze()``."""
        if self._finalized:
            raise RuntimeError("Sparsifier.loss() after finalize()")
        if self.sparsity_loss is None or self._frozen:
            return torch.zeros((), device=next(iter(self.layers.values())).param.device)
        return self.sparsity_loss(list(self.r.values()))

    def param_groups(self, model_or_params: "nn.Module | Iterable[Tensor]", lr: float,
                     weight_decay: float = 0.0) -> list[dict]:
        """Optimizer param groups: everything at ``lr`` and ``weight_decay``; ASL's ``r`` (all of
        them, whether listed or not) in a second group at ``lr/100`` without weight decay, as the
        authors train it. STR's ``s`` stays in the first group (it needs the decay, SPEC §1).
        ``torch.optim.SGD(sp.param_groups(model, lr=0.1, weight_decay=5e-4), momentum=0.9)``"""
        params = model_or_params.parameters() if isinstance(model_or_params, nn.Module) else model_or_params
        learned = {id(p): p for p in self.r.values()}
        seen, rest = set(learned), []
        for p in params:
            if id(p) not in seen:
                seen.add(id(p))
                rest.append(p)
        groups = [{"params": rest, "lr": lr, "weight_decay": weight_decay}]
        if learned:
            groups.append({"params": list(learned.values()), "lr": lr / 100.0, "weight_decay": 0.0})
        return groups

    def _effective(self, sw: SparseWeight) -> Tensor:
        if self._finalized:
            return sw.param.full_tensor() if distributed.is_dtensor(sw.param) else sw.param
        return self._full_effective(sw)

    @torch.no_grad()
    def sparsity(self) -> dict:
        """Attained sparsity (fraction of exact zeros in the effective weights):
        ``{"overall": float, "layers": {name: float}, "model": float, "dense": [names], "dead": [names]}``.
        ``overall``: over the sparsified weights; ``model``: over **every** prunable weight of the
        model, those left dense included (``dense``: their names; ``Sparsifier.dense`` says why);
        ``dead``: sparsified weights that are 100 % zero. ASL adds ``"modelled"``, the same form
        with ``erf(r/√2)`` per layer (mean over channels) and their weight-count-weighted mean
        overall: the Gaussian model the loss optimises, which the attained sparsity only
        approximates (SPEC §4). Works after ``finalize()`` too."""
        zeros, total, per_layer = 0, 0, {}
        for name, sw in self.layers.items():
            w = self._effective(sw)
            z = int((w == 0).sum())
            per_layer[name] = z / max(w.numel(), 1)
            zeros, total = zeros + z, total + w.numel()
        dense_zeros = sum(int(((w.full_tensor() if distributed.is_dtensor(w) else w) == 0).sum())
                          for w in self._dense_weights.values())
        dense_total = sum(w.numel() for w in self._dense_weights.values())
        report = {"overall": zeros / max(total, 1), "layers": per_layer,
                  "model": (zeros + dense_zeros) / max(total + dense_total, 1), "dense": list(self.dense),
                  "dead": [n for n, f in per_layer.items() if f == 1.0 and self.layers[n].param.numel()]}
        if self.r:
            modelled = {name: erf_sparsity(r).item() for name, r in self.r.items()}
            sizes = {name: sw.param.numel() for name, sw in self.layers.items()}
            report["modelled"] = {"overall": sum(modelled[n] * sizes[n] for n in sizes) / max(total, 1),
                                  "layers": modelled}
        return report

    @torch.no_grad()
    def _bake(self) -> dict[str, Tensor]:
        """Write each effective weight into its Parameter (in place: ties and optimizers keep
        it) and drop the method's state; returns the canonical masks ``effective != 0``."""
        effective = {name: self._full_effective(sw).clone() for name, sw in self.layers.items()}
        masks = {}
        for name, sw in self.layers.items():
            if distributed.is_dtensor(sw.param):  # FSDP2: this rank's rows of the stored layout
                off, rows = distributed.shard_rows(sw.param)
                stored = effective[name].t() if sw.transposed else effective[name]
                sw.param.to_local().copy_(stored[off:off + rows])
            else:
                sw.weight.copy_(effective[name])
            masks[name] = effective[name] != 0
            sw.drop_state()
            for mod, pname in self._holders[name]:
                disable(mod, pname)
        return masks

    def freeze(self) -> "Sparsifier":
        """End pruning, keep fine-tuning with the mask fixed (ST-3's authors' last epochs): the
        effective weights are written into the Parameters, each layer's state becomes a bool
        ``mask`` (``effective != 0``), pruned weights get zero gradient and ``step()`` keeps them
        exactly 0. Checkpoints: ``weight``, ``bias``, ``mask``; to resume, ``sparsify`` the fresh
        model the same way, call ``freeze()``, then load the model's and the Sparsifier's state.
        STR's ``s`` / ASL's ``r`` leave the model (``loss()`` is 0). Returns ``self``."""
        if self._finalized:
            raise RuntimeError("Sparsifier.freeze() after finalize()")
        if self._frozen:
            raise RuntimeError("Sparsifier.freeze(): already frozen")
        masks = self._bake()
        method = FixedMask()
        layers = {}
        for name, sw in self.layers.items():
            new = SparseWeight(sw.module, sw.pname, sw.name, sw.transposed, method)
            new.register_buffer("mask", masks[name])
            for mod, pname in self._holders[name]:
                enable(mod, pname, new)
            layers[name] = new
        self.layers, self._frozen = layers, True
        return self

    def finalize(self) -> nn.Module:
        """Write every effective weight into its Parameter (in place: tied weights stay tied, an
        optimizer keeps them), drop the method's state and give every module its own class back:
        a plain model with the zeros baked in (same outputs); returns it. ``step()`` is refused
        afterwards."""
        if not self._finalized:
            self._bake()
            self._finalized = True
        return self.model

    def state_dict(self) -> dict:
        return {"method": self.method.name, "scope": self.scope, "step": self.step_count, "frozen": self._frozen}

    def load_state_dict(self, state: dict) -> None:
        """Restore the step counter (the thresholds come with the model's state_dict). Method,
        scope and frozen-ness must match (a checkpoint without ``scope`` predates it: per-layer for
        magnitude methods; one without ``frozen`` was not frozen)."""
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError(f"state_dict must be a dict from Sparsifier.state_dict(), got {state!r}")
        if state.get("method") != self.method.name:
            raise ValueError(f"state_dict is for method {state.get('method')!r}, this Sparsifier runs {self.method.name!r}")
        scope = state.get("scope", "layer" if isinstance(self.method, MagnitudeMethod) else None)
        if scope != self.scope:
            raise ValueError(f"state_dict is for scope {scope!r}, this Sparsifier runs {self.scope!r}")
        if bool(state.get("frozen", False)) != self._frozen:
            raise ValueError(f"state_dict frozen={state.get('frozen', False)}, this Sparsifier frozen={self._frozen}: "
                             "call freeze() before loading a frozen checkpoint (and before the model's state_dict)")
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"state_dict step must be an int >= 0, got {step!r}")
        self.step_count = int(step)

    def __repr__(self) -> str:
        state = "finalized" if self._finalized else "frozen" if self._frozen else f"target={self.target()}"
        return (f"Sparsifier(method={self.method.name}, layers={len(self.layers)}, step={self.step_count}, "
                f"{state}, scope={self.scope})")


_INTERNAL = (os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.abspath(torch.__file__)))


def _warn(message: str) -> None:
    """A UserWarning attributed to the first caller outside sparsekern and torch (the user's line)."""
    frame, level = sys._getframe(1), 2  # stacklevel 2: _warn's caller
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)


def _excluded(exclude, model: nn.Module) -> Callable[[str, nn.Module], bool]:
    if callable(exclude):
        return exclude
    names = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    known = {n for n, _ in model.named_modules(remove_duplicate=False)}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"exclude names {unknown} are not modules of the model")
    return lambda name, _: any(name == n or name.startswith(n + ".") for n in names)


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_weight(name: str, p: Tensor) -> None:
    """The checks a weight passes before anything is changed (SPEC §0)."""
    if isinstance(p, nn.parameter.UninitializedParameter):
        raise ValueError(f"weight {name!r} is uninitialized (a lazy module): run a forward before sparsify()")
    if p.dtype not in _DTYPES:
        raise TypeError(f"weight {name!r} is {p.dtype}; sparsekern trains float32, float16 or bfloat16 weights")
    if p.is_meta:
        raise ValueError(f"weight {name!r} is on the meta device: materialise the model before sparsify()")
    if p.numel() and not bool(torch.isfinite(p).all()):
        raise FloatingPointError(f"weight {name!r} has NaN or infinite values")


def _wrapped_by_ddp(params: list[Tensor]) -> bool:
    """Whether a live ``DistributedDataParallel`` already holds one of ``params`` (it registered its
    parameters when built, so Parameters added now would not be synchronised)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return False
    from torch.nn.parallel import DistributedDataParallel
    ids = {id(p) for p in params}
    return any(isinstance(o, DistributedDataParallel) and any(id(p) in ids for p in o.module.parameters())
               for o in gc.get_objects())


class _FirstForward:
    """Hooks on the model's first eager forward: warn about sparse weights it never read
    through their module attribute (used another way, they would run dense)."""

    def __init__(self, model: nn.Module, layers: dict[str, SparseWeight]):
        self.layers = layers
        self.handles = [model.register_forward_pre_hook(self.pre), model.register_forward_hook(self.post)]

    def pre(self, module, args) -> None:
        if not torch.compiler.is_compiling() and not _State.raw and _State.reads is None:
            _State.reads = set()

    def post(self, module, args, out) -> None:
        if torch.compiler.is_compiling() or _State.raw or _State.reads is None:
            return
        unread = [name for name, sw in self.layers.items() if id(sw) not in _State.reads
                  and sw.module.__dict__.get("_sparsekern", {}).get(sw.pname) is sw]
        _State.reads = None
        for h in self.handles:
            h.remove()
        if unread:
            _warn(f"sparsekern: the first forward did not read these sparse weights through their module "
                  f"attribute: {unread}. If the model uses them another way (module._parameters, a reference "
                  "kept from before sparsify()), that use runs DENSE; if they are just unused in this forward, "
                  "ignore this.")


def sparsify(model: nn.Module, method: str, sparsity: float | None = None,
             schedule: Callable[[int], float] | None = None,
             exclude: Iterable[str] | Callable[[str, nn.Module], bool] = (),
             include: Callable[[str, nn.Module], bool] | None = None, scope: str | None = None,
             min_density: float | None = None, **options) -> Sparsifier:
    """Make the weights of ``model`` sparse under ``method``, in place, and return the ``Sparsifier``
    that drives them (docs/sparsify.md). Atomic: on any error the model is exactly as it was.

    What is pruned: by default every ``nn.Linear`` (subclasses included), ``nn.Conv1d/2d/3d``
    (grouped, depthwise), ``nn.MultiheadAttention`` (``in_proj_weight`` or ``q/k/v_proj_weight``;
    its ``out_proj`` is a Linear) and transformers' ``Conv1D`` weight — never biases, norms or
    embeddings; a Parameter tied to a pruned one (GPT-2's embedding = ``lm_head``) is pruned once
    and every holder reads the same sparse weight. Each Parameter stays where it is (same object,
    state_dict key ``weight``); its modules read the effective weight through their attribute, so
    functional use (``F.linear(x, mod.weight)``, MHA) is sparse too. Weights a method cannot prune
    stay dense with one warning listing them (``Sparsifier.dense``).

    method: ``"str"``, ``"st3"``, ``"st3_sigma"``, ``"feather"``, ``"gmp"``, ``"asl"``,
      ``"starfire"``, ``"nm"`` (SPEC §1–6); ``options`` go to it (STR: s_init, activation,
      granularity; ST-3/ST-3σ: rescale; Feather: p, theta — None = authors' rule; ASL: r_init,
      granularity and the loss: loss (``"budget"``, ``"hinge"``, ``"avg"``, ``"wavg"``),
      contribution, param_budget, flop_budget, lam, lam_params, lam_flops, input_size — see
      ``methods.ASL``, ``AdaptiveSparsityLoss``; STARFIRE: era=(start_step, end_step) (required),
      ramp (``"cubic"``, ``"linear"``), conv3x3 (``"intra"``, ``"window"``, ``"ck"``), fc
      (``"fine"``, ``"block"``), block, window_fraction, max_nonzero, ck_group — see
      ``methods.Starfire``; N:M: n, m, era, ramp — ``methods.NM``, whose sparsity is ``1 − n/m``).
    sparsity: final target in [0, 1] (ignored, with a warning, by the learned method ``str``).
      ASL: ``r`` starts at ``√2·erfinv(0.6·sparsity)``, and the budget losses default to the
      parameter density budget ``1 − sparsity``; the attained sparsity is learned around it.
    schedule: callable step → target sparsity, e.g. ``CubicSchedule``; None = ``sparsity`` from
      step 0. Magnitude methods need ``sparsity`` or ``schedule``. STARFIRE and N:M ramp over their
      ``era`` instead (no ``schedule``/``scope``).
    exclude: module names (a name excludes its whole subtree; a tied Parameter is excluded when
      any module holding it is) or a predicate ``(name, module) → bool``, e.g.
      ``lambda n, m: m.weight.numel() < 1000`` (ASL's authors skip layers with fewer than 1000 weights).
    include: None (the kinds above) or a predicate ``(name, module) → bool`` over every module
      replacing that choice; a picked module of another kind (e.g. ``nn.Embedding``) contributes its
      ≥ 2-D ``weight``.
    scope: where magnitude methods choose the threshold. ``"global"``: one exact quantile ``T``
      of ``|w|·c_l`` over all chosen layers, ``t_l = T / c_l`` (``c_l = 1``; ST-3σ: sqrt(sum of
      W_l's shape)), so layers end with different sparsities and the model meets the target;
      ``"layer"``: each layer meets the target (not for ``st3_sigma``). None = the paper's
      choice: ``"global"`` for st3, st3_sigma, feather; ``"layer"`` for gmp (uniform GMP).
      Ignored, with a warning, by ``str``.
    min_density: magnitude methods only; None or d in [0, 1): every layer keeps at least
      ``ceil(d·n_l)`` of its ``n_l`` weights (fewer only on ties of |w|) — per layer the target is
      capped there; globally, layers that ``T`` would take below are held there and the others
      share the rest of the model-wide target exactly (one host sync per step). Without it a layer can be
      pruned to 100 %: ``step()`` then warns, naming it.
    The weight/bias Parameters are kept, so an existing optimizer still holds them; STR's new
    ``s`` Parameters must be added to the optimizer (with weight decay), ASL's ``r`` too (at lr/100
    without weight decay: ``Sparsifier.param_groups``). Under DDP: ``sparsify`` first, then wrap
    (a model already in ``DistributedDataParallel`` is refused for str/asl, whose new Parameters
    DDP would not synchronise). Under FSDP2: ``sparsify`` first, then ``fully_shard`` with
    ``ignored_params=sparsifier.replicated_params()`` (docs/distributed.md); ``fully_shard`` first
    works for the magnitude methods only; tensor-parallel DTensor weights are refused.
    """
    cls = method_class(method)
    if sparsity is not None:
        sparsity = check_sparsity(sparsity)
    if schedule is not None and not callable(schedule):
        raise TypeError(f"schedule must be callable step -> sparsity, got {type(schedule).__name__}")
    if include is not None and not callable(include):
        raise TypeError(f"include must be a predicate (name, module) -> bool, got {type(include).__name__}")
    scheduled_final = getattr(schedule, "final_sparsity", None)
    if None not in (sparsity, scheduled_final) and sparsity != scheduled_final:
        raise ValueError(f"sparsity={sparsity} disagrees with schedule.final_sparsity={scheduled_final}")
    final = sparsity if sparsity is not None else scheduled_final
    magnitude, masked = issubclass(cls, MagnitudeMethod), issubclass(cls, MaskMethod)
    if min_density is not None:
        if not magnitude:
            raise ValueError(f"min_density applies to the magnitude methods (st3, st3_sigma, feather, gmp), "
                             f"not {method!r}")
        min_density = check_sparsity(min_density, "min_density")
        if min_density == 1.0:
            raise ValueError("min_density must be < 1 (1 would prune nothing)")
    if magnitude and sparsity is None and schedule is None:
        raise ValueError(f"method {method!r} needs a target: pass sparsity= or schedule=")
    if masked and (schedule is not None or scope is not None):
        raise ValueError(f"method {method!r} ramps over era=(start_step, end_step) with ramp='cubic'|'linear' "
                         "and masks each layer on its own: schedule=/scope= do not apply")
    if issubclass(cls, ASL):  # learns per-layer sparsities; the target sets r's init and the default budget
        if schedule is not None or scope is not None:
            warnings.warn("method 'asl' learns per-layer sparsities under its loss; schedule/scope are ignored",
                          UserWarning, stacklevel=2)
        final, schedule, scope = sparsity, None, None
    elif not (magnitude or masked) and (sparsity is not None or schedule is not None or scope is not None):
        warnings.warn(f"method {method!r} learns its sparsity; sparsity/schedule/scope are ignored",
                      UserWarning, stacklevel=2)
        final, schedule, scope = None, None, None
    meth = cls.from_options(final, **options)
    scope = _check_scope(scope, meth)
    if isinstance(meth, MaskMethod):
        final = meth.final_sparsity
        schedule = meth.schedule()

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if type(model).__name__ in ("DistributedDataParallel", "FullyShardedDataParallel"):
        raise ValueError(f"model is a {type(model).__name__}: call sparsify(model) before wrapping it "
                         "(then wrap the sparsified model)")
    skip = _excluded(exclude, model)
    candidates = prunable_weights(model, include)
    if not candidates:
        raise ValueError("model has no weight to sparsify (Linear, Conv1d/2d/3d, MultiheadAttention, Conv1D)")
    chosen, dense, dense_weights, where = [], {}, {}, {}
    fsdp = None  # ids of FSDP2's sharded Parameters, once a DTensor weight is seen
    for name, mod, pname, transposed in candidates:
        p = mod._parameters[pname]
        where[name] = holders(model, p)
        if any(skip(mname, m) for mname, m, _ in where[name]):
            dense[name], dense_weights[name] = "excluded", p
            continue
        if distributed.is_dtensor(p):
            fsdp = distributed.fsdp_params(model) if fsdp is None else fsdp
            distributed.check_sharded(name, p, fsdp)
            if not magnitude:
                raise ValueError(f"weight {name!r} is already sharded by FSDP2 (fully_shard): method {meth.name!r} "
                                 "needs sparsify(model) first, then fully_shard (see README, Distributed training)")
        _check_weight(name, p)
        if any(pn in m.__dict__.get("_sparsekern", {}) for _, m, pn in where[name]):
            raise ValueError(f"weight {name!r} is already sparse (another sparsify() call): finalize() that "
                             "Sparsifier first, or exclude= it")
        sw = SparseWeight(mod, pname, name, transposed, meth)
        reason = meth.unsupported(sw.weight)
        if reason is not None:
            dense[name], dense_weights[name] = f"{meth.name}: {reason}", p
            continue
        chosen.append(sw)
    if not chosen:
        raise ValueError(f"every prunable weight of the model is left dense: {dense}")
    unsupported = {n: r for n, r in dense.items() if r != "excluded"}
    if unsupported:
        warnings.warn(f"sparsify: {len(unsupported)} weight(s) stay dense, the method cannot prune them: "
                      f"{unsupported}", UserWarning, stacklevel=2)
    zero = [] if not isinstance(meth, STR) else [sw.name for sw in chosen
                                                  if sw.param.numel() and not bool(sw.param.any())]
    if zero:
        warnings.warn(f"sparsify: weight(s) {zero} are all zero: under 'str' a weight with |w| <= g(s) gets no "
                      "gradient, so they would never train; initialise them or exclude= them", UserWarning, stacklevel=2)
    if isinstance(meth, (STR, ASL)) and _wrapped_by_ddp([sw.param for sw in chosen]):
        raise ValueError(f"model is already wrapped in DistributedDataParallel: method {meth.name!r} adds learned "
                         "Parameters that DDP would not synchronise; call sparsify(model) first, then wrap it")
    pairs = [(sw.name, sw) for sw in chosen]
    if isinstance(meth, MaskMethod):
        meth.select(pairs)
    # built before any change: a bad loss option leaves the model untouched
    loss = None
    if isinstance(meth, ASL):
        size, flops = meth.flop_input_size(), None
        if size is not None:
            rows = {row.name: row for row in count_flops(model, size).rows}
            flops = [rows[name].dense_macs for name, _ in pairs]
        loss = meth.make_loss(dict(pairs), flops)
    layer_holders = {sw.name: [(m, pn) for _, m, pn in where[sw.name]] for sw in chosen}
    done: list[SparseWeight] = []
    enabled: list[tuple[nn.Module, str]] = []
    try:
        for sw in chosen:
            done.append(sw)
            meth.init_state(sw)
            for mod, pname in layer_holders[sw.name]:
                enable(mod, pname, sw)
                enabled.append((mod, pname))
        sp = Sparsifier(model, meth, dict(pairs), schedule, final, scope, loss, min_density=min_density,
                        dense=dense, dense_weights=dense_weights, holders=layer_holders)
    except BaseException:  # undo: no state, own classes (weights change only in a Sparsifier step)
        for sw in done:
            sw.drop_state()
        for mod, pname in enabled:
            disable(mod, pname)
        raise
    _FirstForward(model, sp.layers)
    return sp
