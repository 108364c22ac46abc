"""``python -m bench``: the threshold-family suite on the present device (CUDA if available).

For every op × size × dtype × mode it times the providers eager / compile / sparsekern (median
and IQR of repeated calls after warmup; compilation is warmup) and, for forward+backward, their
peak extra memory (measured in a subprocess, see ``bench/harness.py``). Prints a table and the
performance targets (PASS/FAIL), writes JSON rows and the table next to it (``.md``).

    python -m bench                       # full default suite (64K, 1M, 16M; fp32, bf16)
    python -m bench --quick               # 64K only, short timings: a smoke test
    python -m bench --ops st3 --sizes 16M --dtypes fp32 --out /tmp/st3.json
"""
import argparse
import datetime
import itertools
import json
import os
import subprocess
import sys
import tempfile

import torch

from . import harness as H

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="64K only and short timings (smoke test)")
    p.add_argument("--ops", help=f"comma-separated ops, short or full names (default: all of "
                                 f"{','.join(o.removesuffix('_threshold') for o in H.OPS)})")
    p.add_argument("--sizes", help=f"comma-separated from {','.join(H.SIZES)} (default: all; "
                                   "--quick: 64K)")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated from "
                   f"{','.join(H.DTYPES)} (default: fp32,bf16)")
    p.add_argument("--out", help="JSON path (default: bench/results/<device>-<date>[-quick].json);"
                                 " the table goes to the same path with .md")
    p.add_argument("--memory-worker", nargs=2, metavar=("CASES", "RESULT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.ops = [H.op_name(o) for o in args.ops.split(",")] if args.ops else list(H.OPS)
    args.sizes = args.sizes.split(",") if args.sizes else (["64K"] if args.quick else list(H.SIZES))
    args.dtypes = args.dtypes.split(",")
    for name, chosen, known in (("size", args.sizes, H.SIZES), ("dtype", args.dtypes, H.DTYPES)):
        bad = [c for c in chosen if c not in known]
        if bad:
            p.error(f"unknown {name} {', '.join(bad)}; choose from {', '.join(known)}")
    return args


def _case_key(case):
    return (case["op"], case["size"], case["dtype"], case["mode"])


def run_timings(cases, device, quick):
    """Time the providers of each case side by side on shared inputs."""
    budget = 0.1 if quick else 0.4
    results = {}
    for i, case in enumerate(cases, 1):
        inputs = H.make_inputs(case["op"], H.SIZES[case["size"]], H.DTYPES[case["dtype"]], device,
                               grad=case["mode"] == "fwd+bwd")
        steps = {p: H.make_step(H.provider_fn(case["op"], p), inputs, case["mode"])[0]
                 for p in H.PROVIDERS}
        # Fewer repeats at 16M so the full suite stays within minutes on 2 cores.
        reps = (5, 10) if case["size"] == "16M" else (5, 200)
        stats = H.time_steps(steps, device, budget_s=budget, min_reps=reps[0], max_reps=reps[1])
        print(f"[{i}/{len(cases)}] {' '.join(_case_key(case))}: " + ", ".join(
            f"{p} {r['median_s'] * 1e3:.3g} ms" if "median_s" in r else f"{p} ERROR {r['error']}"
            for p, r in stats.items()), file=sys.stderr, flush=True)
        results.update({_case_key(case) + (p,): r for p, r in stats.items()})
    return results


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
        got = (f"{entry['peak_extra_bytes'] / 2**20:.1f} MiB" if "error" not in entry
               else f"ERROR {entry['error']}")
        print(f"memory {' '.join(_case_key(case))} {provider}: {got}", file=sys.stderr, flush=True)
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
            print(f"memory worker failed (exit {proc.returncode}); no memory numbers",
                  file=sys.stderr)
            return [], {}
        with open(result_path) as f:
            out = json.load(f)
    return out["validation"], {_case_key(p) + (p["provider"],): p for p in out["peaks"]}


# --- reporting ----------------------------------------------------------------------------------

def _ms(x):
    x *= 1e3
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def _speedup(rows, key, base):
    a, b = rows.get(key + (base,), {}), rows.get(key + ("sparsekern",), {})
    if "median_s" in a and "median_s" in b:
        return a["median_s"] / b["median_s"]
    return None


def _mib(row):
    b = row.get("peak_extra_bytes")
    return None if b is None else b / 2**20


def table(cases, rows):
    head = ["op", "size", "dtype", "mode"]
    head += [f"{p} ms" for p in H.PROVIDERS] + ["×eager", "×compile"]
    head += [f"peak MiB {p}" for p in H.PROVIDERS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case in cases:
        key = _case_key(case)
        cells = [case["op"].removesuffix("_threshold"), case["size"], case["dtype"], case["mode"]]
        for p in H.PROVIDERS:
            r = rows.get(key + (p,), {})
            cells.append(f"{_ms(r['median_s'])} ({_ms(r['q3_s'] - r['q1_s'])})" if "median_s" in r
                         else "error")
        for base in ("eager", "compile"):
            s = _speedup(rows, key, base)
            cells.append("–" if s is None else f"{s:.2f}")
        for p in H.PROVIDERS:
            m = _mib(rows.get(key + (p,), {}))
            cells.append("–" if m is None else f"{m:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(rows):
    """The CPU/issue targets for ``st3_threshold`` at 16M fp32 (status PASS/FAIL/NOT MEASURED)."""
    fwd, fb = ("st3_threshold", "16M", "fp32", "fwd"), ("st3_threshold", "16M", "fp32", "fwd+bwd")
    mem = [_mib(rows.get(fb + (p,), {})) for p in ("sparsekern", "eager")]
    checks = [
        ("st3 fwd 16M fp32: sparsekern >= 5x eager", _speedup(rows, fwd, "eager"), 5.0, "x"),
        ("st3 fwd 16M fp32: sparsekern >= 1.0x compile", _speedup(rows, fwd, "compile"), 1.0, "x"),
        ("st3 fwd+bwd 16M fp32: sparsekern >= 3x eager", _speedup(rows, fb, "eager"), 3.0, "x"),
        ("st3 fwd+bwd 16M fp32: sparsekern peak memory < eager",
         None if None in mem else mem[0] / mem[1], 1.0, " of eager"),
    ]
    out = []
    for name, value, bound, unit in checks:
        if value is None:
            status = "NOT MEASURED"
        elif unit == "x":
            status = "PASS" if value >= bound else "FAIL"
        else:
            status = "PASS" if value < bound else "FAIL"
        out.append({"target": name, "status": status, "value": value,
                    "text": f"{status}: {name}" + ("" if value is None else f" (measured {value:.2f}{unit})")})
    return out


def default_out(env, quick):
    date = datetime.date.today().isoformat()
    return os.path.join(RESULTS, f"{H.slug(env['device_name'])}-{date}{'-quick' if quick else ''}.json")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    command = " ".join(["python -m bench", *argv])
    args = parse_args(argv)
    if args.memory_worker:
        return memory_worker(*args.memory_worker)
    device = H.default_device()
    env = H.environment(device)
    print(f"sparsekern bench on {env['device_name']} ({device}, {env['threads']} threads), "
          f"torch {env['torch']}, triton {env['triton']}, git {env['git_sha'][:12]}; "
          f"sparsekern backend: {env['sparsekern_backend']}", file=sys.stderr, flush=True)
    if env["load_avg_1m_start"] > 0.5 * env["cpu_count"]:
        print(f"WARNING: load average {env['load_avg_1m_start']:.1f} on {env['cpu_count']} CPUs: "
              "other processes will distort the timings", file=sys.stderr, flush=True)
    cases = [{"op": o, "size": s, "dtype": d, "mode": m}
             for o, s, d, m in itertools.product(args.ops, args.sizes, args.dtypes, H.MODES)]
    snap = H.cpu_snapshot()
    timings = run_timings(cases, device, args.quick)
    env["other_processes_cpus"] = round(H.other_load(snap, H.cpu_snapshot()), 2)
    validation, peaks = run_memory([c for c in cases if c["mode"] == "fwd+bwd"], device)
    env["load_avg_1m_end"] = os.getloadavg()[0]

    rows = {}
    for case in cases:
        for p in H.PROVIDERS:
            key = _case_key(case) + (p,)
            row = {**env, **case, "provider": p, "shape": list(H.SIZES[case["size"]]),
                   **timings[key]}
            if key in peaks:
                row["peak_extra_bytes"] = peaks[key].get("peak_extra_bytes")
                if "error" in peaks[key]:
                    row["memory_error"] = peaks[key]["error"]
            rows[key] = row
    tgt = targets(rows)
    text = "\n".join([
        f"# sparsekern threshold benchmark: {env['device_name']} ({device})",
        "",
        f"- command: `{command}`",
        f"- {env['date']}, git {env['git_sha']}{' (dirty)' if env['git_dirty'] else ''}, "
        f"torch {env['torch']}, triton {env['triton']}, {env['threads']} threads",
        f"- background load: other processes kept {env['other_processes_cpus']:.2f} of "
        f"{env['cpu_count']} CPUs busy during the timings (load average "
        f"{env['load_avg_1m_start']:.2f} at start, {env['load_avg_1m_end']:.2f} at end)",
        f"- sparsekern backend: {env['sparsekern_backend']}",
        f"- threshold: per-layer scalar at the {H.SPARSITY} quantile of |w|; weights "
        + ", ".join(f"{k} = {list(v)}" for k, v in H.SIZES.items() if k in args.sizes),
        "- times: median (IQR) in ms of repeated calls after warmup (compilation excluded); "
        "×eager / ×compile: speedup of sparsekern",
        *(["- CPU: every call allocates its outputs; glibc serves blocks > 32 MiB (fp32 16M) with "
           "fresh pages, so those times include first-touch page faults; smaller blocks may reuse "
           "freed heap memory, depending on what ran before"] if device == "cpu" else []),
        f"- peak MiB (fwd+bwd): {H.MEMORY_METHOD[device]}; check: "
        + ", ".join(f"{v['tensor_bytes'] / 2**20:g} MiB {'written' if v['written'] else 'unwritten'}"
                    f" -> {v['measured_bytes'] / 2**20:.2f} MiB" for v in validation),
        "",
        table(cases, rows),
        "",
        *(t["text"] for t in tgt),
    ])
    print(text)
    out = args.out or default_out(env, args.quick)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"meta": {**env, "command": command, "memory_method": H.MEMORY_METHOD[device],
                            "memory_validation": validation, "sparsity": H.SPARSITY},
                   "targets": tgt, "rows": list(rows.values())}, f, indent=1)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(text + "\n")
    print(f"\nwrote {out} and {os.path.splitext(out)[0]}.md", file=sys.stderr)


if __name__ == "__main__":
    main()
