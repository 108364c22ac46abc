"""``make gpu-check`` = ``python -m bench.gpu_check``: everything a lent GPU machine should run, as
one command within a time budget (default 420 s: with Python start-up it fits 8 minutes on one
H100; no network needed):

1. ``facts``: GPU name, compute capability, memory, SMs, shared memory / registers / L2 (checked
   against what the AOT compile check ``sparsekern/triton/aot.py`` assumes); torch (its CUDA,
   cuDNN, arch list), triton (and its compile target), numpy, Python, driver versions; the
   device copy bandwidth (a 512 MiB ``copy_``);
2. ``tests:<file>``: the CUDA tests of every family: the Triton-backend tests (``pytest -k
   triton`` on :func:`cuda_test_files`; with a GPU ``tests/utils.py`` gives the Triton kernels
   CUDA tensors), one pytest process per file, sharing ``--tests-s`` (default 180 s);
3. ``bench:<family>``: the families of ``python -m bench`` on CUDA, suite ``gpu``
   (``bench/families.py``): fused ops vs eager vs torch.compile with the fraction of measured
   copy bandwidth (threshold, asl), global threshold vs cat+sort / cat+kthvalue / cat+topk,
   Gaussian bounds, masks, sparse Linear 4096² (Triton) vs cuBLAS dense at 5 sparsities, fp32
   and fp16, batch 1 and 64 (``bench_spmm_gpu.bench_case``).

Every part runs in its own process (a crash or a broken CUDA context stays there) with its own
time limit, cut to what is left of the budget: a part that crashes or times out is recorded and
the next one runs; a part that no longer fits is recorded as "not run: budget". Writes
``<out>/<gpu-slug>-<date>-gpu-check.json`` and ``.md`` (default out: ``bench/results``; the suffix
keeps ``python -m bench``'s ``<gpu-slug>-<date>.json`` of the same day) and exits 1 if anything
went wrong (a part not ok, a test not passed, pytest missing, an error of a sparsekern benchmark
provider; failed speed targets are results, not errors); without CUDA it exits 2 at once.

pytest missing: if ``.whl/`` (repository root) holds wheels (pytest, pluggy, iniconfig, packaging,
pygments; hypothesis, sortedcontainers for ``tests/test_select.py``), they are installed
with ``pip install --no-index --no-deps --target`` into a temporary directory on the tests'
PYTHONPATH (the Python installation is not changed); otherwise the tests are reported as not run
and the benchmarks still run.

    python -m bench.gpu_check [--budget-s 420] [--tests-s 180] [--out DIR]
"""
import argparse
import collections
import contextlib
import dataclasses
import datetime
import glob
import importlib
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time

import torch

from . import families as F
from . import harness as H
from . import report

SCHEMA = "sparsekern-gpu-check/1"
SUITE = "gpu"
TEST_SELECTION = "triton"
#: time limits (s) of the long CUDA test files, which run last; the others get TEST_LIMIT_S. All
#: of them together get ``--tests-s``.
TEST_LIMITS = {"tests/test_spmm_triton.py": 70, "tests/test_threshold_kernels.py": 120}
TEST_LIMIT_S = 40
#: family -> time limit (s) of its benchmark part, in run order (a part cut short keeps the cases it
#: finished: ``families.Context.on_rows``)
BENCH_FAMILIES = {"threshold": 100, "spmm": 80, "select": 45, "bound": 60, "masks": 70}
FACTS_LIMIT_S = 60
MIN_START_S = 10  # a part is not started with less time than this left
COPY_BYTES = 512 << 20
#: fact -> attribute of torch.cuda.get_device_properties (None where this torch lacks it)
DEVICE_LIMITS = {"smem_per_block_optin": "shared_memory_per_block_optin",
                 "smem_per_sm": "shared_memory_per_multiprocessor", "regs_per_sm": "regs_per_multiprocessor",
                 "max_threads_per_sm": "max_threads_per_multi_processor", "l2_cache_bytes": "L2_cache_size"}
RESULT_ENV = "SPARSEKERN_GPU_CHECK_RESULT"  # file a part appends its JSON lines to
WHEELS = os.path.join(H.REPO, ".whl")
RESULTS = os.path.join(H.REPO, "bench", "results")
TAIL_LINES = 40
NO_PYTEST = "not run: pytest missing"
TEST_COUNTS = ("collected", "passed", "failed", "errors", "skipped", "not_run")


@dataclasses.dataclass
class Part:
    """One guarded step: ``argv`` runs from the repository root in its own process group; it
    appends JSON lines to the file named by ``$SPARSEKERN_GPU_CHECK_RESULT``. Exit codes in
    ``ok_codes`` count as ok; parts of one ``group`` share a group budget."""
    name: str
    argv: list
    limit_s: float
    group: str = ""
    ok_codes: tuple = (0,)
    env: dict = dataclasses.field(default_factory=dict)


def read_lines(path):
    """The JSON lines of a part's result file (none if it was never written; a line cut short
    by a kill is dropped)."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
    return out


def _echo(stream, tail):
    for line in stream:
        sys.stdout.write(line)
        sys.stdout.flush()
        tail.append(line.rstrip("\n"))


def run_part(part, timeout_s):
    """Run ``part`` for at most ``timeout_s``, its output echoed; then its process group is killed
    (what it left running, or all of it on a timeout). Returns ``{status, exit_code, wall_s, lines, output_tail}``; status ``ok``,
    ``failed (exit N)``, ``crashed (signal N)`` or ``timeout after N s``."""
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.jsonl")
        tail = collections.deque(maxlen=TAIL_LINES)
        t0 = time.monotonic()
        proc = subprocess.Popen(part.argv, cwd=H.REPO, env={**os.environ, **part.env, RESULT_ENV: result},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                                start_new_session=True)
        reader = threading.Thread(target=_echo, args=(proc.stdout, tail), daemon=True)
        reader.start()
        try:
            code = proc.wait(timeout=timeout_s)
            status = ("ok" if code in part.ok_codes else
                      f"crashed (signal {-code})" if code < 0 else f"failed (exit {code})")
        except subprocess.TimeoutExpired:
            code, status = None, f"timeout after {round(timeout_s, 1):g} s"
        wall = round(time.monotonic() - t0, 1)
        with contextlib.suppress(ProcessLookupError):  # the part and whatever it left running
            os.killpg(proc.pid, signal.SIGKILL)
        code = proc.wait() if code is None else code
        reader.join(timeout=5)  # a grandchild that left the process group may hold the pipe
        return {"status": status, "exit_code": code, "wall_s": wall, "lines": read_lines(result),
                "output_tail": "\n".join(tail)}


def run_parts(parts, budget_s, group_budgets=None, min_start_s=MIN_START_S):
    """Run ``parts`` in order, each for at most its limit, what is left of ``budget_s`` and what
    is left of its group's budget (``group_budgets``, seconds); a part with less than
    ``min_start_s`` left is not started ("not run: budget" / "not run: <group> budget").
    Returns one outcome per part: name, status, limit_s, wall_s, lines, output_tail."""
    group_budgets = group_budgets or {}
    start, used, out = time.monotonic(), collections.Counter(), []
    for part in parts:
        left = budget_s - (time.monotonic() - start)
        group_left = group_budgets.get(part.group, float("inf")) - used[part.group]
        limit = min(part.limit_s, left, group_left)
        if limit < min_start_s:
            status = "not run: budget" if left <= group_left else f"not run: {part.group} budget"
            print(f"== {part.name}: {status}", file=sys.stderr, flush=True)
            out.append({"name": part.name, "status": status, "limit_s": 0.0, "wall_s": 0.0, "lines": []})
            continue
        print(f"== {part.name} (at most {limit:.0f} s)", file=sys.stderr, flush=True)
        res = run_part(part, limit)
        used[part.group] += res["wall_s"]
        print(f"== {part.name}: {res['status']} in {res['wall_s']:.0f} s", file=sys.stderr, flush=True)
        out.append({"name": part.name, "limit_s": round(limit, 1), **res})
    return out


# --- the parts' processes -------------------------------------------------------------------------

def _attempt(fn):
    try:
        return fn()
    except Exception as e:  # one missing fact does not lose the others
        return f"error: {type(e).__name__}: {e}"


def _driver_version():
    out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return out.splitlines()[0].strip()


def _copy_bandwidth():
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    st = H.time_step(lambda: dst.copy_(src), "cuda", budget_s=0.2, min_reps=10, max_reps=100)
    return {"copy_bytes": COPY_BYTES, "copy_median_s": st["median_s"],
            "copy_gbps": 2 * COPY_BYTES / st["median_s"] / 1e9}


def facts():
    """GPU and software facts, the device limits next to the shared memory per block that the AOT
    compile check (``sparsekern/triton/aot.py``) assumes, and the device copy bandwidth (read +
    write bytes / median time)."""
    from sparsekern import _ext

    p = torch.cuda.get_device_properties(0)
    out = {"gpu": p.name, "capability": f"{p.major}.{p.minor}", "sm_count": p.multi_processor_count,
           "memory_gib": round(p.total_memory / 2 ** 30, 1), "driver": _attempt(_driver_version),
           "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "cudnn": _attempt(torch.backends.cudnn.version),
           "torch_arch_list": " ".join(torch.cuda.get_arch_list()),
           "triton": _attempt(lambda: importlib.import_module("triton").__version__),
           "triton_target": _attempt(
               lambda: str(importlib.import_module("triton").runtime.driver.active.get_current_target())),
           "numpy": _attempt(lambda: importlib.import_module("numpy").__version__),
           "python": platform.python_version(), "cpu_count": os.cpu_count(),
           "cpp_kernels": "loaded" if _ext.LOADED else f"not loaded: {_ext.ERROR}"}
    out.update({key: getattr(p, attr, None) for key, attr in DEVICE_LIMITS.items()})
    out["aot_smem_limit"] = _attempt(  # what the AOT compile check assumes for this capability
        lambda: importlib.import_module("sparsekern.triton.aot").SMEM_LIMITS.get(p.major * 10 + p.minor))
    bandwidth = _attempt(_copy_bandwidth)
    out.update(bandwidth if isinstance(bandwidth, dict) else {"copy_gbps": bandwidth})
    out["environment"] = H.environment("cuda")
    return out


def _emit(obj):
    with open(os.environ[RESULT_ENV], "a") as f:
        f.write(json.dumps(obj) + "\n")


def bench_family(family):
    """One family of ``python -m bench`` on CUDA, suite :data:`SUITE`: emits ``{env}``, then
    ``{rows}`` (with the run keys) as each case finishes."""
    env = H.environment("cuda")
    _emit({"env": env})
    run_keys = {k: env[k] for k in report.RUN_KEYS}
    ctx = F.Context("cuda", SUITE, progress=False,
                    on_rows=lambda rows: _emit({"rows": [{**run_keys, **r} for r in rows]}))
    if family == "threshold":
        F.run_threshold(ctx, F.threshold_cases(ctx))
    else:
        getattr(F, f"run_{family}")(ctx)


def run_child(name):
    """Entry of a part's process: its results as JSON lines to ``$SPARSEKERN_GPU_CHECK_RESULT``."""
    if name == "facts":
        _emit(facts())
    else:
        bench_family(name.removeprefix("bench:"))


# --- plan -----------------------------------------------------------------------------------------

def ensure_pytest(wheels, target):
    """``(env of the test processes, note)``: ``({}, None)`` if pytest imports; else the wheels
    in ``wheels`` installed into ``target`` (then on PYTHONPATH) if that makes it import; else
    ``(None, "pytest missing: ...")``."""
    if importlib.util.find_spec("pytest"):
        return {}, None
    found = sorted(glob.glob(os.path.join(wheels, "*.whl")))
    if not found:
        return None, f"pytest missing: CUDA tests not run (no wheels in {wheels} to install it from)"
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [target, os.environ.get("PYTHONPATH")]))}
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--target", target,
                          *found], capture_output=True, text=True)
    probe = subprocess.run([sys.executable, "-c", "import pytest"], env={**os.environ, **env},
                           capture_output=True, text=True)
    if probe.returncode:
        why = (pip.stderr if pip.returncode else probe.stderr).strip()[-300:]
        return None, (f"pytest missing: CUDA tests not run (the {len(found)} wheels in {wheels} did not "
                      f"install it: {why})")
    return env, f"pytest installed from {len(found)} wheels in {wheels}"


def cuda_test_files():
    """``{path: time limit}`` of the test files ``-k triton`` selects from (a "triton" backend
    parameter or triton in the file's name; with a GPU their Triton tests take CUDA tensors,
    ``tests/utils.py``), the short ones first."""
    def selected(path):
        with open(path) as f:
            return "triton" in os.path.basename(path) or '"triton"' in f.read()

    paths = sorted(os.path.relpath(p, H.REPO) for p in glob.glob(os.path.join(H.REPO, "tests", "test_*.py"))
                   if selected(p))
    return ({p: TEST_LIMIT_S for p in paths if p not in TEST_LIMITS}
            | {p: s for p, s in TEST_LIMITS.items() if p in paths})


def plan(test_env):
    """The parts, in run order: facts, the CUDA tests (none if ``test_env`` is None: no pytest),
    the benchmark families."""
    me = [sys.executable, "-m", "bench.gpu_check", "--part"]
    parts = [Part("facts", me + ["facts"], FACTS_LIMIT_S)]
    if test_env is not None:
        parts += [Part(f"tests:{path}", [sys.executable, "-m", "pytest", path, "-k", TEST_SELECTION, "-q",
                                         "--tb=short", "-p", "bench.pytest_record", "-p", "no:cacheprovider"],
                       limit, group="tests", ok_codes=(0, 1, 5), env=test_env)  # 1: tests failed, 5: none
                  for path, limit in cuda_test_files().items()]
    return parts + [Part(f"bench:{f}", me + [f"bench:{f}"], limit) for f, limit in BENCH_FAMILIES.items()]


# --- results --------------------------------------------------------------------------------------

def summarize_tests(lines):
    """Counts of one pytest run from its ``bench.pytest_record`` lines, possibly cut short:
    collected, passed, failed, errors (collection, setup, teardown), skipped, not_run (collected,
    never started), unfinished (started, no outcome: killed or crashed in it), failures."""
    counts = dict.fromkeys(("passed", "failed", "errors", "skipped"), 0)
    collected, started, done, failures = None, [], set(), []
    for e in lines:
        if "collected" in e:
            collected = e["collected"]
            continue
        if e["when"] == "start":
            started.append(e["nodeid"])
            continue
        done.add(e["nodeid"])
        if e["outcome"] in ("passed", "skipped"):
            counts[e["outcome"]] += 1
        else:
            counts["failed" if e["when"] == "call" else "errors"] += 1
            failures.append({k: e[k] for k in ("nodeid", "when", "message")})
    return {"collected": collected, **counts,
            "not_run": None if collected is None else collected - len(set(started)),
            "unfinished": [n for n in dict.fromkeys(started) if n not in done], "failures": failures}


def tests_summary(outcomes, pytest_note):
    """The CUDA tests: per file (status, wall, counts, failures) and the totals."""
    files = [{"file": o["name"].removeprefix("tests:"), "status": o["status"], "wall_s": o["wall_s"],
              **summarize_tests(o["lines"])} for o in outcomes if o["name"].startswith("tests:")]
    total = {k: sum(f[k] or 0 for f in files) for k in TEST_COUNTS}
    return {"selection": f"-k {TEST_SELECTION}", "pytest": pytest_note or "present", **total, "files": files}


def bench_doc(outcomes, command, snap):
    """The benchmark parts' rows as a ``python -m bench`` results document (``bench/report.py``
    schema, suite :data:`SUITE`, CUDA targets); None without rows."""
    rows, walls, failed, env = [], {}, {}, None
    for o in outcomes:
        if not o["name"].startswith("bench:"):
            continue
        family = o["name"].removeprefix("bench:")
        walls[family] = float(o["wall_s"])
        if o["status"] != "ok":
            failed[family] = o["status"]
        for line in o["lines"]:
            rows += line.get("rows", [])
            env = env or line.get("env")
    if not rows:
        return None
    meta = {**env, "command": command, "suite": SUITE, "filter": None, "wall_s": float(sum(walls.values())),
            "family_wall_s": walls, "failed_families": failed, "load_avg_1m_end": os.getloadavg()[0],
            "other_processes_cpus": round(H.other_load(snap, H.cpu_snapshot()), 2)}
    return {"schema": report.SCHEMA, "meta": meta, "rows": rows, "targets": F.targets(rows, "cuda")}


def problems(doc):
    """What went wrong, most important first (empty: everything ran and passed). Benchmark
    targets that fail are results, not problems."""
    t = doc["tests"]
    missing = t["pytest"].startswith("pytest missing")
    out = [t["pytest"]] if missing else []
    out += [f"{p['name']}: {p['status']}" for p in doc["parts"]
            if p["status"] != "ok" and not (missing and p["status"] == NO_PYTEST)]
    unfinished = sum(len(f["unfinished"]) for f in t["files"])
    if t["failed"] or t["errors"] or t["not_run"] or unfinished:
        out.append(f"CUDA tests: {t['failed']} failed, {t['errors']} errors, {unfinished} unfinished, "
                   f"{t['not_run']} not run (of {t['collected']} collected)")
    f = doc["facts"]
    aot, device = f.get("aot_smem_limit"), f.get("smem_per_block_optin")
    if isinstance(aot, int) and isinstance(device, int) and aot != device:
        out.append(f"the AOT check (sparsekern/triton/aot.py SMEM_LIMITS) assumes {aot} B of shared memory per "
                   f"block for capability {f['capability']}; this GPU allows {device} B")
    if doc.get("bench_error"):
        out.append(f"benchmark results invalid: {doc['bench_error']}")
    errors = [r for r in (doc["bench"] or {}).get("rows", [])  # a baseline's error is no sparsekern problem
              if "error" in r and (r["provider"] == "sparsekern" or r["provider"].startswith("sk_"))]
    if errors:
        out.append(f"benchmarks: {len(errors)} sparsekern provider errors, e.g. {errors[0]['case']} "
                   f"{errors[0]['provider']}: {errors[0]['error'][:200]}")
    return out


def build(outcomes, pytest_note, command, budget_s, wall_s, snap):
    """The results document of a run from its part outcomes."""
    facts_line = next((line for o in outcomes if o["name"] == "facts" for line in o["lines"]), {})
    doc = {"schema": SCHEMA, "command": command, "date": datetime.date.today().isoformat(),
           "budget_s": budget_s, "wall_s": round(wall_s, 1), "facts": facts_line,
           "tests": tests_summary(outcomes, pytest_note),
           "parts": [{k: v for k, v in o.items() if k != "lines" and (k != "output_tail" or o["status"] != "ok")}
                     for o in outcomes],
           "bench": bench_doc(outcomes, command, snap)}
    if doc["bench"] is not None:
        try:
            report.validate(doc["bench"])
        except ValueError as e:
            doc["bench_error"] = str(e)
    doc["problems"] = problems(doc)
    doc["ok"] = not doc["problems"]
    return doc


def gpu_name(doc):
    """The GPU's name from the facts, else from the benchmark rows; "unknown-gpu" without both."""
    return doc["facts"].get("gpu") or (doc["bench"] or {}).get("meta", {}).get("device_name") or "unknown-gpu"


def results_stem(out_dir, name, date):
    """``<out_dir>/<gpu-slug>-<date>-gpu-check`` (``.json`` / ``.md`` are added)."""
    return os.path.join(out_dir, f"{H.slug(name)}-{date}-gpu-check")


def _cells(values):
    return "| " + " | ".join("–" if v is None else str(v) for v in values) + " |"


def markdown(doc):
    """The Markdown report: verdict and problems first, facts, tests, parts, benchmark tables."""
    f = doc["facts"]
    env = f.get("environment") or (doc["bench"] or {}).get("meta", {})
    lines = [f"# sparsekern GPU check: {gpu_name(doc)}, {doc['date']}", ""]
    if doc["ok"]:
        lines.append("**OK**: every part ran, every CUDA test passed, no benchmark provider failed.")
    else:
        lines += ["**PROBLEMS:**", ""] + [f"- **{p}**" for p in doc["problems"]]
    lines += ["", f"- command: `{doc['command']}`; budget {doc['budget_s']:.0f} s, wall {doc['wall_s']:.0f} s"]
    if env:
        lines.append(f"- git {env['git_sha']}{' (dirty)' if env['git_dirty'] else ''}; "
                     f"sparsekern backend on CUDA: {env['sparsekern_backend']}")
    lines += ["", "## Hardware and software", "", "| fact | value |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} GB/s |" if k == "copy_gbps" and isinstance(v, float) else f"| {k} | {v} |"
              for k, v in f.items() if k != "environment"] or ["| facts | not measured (see Parts) |"]
    t = doc["tests"]
    lines += ["", f"## CUDA tests (`pytest {t['selection']}`)", "", f"pytest: {t['pytest']}", "",
              "| file | status | collected | passed | failed | errors | skipped | not run | s |",
              "|---|---|---|---|---|---|---|---|---|"]
    lines += [_cells([x["file"], x["status"],  # "–": the file did not run
                      *(x[k] if x["collected"] is not None else None for k in TEST_COUNTS), x["wall_s"]])
              for x in t["files"]]
    lines.append(_cells(["total", "", *(t[k] for k in TEST_COUNTS), ""]))
    bad = [(x["nodeid"], x["when"], x["message"]) for file in t["files"] for x in file["failures"]]
    bad += [(n, "unfinished", "killed or crashed while it ran") for file in t["files"] for n in file["unfinished"]]
    if bad:
        lines += ["", "Not passed:", ""] + [f"- `{n}` ({w}): {m.splitlines()[0] if m else ''}" for n, w, m in bad]
    lines += ["", "## Parts", "", "| part | status | limit s | wall s |", "|---|---|---|---|"]
    lines += [_cells([p["name"], p["status"], p["limit_s"], p["wall_s"]]) for p in doc["parts"]]
    for p in doc["parts"]:
        if p.get("output_tail"):
            lines += ["", f"Last output of {p['name']}:", "", "```", p["output_tail"], "```"]
    lines += ["", "## Benchmarks", ""]
    if doc["bench"] is None:
        lines.append("No benchmark rows (see Parts).")
    elif doc.get("bench_error"):
        lines.append(f"Rows in the JSON; not tabulated: {doc['bench_error']}")
    else:
        counts = collections.Counter(x["status"] for x in doc["bench"]["targets"])
        lines += [f"Targets: {', '.join(f'{counts[s]} {s}' for s in report.STATUSES if counts[s])}.", ""]
        lines += ["#" + line if line.startswith("#") else line
                  for line in report.markdown(doc["bench"]).splitlines()[1:]]
    return "\n".join(lines) + "\n"


def write(doc, out_dir):
    """Write ``<stem>.json`` and ``<stem>.md`` (:func:`results_stem`); returns the stem."""
    stem = results_stem(out_dir, gpu_name(doc), doc["date"])
    os.makedirs(out_dir, exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(doc))
    return stem


# --- main -----------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-s", type=float, default=420.0, help="the whole run's time budget (default 420)")
    p.add_argument("--tests-s", type=float, default=180.0, help="the CUDA tests' share of it (default 180)")
    p.add_argument("--out", default=RESULTS, help="output directory (default bench/results)")
    p.add_argument("--part", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.part:
        return run_child(args.part)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False): nothing run. "
              "This check is for a GPU machine; on CPU use `make test` / `python -m bench`.", file=sys.stderr)
        sys.exit(2)
    t0, snap = time.monotonic(), H.cpu_snapshot()
    with tempfile.TemporaryDirectory() as wheels_target:
        test_env, pytest_note = ensure_pytest(WHEELS, wheels_target)
        if pytest_note:
            print(f"gpu_check: {pytest_note}", file=sys.stderr, flush=True)
        outcomes = run_parts(plan(test_env), args.budget_s - (time.monotonic() - t0), {"tests": args.tests_s})
    if test_env is None:  # in plan order: after the facts
        outcomes[1:1] = [{"name": f"tests:{path}", "status": NO_PYTEST, "limit_s": 0.0, "wall_s": 0.0,
                          "lines": []} for path in cuda_test_files()]
    command = " ".join(["python -m bench.gpu_check", *argv])
    doc = build(outcomes, pytest_note, command, args.budget_s, time.monotonic() - t0, snap)
    stem = write(doc, args.out)
    verdict = "OK" if doc["ok"] else "PROBLEMS:\n" + "\n".join(f"  - {p}" for p in doc["problems"])
    print(f"\ngpu_check: {verdict}", file=sys.stderr)
    print(f"wrote {stem}.json, {stem}.md in {doc['wall_s']:.0f} s", file=sys.stderr)
    sys.exit(0 if doc["ok"] else 1)


if __name__ == "__main__":
    main()
