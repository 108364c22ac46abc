"""Sparse Linear and conv (spmm family): crossover of sparsekern's CSR kernels vs dense
``F.linear`` (MKL) and torch CSR (``w.to_sparse_csr()`` matmul) over sparsity 50–99 %, Linear
4096×4096 at batch 1 and 64; and the direct sparse 3×3 conv 256→256 at 56×56, batch 1, vs
``F.conv2d`` (oneDNN). fp32, CPU. Outputs are checked equal to dense.

pytest-benchmark (timing only)::

    pytest bench/bench_spmm.py --benchmark-only

Script (providers side by side, round-robin, per thread count; writes a Markdown table)::

    python -m bench.bench_spmm [--threads 1 2]
"""
import argparse
import os

import pytest
import torch
import torch.nn.functional as F

from . import harness as H

PROVIDERS = ("dense", "torch_csr", "sparsekern")
SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)
BATCHES = (1, 64)
FEATURES = 4096
#: (batch, sparsity, baseline) -> minimum speedup of sparsekern (issue 6)
TARGETS = {(64, 0.9, "dense"): 4.0, (64, 0.95, "dense"): 7.0, (64, 0.9, "torch_csr"): 1.5}
CONV_SPARSITIES = (0.7, 0.8, 0.9, 0.95)
CONV_TARGET = (0.9, 2.5)  # 3×3 256→256 56×56 batch 1: ≥ 2.5× dense at 90 %


def make_case(batch, sparsity, seed=0):
    """Weight ``[4096, 4096]`` with a uniform random ``sparsity`` fraction of zeros, bias, input
    ``[batch, 4096]`` (seeded normal)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(FEATURES, FEATURES, generator=g)
    w *= torch.rand(FEATURES, FEATURES, generator=g) >= sparsity
    return w, torch.randn(FEATURES, generator=g), torch.randn(batch, FEATURES, generator=g)


def provider_fn(provider, w, b):
    """``x -> y`` for ``provider``; formats are built here, outside the timing."""
    if provider == "dense":
        return lambda x: F.linear(x, w, b)
    if provider == "torch_csr":
        c = w.to_sparse_csr()
        return lambda x: (c @ x.t()).t() + b
    from sparsekern.inference import CSRLinear

    m = CSRLinear(w, b).eval()
    return lambda x: m(x)


# --- pytest-benchmark -----------------------------------------------------------------------------

@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("sparsity", (0.9, 0.95))
@pytest.mark.parametrize("batch", BATCHES)
def test_linear(benchmark, batch, sparsity, provider):
    w, b, x = make_case(batch, sparsity)
    fn = provider_fn(provider, w, b)
    benchmark.group = f"linear 4096x4096 batch {batch} s={sparsity}"
    benchmark.extra_info.update(H.environment("cpu"))
    with torch.no_grad():
        benchmark.pedantic(lambda: fn(x), rounds=10, warmup_rounds=2)


# --- script ---------------------------------------------------------------------------------------

def bench_case(batch, sparsity):
    w, b, x = make_case(batch, sparsity)
    fns = {p: provider_fn(p, w, b) for p in PROVIDERS}
    with torch.no_grad():
        ref = fns["dense"](x)
        for p in PROVIDERS[1:]:
            torch.testing.assert_close(fns[p](x), ref, atol=1e-3, rtol=1e-3)
        snap = H.cpu_snapshot()
        stats = H.time_steps({p: (lambda f=f: f(x)) for p, f in fns.items()}, "cpu",
                             budget_s=0.5, min_reps=7, max_reps=100)
        load = H.other_load(snap, H.cpu_snapshot())
    return {"batch": batch, "sparsity": sparsity, "load": load, **stats}


def bench_conv(sparsity, seed=0):
    """3×3 conv 256→256, padding 1, input [1, 256, 56, 56]: F.conv2d vs CSRConv2d."""
    from sparsekern.inference import CSRConv2d

    g = torch.Generator().manual_seed(seed)
    conv = torch.nn.Conv2d(256, 256, 3, padding=1).eval()
    with torch.no_grad():
        conv.weight.mul_(torch.rand(conv.weight.shape, generator=g) >= sparsity)
    sparse = CSRConv2d.from_dense(conv).eval()
    x = torch.randn(1, 256, 56, 56, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), conv(x), atol=1e-3, rtol=1e-3)
        snap = H.cpu_snapshot()
        stats = H.time_steps({"dense": lambda: conv(x), "sparsekern": lambda: sparse(x)}, "cpu",
                             budget_s=0.5, min_reps=7, max_reps=100)
        load = H.other_load(snap, H.cpu_snapshot())
    return {"sparsity": sparsity, "load": load, **stats}


def conv_table(rows):
    lines = ["| sparsity | dense ms | sparsekern ms | vs dense | other load (CPUs) |", "|---|---|---|---|---|"]
    for r in rows:
        d, s = r["dense"]["median_s"], r["sparsekern"]["median_s"]
        lines.append(f"| {r['sparsity']:.0%} | {d * 1e3:.3f} | {s * 1e3:.3f} | {d / s:.1f}× | {r['load']:.1f} |")
    r = next((r for r in rows if r["sparsity"] == CONV_TARGET[0]), None)
    if r is None:
        return lines
    x = r["dense"]["median_s"] / r["sparsekern"]["median_s"]
    return lines + ["", f"- 3×3 conv, {CONV_TARGET[0]:.0%}: ≥ {CONV_TARGET[1]}× dense — measured {x:.1f}× "
                        f"({'PASS' if x >= CONV_TARGET[1] else 'FAIL'})"]


def table(rows):
    lines = ["| batch | sparsity | dense ms | torch CSR ms | sparsekern ms | vs dense | vs torch CSR "
             "| other load (CPUs) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d, c, s = (r[p]["median_s"] for p in PROVIDERS)
        lines.append(f"| {r['batch']} | {r['sparsity']:.0%} | {d * 1e3:.3f} | {c * 1e3:.3f} | "
                     f"{s * 1e3:.3f} | {d / s:.1f}× | {c / s:.1f}× | {r['load']:.1f} |")
    return lines


def targets(rows):
    by = {(r["batch"], r["sparsity"]): r for r in rows}
    out = []
    for (batch, sparsity, base), goal in TARGETS.items():
        r = by[batch, sparsity]
        x = r[base]["median_s"] / r["sparsekern"]["median_s"]
        out.append(f"- batch {batch}, {sparsity:.0%}: ≥ {goal}× {base} — measured {x:.1f}× "
                   f"({'PASS' if x >= goal else 'FAIL'})")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.bench_spmm", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    p.add_argument("--out", help="Markdown output (default: bench/results/spmm-<cpu>.md)")
    args = p.parse_args(argv)
    env = H.environment("cpu")
    load0 = os.getloadavg()[0]
    md = [f"# Sparse Linear 4096×4096 (spmm family) — {env['device_name']}", "",
          f"- command: `python -m bench.bench_spmm --threads {' '.join(map(str, args.threads))}`",
          f"- machine: {env['device_name']}, {env['cpu_count']} CPUs; torch {env['torch']}; "
          f"sparsekern backend: {env['sparsekern_backend']}",
          f"- git {env['git_sha'][:10]}{' (dirty)' if env['git_dirty'] else ''}, {env['date']}",
          "- fp32; uniform random zeros; bias; median of round-robin timed calls (harness.time_steps); "
          "dense = `F.linear` (MKL), torch CSR = `(w.to_sparse_csr() @ x.t()).t() + b`, "
          "sparsekern = `inference.CSRLinear` (CSR, batch as the SIMD dimension); outputs checked equal",
          "- other load = average CPUs kept busy by other processes during the case "
          "(the machine is shared; > 0 inflates multi-threaded times)", ""]
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"{threads} threads", flush=True)
        rows = []
        for batch in BATCHES:
            for s in SPARSITIES:
                rows.append(bench_case(batch, s))
                print("\n".join(table(rows[-1:])[2:]), flush=True)
        md += [f"## {threads} thread{'s' if threads > 1 else ''}", "", "### Linear 4096×4096", ""]
        md += table(rows) + [""] + targets(rows) + [""]
        crows = []
        for s in CONV_SPARSITIES:
            crows.append(bench_conv(s))
            print("\n".join(conv_table(crows[-1:])[2:3]), flush=True)
        md += ["### 3×3 conv 256→256, 56×56, batch 1 (`CSRConv2d`, direct sparse conv)", ""]
        md += conv_table(crows) + [""]
    md.append(f"1-min load average: {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.")
    text = "\n".join(md) + "\n"
    print(text)
    out = args.out or os.path.join(H.REPO, "bench", "results", f"spmm-{H.slug(env['device_name'])}.md")
    with open(out, "w") as f:
        f.write(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
