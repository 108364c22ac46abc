"""Sparse Linear on a CUDA GPU (spmm family, Triton kernels of ``sparsekern/triton/spmm.py``):
speed vs dense ``F.linear`` (cuBLAS), torch CSR (``w.to_sparse_csr()`` matmul, cuSPARSE) and
torch's semi-structured 2:4 (``torch.sparse.to_sparse_semi_structured``, 16-bit, where the GPU
supports it) over sparsity 50–99 %: Linear 4096×4096 and the LLM projection 4096→11008, batch 1
and 64, fp32 and fp16/bf16.

Providers, each ``x [B, in] -> y [B, out]`` with everything a Linear call needs (x transposed
to ``[in, B]`` for the sparsekern kernels, bias):

* ``dense``: ``F.linear(x, w, b)``; ``torch_csr``: ``(w.to_sparse_csr() @ x.t()).t() + b``;
* ``sk_csr``: ``csr_mm`` on the same unstructured weight;
* ``sk_bsr``: ``bsr_mm`` on a weight of the same density whose zeros are whole 32×32 blocks
  (``tl.dot`` on the blocks);
* ``sk_nm``: ``nm_mm`` at the N:M sparsities (2:4, 1:4, 1:8, 1:16);
* ``semi_2:4``: ``F.linear`` with a 2:4 semi-structured weight (50 %, fp16/bf16 only).

Every provider's output is checked against ``F.linear`` of its own weight. fp32 runs with torch's
default ``allow_tf32 = False`` (cuBLAS and ``bsr_mm``'s ``tl.dot`` both in full fp32). Times:
median of CUDA-event timed calls (``harness.time_steps``), round-robin. Writes JSON rows and a
Markdown table (default ``bench/results/spmm-gpu-<device>.json`` / ``.md``)::

    python -m bench.bench_spmm_gpu [--quick] [--dtypes fp32,fp16] [--out PATH.json]

Needs CUDA; exits with a message otherwise (the CPU crossover is ``bench/bench_spmm.py``).
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

from . import harness as H

#: name -> (out_features, in_features)
SHAPES = {"4096x4096": (4096, 4096), "4096->11008": (11008, 4096)}
BATCHES = (1, 64)
SPARSITIES = (0.5, 0.75, 0.875, 0.9, 0.9375, 0.95, 0.97, 0.99)
#: sparsity -> (n, m) of the N:M format at that sparsity
NM = {0.5: (2, 4), 0.75: (1, 4), 0.875: (1, 8), 0.9375: (1, 16)}
BSR_BLOCK = 32
PROVIDERS = ("dense", "torch_csr", "sk_csr", "sk_bsr", "sk_nm", "semi_2:4")
#: output check (atol = rtol) per dtype; weights are randn / sqrt(in), so outputs are O(1)
CHECK_TOL = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 5e-2}


def make_weights(out_f, in_f, sparsity, dtype, gen, device="cuda"):
    """Unstructured, 32×32-block and (at N:M sparsities) N:M weights of ``sparsity``."""
    w = torch.randn(out_f, in_f, generator=gen) / in_f ** 0.5
    ws = {"unstructured": w * (torch.rand(out_f, in_f, generator=gen) >= sparsity)}
    br, bc = -(-out_f // BSR_BLOCK), -(-in_f // BSR_BLOCK)
    keep = torch.zeros(br * bc, dtype=torch.bool)
    keep[torch.randperm(br * bc, generator=gen)[:round((1 - sparsity) * br * bc)]] = True
    keep = keep.reshape(br, bc).repeat_interleave(BSR_BLOCK, 0).repeat_interleave(BSR_BLOCK, 1)
    ws["block"] = w * keep[:out_f, :in_f]
    if sparsity in NM:
        n, m = NM[sparsity]
        pos = torch.rand(out_f, in_f // m, m, generator=gen).argsort(-1)[..., :n]
        keep = torch.zeros(out_f, in_f // m, m, dtype=torch.bool).scatter_(2, pos, True)
        ws["nm"] = w * keep.reshape(out_f, in_f)
    return {k: v.to(device=device, dtype=dtype) for k, v in ws.items()}


def providers(ws, bias, sparsity, dtype_name):
    """name -> (x -> y, its weight) for the providers that apply to this case."""
    from sparsekern.inference.formats import bsr_from_dense, csr_from_dense, nm_from_dense
    from sparsekern.triton import spmm as T

    w, out_f = ws["unstructured"], ws["unstructured"].shape[0]
    b = bias.to(w.dtype)

    def cast(*tensors):  # the builders take fp32: their values back in w's dtype (exact for fp16/bf16)
        return [t.to(w.dtype) if t.is_floating_point() else t for t in tensors]

    def as_cols(x):  # x [B, in] -> [in, B], as inference.functional.sparse_linear does
        return x.reshape(-1, 1) if x.shape[0] == 1 else x.t().contiguous()

    csr = w.to_sparse_csr()
    rowptr, col, val = cast(*csr_from_dense(w.float()))
    fns = {
        "dense": (lambda x: F.linear(x, w, b), w),
        "torch_csr": (lambda x: (csr @ x.t()).t() + b, w),
        "sk_csr": (lambda x: T.csr_mm(rowptr, col, val, bias, as_cols(x), out_f, True), w),
    }
    bsr = cast(*bsr_from_dense(ws["block"].float(), (BSR_BLOCK, BSR_BLOCK)))
    fns["sk_bsr"] = (lambda x: T.bsr_mm(*bsr, bias, as_cols(x), out_f, True), ws["block"])
    if "nm" in ws:
        n, m = NM[sparsity]
        nm = cast(*nm_from_dense(ws["nm"].float(), n, m))
        fns["sk_nm"] = (lambda x: T.nm_mm(*nm, bias, as_cols(x), n, m, out_f, True), ws["nm"])
        if (n, m) == (2, 4) and dtype_name != "fp32":
            try:
                semi = torch.sparse.to_sparse_semi_structured(ws["nm"])
                fns["semi_2:4"] = (lambda x: F.linear(x, semi, b), ws["nm"])
            except Exception as e:  # unsupported GPU / build: reported, not fatal
                fns["semi_2:4"] = (e, ws["nm"])
    return fns


def bench_case(shape, dtype_name, sparsity, batches, budget, gen, device="cuda"):
    out_f, in_f = SHAPES[shape]
    dtype = H.DTYPES[dtype_name]
    ws = make_weights(out_f, in_f, sparsity, dtype, gen, device)
    bias = torch.randn(out_f, generator=gen).to(device)
    fns = providers(ws, bias, sparsity, dtype_name)
    rows = []
    for batch in batches:
        x = torch.randn(batch, in_f, generator=gen).to(device=device, dtype=dtype)
        steps, row = {}, {"shape": shape, "out_features": out_f, "in_features": in_f,
                          "dtype": dtype_name, "sparsity": sparsity, "batch": batch}
        with torch.no_grad():
            for name, (fn, w) in fns.items():
                if isinstance(fn, Exception):
                    row[name] = {"error": f"{type(fn).__name__}: {fn}"}
                    continue
                try:
                    y = fn(x)
                    tol = CHECK_TOL[dtype_name]
                    ref = F.linear(x.float(), w.float(), bias)
                    torch.testing.assert_close(y.float(), ref, atol=tol, rtol=tol)
                except Exception as e:  # a failing or wrong provider is reported, not timed
                    row[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                    continue
                steps[name] = lambda fn=fn: fn(x)
            row.update(H.time_steps(steps, device, budget_s=budget, min_reps=10, max_reps=500))
        rows.append(row)
        print("".join(table_line(row)), flush=True)
    return rows


def _cell(row, name):
    r = row.get(name)
    if r is None:
        return "–"
    if "error" in r:
        return "error"
    us = r["median_s"] * 1e6
    if name == "dense" or "median_s" not in row.get("dense", {}):
        return f"{us:.1f}"
    return f"{us:.1f} ({row['dense']['median_s'] / r['median_s']:.2f}×)"


def table_line(row):
    return [f"| {row['batch']} | {row['sparsity']:.2%} |"] + [f" {_cell(row, p)} |" for p in PROVIDERS]


def markdown(rows, env, command):
    md = [f"# Sparse Linear on the GPU (spmm family, Triton) — {env['device_name']}", "",
          f"- command: `{command}`",
          f"- torch {env['torch']}, triton {env['triton']}; git {env['git_sha'][:10]}"
          f"{' (dirty)' if env['git_dirty'] else ''}, {env['date']}",
          "- times: median µs of CUDA-event timed calls (round-robin); in parentheses: speedup vs "
          "dense `F.linear` (cuBLAS); `–`: not applicable; `error`: see the JSON",
          "- torch_csr / sk_csr: uniform random zeros; sk_bsr: the same density in whole "
          f"{BSR_BLOCK}×{BSR_BLOCK} blocks; sk_nm: N:M at 50 % (2:4), 75 % (1:4), 87.5 % (1:8), "
          "93.75 % (1:16); semi_2:4: torch semi-structured, 50 %, 16-bit; outputs checked equal to "
          "`F.linear` of each provider's weight", ""]
    head = "| batch | sparsity | " + " | ".join(f"{p} µs" for p in PROVIDERS) + " |"
    for key in dict.fromkeys((r["shape"], r["dtype"]) for r in rows):
        md += [f"## {key[0]} ({SHAPES[key[0]][1]} → {SHAPES[key[0]][0]}), {key[1]}", "", head,
               "|" + "---|" * (len(PROVIDERS) + 2)]
        md += ["".join(table_line(r)) for r in rows if (r["shape"], r["dtype"]) == key]
        md.append("")
    errors = {(r["shape"], r["dtype"], p, r[p]["error"].splitlines()[0]) for r in rows for p in PROVIDERS
              if p in r and "error" in r[p]}
    if errors:
        md += ["Errors:", ""] + [f"- {s} {d} {p}: {e}" for s, d, p, e in sorted(errors)]
    return "\n".join(md) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.bench_spmm_gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated from {','.join(SHAPES)}")
    p.add_argument("--dtypes", default="fp32,fp16,bf16", help="comma-separated from fp32,fp16,bf16")
    p.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)))
    p.add_argument("--batches", default=",".join(map(str, BATCHES)))
    p.add_argument("--quick", action="store_true", help="short timings (a smoke test)")
    p.add_argument("--out", help="JSON path (default: bench/results/spmm-gpu-<device>.json); "
                                 "the table goes next to it (.md)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_spmm_gpu: no CUDA device (torch.cuda.is_available() is False); "
                         "the CPU sparse Linear benchmark is `python -m bench.bench_spmm`")
    shapes, dtypes = args.shapes.split(","), args.dtypes.split(",")
    for name, chosen, known in (("shape", shapes, SHAPES), ("dtype", dtypes, CHECK_TOL)):
        bad = [c for c in chosen if c not in known]
        if bad:
            p.error(f"unknown {name} {', '.join(bad)}; choose from {', '.join(known)}")
    sparsities = [float(s) for s in args.sparsities.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    env = H.environment("cuda")
    gen = torch.Generator().manual_seed(0)
    rows = []
    for shape in shapes:
        for dtype_name in dtypes:
            print(f"{shape} {dtype_name}", flush=True)
            for s in sparsities:
                rows += bench_case(shape, dtype_name, s, batches, 0.05 if args.quick else 0.3, gen)
    out = args.out or H.results_path("spmm-gpu", env["device_name"], ".json")
    with open(out, "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1)
    command = "python -m bench.bench_spmm_gpu " + " ".join(sys.argv[1:] if argv is None else argv)
    text = markdown(rows, env, command.strip())
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {out} and its .md")


if __name__ == "__main__":
    main()
