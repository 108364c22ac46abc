"""``python -m bench``: every op family (threshold, select, bound, masks, spmm) and the
training-step overhead of every method, sparsekern vs eager PyTorch and ``torch.compile``, on the
present device (CUDA if available). Prints a summary table and the targets (docs/benchmarks.md) (PASS/FAIL),
writes ``<out>/<device>-<date>[-<suite>].json`` (schema: ``bench/report.py``), a Markdown report
next to it and PNG plots (speedup vs size per op; the spmm crossover map).

    python -m bench                          # full default suite (< 15 min on 2 CPU cores)
    python -m bench --suite quick            # every family, small sizes, short timings
    python -m bench --filter 'threshold/st3' --out /tmp/st3
    python -m bench --ops st3 --sizes 16M --dtypes fp32      # threshold family, chosen cases

``--filter`` is a regular expression searched in each case id ``family/op/size/dtype/mode``
(e.g. ``threshold/st3/16M/fp32/fwd``, ``spmm/linear-b64/90%/fp32/infer``,
``train_step/st3/resnet50/fp32/step``). Threshold forward+backward peak memory is measured in a
subprocess (``bench/harness.py``). On CUDA the spmm family is the Triton sparse Linear vs cuBLAS
(``families.run_spmm_cuda``); ``--suite gpu`` is the short CUDA suite of ``make gpu-check``.
"""
import argparse
import datetime
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback

import torch

from . import families as F
from . import harness as H
from . import report

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=tuple(F.SUITES), default="full",
                   help="full (default), quick, gpu (short, CUDA); tiny is for the tests")
    p.add_argument("--quick", action="store_true", help="same as --suite quick")
    p.add_argument("--device", choices=("cpu", "cuda"), default=H.default_device(),
                   help="default: cuda if available, else cpu")
    p.add_argument("--filter", help="regular expression searched in each case id family/op/size/dtype/mode")
    p.add_argument("--out", help="output directory (default bench/results); a path ending in .json "
                                 "names the results file itself")
    p.add_argument("--ops", help="threshold family: comma-separated ops, short or full names")
    p.add_argument("--sizes", help=f"threshold family: comma-separated from {','.join(H.SIZES)}")
    p.add_argument("--dtypes", help=f"threshold family: comma-separated from {','.join(H.DTYPES)}")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    p.add_argument("--memory-worker", nargs=2, metavar=("CASES", "RESULT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.suite = "quick"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False")
    try:
        args.pattern = re.compile(args.filter) if args.filter else None
    except re.error as e:
        p.error(f"--filter {args.filter!r}: {e}")
    try:
        args.ops = [H.op_name(o) for o in args.ops.split(",")] if args.ops else None
    except ValueError as e:
        p.error(f"--ops: {e}")
    for name in ("sizes", "dtypes"):
        chosen = getattr(args, name).split(",") if getattr(args, name) else None
        known = H.SIZES if name == "sizes" else H.DTYPES
        bad = [c for c in chosen or () if c not in known]
        if bad:
            p.error(f"unknown {name[:-1]} {', '.join(bad)}; choose from {', '.join(known)}")
        setattr(args, name, chosen)
    if (args.sizes or args.dtypes) and not args.ops:
        args.ops = list(H.OPS)
    return args


# --- threshold peak memory (subprocess) -----------------------------------------------------------

def _case_key(case):
    return (case["op"], case["size"], case["dtype"], case["mode"])


def memory_worker(cases_path, result_path):
    """Subprocess entry: validate the memory method, then peak extra bytes per case/provider."""
    with open(cases_path) as f:
        spec = json.load(f)
    device = spec["device"]
    out = {"validation": H.validate_memory(device), "peaks": []}
    for case, provider in itertools.product(spec["cases"], H.PROVIDERS):
        entry = {**case, "provider": provider}
        try:
            inputs = H.make_inputs(case["op"], H.SIZES[case["size"]], H.DTYPES[case["dtype"]],
                                   device, grad=True)
            step, clear = H.make_step(H.provider_fn(case["op"], provider), inputs, case["mode"])
            for _ in range(2):  # warmup, compilation included
                step()
            entry["peak_extra_bytes"] = H.peak_extra_bytes(step, clear, device)
        except Exception as e:
            entry["error"] = f"{type(e).__name__}: {e}"
        out["peaks"].append(entry)
    with open(result_path, "w") as f:
        json.dump(out, f)


def run_memory(cases, device):
    """Run :func:`memory_worker` in a fresh process with ``H.CPU_MEMORY_ENV``."""
    env = dict(os.environ)
    for k, v in H.CPU_MEMORY_ENV.items():
        env[k] = f"{env[k]}:{v}" if env.get(k) else v
    with tempfile.TemporaryDirectory() as tmp:
        cases_path, result_path = os.path.join(tmp, "cases.json"), os.path.join(tmp, "result.json")
        with open(cases_path, "w") as f:
            json.dump({"device": device, "cases": cases}, f)
        proc = subprocess.run([sys.executable, "-m", "bench", "--memory-worker", cases_path,
                               result_path], cwd=H.REPO, env=env)
        if proc.returncode != 0:
            print(f"memory worker failed (exit {proc.returncode}); no memory numbers", file=sys.stderr)
            return [], {}
        with open(result_path) as f:
            out = json.load(f)
    return out["validation"], {_case_key(p) + (p["provider"],): p for p in out["peaks"]}


def run_threshold(ctx, args):
    cases = F.threshold_cases(ctx, args.ops, args.sizes, args.dtypes)
    rows = F.run_threshold(ctx, cases)
    mem = [c for c in cases if c["mode"] == "fwd+bwd" and (ctx.suite != "full" or c["size"] == "16M")]
    if not (ctx.cfg["memory"] and mem):
        return rows, {}
    print(f"threshold: peak memory of {len(mem)} fwd+bwd cases in a subprocess", file=sys.stderr, flush=True)
    validation, peaks = run_memory(mem, ctx.device)
    by_case = {f"threshold/{c['op'].removesuffix('_threshold')}/{c['size']}/{c['dtype']}/{c['mode']}": c
               for c in mem}
    for r in rows:
        if r["case"] in by_case:
            peak = peaks.get(_case_key(by_case[r["case"]]) + (r["provider"],), {})
            r["peak_extra_bytes"] = peak.get("peak_extra_bytes")
            if "error" in peak:
                r["memory_error"] = peak["error"]
    return rows, {"memory_method": H.MEMORY_METHOD[ctx.device], "memory_validation": validation}


# --- main -----------------------------------------------------------------------------------------

def out_stem(args, env):
    if args.out and args.out.endswith(".json"):
        return args.out[:-5]
    date = datetime.date.today().isoformat()
    suffix = "" if args.suite == "full" else f"-{args.suite}"
    return os.path.join(args.out or RESULTS, f"{H.slug(env['device_name'])}-{date}{suffix}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.memory_worker:
        return memory_worker(*args.memory_worker)
    device = args.device
    env = H.environment(device)
    # Freed tensors stay in the heap (glibc), dense and sparse alike: timings without page faults
    # that depend on what the process allocated before (README "Quickstart: sparse inference").
    from sparsekern.inference import retain_freed_memory
    env["retain_freed_memory"] = device == "cpu" and retain_freed_memory()
    print(f"sparsekern bench, suite {args.suite}, on {env['device_name']} ({device}, {env['threads']} threads), "
          f"torch {env['torch']}, triton {env['triton']}, git {env['git_sha'][:12]}; "
          f"sparsekern backend: {env['sparsekern_backend']}", file=sys.stderr, flush=True)
    if env["load_avg_1m_start"] > 0.5 * env["cpu_count"]:
        print(f"WARNING: load average {env['load_avg_1m_start']:.1f} on {env['cpu_count']} CPUs: "
              "other processes will distort the timings", file=sys.stderr, flush=True)
    ctx = F.Context(device, args.suite, args.pattern, progress=not args.no_progress)
    runners = {"threshold": lambda: run_threshold(ctx, args), "select": lambda: (F.run_select(ctx), {}),
               "bound": lambda: (F.run_bound(ctx), {}), "masks": lambda: (F.run_masks(ctx), {}),
               "spmm": lambda: (F.run_spmm(ctx), {}), "train_step": lambda: (F.run_train_step(ctx), {})}
    if args.ops:  # the old threshold-only flags
        runners = {"threshold": runners["threshold"]}
    rows, meta, walls, failed = [], {}, {}, {}
    snap, t0 = H.cpu_snapshot(), time.perf_counter()
    for family, run in runners.items():
        start = time.perf_counter()
        try:
            got, extra = run()
        except Exception as e:  # one broken family does not lose the others' numbers
            traceback.print_exc()
            failed[family] = f"{type(e).__name__}: {e}"
            got, extra = [], {}
        walls[family] = round(time.perf_counter() - start, 1)
        print(f"{family}: {len(got)} rows in {walls[family]:.0f} s", file=sys.stderr, flush=True)
        rows += got
        meta.update(extra)
    if not rows:
        sys.exit(f"no case ran (filter {args.filter!r}); failed families: {failed or 'none'}")
    env["other_processes_cpus"] = round(H.other_load(snap, H.cpu_snapshot()), 2)
    env["load_avg_1m_end"] = os.getloadavg()[0]
    run_keys = {k: env[k] for k in report.RUN_KEYS}
    doc = {"schema": report.SCHEMA,
           "meta": {**env, **meta, "command": " ".join(["python -m bench", *argv]), "suite": args.suite,
                    "filter": args.filter, "wall_s": round(time.perf_counter() - t0, 1),
                    "family_wall_s": walls, "failed_families": failed},
           "rows": [{**run_keys, **r} for r in rows],
           "targets": F.targets(rows, device)}
    report.validate(doc)
    stem = out_stem(args, env)
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    pngs = report.plots(doc, stem)
    with open(stem + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(report.markdown(doc, pngs))
    print(report.summary(doc))
    print("\n" + "\n".join(t["text"] for t in doc["targets"]))
    print(f"\nwrote {stem}.json, {stem}.md" + "".join(f", {p}" for p in pngs)
          + f" in {doc['meta']['wall_s']:.0f} s", file=sys.stderr)
    if failed:
        sys.exit(f"families failed: {failed}")


if __name__ == "__main__":
    main()
