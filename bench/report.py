"""Results file schema, its validation, the Markdown report and the PNG plots of ``python -m bench``.

Results file (JSON, ``<out>/<device-slug>-<date>[-<suite>].json``, schema ``sparsekern-bench/1``)::

    {"schema": "sparsekern-bench/1",
     "meta": {...},        # the run: META_KEYS below (+ memory_method / memory_validation on
                           # runs that measured memory)
     "rows": [{...}, ...], # one per (case, provider): ROW_KEYS below + the timing or "error"
     "targets": [{"target": str, "status": "PASS"|"FAIL"|"NOT MEASURED",
                  "value": float|null, "text": str}, ...]}

Row fields (ROW_KEYS are required in every row):

* run: ``device`` ("cpu"/"cuda"), ``device_name`` (CPU model / GPU name), ``torch``,
  ``triton`` (null if absent), ``git_sha``, ``git_dirty``, ``date`` (ISO 8601), ``threads``
* case: ``family`` (threshold, select, bound, masks, spmm, train_step), ``op``, ``size`` (label:
  "16M", "resnet50", "64×64×3×3", "90%"), ``numel`` (elements of the weight(s)), ``dtype``,
  ``mode`` (fwd, fwd+bwd, mask, infer, step), ``case`` ("family/op/size/dtype/mode", the id
  ``--filter`` matches), ``provider``, ``baseline`` (the provider speedups are relative to)
* timing, seconds, per call: ``median_s``, ``q1_s``, ``q3_s``, ``min_s``, ``max_s``, ``reps``
  (``first_call_s`` when warmed up: compilation included) — or ``error`` (str) if the provider failed
* optional: ``speedup_vs_baseline`` (baseline median / this median), ``shape``,
  ``peak_extra_bytes`` / ``memory_error`` (threshold fwd+bwd), ``bytes_moved``, ``copy_gbps``,
  ``bandwidth_fraction`` (CUDA: (bytes_moved / median) / measured copy bandwidth), ``sparsity``,
  ``batch``, ``kind`` / ``kernel`` / ``other_load_cpus`` (spmm), ``dense_macs``, ``macs``,
  ``layers_converted``, ``layers_total``, ``worst_layer_speedup`` (spmm whole model, and Linear
  batch 64 after ``convert``: dense / converted timed side by side), ``layers``,
  ``max_abs_diff`` (train_step: eager vs sparsekern outputs; spmm whole model: converted vs dense)
"""
import math
import os
import sys

SCHEMA = "sparsekern-bench/1"
#: required keys of ``meta`` and their types
META_KEYS = {"command": str, "suite": str, "device": str, "device_name": str, "torch": str,
             "triton": (str, type(None)), "git_sha": str, "git_dirty": bool, "date": str,
             "threads": int, "cpu_count": int, "python": str, "sparsekern_backend": str,
             "load_avg_1m_start": float, "load_avg_1m_end": float, "other_processes_cpus": float,
             "wall_s": float, "family_wall_s": dict}
RUN_KEYS = ("device", "device_name", "torch", "triton", "git_sha", "git_dirty", "date", "threads")
#: required keys of every row and their types
ROW_KEYS = {"device": str, "device_name": str, "torch": str, "triton": (str, type(None)), "git_sha": str,
            "git_dirty": bool, "date": str, "threads": int, "family": str, "op": str, "size": str,
            "numel": int, "dtype": str, "mode": str, "case": str, "provider": str, "baseline": str}
TIMING_KEYS = {"median_s": float, "q1_s": float, "q3_s": float, "min_s": float, "max_s": float, "reps": int}
STATUSES = ("PASS", "FAIL", "NOT MEASURED")


def _check(obj, keys, where):
    for k, t in keys.items():
        if k not in obj:
            raise ValueError(f"{where}: missing {k!r}")
        if not isinstance(obj[k], t) or (t is int and isinstance(obj[k], bool)):
            raise ValueError(f"{where}: {k!r} = {obj[k]!r} is not {t}")


def validate(doc):
    """Raise ValueError naming the first field of ``doc`` that breaks the schema above."""
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise ValueError(f"not a {SCHEMA} results file (schema = {doc.get('schema') if isinstance(doc, dict) else doc!r})")
    _check(doc.get("meta", {}), META_KEYS, "meta")
    rows = doc.get("rows")
    if not isinstance(rows, list) or not rows:
        raise ValueError("rows: need a non-empty list")
    seen = set()
    for i, r in enumerate(rows):
        where = f"rows[{i}] ({r.get('case')} {r.get('provider')})"
        _check(r, ROW_KEYS, where)
        if r["case"] != f"{r['family']}/{r['op']}/{r['size']}/{r['dtype']}/{r['mode']}":
            raise ValueError(f"{where}: case is not family/op/size/dtype/mode")
        if (r["case"], r["provider"]) in seen:
            raise ValueError(f"{where}: duplicate case and provider")
        seen.add((r["case"], r["provider"]))
        if "error" in r:
            if not isinstance(r["error"], str):
                raise ValueError(f"{where}: error must be a string")
            continue
        _check(r, TIMING_KEYS, where)
        if not 0 < r["min_s"] <= r["q1_s"] <= r["median_s"] <= r["q3_s"] <= r["max_s"]:
            raise ValueError(f"{where}: timings not ordered min <= q1 <= median <= q3 <= max")
    for i, t in enumerate(doc.get("targets", [])):
        _check(t, {"target": str, "status": str, "text": str}, f"targets[{i}]")
        if t["status"] not in STATUSES:
            raise ValueError(f"targets[{i}]: status {t['status']!r} not in {STATUSES}")


# --- tables ---------------------------------------------------------------------------------------

def _ms(s):
    s *= 1e3
    return f"{s:.0f}" if s >= 100 else f"{s:.3g}"


def _cases(rows):
    """``{case: {provider: row}}`` in first-seen order."""
    out = {}
    for r in rows:
        out.setdefault(r["case"], {})[r["provider"]] = r
    return out


def family_table(rows):
    """Markdown table of one family: median ms (IQR) per provider, sparsekern's speedups."""
    cases = _cases(rows)
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    base = rows[0]["baseline"]
    others = [p for p in providers if p != "sparsekern"]
    extra = [k for k in ("peak_extra_bytes", "bandwidth_fraction", "max_abs_diff") if any(k in r for r in rows)]
    head = ["op", "size", "dtype", "mode"] + [f"{p} ms" for p in providers]
    head += [f"×{p}" for p in others if "sparsekern" in providers]
    if "peak_extra_bytes" in extra:
        head += ["peak MiB " + p for p in providers]
    if "bandwidth_fraction" in extra:
        head.append("sparsekern of copy BW")
    if "max_abs_diff" in extra:
        head.append("max |eager − sk|")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case, by in cases.items():
        r0 = next(iter(by.values()))
        sk = by.get("sparsekern", {})
        cells = [r0["op"], r0["size"], r0["dtype"], r0["mode"]]
        for p in providers:
            r = by.get(p, {})
            cells.append(f"{_ms(r['median_s'])} ({_ms(r['q3_s'] - r['q1_s'])})" if "median_s" in r
                         else ("error" if "error" in r else "–"))
        if "sparsekern" in providers:
            for p in others:
                o = by.get(p, {})
                cells.append(f"{o['median_s'] / sk['median_s']:.2f}" if "median_s" in o and "median_s" in sk
                             else "–")
        if "peak_extra_bytes" in extra:
            cells += [f"{by[p]['peak_extra_bytes'] / 2**20:.1f}" if by.get(p, {}).get("peak_extra_bytes") is not None
                      else "–" for p in providers]
        if "bandwidth_fraction" in extra:
            cells.append(f"{sk['bandwidth_fraction']:.0%}" if "bandwidth_fraction" in sk else "–")
        if "max_abs_diff" in extra:
            cells.append(f"{r0['max_abs_diff']:.1e}" if "max_abs_diff" in r0 else "–")
        lines.append("| " + " | ".join(cells) + " |")
    errors = [f"- {r['case']} {r['provider']}: {r['error']}" for r in rows if "error" in r]
    note = f"Median (IQR) ms per call; ×P: P's median / sparsekern's (baseline: {base})."
    return "\n".join(lines + ([""] + errors if errors else []) + ["", note])


def compact_table(rows):
    """Markdown: per case, the baseline's and sparsekern's median ms and sparsekern's speedups."""
    lines = ["| op | size | dtype | mode | baseline ms | sparsekern ms | ×baseline | ×compile |",
             "|---|---|---|---|---|---|---|---|"]
    for by in _cases(rows).values():
        r0 = next(iter(by.values()))
        sk, base, comp = by.get("sparsekern", {}), by.get(r0["baseline"], {}), by.get("compile", {})
        sp = lambda o: f"{o['median_s'] / sk['median_s']:.2f}" if "median_s" in o and "median_s" in sk else "–"  # noqa: E731
        ms = lambda o: _ms(o["median_s"]) if "median_s" in o else ("error" if "error" in o else "–")  # noqa: E731
        lines.append(f"| {r0['op']} | {r0['size']} | {r0['dtype']} | {r0['mode']} | {r0['baseline']} {ms(base)} "
                     f"| {ms(sk)} | {sp(base)} | {sp(comp)} |")
    return "\n".join(lines)


def summary(doc):
    """One line per case: sparsekern's speedup over the baseline (and compile): the terminal table."""
    lines = [f"{'case':<48} {'baseline ms':>12} {'sparsekern ms':>14} {'×base':>7} {'×compile':>9}"]
    for case, by in _cases(doc["rows"]).items():
        sk = by.get("sparsekern", {})
        base = by.get(next(iter(by.values()))["baseline"], {})
        comp = by.get("compile", {})
        sp = lambda o: f"{o['median_s'] / sk['median_s']:.2f}" if "median_s" in o and "median_s" in sk else "–"  # noqa: E731
        ms = lambda o: _ms(o["median_s"]) if "median_s" in o else ("error" if "error" in o else "–")  # noqa: E731
        lines.append(f"{case:<48} {ms(base):>12} {ms(sk):>14} {sp(base):>7} {sp(comp):>9}")
    return "\n".join(lines)


FAMILY_TITLES = {
    "threshold": "Threshold ops (SPEC §1–3, §6): per-layer scalar threshold at the 0.9 quantile of |w|",
    "select": "Global magnitude threshold (SPEC §9) over a network's weights; eager = concatenate + sort",
    "bound": "Bounds (SPEC §4): Gaussian bounds of a network's weights; asl_threshold (per-layer r)",
    "masks": "Structured masks (SPEC §5), s = 0.5 (N:M 2:4, blocks 4×4); masks checked equal",
    "spmm": "Sparse inference: Linear 4096×4096 (batch b) and 3×3 conv 256→256 56×56 vs dense; size = sparsity",
    "train_step": "Training-step sparsification overhead (threshold/masks + thresholding + backward), s = 0.9",
}


def markdown(doc, plots=()):
    m = doc["meta"]
    fam = ", ".join(f"{k} {v:.0f} s" for k, v in m["family_wall_s"].items())
    lines = [f"# sparsekern benchmarks: {m['device_name']} ({m['device']})", "",
             f"- command: `{m['command']}` (suite {m['suite']}), wall time {m['wall_s']:.0f} s ({fam})",
             f"- {m['date']}, git {m['git_sha']}{' (dirty)' if m['git_dirty'] else ''}, torch {m['torch']}, "
             f"triton {m['triton']}, Python {m['python']}, {m['threads']} threads of {m['cpu_count']} CPUs",
             f"- sparsekern backend: {m['sparsekern_backend']}",
             f"- background load: other processes kept {m['other_processes_cpus']:.2f} CPUs busy on average "
             f"(load average {m['load_avg_1m_start']:.2f} at start, {m['load_avg_1m_end']:.2f} at end)",
             "- times: median (IQR) in ms of repeated calls after warmup (compilation excluded), providers "
             "of a case timed side by side; eager = `sparsekern.reference`, compile = "
             "`torch.compile(reference, dynamic=False)`"]
    if "memory_method" in m:
        lines.append(f"- peak MiB (threshold fwd+bwd): {m['memory_method']}")
    if m["device"] == "cuda":
        lines.append("- copy BW: (ideal bytes / median) over a measured device copy of the weight's bytes; "
                     "ideal bytes: fwd 2× the weight (read w, write out), fwd+bwd 5×")
    for family in dict.fromkeys(r["family"] for r in doc["rows"]):
        rows = [r for r in doc["rows"] if r["family"] == family]
        lines += ["", f"## {family}", "", FAMILY_TITLES.get(family, ""), "", family_table(rows)]
    if doc.get("targets"):
        lines += ["", "## Targets (docs/benchmarks.md)", ""] + [f"- {t['text']}" for t in doc["targets"]]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
    return "\n".join(lines) + "\n"


# --- plots ----------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_speedup_vs_size(doc, path):
    """One panel per op measured at ≥ 2 sizes: sparsekern speedup vs elements, a line per
    dtype/mode, solid over the baseline, dashed over compile. Returns ``path`` or None."""
    cases = _cases(doc["rows"])
    series = {}
    for by in cases.values():
        sk = by.get("sparsekern", {})
        r0 = next(iter(by.values()))
        if r0["family"] == "spmm" or "median_s" not in sk:
            continue
        for other, style in ((r0["baseline"], "-"), ("compile", "--")):
            o = by.get(other, {})
            if "median_s" in o:
                key = (r0["family"], r0["op"])
                series.setdefault(key, {}).setdefault((r0["dtype"], r0["mode"], other, style), []).append(
                    (r0["numel"], o["median_s"] / sk["median_s"]))
    panels = {k: v for k, v in series.items() if len({x for pts in v.values() for x, _ in pts}) >= 2}
    if not panels:
        return None
    plt = _pyplot()
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.6 * nrows), squeeze=False)
    for ax, ((family, op), lines) in zip(axes.flat, panels.items()):
        for (dtype, mode, other, style), pts in lines.items():
            pts.sort()
            ax.plot([x for x, _ in pts], [y for _, y in pts], style, marker="o", label=f"{dtype} {mode} vs {other}")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set(xscale="log", yscale="log", title=f"{family}: {op}", xlabel="elements", ylabel="sparsekern speedup")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    m = doc["meta"]
    fig.suptitle(f"sparsekern speedup vs size — {m['device_name']} ({m['device']}), torch {m['torch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_spmm_crossover(doc, path):
    """Sparse-inference crossover map (``bench_spmm.plot_crossover``): sparsekern's speedup vs
    sparsity over dense and torch CSR, one line per layer shape. Returns ``path`` or None."""
    from .bench_spmm import plot_crossover

    points = []
    for by in _cases([r for r in doc["rows"] if r["family"] == "spmm" and "kind" in r]).values():
        sk, d, c = (by.get(p, {}) for p in ("sparsekern", "dense", "torch_csr"))
        if all("median_s" in r for r in (sk, d, c)):
            points.append({k: sk[k] for k in ("kind", "kernel", "shape", "sparsity")}
                          | {"vs_dense": d["median_s"] / sk["median_s"],
                             "vs_torch_csr": c["median_s"] / sk["median_s"]})
    if not points:
        return None
    return plot_crossover(points, path, title=f"sparse inference crossover — {doc['meta']['device_name']}")


def plots(doc, stem):
    """Write ``<stem>-speedup.png`` and ``<stem>-spmm-crossover.png`` (when there is data);
    none, with a warning, if matplotlib is not installed."""
    try:
        _pyplot()
    except ImportError:
        print("matplotlib is not installed: no plots", file=sys.stderr)
        return []
    made = [plot_speedup_vs_size(doc, f"{stem}-speedup.png"), plot_spmm_crossover(doc, f"{stem}-spmm-crossover.png")]
    return [p for p in made if p]
