"""Training API: ``sparsify()`` swaps layers in place, ``Sparsifier`` drives thresholds per step."""
import numbers
import warnings
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

import sparsekern as sk

from .losses import AdaptiveSparsityLoss, erf_sparsity
from .methods import ASL, MagnitudeMethod, MaskMethod, Method, method_class
from .nn import SPARSE_LAYERS, SparseLayer


def _check_sparsity(value, name: str = "sparsity") -> float:
    """``value`` as a float in [0, 1]; TypeError/ValueError naming ``name`` otherwise (SPEC §0)."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float in [0, 1], got {type(value).__name__}")
    value = float(value)
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


class CubicSchedule:
    """Zhu & Gupta cubic ramp (SPEC §7): ``s(t) = s_f + (s_i − s_f)·(1 − (t − t0)/(t1 − t0))³``
    for ``t0 ≤ t ≤ t1``, ``s_i`` before, ``s_f`` after; ``t`` counts optimizer steps."""

    def __init__(self, start_step: int, end_step: int, final_sparsity: float, initial_sparsity: float = 0.0):
        if not (isinstance(start_step, numbers.Integral) and isinstance(end_step, numbers.Integral)
                and 0 <= start_step < end_step):
            raise ValueError(f"need integers 0 <= start_step < end_step, got {start_step!r}, {end_step!r}")
        self.start_step, self.end_step = int(start_step), int(end_step)
        self.final_sparsity = _check_sparsity(final_sparsity, "final_sparsity")
        self.initial_sparsity = _check_sparsity(initial_sparsity, "initial_sparsity")

    def __call__(self, step: int) -> float:
        if step <= self.start_step:
            return self.initial_sparsity
        if step >= self.end_step:
            return self.final_sparsity
        frac = (step - self.start_step) / (self.end_step - self.start_step)
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1.0 - frac) ** 3

    def __repr__(self) -> str:
        return (f"CubicSchedule(start_step={self.start_step}, end_step={self.end_step}, "
                f"final_sparsity={self.final_sparsity}, initial_sparsity={self.initial_sparsity})")


class LinearSchedule(CubicSchedule):
    """Linear ramp: ``s(t) = s_i + (s_f − s_i)·(t − t0)/(t1 − t0)`` for ``t0 ≤ t ≤ t1``, ``s_i``
    before, ``s_f`` after (STARFIRE's ``ramp="linear"``, SPEC §5)."""

    def __call__(self, step: int) -> float:
        if step <= self.start_step:
            return self.initial_sparsity
        if step >= self.end_step:
            return self.final_sparsity
        frac = (step - self.start_step) / (self.end_step - self.start_step)
        return self.initial_sparsity + (self.final_sparsity - self.initial_sparsity) * frac

    def __repr__(self) -> str:
        return "Linear" + super().__repr__().removeprefix("Cubic")


_RAMPS = {"cubic": CubicSchedule, "linear": LinearSchedule}


def _check_scope(scope: str | None, method: Method) -> str | None:
    """The scope a Sparsifier for ``method`` runs with (None: the method's default)."""
    if not isinstance(method, MagnitudeMethod):
        return None
    if scope is None:
        return method.default_scope
    if scope not in method.scopes:
        raise ValueError(f"scope must be one of {method.scopes} for method {method.name!r}, got {scope!r}")
    return scope


def _swap(model: nn.Module, replace: dict[int, nn.Module]) -> None:
    """Put ``replace[id(m)]`` wherever module ``m`` is registered in ``model`` (shared ones too)."""
    for name, mod in list(model.named_modules(remove_duplicate=False)):
        if id(mod) in replace:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, replace[id(mod)])


class Sparsifier:
    """Drives the sparse layers of one model; returned by ``sparsify()``.

    Call ``step()`` after every ``optimizer.step()``. Checkpoint ``state_dict()`` next to the
    model's and the optimizer's (thresholds live in the model's state_dict), and resume is exact.
    ``scope``: see ``sparsify()``; None for learned-threshold methods (STR, ASL). ``scales``: each
    layer's ``c_l`` in the global quantile (None unless ``scope="global"``). ``sparsity_loss``:
    ASL's loss over the layers' ``r`` (``loss()``), else None.
    """

    def __init__(self, model: nn.Module, method: Method, layers: dict[str, nn.Module],
                 schedule: Callable[[int], float] | None, final_sparsity: float | None, scope: str | None = None,
                 sparsity_loss: AdaptiveSparsityLoss | None = None):
        self.scope = _check_scope(scope, method)
        self.model, self.method, self.layers = model, method, layers
        self.sparsity_loss = sparsity_loss
        #: ASL's ``r`` Parameters by layer name (kept after ``finalize()`` for the modelled sparsity)
        self.r = {name: m.r for name, m in layers.items()} if isinstance(method, ASL) else {}
        self.schedule, self.final_sparsity = schedule, final_sparsity
        self.scales = [method.scale(m) for m in layers.values()] if self.scope == "global" else None
        self.step_count = 0
        self._finalized = False
        self._update()

    def target(self, step: int | None = None) -> float | None:
        """Target sparsity at ``step`` (default: now); ASL: the requested sparsity (``sparsify``'s
        ``sparsity``); None for STR, which learns it. STARFIRE/N:M: the ramp over the pruning era."""
        if not isinstance(self.method, (MagnitudeMethod, MaskMethod)):
            return self.final_sparsity
        step = self.step_count if step is None else step
        if self.schedule is None:
            return self.final_sparsity
        return _check_sparsity(self.schedule(step), f"schedule({step})")

    def step(self) -> None:
        """Advance one optimizer step and recompute the thresholds from the updated weights:
        one selection call over all layers, results copied into the ``threshold`` buffers on
        the weights' device. No host sync, so on accelerators a NaN weight is not raised here:
        it makes the thresholds NaN (on CPU: ``FloatingPointError`` naming its index in ``layers``).
        STARFIRE/N:M (``MaskMethod.update``): masks rebuilt in the era, frozen after it, pruned
        weights zeroed in place (so call it after every ``optimizer.step()``)."""
        if self._finalized:
            raise RuntimeError("Sparsifier.step() after finalize()")
        self.step_count += 1
        self._update()

    @torch.no_grad()
    def _update(self) -> None:
        if isinstance(self.method, MaskMethod):
            self.method.update(list(self.layers.values()), self.step_count, self.target())
            return
        if not isinstance(self.method, MagnitudeMethod):
            return
        layers = list(self.layers.values())
        weights = [m.weight for m in layers]
        s = self.target()
        check_nan = weights[0].device.type == "cpu"  # reading the NaN flag back is free only there
        if s == 0.0:  # t = 0 keeps every nonzero (the quantile would prune the smallest |w|)
            thresholds = [torch.zeros((), dtype=torch.float32, device=w.device) for w in weights]
        elif self.scope == "global":
            T = sk.global_magnitude_threshold(weights, s, scales=self.scales, check_nan=check_nan)
            thresholds = [T if c == 1.0 else T / c for c in self.scales]
        else:
            thresholds = sk.magnitude_thresholds(weights, s, check_nan=check_nan).unbind()
        for layer, t in zip(layers, thresholds):
            self.method.set_threshold(layer, t)

    def loss(self) -> Tensor:
        """The sparsity loss to add to the task loss (0-d): ASL's ``AdaptiveSparsityLoss`` over
        the layers' ``r`` (SPEC §4); a constant 0 for methods without one."""
        if self._finalized:
            raise RuntimeError("Sparsifier.loss() after finalize()")
        if self.sparsity_loss is None:
            return torch.zeros((), device=next(iter(self.layers.values())).weight.device)
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

    @torch.no_grad()
    def sparsity(self) -> dict:
        """Attained sparsity (fraction of exact zeros in the effective weights):
        ``{"overall": float, "layers": {name: float}}``. ASL adds ``"modelled"``, the same form
        with ``erf(r/√2)`` per layer (mean over channels) and their weight-count-weighted mean
        overall: the Gaussian model the loss optimises, which the attained sparsity only
        approximates (SPEC §4). Works after ``finalize()`` too."""
        zeros, total, per_layer = 0, 0, {}
        for name, m in self.layers.items():
            w = m.effective_weight() if isinstance(m, SparseLayer) else m.weight
            z = int((w == 0).sum())
            per_layer[name] = z / max(w.numel(), 1)
            zeros, total = zeros + z, total + w.numel()
        report = {"overall": zeros / max(total, 1), "layers": per_layer}
        if self.r:
            modelled = {name: erf_sparsity(r).item() for name, r in self.r.items()}
            sizes = {name: m.weight.numel() for name, m in self.layers.items()}
            report["modelled"] = {"overall": sum(modelled[n] * sizes[n] for n in sizes) / max(total, 1),
                                  "layers": modelled}
        return report

    def finalize(self) -> nn.Module:
        """Replace every sparse layer by plain ``nn.Conv2d``/``nn.Linear`` with the effective
        weight baked in (same outputs); returns the model. ``step()`` is refused afterwards."""
        dense = {id(m): m.to_dense() for m in self.layers.values() if isinstance(m, SparseLayer)}
        _swap(self.model, dense)
        self.layers = {name: dense.get(id(m), m) for name, m in self.layers.items()}
        self._finalized = True
        return self.model

    def state_dict(self) -> dict:
        return {"method": self.method.name, "scope": self.scope, "step": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        """Restore the step counter (the thresholds come with the model's state_dict). Method and
        scope must match (a checkpoint without ``scope`` predates it: per-layer for magnitude methods)."""
        if state.get("method") != self.method.name:
            raise ValueError(f"state_dict is for method {state.get('method')!r}, this Sparsifier runs {self.method.name!r}")
        scope = state.get("scope", "layer" if isinstance(self.method, MagnitudeMethod) else None)
        if scope != self.scope:
            raise ValueError(f"state_dict is for scope {scope!r}, this Sparsifier runs {self.scope!r}")
        self.step_count = int(state["step"])

    def __repr__(self) -> str:
        return (f"Sparsifier(method={self.method.name}, layers={len(self.layers)}, step={self.step_count}, "
                f"target={self.target()}, scope={self.scope})")


def _excluded(exclude, model: nn.Module) -> Callable[[str, nn.Module], bool]:
    if callable(exclude):
        return exclude
    names = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    known = {n for n, _ in model.named_modules(remove_duplicate=False)}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"exclude names {unknown} are not modules of the model")
    return lambda name, _: any(name == n or name.startswith(n + ".") for n in names)


def sparsify(model: nn.Module, method: str, sparsity: float | None = None,
             schedule: Callable[[int], float] | None = None,
             exclude: Iterable[str] | Callable[[str, nn.Module], bool] = (), scope: str | None = None,
             **options) -> Sparsifier:
    """Swap every ``nn.Conv2d``/``nn.Linear`` of ``model`` (exact types; subclasses are left
    alone) in place for its sparse layer, and return the ``Sparsifier`` that drives them.

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
    exclude: module names (a name excludes its whole subtree) or a predicate ``(name, module) →
      bool``, e.g. ``lambda n, m: m.weight.numel() < 1000`` (ASL's authors skip layers with
      fewer than 1000 weights).
    scope: where magnitude methods choose the threshold. ``"global"``: one exact quantile ``T``
      of ``|w|·c_l`` over all chosen layers, ``t_l = T / c_l`` (``c_l = 1``; ST-3σ: sqrt(sum of
      W_l's shape)), so layers end with different sparsities and the model meets the target;
      ``"layer"``: each layer meets the target (not for ``st3_sigma``). None = the paper's
      choice: ``"global"`` for st3, st3_sigma, feather; ``"layer"`` for gmp (uniform GMP).
      Ignored, with a warning, by ``str``.
    The weight/bias Parameters are reused, so an existing optimizer still holds them; STR's new
    ``s`` Parameters must be added to the optimizer (with weight decay), ASL's ``r`` too (at lr/100
    without weight decay: ``Sparsifier.param_groups``).
    """
    cls = method_class(method)
    if sparsity is not None:
        sparsity = _check_sparsity(sparsity)
    if schedule is not None and not callable(schedule):
        raise TypeError(f"schedule must be callable step -> sparsity, got {type(schedule).__name__}")
    scheduled_final = getattr(schedule, "final_sparsity", None)
    if None not in (sparsity, scheduled_final) and sparsity != scheduled_final:
        raise ValueError(f"sparsity={sparsity} disagrees with schedule.final_sparsity={scheduled_final}")
    final = sparsity if sparsity is not None else scheduled_final
    magnitude, masked = issubclass(cls, MagnitudeMethod), issubclass(cls, MaskMethod)
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
        schedule = _RAMPS[meth.ramp](*meth.era, final)

    if type(model) in SPARSE_LAYERS:
        raise ValueError("model is itself a Conv2d/Linear and cannot be swapped in place; wrap it, "
                         "e.g. nn.Sequential(model)")
    skip = _excluded(exclude, model)
    found: dict[int, tuple[str, nn.Module, bool]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        if type(mod) in SPARSE_LAYERS:
            first, _, excluded = found.get(id(mod), (name, mod, False))
            found[id(mod)] = (first, mod, excluded or bool(skip(name, mod)))
    if not found:
        raise ValueError("model has no nn.Conv2d or nn.Linear layer to sparsify")
    chosen = [(name, mod) for name, mod, excluded in found.values() if not excluded]
    if not chosen:
        raise ValueError("every nn.Conv2d/nn.Linear of the model is excluded")
    if isinstance(meth, MaskMethod):
        chosen = meth.select(chosen)
    # built before the swap: a bad loss option leaves the model untouched
    loss = meth.make_loss(model, dict(chosen)) if isinstance(meth, ASL) else None
    layers = {name: SPARSE_LAYERS[type(mod)].from_dense(mod, meth) for name, mod in chosen}
    _swap(model, {id(mod): layers[name] for name, mod in chosen})
    return Sparsifier(model, meth, layers, schedule, final, scope, loss)
