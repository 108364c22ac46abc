"""Sparse Linear and conv (spmm family), fp32, CPU: crossover maps and a whole pruned ResNet-50.

* Crossover maps: speedup of sparsekern's inference modules (``CSRLinear``, ``CSRConv1x1``,
  ``CSRConv2d``) vs dense (``F.linear`` / ``F.conv2d``: MKL / oneDNN) and vs torch CSR
  (``w.to_sparse_csr()`` matmul; convs through ``F.unfold``) over sparsity 50–99 %, unstructured
  magnitude pruning, for Linear 4096×4096 at batch 1 and 64, the distinct conv layers of ResNet-50
  (``bench.models``, batch 1, 224×224) and the target 3×3 conv 256→256 at 56×56. Providers run
  side by side (``harness.time_steps``); outputs are checked equal to dense. Plot:
  :func:`plot_crossover`.
* Whole model: ResNet-50 pruned to STR's learnt 90 % budget (``bench.suites.STR_RESNET50_90``,
  Table 7), dense vs ``sk.inference.convert`` at batch 1, with ``sk.count_flops`` and the
  per-layer convert report, each converted layer re-timed against its dense original.
* Targets (issue 6) printed PASS/FAIL.

pytest-benchmark (timing only)::

    pytest bench/bench_spmm.py --benchmark-only

Script (writes bench/results/spmm-<cpu>.md, .json and spmm-crossover-<cpu>.png)::

    python -m bench.bench_spmm [--threads 1 2] [--quick] [--no-model]
"""
import argparse
import copy
import json
import math
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from . import harness as H

PROVIDERS = ("dense", "torch_csr", "sparsekern")
SPARSITIES = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.99)
QUICK_SPARSITIES = (0.5, 0.9, 0.99)
BATCHES = (1, 64)
FEATURES = 4096
#: (batch, sparsity, baseline) -> minimum speedup of sparsekern, Linear 4096² (issue 6)
TARGETS = {(64, 0.9, "dense"): 4.0, (64, 0.95, "dense"): 7.0, (64, 0.9, "torch_csr"): 1.5}
CONV_TARGET = (0.9, 2.5)  # 3×3 256→256 56×56 batch 1: ≥ 2.5× dense at 90 %
#: After convert(), no layer slower than this fraction of dense (issue 6).
MIN_LAYER_SPEEDUP = 0.95
TIMING = {"budget_s": 0.5, "min_reps": 11, "max_reps": 100}
QUICK_TIMING = {"budget_s": 0.05, "min_reps": 3, "max_reps": 10}


# --- cases ----------------------------------------------------------------------------------------

def linear_spec(batch, features=FEATURES, out_features=None):
    """A Linear case: input ``[batch, features]``, weight ``[out_features, features]``, bias."""
    out_features = out_features or features
    return {"kind": "linear", "name": f"linear {out_features}x{features} b{batch}", "batch": batch,
            "in": features, "out": out_features}


def conv_spec(cin, cout, kernel, stride, padding, hw, batch=1, layers=()):
    """A Conv2d case (no bias, as in ResNet-50): input ``[batch, cin, hw, hw]``."""
    name = f"conv{kernel}x{kernel} {cin}->{cout} {hw}x{hw}" + (f" s{stride}" if stride > 1 else "")
    return {"kind": "conv", "name": name, "batch": batch, "in": cin, "out": cout, "kernel": kernel,
            "stride": stride, "padding": padding, "hw": hw, "layers": list(layers)}


#: The conv of the 3×3 target (not a ResNet-50 v1.5 layer: those 256→256 convs run at 14×14).
TARGET_CONV = conv_spec(256, 256, 3, 1, 1, 56)


def resnet50_conv_specs(hw=224):
    """The distinct Conv2d layers of ``bench.models.resnet50`` at batch 1 (input shape, weight,
    stride, padding), in model order; ``layers`` lists the module names that share each."""
    from .models import resnet50

    with torch.device("meta"):
        model = resnet50()
    seen, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            def hook(mod, args, name=name):
                x = args[0]
                key = (mod.in_channels, mod.out_channels, mod.kernel_size[0], mod.stride[0],
                       mod.padding[0], x.shape[-1])
                seen.setdefault(key, []).append(name)
            hooks.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(torch.empty(1, 3, hw, hw, device="meta"))
    for h in hooks:
        h.remove()
    return [conv_spec(*key, layers=names) for key, names in seen.items()]


def crossover_specs(quick=False):
    """Linear 4096² at batch 1 and 64, the ResNet-50 convs and :data:`TARGET_CONV`; ``quick``:
    the Linears, the target conv and three ResNet-50 convs (stem, a 1×1, a strided 3×3)."""
    convs = resnet50_conv_specs()
    if quick:
        convs = [convs[0], convs[1], next(c for c in convs if c["kernel"] == 3 and c["stride"] == 2)]
    return [linear_spec(b) for b in BATCHES] + convs + [TARGET_CONV]


def magnitude_prune_(w, sparsity):
    """Zero the ``sparsity`` fraction of ``w`` with the smallest ``|w|`` (exact quantile, in place)."""
    import sparsekern as sk

    if sparsity > 0:
        w.mul_(w.abs() > sk.magnitude_thresholds([w], [sparsity])[0])
    return w


def make_layer(spec, sparsity, seed=0):
    """The dense eval module of ``spec`` (He-scaled seeded normal weight, magnitude-pruned to
    ``sparsity``; Linear with a bias) and a seeded normal input."""
    g = torch.Generator().manual_seed(seed)
    if spec["kind"] == "linear":
        m = nn.Linear(spec["in"], spec["out"])
        x = torch.randn(spec["batch"], spec["in"], generator=g)
    else:
        m = nn.Conv2d(spec["in"], spec["out"], spec["kernel"], spec["stride"], spec["padding"], bias=False)
        x = torch.randn(spec["batch"], spec["in"], spec["hw"], spec["hw"], generator=g)
    with torch.no_grad():
        w = m.weight
        w.copy_(torch.randn(w.shape, generator=g) * math.sqrt(2.0 / w[0].numel()))
        magnitude_prune_(w, sparsity)
        if m.bias is not None:
            m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return m.eval().requires_grad_(False), x


def _torch_csr_conv(conv):
    """``x -> F.conv2d(x, w)`` as torch CSR ``w[out, C·R·S] @ im2col(x)`` (``F.unfold``; a 1×1
    conv with padding 0 reshapes instead)."""
    c = conv.weight.reshape(conv.out_channels, -1).to_sparse_csr()
    k, s, p, d = conv.kernel_size, conv.stride, conv.padding, conv.dilation

    def fn(x):
        n, h, w = x.shape[0], x.shape[2], x.shape[3]
        ho, wo = (h + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1, (w + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
        if k == (1, 1) and p == (0, 0):
            cols = x[:, :, ::s[0], ::s[1]].transpose(0, 1).reshape(x.shape[1], -1)
        else:
            cols = F.unfold(x, k, d, p, s).transpose(0, 1).reshape(c.shape[1], -1)
        y = (c @ cols).view(-1, n, ho, wo).transpose(0, 1)
        return y if conv.bias is None else y + conv.bias.view(1, -1, 1, 1)
    return fn


def sparse_module(m):
    """The sparsekern inference module for a dense Linear / Conv2d."""
    from sparsekern.inference import CSRConv1x1, CSRConv2d, CSRLinear

    if isinstance(m, nn.Linear):
        return CSRLinear.from_dense(m).eval()
    if m.kernel_size == (1, 1) and m.padding == (0, 0):
        return CSRConv1x1.from_dense(m).eval()
    return CSRConv2d.from_dense(m).eval()


def provider_fn(provider, w, b):
    """``x -> y`` of a Linear with weight ``w``, bias ``b`` for ``provider`` (formats built here,
    outside the timing)."""
    if provider == "dense":
        return lambda x: F.linear(x, w, b)
    if provider == "torch_csr":
        c = w.to_sparse_csr()
        return lambda x: (c @ x.t()).t() + b
    m = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    with torch.no_grad():
        m.weight.copy_(w)
        if b is not None:
            m.bias.copy_(b)
    return sparse_module(m)


def layer_fns(m):
    """``{provider: x -> y}`` for a dense eval Linear / Conv2d ``m``."""
    if isinstance(m, nn.Linear):
        return {p: provider_fn(p, m.weight, m.bias) for p in PROVIDERS}
    return {"dense": m, "torch_csr": _torch_csr_conv(m), "sparsekern": sparse_module(m)}


def make_case(batch, sparsity, seed=0):
    """Linear 4096²: weight ``[4096, 4096]`` magnitude-pruned to ``sparsity``, bias, input
    ``[batch, 4096]``."""
    m, x = make_layer(linear_spec(batch), sparsity, seed)
    return m.weight, m.bias, x


# --- pytest-benchmark -----------------------------------------------------------------------------

@H.parametrize("provider", PROVIDERS)
@H.parametrize("sparsity", (0.9, 0.95))
@H.parametrize("batch", BATCHES)
def test_linear(benchmark, batch, sparsity, provider):
    w, b, x = make_case(batch, sparsity)
    fn = provider_fn(provider, w, b)
    benchmark.group = f"linear 4096x4096 batch {batch} s={sparsity}"
    benchmark.extra_info.update(H.environment("cpu"))
    with torch.no_grad():
        benchmark.pedantic(lambda: fn(x), rounds=10, warmup_rounds=2)


# --- crossover ------------------------------------------------------------------------------------

def bench_point(spec, sparsity, seed=0, budget_s=0.5, min_reps=7, max_reps=100):
    """One case at one sparsity: the three providers side by side (outputs checked equal to dense
    first). Row: the spec's fields, ``shape`` (its name), ``sparsity``, measured ``density``,
    ``load`` (CPUs other processes kept busy), ``{provider: stats}``, ``vs_dense``, ``vs_torch_csr``."""
    m, x = make_layer(spec, sparsity, seed)
    fns = layer_fns(m)
    with torch.no_grad():
        ref = fns["dense"](x)
        for p in PROVIDERS[1:]:
            torch.testing.assert_close(fns[p](x), ref, atol=1e-3, rtol=1e-3,
                                       msg=lambda e: f"{spec['name']} s={sparsity} {p}: {e}")
        snap = H.cpu_snapshot()
        stats = H.time_steps({p: (lambda f=f: f(x)) for p, f in fns.items()}, "cpu",
                             budget_s=budget_s, min_reps=min_reps, max_reps=max_reps)
        load = H.other_load(snap, H.cpu_snapshot())
    s = stats["sparsekern"]["median_s"]
    return {**{k: v for k, v in spec.items() if k != "name"}, "shape": spec["name"], "sparsity": sparsity,
            "density": float((m.weight != 0).float().mean()), "load": load, **stats,
            "vs_dense": stats["dense"]["median_s"] / s, "vs_torch_csr": stats["torch_csr"]["median_s"] / s}


def crossover(specs, sparsities=SPARSITIES, progress=True, **timing):
    """:func:`bench_point` for every spec × sparsity (tqdm progress bar); ``timing``: the
    ``budget_s``/``min_reps``/``max_reps`` of :func:`bench_point`."""
    from tqdm import tqdm

    points = [(spec, s) for spec in specs for s in sparsities]
    rows = []
    with tqdm(points, desc="crossover", unit="point", disable=not progress) as bar:
        for spec, s in bar:
            bar.set_postfix_str(f"{spec['name']} {s:.0%}")
            rows.append(bench_point(spec, s, **timing))
    return rows


def crossover_sparsity(rows, key="vs_dense"):
    """Lowest measured sparsity from which on sparsekern is ≥ 1× ``key`` at every higher one (None
    if it is not at the sparsest point). ``rows``: one shape's rows."""
    best = None
    for r in sorted(rows, key=lambda r: -r["sparsity"]):
        if r[key] < 1.0:
            break
        best = r["sparsity"]
    return best


def _by_shape(rows):
    out = {}
    for r in rows:
        out.setdefault(r["shape"], []).append(r)
    return out


def crossover_table(rows, key="vs_dense"):
    """Markdown: one line per shape, speedup ``key`` of sparsekern per sparsity, and the crossover."""
    sparsities = sorted({r["sparsity"] for r in rows})
    lines = ["| shape | ResNet-50 layers | " + " | ".join(f"{s:.0%}" for s in sparsities)
             + " | ≥ 1× from |", "|---|---|" + "---|" * (len(sparsities) + 1)]
    for shape, rs in _by_shape(rows).items():
        by = {r["sparsity"]: r for r in rs}
        layers = rs[0].get("layers") or []
        cells = [f"{by[s][key]:.2f}" if s in by else "–" for s in sparsities]
        c = crossover_sparsity(rs, key)
        lines.append(f"| {shape} | {len(layers) or ''} | " + " | ".join(cells)
                     + f" | {'never' if c is None else f'{c:.0%}'} |")
    return lines


def _panel(row):
    if row["kind"] == "linear":
        return "Linear"
    return "Conv2d 1×1, batch 1" if row["kernel"] == 1 else "Conv2d 3×3 / 7×7, batch 1"


def plot_crossover(rows, path, title="sparsekern speedup (fp32, CPU)"):
    """PNG of sparsekern's speedup vs sparsity per shape (log y, line at 1×): a row of panels each
    for the Linear shapes, the 1×1 convs and the other convs; vs dense (left), vs torch CSR (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {}
    for r in rows:
        groups.setdefault(_panel(r), []).append(r)
    fig, axes = plt.subplots(len(groups), 2, figsize=(15, 5 * len(groups)), squeeze=False)
    for (panel, g), row_axes in zip(groups.items(), axes):
        shapes = _by_shape(g)
        colors = plt.get_cmap("tab10" if len(shapes) <= 10 else "tab20")
        for ax, key, base in zip(row_axes, ("vs_dense", "vs_torch_csr"), ("dense", "torch CSR")):
            for i, (shape, rs) in enumerate(shapes.items()):
                rs = sorted(rs, key=lambda r: r["sparsity"])
                target = shape == TARGET_CONV["name"]
                ax.plot([100 * r["sparsity"] for r in rs], [r[key] for r in rs], marker="o", ms=3,
                        lw=2.5 if target else 1.2, color="black" if target else colors(i),
                        label=shape + (" (target; not a ResNet-50 layer)" if target else ""))
            ax.axhline(1.0, color="black", lw=1, ls="--")
            ax.set_yscale("log")
            ax.set_xlabel("sparsity (%)")
            ax.set_ylabel(f"speedup vs {base} (×)")
            ax.set_title(f"{panel}: sparsekern vs {base}")
            ax.grid(True, which="both", alpha=0.3)
        row_axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def table(rows):
    """Markdown lines: times and speedups per row (rows of :func:`bench_point`)."""
    lines = ["| batch | sparsity | dense ms | torch CSR ms | sparsekern ms | vs dense | vs torch CSR "
             "| other load (CPUs) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d, c, s = (r[p]["median_s"] for p in PROVIDERS)
        lines.append(f"| {r['batch']} | {r['sparsity']:.0%} | {d * 1e3:.3f} | {c * 1e3:.3f} | "
                     f"{s * 1e3:.3f} | {d / s:.1f}× | {c / s:.1f}× | {r['load']:.1f} |")
    return lines


def times_table(rows):
    """Markdown lines: :func:`table` with the shape in front (every crossover point)."""
    lines = table(rows)
    return (["| shape " + lines[0]] + ["|---" + lines[1]]
            + [f"| {r['shape']} {line}" for r, line in zip(rows, lines[2:])])


# --- whole model ----------------------------------------------------------------------------------

#: Whole models of :func:`bench_model`: (builder in ``bench.models``, STR budget in ``bench.suites``).
WHOLE_MODELS = {"resnet50": ("resnet50", "STR_RESNET50_90"), "mobilenet_v1": ("mobilenet_v1", "STR_MOBILENET_V1_89")}


def pruned_resnet50(budget=None, seed=0, calibration_batch=8, model="resnet50"):
    """``bench.models.<model>`` (``resnet50`` or ``mobilenet_v1``) with seeded default-init weights,
    each Conv2d/Linear magnitude-pruned to ``budget`` (default: STR's, ``suites.STR_RESNET50_90`` /
    ``STR_MOBILENET_V1_89``); BatchNorm statistics calibrated on one seeded random batch (so
    activations stay O(1)); eval mode."""
    from . import models, suites

    build, default = WHOLE_MODELS[model]
    torch.manual_seed(seed)
    model = getattr(models, build)()
    models.prune_to_budget_(model, getattr(suites, default) if budget is None else budget)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average: the batch's statistics exactly
    with torch.no_grad():
        model.train()(torch.randn(calibration_batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed)))
    return model.eval().requires_grad_(False)


def bench_model(budget=None, quick=False, seed=0, model="resnet50", batch=1):
    """Whole-model latency at ``batch`` images of 224×224: the dense (pruned, zeros stored)
    ResNet-50 / MobileNetV1 (``model``) vs its ``convert``-ed copy (example_input: the batch;
    BatchNorms folded, max pool separable, the layers' formats), side by side; FLOPs; the per-layer
    convert report; each converted layer re-timed against its dense original on its real input
    shape (``relayer``)."""
    import sparsekern as sk

    dense = pruned_resnet50(budget, seed, model=model)
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed + 1))
    flops = sk.count_flops(dense, (3, 224, 224))
    t0 = time.perf_counter()
    big = batch > 1  # a batch-32 ResNet-50 forward takes seconds: fewer samples
    sparse, report = sk.inference.convert(copy.deepcopy(dense), example_input=x, reps=2 if quick or big else 5,
                                          return_report=True)
    convert_s = time.perf_counter() - t0
    with torch.no_grad():
        ref, out = dense(x), sparse(x)
        max_err = float((out - ref).abs().max())
        torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-3)
        timing = QUICK_TIMING if quick else {"budget_s": 3.0, "min_reps": 4 if big else 10, "max_reps": 50}
        snap = H.cpu_snapshot()
        stats = H.time_steps({"dense": lambda: dense(x), "sparsekern": lambda: sparse(x)}, "cpu", **timing)
        load = H.other_load(snap, H.cpu_snapshot())
        layers, flop_rows = [], {r.name: r for r in flops.rows}
        for r in report:
            row = {k: getattr(r, k, None) for k in ("name", "kind", "density", "format", "dense_ms",
                                                     "sparse_ms", "speedup", "note")}
            row["input_shape"] = list(getattr(r, "input_shape", ()) or ())
            f = flop_rows.get(row["name"])
            row["dense_macs"], row["macs"] = (f.dense_macs, f.macs) if f else (None, None)
            if row["format"] != "dense" and row["input_shape"]:
                xi = torch.randn(row["input_shape"])
                d, s = dense.get_submodule(row["name"]), sparse.get_submodule(row["name"])
                t = H.time_steps({"dense": lambda: d(xi), "sparse": lambda: s(xi)}, "cpu",
                                 **(QUICK_TIMING if quick or big else {"budget_s": 0.2, "min_reps": 7, "max_reps": 50}))
                row["relayer"] = {"dense_ms": t["dense"]["median_s"] * 1e3, "sparse_ms": t["sparse"]["median_s"] * 1e3,
                                  "speedup": t["dense"]["median_s"] / t["sparse"]["median_s"]}
            layers.append(row)
    converted = {r["name"] for r in layers if r["format"] != "dense"}
    return {"model": model, "batch": batch, "params": flops.params, "nonzero_params": flops.nonzero_params,
            "sparsity": 1 - flops.nonzero_params / flops.params,
            "dense_macs": flops.dense_macs, "macs": flops.macs,
            "executed_macs": sum(f.macs if f.name in converted else f.dense_macs for f in flops.rows),
            "dense": stats["dense"], "sparsekern": stats["sparsekern"], "load": load,
            "speedup": stats["dense"]["median_s"] / stats["sparsekern"]["median_s"],
            "max_abs_err": max_err, "convert_s": convert_s, "layers": layers}


def budget_line():
    """The STR budget's totals next to Table 7's (``suites.STR_RESNET50_90``)."""
    from . import suites

    parts = []
    for key, exclude in (("overall", ()), ("backbone", ("fc",))):
        n, s = suites.budget_sparsity(suites.STR_RESNET50_90, exclude)
        parts.append(f"{key} {s:.2f} % of {n:,} weights (Table 7: {suites.STR_RESNET50_90_TOTALS[key][1]:.2f} %)")
    return ("Budget: STR column of Table 7 (Kusupati et al. 2020), per-layer magnitude pruning of "
            "seeded random weights, BatchNorm statistics from one random batch, eval; " + "; ".join(parts) + ".")


def model_section(res):
    """Markdown lines for :func:`bench_model`'s result."""
    d, s = res["dense"]["median_s"] * 1e3, res["sparsekern"]["median_s"] * 1e3
    conv = [r for r in res["layers"] if r["format"] != "dense"]
    lines = [
        "| model | latency ms (median, IQR) | MACs (sk.count_flops) | nonzero weights |",
        "|---|---|---|---|",
        f"| dense (pruned weights stored dense) | {d:.1f} ({(res['dense']['q3_s'] - res['dense']['q1_s']) * 1e3:.1f}) | "
        f"{res['dense_macs'] / 1e9:.3f} G | {res['params']:,} |",
        f"| sparsekern `convert` | {s:.1f} ({(res['sparsekern']['q3_s'] - res['sparsekern']['q1_s']) * 1e3:.1f}) | "
        f"{res['macs'] / 1e9:.3f} G if all sparse; {res['executed_macs'] / 1e9:.3f} G as converted | "
        f"{res['nonzero_params']:,} ({res['sparsity']:.2%} sparse) |",
        "",
        f"Speedup {res['speedup']:.2f}× (FLOPs: {res['dense_macs'] / res['macs']:.1f}× fewer); "
        f"{len(conv)} of {len(res['layers'])} layers converted; output max |Δ| vs dense "
        f"{res['max_abs_err']:.2e}; convert took {res['convert_s']:.1f} s; other load {res['load']:.1f} CPUs.",
        "",
        "| layer | input | density | format | convert: dense ms | sparse ms | speedup | re-timed speedup | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    f = (lambda v, spec: "–" if v is None else format(v, spec))
    for r in res["layers"]:
        re_ = r.get("relayer")
        lines.append(f"| {r['name']} | {'×'.join(map(str, r['input_shape']))} | {r['density']:.3f} | {r['format']} | "
                     f"{f(r['dense_ms'], '.3f')} | {f(r['sparse_ms'], '.3f')} | {f(r['speedup'], '.2f')} | "
                     f"{f(re_ and re_['speedup'], '.2f')} | {r['note'] or ''} |")
    return lines


# --- targets --------------------------------------------------------------------------------------

def check_targets(rows, model=None):
    """Issue 6's targets as ``{"target", "status" (PASS/FAIL/NOT MEASURED), "value", "text"}``:
    Linear 4096² batch 64 (``rows``), the 3×3 conv (rows of :data:`TARGET_CONV`) and, with
    ``model`` (:func:`bench_model`), no converted layer below :data:`MIN_LAYER_SPEEDUP`× dense,
    from the convert report and re-timed."""
    lin = {(r["batch"], r["sparsity"]): r for r in rows
           if r.get("kind", "linear") == "linear" and r.get("in", FEATURES) == FEATURES == r.get("out", FEATURES)}
    conv = {r["sparsity"]: r for r in rows if r.get("shape") == TARGET_CONV["name"]}
    checks = [(f"Linear 4096², batch {b}, {s:.0%}: ≥ {goal:g}× {base}",
               lin.get((b, s), {}).get(f"vs_{base}") if (b, s) in lin else None, goal)
              for (b, s, base), goal in TARGETS.items()]
    c = conv.get(CONV_TARGET[0])
    checks.append((f"3×3 conv 256→256 56×56 batch 1, {CONV_TARGET[0]:.0%}: ≥ {CONV_TARGET[1]:g}× dense",
                   c and c["vs_dense"], CONV_TARGET[1]))
    if model is not None:
        conv_rows = [r for r in model["layers"] if r["format"] != "dense"]
        report = min([r["speedup"] for r in conv_rows], default=1.0)  # dense layers: 1×
        retimed = min([r["relayer"]["speedup"] for r in conv_rows if "relayer" in r], default=1.0)
        checks.append((f"ResNet-50 (STR 90 %) after convert: no layer < {MIN_LAYER_SPEEDUP}× dense (report)",
                       report, MIN_LAYER_SPEEDUP))
        checks.append((f"ResNet-50 (STR 90 %) after convert: no layer < {MIN_LAYER_SPEEDUP}× dense (re-timed)",
                       retimed, MIN_LAYER_SPEEDUP))
    out = []
    for name, value, goal in checks:
        status = "NOT MEASURED" if value is None else "PASS" if value >= goal else "FAIL"
        out.append({"target": name, "status": status, "value": value,
                    "text": f"- {name} — " + ("not measured" if value is None else f"measured {value:.2f}×")
                    + f" ({status})"})
    return out


# --- script ---------------------------------------------------------------------------------------

def _paths(out):
    stem, _ = os.path.splitext(out)
    d, base = os.path.split(stem)
    png = base.replace("spmm-", "spmm-crossover-", 1) if base.startswith("spmm-") else base + "-crossover"
    return stem + ".json", os.path.join(d, png)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.bench_spmm", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    p.add_argument("--quick", action="store_true", help=f"sparsities {QUICK_SPARSITIES}, five shapes, "
                   "short timings (smoke test)")
    p.add_argument("--no-model", action="store_true", help="skip the whole ResNet-50")
    p.add_argument("--out", help="Markdown output (default: bench/results/spmm-<cpu>[-quick].md); "
                   "JSON next to it, PNG spmm-crossover-<...>.png")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
    env = H.environment("cpu")
    load0 = os.getloadavg()[0]
    command = "python -m bench.bench_spmm " + " ".join(argv if argv is not None else sys.argv[1:])
    sparsities = QUICK_SPARSITIES if args.quick else SPARSITIES
    timing = QUICK_TIMING if args.quick else TIMING
    specs = crossover_specs(args.quick)
    out = args.out or H.results_path("spmm", env["device_name"], "-quick.md" if args.quick else ".md")
    json_path, png_stem = _paths(out)
    md = [f"# Sparse inference (spmm family) — {env['device_name']}", "",
          f"- command: `{command.strip()}`",
          f"- machine: {env['device_name']}, {env['cpu_count']} CPUs (shared); torch {env['torch']}; "
          f"sparsekern backend: {env['sparsekern_backend']}",
          f"- git {env['git_sha'][:10]}{' (dirty)' if env['git_dirty'] else ''}, {env['date']}",
          "- fp32, batch 1 for convs (224×224 ResNet-50 shapes); weights He-scaled normal, magnitude-pruned "
          "(unstructured, exact per-layer quantile); median of round-robin timed calls (harness.time_steps); "
          "dense = `F.linear` (MKL) / `F.conv2d` (oneDNN), torch CSR = `w.to_sparse_csr() @ x` (convs: "
          "`@ F.unfold(x)`, 1×1: a reshape), sparsekern = `inference.CSRLinear` / `CSRConv1x1` / `CSRConv2d`; "
          "outputs checked equal to dense",
          "- other load = average CPUs kept busy by other processes (> 0 inflates multi-threaded times)", ""]
    result = {"meta": {**env, "command": command.strip(), "sparsities": list(sparsities)}, "runs": []}
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"{threads} thread(s), {len(specs)} shapes × {len(sparsities)} sparsities", flush=True)
        rows = crossover(specs, sparsities, **timing)
        model = None if args.no_model else bench_model(quick=args.quick)
        tgt = check_targets(rows, model)
        suffix = f"-{threads}t" if len(args.threads) > 1 else ""
        png = plot_crossover(rows, f"{png_stem}{suffix}.png",
                             title=f"sparsekern speedup, fp32, {env['device_name']}, {threads} thread(s)")
        md += [f"## {threads} thread{'s' if threads > 1 else ''}", "", "### Targets", ""]
        md += [t["text"] for t in tgt] + [""]
        md += [f"### Crossover: sparsekern speedup vs dense (plot: `{os.path.basename(png)}`)", ""]
        md += crossover_table(rows, "vs_dense") + [""]
        md += ["### Crossover: sparsekern speedup vs torch CSR", ""]
        md += crossover_table(rows, "vs_torch_csr") + [""]
        if model is not None:
            md += ["### ResNet-50, STR's learnt 90 % budget (Table 7), batch 1, 224×224", "", budget_line(), ""]
            md += model_section(model) + [""]
        md += ["### All points (ms)", ""] + times_table(rows) + [""]
        result["runs"].append({"threads": threads, "rows": rows, "model": model, "targets": tgt})
        print("\n".join(t["text"] for t in tgt), flush=True)
    md.append(f"1-min load average: {load0:.2f} at the start, {os.getloadavg()[0]:.2f} at the end.")
    result["meta"]["load_avg_1m_end"] = os.getloadavg()[0]
    text = "\n".join(md) + "\n"
    print(text)
    with open(out, "w") as f:
        f.write(text)
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}, {json_path} and the crossover PNG")


if __name__ == "__main__":
    main()


# --- bf16 decode ---------------------------------------------------------------------------------

#: Llama-7B MLP shape: gate/up 4096→11008, down 11008→4096.
LLAMA_MLP = (4096, 11008)
#: The bf16 decode cases: name → (density of the unstructured weight, or "2:4").
BF16_CASES = {"50%": 0.5, "70%": 0.3, "2:4": "2:4"}


class LlamaMLP(nn.Module):
    """``down(silu(gate(x)) · up(x))`` (transformers' LlamaMLP), no biases."""

    def __init__(self, hidden, inter, dtype=torch.bfloat16):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False, dtype=dtype)
        self.up_proj = nn.Linear(hidden, inter, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(inter, hidden, bias=False, dtype=dtype)

    def forward(self, x):
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def bench_bf16_mlp(case, batch=1, quick=False, seed=0, dtype=torch.bfloat16):
    """Llama-shaped MLP (:data:`LLAMA_MLP`) in bf16 at ``batch`` rows (decode): dense (torch's
    bf16 ``F.linear``) vs each Linear replaced by ``BitmapLinear`` (the bitmap format, built
    directly: the kernel's speed, not convert's choice), magnitude-pruned to the case's
    unstructured density or 2:4 (``sk.nm_mask``). Outputs checked within bf16 tolerance."""
    import sparsekern as sk
    from sparsekern.inference import BitmapLinear

    torch.manual_seed(seed)
    hidden, inter = LLAMA_MLP
    dense = LlamaMLP(hidden, inter, dtype).eval().requires_grad_(False)
    spec = BF16_CASES[case]
    with torch.no_grad():
        for lin in (dense.gate_proj, dense.up_proj, dense.down_proj):
            w = lin.weight.float()
            mask = sk.nm_mask(w, 2, 4) if spec == "2:4" else w.abs() > w.abs().flatten().kthvalue(
                int(w.numel() * (1 - spec))).values
            lin.weight.mul_(mask.to(lin.weight.dtype))
    sparse = copy.deepcopy(dense)
    for name in ("gate_proj", "up_proj", "down_proj"):
        setattr(sparse, name, BitmapLinear.from_dense(getattr(dense, name)).eval())
    x = torch.randn(batch, hidden, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    with torch.no_grad():
        ref, out = dense(x), sparse(x)
        max_err = float((out.float() - ref.float()).abs().max())
        torch.testing.assert_close(out, ref, atol=2 ** -6, rtol=2 ** -6)
        snap = H.cpu_snapshot()
        stats = H.time_steps({"dense": lambda: dense(x), "sparsekern": lambda: sparse(x)}, "cpu",
                             **(QUICK_TIMING if quick else {"budget_s": 3.0, "min_reps": 20, "max_reps": 100}))
        load = H.other_load(snap, H.cpu_snapshot())
    density = sum(int((getattr(dense, n).weight != 0).sum()) for n in ("gate_proj", "up_proj", "down_proj")) / (3 * hidden * inter)
    return {"case": case, "batch": batch, "density": density, "dense": stats["dense"],
            "sparsekern": stats["sparsekern"], "load": load, "max_abs_err": max_err,
            "speedup": stats["dense"]["median_s"] / stats["sparsekern"]["median_s"]}
