"""Sparsification overhead of one training step, per method, on a network's weight shapes
(ResNet-50 by default: 54 Conv/Linear weights, 25.5 M): the per-step threshold or mask work,
thresholding every layer, and the backward of thresholding (the convolutions themselves are not
run: they cost the same with and without sparsification).

* ``eager``: the method composed in plain PyTorch from ``sparsekern.reference`` (sort-based
  quantiles and masks, the thresholding ops as autograd graphs of elementwise ops).
* ``sparsekern``: the model through ``sk.sparsify(...)``: ``Sparsifier.step()`` (one multi-tensor
  selection call, or the mask ops), ``layer.weight`` of every layer (its effective weight: one fused op),
  backward.

Both start from the same weights; their first effective weights are compared
(``max_abs_diff``). STARFIRE and N:M are timed at the last step of their pruning era (masks
rebuilt at the final sparsity every step, as during the era). ASL's sparsity loss and STR's
weight decay are left out of both (scalar work). fp32, sparsity 0.9 (N:M: 2:4).

pytest-benchmark (timing only)::

    pytest bench/bench_train_step.py --benchmark-only
"""
import math
import warnings

import torch
from torch import nn

from . import harness as H
from . import suites

METHODS = ("gmp", "str", "st3", "st3_sigma", "feather", "asl", "starfire", "nm")
PROVIDERS = ("eager", "sparsekern")
SPARSITY = 0.9
ERA_END = 10 ** 9  # STARFIRE / N:M: each timed step is set to be the era's last one
OPTIONS = {"gmp": {"sparsity": SPARSITY}, "str": {}, "st3": {"sparsity": SPARSITY},
           "st3_sigma": {"sparsity": SPARSITY}, "feather": {"sparsity": SPARSITY},
           "asl": {"sparsity": SPARSITY}, "starfire": {"sparsity": SPARSITY, "era": (0, ERA_END)},
           "nm": {"era": (0, ERA_END)}}


def _model(weights):
    """``nn.ModuleList`` of bias-free Conv2d / Linear layers holding ``weights`` (shared)."""
    layers = []
    for w in weights:
        if w.dim() == 4:
            m = nn.Conv2d(w.shape[1], w.shape[0], tuple(w.shape[2:]), bias=False, device="meta")
        else:
            m = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        m.weight = nn.Parameter(w)
        layers.append(m)
    return nn.ModuleList(layers)


def sparsekern_outputs(method, weights):
    """``(outputs(), weights)``: the model's weights under ``sk.sparsify`` and a callable doing one
    Sparsifier step and returning every layer's effective weight (dense layers: the weight)."""
    import sparsekern as sk

    model = _model(weights)
    raw = [m.weight for m in model]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nm: first conv (C_in = 3) stays dense
        sp = sk.sparsify(model, method, **OPTIONS[method])

    def outputs():
        if method in ("starfire", "nm"):
            sp.step_count = ERA_END - 1
        sp.step()
        return [m.weight for m in model]  # the effective weight of a sparse layer (one fused op)

    return outputs, raw


def eager_outputs(method, weights):
    """``(outputs(), weights)`` for the same method written with ``sparsekern.reference``."""
    from sparsekern import reference as R
    from sparsekern.methods.asl import initial_r
    from sparsekern.methods.starfire import _keep_one_per_row

    ws = [nn.Parameter(w) for w in weights]
    dev = ws[0].device
    s_param = [nn.Parameter(torch.full((), -5.0, device=dev)) for _ in ws]  # STR's s_init
    r_param = [nn.Parameter(torch.full((), initial_r(SPARSITY), device=dev)) for _ in ws]
    masks = [torch.ones_like(w, dtype=torch.bool) for w in ws]
    nm_ok = [w.shape[1] % 4 == 0 for w in ws]

    @torch.no_grad()
    def update_masks():
        for w, m in zip(ws, masks):
            w.masked_fill_(~m, 0)
        if method == "nm":
            new = [R.nm_mask(w, 2, 4) if ok else None for w, ok in zip(ws, nm_ok)]
        else:
            new = [None] * len(ws)
            fine = [i for i, w in enumerate(ws) if not (w.dim() == 4 and w.shape[2] * w.shape[3] > 1)]
            for i, w in enumerate(ws):
                if i not in fine:
                    new[i] = R.intra_mask(w, SPARSITY)
            ts = R.magnitude_thresholds([ws[i] for i in fine], SPARSITY)
            for i, t in zip(fine, ts.unbind()):
                new[i] = _keep_one_per_row(ws[i].abs().float() > t, ws[i])
        for w, m, n in zip(ws, masks, new):
            if n is not None:
                m &= n
                w.masked_fill_(~m, 0)

    def outputs():
        if method in ("starfire", "nm"):
            update_masks()
            return [R.masked_weight(w, m) if method == "starfire" or ok else w
                    for w, m, ok in zip(ws, masks, nm_ok)]
        if method == "str":
            return [R.str_threshold(w, s) for w, s in zip(ws, s_param)]
        if method == "asl":
            return [R.asl_threshold(w, r) for w, r in zip(ws, r_param)]
        with torch.no_grad():
            if method == "gmp":
                ts = R.magnitude_thresholds(ws, SPARSITY).unbind()
            else:
                scales = [math.sqrt(sum(w.shape)) for w in ws] if method == "st3_sigma" else None
                T = R.global_magnitude_threshold(ws, SPARSITY, scales=scales)
                ts = [T / c for c in scales] if scales else [T] * len(ws)
        if method == "gmp":
            return [R.hard_threshold(w, t, ste=False) for w, t in zip(ws, ts)]
        if method == "feather":
            return [R.power_threshold(w, t, p=3.0, theta=1.0) for w, t in zip(ws, ts)]
        return [R.st3_threshold(w, t) for w, t in zip(ws, ts)]

    return outputs, ws


def make_steps(method, shapes, device):
    """``({provider: step}, max_abs_diff)``: one training step's sparsification per provider on
    seeded He-init weights of ``shapes``, and the largest difference of their first outputs."""
    base = suites.make_weights(shapes, device=device)
    grads = suites.make_weights(shapes, device=device, seed=1)
    built = {"eager": eager_outputs(method, [w.clone() for w in base]),
             "sparsekern": sparsekern_outputs(method, [w.clone() for w in base])}
    first = {p: [o.detach().clone() for o in outputs()] for p, (outputs, _) in built.items()}
    diff = max(float((a - b).abs().max()) if a.numel() else 0.0
               for a, b in zip(first["eager"], first["sparsekern"]))

    def step(outputs, ws):
        def run():
            for w in ws:
                w.grad = None
            torch.autograd.backward(outputs(), grads)
        return run

    return {p: step(*b) for p, b in built.items()}, diff


# --- pytest-benchmark -----------------------------------------------------------------------------

@H.parametrize("provider", PROVIDERS)
@H.parametrize("method", METHODS)
def test_train_step(benchmark, method, provider):
    device = H.default_device()
    steps, _ = make_steps(method, suites.resnet50(), device)

    def run():
        steps[provider]()
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"train step {method} ResNet-50 fp32"
    benchmark.extra_info.update(H.environment(device))
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
