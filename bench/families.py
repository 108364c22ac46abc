"""The op families of ``python -m bench``: which cases each suite runs, and how each is timed.

Every ``run_<family>(ctx)`` returns result rows in the schema of ``bench/report.py`` (without the
run metadata, which ``__main__`` adds). Providers of one case are timed side by side
(``harness.time_steps``: warmup, compilation included, then round-robin calls) unless the family's
own ``bench_case`` (masks, spmm: owned by their modules) times them. ``BASELINES`` names the
provider each family's speedups are relative to; ``TARGETS`` are the targets (docs/benchmarks.md).
"""
import dataclasses
import math
import re
import typing

import torch

from . import harness as H
from . import suites

FAMILIES = ("threshold", "select", "bound", "masks", "spmm", "train_step")
#: provider that ``speedup_vs_baseline`` divides by (the plain-PyTorch way)
BASELINES = {"threshold": "eager", "select": "eager", "bound": "eager", "masks": "eager",
             "spmm": "dense", "train_step": "eager"}

#: per-suite case selection; "tiny" is the test suite (``tests/test_bench.py``), not for numbers
SUITES = {
    "full": {
        "budget_s": 0.3,
        "threshold": [(("st3_threshold",), ("64K", "1M", "16M"), ("fp32", "bf16")),
                      (("soft_threshold", "str_threshold", "power_threshold", "hard_threshold"),
                       ("64K", "1M", "16M"), ("fp32",))],
        "memory": True,
        "select": ("mobilenet_v1", "resnet50"),
        "gaussian": "resnet50",
        "asl": ((1024, 1024), (4096, 4096)),
        "masks": "ends",
        "spmm": {"batches": (1, 64), "sparsities": (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99),
                 "conv": (0.7, 0.8, 0.9, 0.95), "resnet50_convs": (0.7, 0.9, 0.95), "model": "full",
                 "model_batches": (1, 32), "mobilenet": True, "bf16_mlp": ("50%", "70%", "2:4"), "pool": (1, 32),
                 "cuda_dtypes": ("fp32", "fp16", "bf16")},
        "train_step": "resnet50",
    },
    "quick": {
        "budget_s": 0.1,
        "threshold": [(("st3_threshold", "soft_threshold", "power_threshold", "hard_threshold",
                        "str_threshold"), ("64K", "1M"), ("fp32",))],
        "memory": False,
        "select": ("mobilenet_v1",),
        "gaussian": "mobilenet_v1",
        "asl": ((1024, 1024),),
        "masks": "smallest",
        "spmm": {"batches": (64,), "sparsities": (0.5, 0.9, 0.99), "conv": (0.9,), "pool": (1,),
                 "cuda_dtypes": ("fp32",)},
        "train_step": "resnet50-layer1",
    },
    # make gpu-check (bench/gpu_check.py): CUDA, a few minutes; 16M weights (smaller ones are
    # launch-bound on a GPU: their copy-bandwidth fractions say little)
    "gpu": {
        "budget_s": 0.1,
        "threshold": [(("st3_threshold",), ("16M",), ("fp32", "bf16")),
                      (("soft_threshold", "str_threshold", "power_threshold", "hard_threshold"),
                       ("16M",), ("fp32",))],
        "memory": False,
        "select": ("resnet50",),
        "gaussian": "resnet50",
        "asl": ((4096, 4096),),
        "masks": "smallest",
        "spmm": {"batches": (1, 64), "sparsities": (0.5, 0.75, 0.9, 0.95, 0.99), "conv": (),
                 "cuda_dtypes": ("fp32", "fp16")},
        "train_step": "resnet50-layer1",
    },
    "tiny": {
        "budget_s": 0.005,
        "threshold": [(("st3_threshold",), ("4K", "64K"), ("fp32",))],
        "memory": False,
        "select": ("tiny",),
        "gaussian": "tiny",
        "asl": ((64, 64),),
        "masks": "one",
        "spmm": {"batches": (1,), "sparsities": (0.9,), "conv": (), "pool": (1,), "cuda_dtypes": ("fp32",)},
        "train_step": "tiny",
    },
}
#: weight lists by name: the suites' networks, one stage of ResNet-50, and a tiny one for tests
WEIGHT_LISTS = {
    "resnet50": suites.resnet50,
    "mobilenet_v1": suites.mobilenet_v1,
    "resnet50-layer1": lambda: suites.resnet50()[:11],
    "tiny": lambda: [(8, 3, 3, 3), (16, 8, 3, 3), (32, 16, 1, 1), (10, 32)],
}


@dataclasses.dataclass
class Context:
    """What every family runner needs: device, suite config, case filter, progress bars, and
    ``on_rows``, called with each case's finished rows (``bench/gpu_check.py`` streams them to a
    file, so a run killed at its time limit keeps the cases it finished)."""
    device: str
    suite: str
    pattern: "re.Pattern | None" = None
    progress: bool = True
    on_rows: "typing.Callable[[list], None] | None" = None

    @property
    def cfg(self):
        return SUITES[self.suite]

    def wanted(self, case_id):
        return self.pattern is None or bool(self.pattern.search(case_id))

    def bar(self, items, desc):
        """``items`` under a tqdm progress bar (plain, if tqdm is not installed)."""
        try:
            from tqdm import tqdm
        except ImportError:
            return items
        return tqdm(items, desc=desc, disable=not self.progress or len(items) < 2, leave=False)

    def done(self, rows):
        """One case's finished rows: handed to ``on_rows``, returned."""
        if self.on_rows:
            self.on_rows(rows)
        return rows

    def time(self, steps, **kwargs):
        """``harness.time_steps`` with the suite's budget (3 to 100 calls each) unless overridden."""
        kwargs = {"budget_s": self.cfg["budget_s"], "min_reps": 3, "max_reps": 100, **kwargs}
        return H.time_steps(steps, self.device, **kwargs)


def _rows(family, op, size, numel, dtype, mode, stats, **extra):
    """One row per provider of ``stats`` (``{provider: timing}``), speedup vs the baseline."""
    base = stats.get(BASELINES[family], {}).get("median_s")
    out = []
    for provider, st in stats.items():
        row = {"family": family, "op": op, "size": size, "numel": int(numel), "dtype": dtype,
               "mode": mode, "case": f"{family}/{op}/{size}/{dtype}/{mode}", "provider": provider,
               "baseline": BASELINES[family], **extra, **st}
        if base is not None and "median_s" in st:
            row["speedup_vs_baseline"] = base / st["median_s"]
        out.append(row)
    return out


# --- CUDA copy bandwidth ------------------------------------------------------------------------

_COPY_GBPS = {}  # (elements, bytes per element) -> measured device copy GB/s


def _bandwidth(rows, numel, elem_bytes, passes, device, ctx):
    """Add ``bytes_moved`` (``passes`` × the weight's bytes: fwd reads w, writes out = 2;
    fwd+bwd adds grad in, w in, grad_w out = 5), ``copy_gbps`` (a copy of the same bytes on
    ``device``, measured: 2 × bytes / time) and ``bandwidth_fraction`` = (bytes_moved / median) /
    copy_gbps to ``rows``. Called on CUDA only (CPU caches make the ideal traffic meaningless)."""
    key = (numel, elem_bytes)
    if key not in _COPY_GBPS:
        src = torch.empty(numel * elem_bytes, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        st = ctx.time({"copy": lambda: dst.copy_(src)})["copy"]
        _COPY_GBPS[key] = 2 * numel * elem_bytes / st["median_s"] / 1e9
    for r in rows:
        r["copy_gbps"] = _COPY_GBPS[key]
        r["bytes_moved"] = passes * numel * elem_bytes
        if "median_s" in r:
            r["bandwidth_fraction"] = r["bytes_moved"] / r["median_s"] / 1e9 / _COPY_GBPS[key]
    return rows


# --- threshold ----------------------------------------------------------------------------------

def threshold_cases(ctx, ops=None, sizes=None, dtypes=None):
    """``[{op, size, dtype, mode}]`` of the suite (or of the explicit ops/sizes/dtypes)."""
    if ops is None:
        groups = ctx.cfg["threshold"]
    else:  # explicit choice (python -m bench --ops ...): sizes and dtypes default as before
        groups = [(ops, sizes or (("64K",) if ctx.suite != "full" else ("64K", "1M", "16M")),
                   dtypes or ("fp32", "bf16"))]
    out = []
    for g_ops, g_sizes, g_dtypes in groups:
        for op in g_ops:
            for size in g_sizes:
                for dtype in g_dtypes:
                    for mode in H.MODES:
                        case = {"op": op, "size": size, "dtype": dtype, "mode": mode}
                        if ctx.wanted(f"threshold/{op.removesuffix('_threshold')}/{size}/{dtype}/{mode}"):
                            out.append(case)
    return out


def run_threshold(ctx, cases):
    """Time eager / compile / sparsekern on each case (fresh compile per case, static shapes)."""
    rows = []
    for case in ctx.bar(cases, "threshold"):
        shape, dtype = H.SIZES[case["size"]], H.DTYPES[case["dtype"]]
        inputs = H.make_inputs(case["op"], shape, dtype, ctx.device, grad=case["mode"] == "fwd+bwd")
        steps = {p: H.make_step(H.provider_fn(case["op"], p), inputs, case["mode"])[0] for p in H.PROVIDERS}
        got = _rows("threshold", case["op"].removesuffix("_threshold"), case["size"], math.prod(shape),
                    case["dtype"], case["mode"], ctx.time(steps, warmup=2), shape=list(shape))
        if ctx.device == "cuda":
            _bandwidth(got, math.prod(shape), dtype.itemsize, 2 if case["mode"] == "fwd" else 5, ctx.device, ctx)
        rows += ctx.done(got)
    return rows


# --- select ---------------------------------------------------------------------------------------

def run_select(ctx):
    """Global magnitude threshold (SPEC §9) over a network's weights: eager (cat+sort, the
    reference), cat+kthvalue, cat+topk, torch.quantile (≤ 2^24 elements), compile of the
    reference, sparsekern. Values are checked equal to the reference's."""
    from . import bench_select as S

    rows = []
    names = [n for n in ctx.cfg["select"] if ctx.wanted(f"select/global_threshold/{n}/fp32/fwd")]
    for name in ctx.bar(names, "select"):
        ws = suites.make_weights(WEIGHT_LISTS[name](), device=ctx.device)
        n = sum(w.numel() for w in ws)
        fns = {"eager": S.provider_fn("cat+sort"), "compile": S.provider_fn("compile"),
               "cat+kthvalue": S.provider_fn("cat+kthvalue"), "cat+topk": S.provider_fn("cat+topk"),
               "sparsekern": S.provider_fn("sparsekern")}
        if S.runs("torch.quantile", n):
            fns["torch.quantile"] = S.provider_fn("torch.quantile")
        ref = fns["eager"](ws)
        torch.testing.assert_close(fns["sparsekern"](ws), ref, atol=0, rtol=0)
        # one warmup (the compiling call; the check above warmed the others): seconds per call
        rows += ctx.done(_rows("select", "global_threshold", name, n, "fp32", "fwd",
                               ctx.time({p: (lambda fn=fn: fn(ws)) for p, fn in fns.items()}, warmup=1)))
    return rows


# --- bound ----------------------------------------------------------------------------------------

def run_bound(ctx):
    """Gaussian bounds of a network's weights in one call, and asl_threshold fwd / fwd+bwd
    (per-layer r, fp32) at the suite's square sizes: eager / compile / sparsekern."""
    from . import bench_bound as B

    rows = []
    name = ctx.cfg["gaussian"]
    if ctx.wanted(f"bound/gaussian_bounds/{name}/fp32/fwd"):
        ws = suites.make_weights(WEIGHT_LISTS[name](), device=ctx.device)
        fns = {p: B.gaussian_fn(p) for p in B.PROVIDERS}
        rows += ctx.done(_rows("bound", "gaussian_bounds", name, sum(w.numel() for w in ws), "fp32", "fwd",
                               ctx.time({p: (lambda fn=fn: fn(ws)) for p, fn in fns.items()})))
    cases = [(shape, mode) for shape in ctx.cfg["asl"] for mode in H.MODES
             if ctx.wanted(f"bound/asl/{_size_label(shape)}/fp32/{mode}")]
    for shape, mode in ctx.bar(cases, "bound"):
        w, r, g = B.asl_inputs(torch.float32, "layer", mode == "fwd+bwd", ctx.device, shape=shape)
        steps = {p: B.asl_step(B.asl_fn(p), w, r, g, mode) for p in B.PROVIDERS}
        got = _rows("bound", "asl", _size_label(shape), math.prod(shape), "fp32", mode, ctx.time(steps),
                    shape=list(shape))
        if ctx.device == "cuda":
            _bandwidth(got, math.prod(shape), 4, 2 if mode == "fwd" else 5, ctx.device, ctx)
        rows += ctx.done(got)
    return rows


def _size_label(shape):
    n = math.prod(shape)
    return next((k for k, v in H.SIZES.items() if math.prod(v) == n), "×".join(map(str, shape)))


# --- masks ----------------------------------------------------------------------------------------

def mask_cases(which):
    """Cases of ``bench_masks.cases()``: ``"all"``; ``"ends"``: each builder's smallest and
    largest weight; ``"smallest"``: each builder's smallest; ``"one"``: the first of those."""
    from . import bench_masks as M

    cases = M.cases()
    if which == "all":
        return cases
    by = {}
    for builder, shape in cases:
        by.setdefault(builder, []).append(shape)
    ends = {b: sorted(shapes, key=math.prod) for b, shapes in by.items()}
    if which == "ends":
        return [(b, s) for b, shapes in ends.items() for s in dict.fromkeys((shapes[0], shapes[-1]))]
    picked = [(b, shapes[0]) for b, shapes in ends.items()]
    return picked if which == "smallest" else picked[:1]


def run_masks(ctx):
    """Structured mask builders via ``bench_masks.bench_case`` (eager / compile / sparsekern,
    masks checked equal)."""
    from . import bench_masks as M

    rows = []
    cases = [(b, s) for b, s in mask_cases(ctx.cfg["masks"])
             if ctx.wanted(f"masks/{b.removesuffix('_mask')}/{'×'.join(map(str, s))}/fp32/mask")]
    for builder, shape in ctx.bar(cases, "masks"):
        stats = {r["provider"]: {k: v for k, v in r.items() if k not in ("case", "provider")}
                 for r in M.bench_case(builder, shape, ctx.device)}
        rows += ctx.done(_rows("masks", builder.removesuffix("_mask"), "×".join(map(str, shape)), math.prod(shape),
                               "fp32", "mask", stats, shape=list(shape)))
    return rows


# --- spmm -----------------------------------------------------------------------------------------

def _spmm_op(spec):
    """Case op of a crossover spec: ``linear-b64``, ``conv3x3-b1`` (the 256→256 56×56 target) or a
    ResNet-50 conv ``rn50-conv3x3-128-128-28-s2`` (in, out, input side, stride)."""
    from . import bench_spmm as P

    if spec["kind"] == "linear":
        return f"linear-b{spec['batch']}"
    if spec["name"] == P.TARGET_CONV["name"]:
        return "conv3x3-b1"
    k = spec["kernel"]
    return (f"rn50-conv{k}x{k}-{spec['in']}-{spec['out']}-{spec['hw']}"
            + (f"-s{spec['stride']}" if spec["stride"] > 1 else ""))


def _converted_linear(spec, sparsity, ctx):
    """Timing of ``sk.inference.convert`` applied to the case's Linear (example input = the
    case's): the user's path, with its dense fallback where the sparse module does not pay; and
    its speedup over the dense layer timed side by side with it."""
    import sparsekern as sk
    from . import bench_spmm as P

    m, x = P.make_layer(spec, sparsity)
    converted = sk.inference.convert(torch.nn.Sequential(m), example_input=x)  # m itself stays dense
    with torch.no_grad():
        torch.testing.assert_close(converted(x), m(x), atol=1e-3, rtol=1e-3)
        st = ctx.time({"dense": lambda: m(x), "convert": lambda: converted(x)}, min_reps=5)
    return st["convert"], st["dense"]["median_s"] / st["convert"]["median_s"]


def run_spmm(ctx):
    """Sparse inference. CPU (C++ kernels): the crossover points of ``bench_spmm`` (Linear 4096² at
    each batch, the 3×3 target conv, the ResNet-50 convs at batch 1) over the suite's sparsities —
    dense vs torch CSR vs sparsekern — and, in the full suite, the whole ResNet-50 at STR's 90 %
    budget, dense vs ``convert`` (``bench_spmm.bench_model``). CUDA: :func:`run_spmm_cuda`."""
    from . import bench_spmm as P

    if ctx.device == "cuda":
        return run_spmm_cuda(ctx)
    cfg, rows = ctx.cfg["spmm"], []
    points = [(P.linear_spec(b), s) for b in cfg["batches"] for s in cfg["sparsities"]]
    points += [(P.TARGET_CONV, s) for s in cfg["conv"]]
    if cfg.get("resnet50_convs"):
        points += [(c, s) for c in P.resnet50_conv_specs() for s in cfg["resnet50_convs"]]
    points = [(spec, s) for spec, s in points if ctx.wanted(f"spmm/{_spmm_op(spec)}/{s:.0%}/fp32/infer")]
    timing = {"budget_s": ctx.cfg["budget_s"], "min_reps": 5, "max_reps": 100}
    for spec, s in ctx.bar(points, "spmm"):
        res = P.bench_point(spec, s, **timing)
        stats = {p: res[p] for p in P.PROVIDERS}
        extra = {}
        if spec["kind"] == "linear" and spec["batch"] == 64:
            stats["convert"], extra["worst_layer_speedup"] = _converted_linear(spec, s, ctx)
        numel = spec["in"] * spec["out"] * spec.get("kernel", 1) ** 2
        rows += ctx.done(_rows("spmm", _spmm_op(spec), f"{s:.0%}", numel, "fp32", "infer", stats, sparsity=s,
                               batch=spec["batch"], shape=spec["name"], kind=spec["kind"],
                               kernel=spec.get("kernel", 1), other_load_cpus=res["load"], **extra))
    whole = [("resnet50", "resnet50-str90", b, "ResNet-50 224×224, STR 90 % budget (Table 7)")
             for b in cfg.get("model_batches", (1,))]
    whole += [("mobilenet_v1", "mobilenetv1-str89", 1, "MobileNetV1 224×224, STR 89 % budget (Table 8)")
              ] if cfg.get("mobilenet") else []
    for model, op, batch, shape in (whole if cfg.get("model") else []):
        if not ctx.wanted(f"spmm/{op}/b{batch}/fp32/infer"):
            continue
        res = P.bench_model(quick=cfg["model"] == "quick", model=model, batch=batch)
        changed = [r for r in res["layers"] if r["format"] != "dense"]
        rows += ctx.done(_rows("spmm", op, f"b{batch}", res["params"], "fp32", "infer",
                               {"dense": res["dense"], "sparsekern": res["sparsekern"]}, sparsity=res["sparsity"],
                               batch=batch, shape=shape,
                               other_load_cpus=res["load"], dense_macs=res["dense_macs"], macs=res["macs"],
                               layers_converted=len(changed), layers_total=len(res["layers"]),
                               worst_layer_speedup=min([r["relayer"]["speedup"] for r in changed if "relayer" in r],
                                                       default=None),
                               max_abs_diff=res["max_abs_err"]))
    for batch in cfg.get("pool", ()):
        if ctx.wanted(f"spmm/maxpool-stem/b{batch}/fp32/infer"):
            rows += ctx.done(_stem_pool_rows(batch, ctx))
    for case in cfg.get("bf16_mlp", ()):
        if not ctx.wanted(f"spmm/llama-mlp-b1/{case}/bf16/infer"):
            continue
        res = P.bench_bf16_mlp(case, quick=ctx.cfg["budget_s"] < 0.5)
        hidden, inter = P.LLAMA_MLP
        rows += ctx.done(_rows("spmm", "llama-mlp-b1", case, 3 * hidden * inter, "bf16", "infer",
                               {"dense": res["dense"], "sparsekern": res["sparsekern"]}, sparsity=1 - res["density"],
                               batch=1, shape=f"Llama MLP {hidden}→{inter}→{hidden} bf16, BitmapLinear",
                               other_load_cpus=res["load"], max_abs_diff=res["max_abs_err"]))
    return rows


def _stem_pool_rows(batch, ctx):
    """The converted models' max pool on a ResNet stem (``[batch, 64, 112, 112]``, 3×3 / 2, padding 1):
    torch's ``F.max_pool2d`` (dense), ``torch.compile`` of it and ``sparsekern.ops.pool.max_pool2d``,
    outputs checked equal."""
    import torch.nn.functional as F
    from sparsekern.ops.pool import max_pool2d

    x = torch.randn(batch, 64, 112, 112, generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    compiled = torch.compile(F.max_pool2d, dynamic=False)
    fns = {"dense": lambda: F.max_pool2d(x, 3, 2, 1), "compile": lambda: compiled(x, 3, 2, 1),
           "sparsekern": lambda: max_pool2d(x, 3, 2, 1)}
    ref = fns["dense"]()
    for name in ("compile", "sparsekern"):
        if not torch.equal(fns[name](), ref):
            raise AssertionError(f"spmm/maxpool-stem/b{batch}: {name} differs from F.max_pool2d")
    stats = ctx.time(fns)
    return _rows("spmm", "maxpool-stem", f"b{batch}", x.numel(), "fp32", "infer", stats, batch=batch,
                 shape=f"max pool 3×3/2 of [{batch}, 64, 112, 112] (a ResNet stem's)")


def run_spmm_cuda(ctx):
    """Sparse Linear 4096×4096 on CUDA (Triton kernels) at the suite's batches, sparsities and
    ``cuda_dtypes``, via ``bench_spmm_gpu.bench_case`` (outputs checked, CUDA-event timing):
    dense ``F.linear`` (cuBLAS, the baseline; torch.compile of it calls the same GEMM, so no
    compile provider), ``torch_csr`` (cuSPARSE), ``sparsekern`` = ``csr_mm`` on the same
    unstructured weight, and ``sk_bsr`` / ``sk_nm`` / ``semi_2:4`` on 32×32-block / N:M / 2:4
    weights of the same density (``bench_spmm_gpu`` docstring)."""
    from . import bench_spmm_gpu as G

    cfg, rows = ctx.cfg["spmm"], []
    out_f, in_f = G.SHAPES["4096x4096"]
    points = [(d, s, [b for b in cfg["batches"] if ctx.wanted(f"spmm/linear-b{b}/{s:.0%}/{d}/infer")])
              for d in cfg["cuda_dtypes"] for s in cfg["sparsities"]]
    gen = torch.Generator().manual_seed(0)
    for dtype, s, batches in ctx.bar([p for p in points if p[2]], "spmm"):
        for r in G.bench_case("4096x4096", dtype, s, batches, ctx.cfg["budget_s"], gen, ctx.device):
            stats = {"sparsekern" if p == "sk_csr" else p: r[p] for p in G.PROVIDERS if p in r}
            rows += ctx.done(_rows("spmm", f"linear-b{r['batch']}", f"{s:.0%}", out_f * in_f, dtype, "infer", stats,
                                   sparsity=s, batch=r["batch"], shape=f"linear {out_f}x{in_f} b{r['batch']} {dtype}",
                                   kind="linear", kernel=1))
    return rows


# --- train step -----------------------------------------------------------------------------------

def run_train_step(ctx):
    """Sparsification overhead of one training step per method (``bench_train_step``)."""
    from . import bench_train_step as T

    name = ctx.cfg["train_step"]
    shapes = WEIGHT_LISTS[name]()
    methods = [m for m in T.METHODS if ctx.wanted(f"train_step/{m}/{name}/fp32/step")]
    rows = []
    for method in ctx.bar(methods, "train_step"):
        steps, check = T.make_steps(method, shapes, ctx.device)
        # seconds per call at ResNet-50 size: the check call in make_steps is the warmup
        stats = ctx.time(steps, warmup=0, max_reps=3)
        rows += ctx.done(_rows("train_step", method, name, suites.numel(shapes), "fp32", "step", stats,
                               layers=len(shapes), max_abs_diff=check))
    return rows


# --- targets --------------------------------------------------------------------------------------

#: CPU targets: (case, provider compared, against, bound, kind): kind "speedup" = against/provider ≥ bound;
#: "memory" = provider peak / against peak < bound; "bandwidth" = fraction ≥ bound (CUDA);
#: "layers" = the slowest converted layer of a whole model, re-timed, ≥ bound × dense
TARGETS = [
    ("threshold/st3/16M/fp32/fwd", "sparsekern", "eager", 5.0, "speedup"),
    ("threshold/st3/16M/fp32/fwd", "sparsekern", "compile", 1.0, "speedup"),
    ("threshold/st3/16M/fp32/fwd+bwd", "sparsekern", "eager", 3.0, "speedup"),
    ("threshold/st3/16M/fp32/fwd+bwd", "sparsekern", "eager", 1.0, "memory"),
    ("select/global_threshold/resnet50/fp32/fwd", "sparsekern", "cat+kthvalue", 10.0, "speedup"),
    ("select/global_threshold/resnet50/fp32/fwd", "sparsekern", "eager", 20.0, "speedup"),
    ("bound/gaussian_bounds/resnet50/fp32/fwd", "sparsekern", "eager", 3.0, "speedup"),
    ("bound/asl/16M/fp32/fwd+bwd", "sparsekern", "eager", 3.0, "speedup"),
    ("spmm/linear-b64/90%/fp32/infer", "sparsekern", "dense", 4.0, "speedup"),
    ("spmm/linear-b64/95%/fp32/infer", "sparsekern", "dense", 7.0, "speedup"),
    ("spmm/linear-b64/90%/fp32/infer", "sparsekern", "torch_csr", 1.5, "speedup"),
    ("spmm/conv3x3-b1/90%/fp32/infer", "sparsekern", "dense", 2.5, "speedup"),
    # issue 16: whole models after convert, bf16 decode
    ("spmm/resnet50-str90/b1/fp32/infer", "sparsekern", "dense", 4.0, "speedup"),
    ("spmm/resnet50-str90/b32/fp32/infer", "sparsekern", "dense", 2.5, "speedup"),
    ("spmm/mobilenetv1-str89/b1/fp32/infer", "sparsekern", "dense", 2.0, "speedup"),
    ("spmm/llama-mlp-b1/50%/bf16/infer", "sparsekern", "dense", 1.3, "speedup"),
    ("spmm/llama-mlp-b1/70%/bf16/infer", "sparsekern", "dense", 2.0, "speedup"),
    ("spmm/llama-mlp-b1/2:4/bf16/infer", "sparsekern", "dense", 1.3, "speedup"),
    ("spmm/maxpool-stem/b1/fp32/infer", "sparsekern", "compile", 2.0, "speedup"),
]
#: CUDA targets besides the per-op bandwidth and compile ones that :func:`targets` adds
CUDA_TARGETS = [
    ("select/global_threshold/resnet50/fp32/fwd", "sparsekern", "cat+kthvalue", 20.0, "speedup"),
]


def targets(rows, device):
    """``[{target, status, value, text}]`` (docs/benchmarks.md): every mask case ≥ 10× eager and, on CPU,
    the fixed TARGETS, sparse Linear at batch 64 never < 0.95× dense (``convert()``, with its
    dense fallback; provider "convert"), no layer of the converted ResNet-50 < 0.95× dense; on
    CUDA, CUDA_TARGETS and every fused op ≥ 80 % of copy bandwidth and ≥ 1× compile. Status
    PASS / FAIL / NOT MEASURED (case not in this run)."""
    by = {(r["case"], r["provider"]): r for r in rows}
    checks = list(TARGETS if device == "cpu" else CUDA_TARGETS)
    checks += [(r["case"], "sparsekern", "eager", 10.0, "speedup") for r in rows
               if r["family"] == "masks" and r["provider"] == "sparsekern"]
    checks += [(r["case"], "convert", "dense", 0.95, "layers") for r in rows
               if r["family"] == "spmm" and r["op"] == "linear-b64" and r["provider"] == "convert"]
    checks += [(r["case"], "sparsekern", "dense", 0.95, "layers") for r in rows
               if r["family"] == "spmm" and r["op"] in ("resnet50-str90", "mobilenetv1-str89")
               and r["provider"] == "sparsekern"]
    if device == "cuda":
        fused = [r["case"] for r in rows if "bandwidth_fraction" in r and r["provider"] == "sparsekern"]
        checks += [(c, "sparsekern", "copy", 0.8, "bandwidth") for c in fused]
        checks += [(c, "sparsekern", "compile", 1.0, "speedup") for c in fused]
    out = []
    for case, prov, other, bound, kind in checks:
        a, b = by.get((case, prov), {}), by.get((case, other), {})
        value = None
        if kind == "speedup" and "median_s" in a and "median_s" in b:
            value = b["median_s"] / a["median_s"]
        elif kind == "memory" and a.get("peak_extra_bytes") and b.get("peak_extra_bytes"):
            value = a["peak_extra_bytes"] / b["peak_extra_bytes"]
        elif kind == "bandwidth":
            value = a.get("bandwidth_fraction")
        elif kind == "layers":
            value = a.get("worst_layer_speedup")
        name = {"speedup": f"{case}: {prov} ≥ {bound:g}× {other}",
                "memory": f"{case}: {prov} peak memory < {bound:g}× {other}",
                "bandwidth": f"{case}: {prov} ≥ {bound:.0%} of copy bandwidth",
                "layers": f"{case}: after convert no layer < {bound:g}× {other} (re-timed)"}[kind]
        if value is None:
            status = "NOT MEASURED"
        else:
            status = "PASS" if (value < bound if kind == "memory" else value >= bound) else "FAIL"
        shown = "" if value is None else f" (measured {value:.2f}{'' if kind == 'bandwidth' else '×'})"
        out.append({"target": name, "status": status, "value": value, "text": f"{status}: {name}{shown}"})
    return out
