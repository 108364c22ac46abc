"""``bench/gpu_check.py`` (``make gpu-check``) on CPU: the clean refusal without CUDA, the part
guard (crash, signal, timeout with its process group killed, budgets), the pytest record of a cut
short run, and the results files built from fake outcomes. The CUDA parts themselves run only on
a GPU machine."""
import datetime
import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from bench import families, gpu_check as G, harness as H, report

PY = sys.executable
GPU = "NVIDIA H100 80GB HBM3"


def _write_line(obj):
    """Python source that appends ``obj`` as a JSON line to the part's result file."""
    return f"import json, os; open(os.environ[{G.RESULT_ENV!r}], 'a').write(json.dumps({obj!r}) + '\\n')"


def _gone(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" in f.read()  # a zombie waiting for its reaper has exited
    except FileNotFoundError:
        return True


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is the path without CUDA")
def test_without_cuda_fails_cleanly(tmp_path):
    proc = subprocess.run([PY, "-m", "bench.gpu_check", "--out", str(tmp_path)], cwd=H.REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and "Traceback" not in proc.stderr + proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_parts_are_guarded(tmp_path):
    """A failing, an excepting, a signalled and a hanging part are recorded; the next part runs;
    the hanging part's child process is killed with it."""
    grandchild = ("import json, os, subprocess, time; p = subprocess.Popen(['sleep', '60']); "
                  f"open(os.environ[{G.RESULT_ENV!r}], 'a').write(json.dumps({{'pid': p.pid}}) + '\\n'); "
                  "print('waiting', flush=True); time.sleep(60)")
    parts = [
        G.Part("ok", [PY, "-c", _write_line({"x": 1})], 30),
        G.Part("exit3", [PY, "-c", _write_line({"x": 2}) + "; print('boom'); raise SystemExit(3)"], 30),
        G.Part("raises", [PY, "-c", "raise ValueError('bad input')"], 30),
        G.Part("segv", [PY, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"], 30),
        G.Part("hangs", [PY, "-c", grandchild], 3),
        G.Part("pytest-like", [PY, "-c", "raise SystemExit(1)"], 30, ok_codes=(0, 1)),
    ]
    t0 = time.monotonic()
    got = {o["name"]: o for o in G.run_parts(parts, budget_s=120, min_start_s=1)}
    assert time.monotonic() - t0 < 60
    assert [o for o in got] == [p.name for p in parts]
    assert got["ok"]["status"] == "ok" and got["ok"]["lines"] == [{"x": 1}]
    assert got["exit3"]["status"] == "failed (exit 3)" and got["exit3"]["lines"] == [{"x": 2}]
    assert got["exit3"]["output_tail"] == "boom"
    assert got["raises"]["status"] == "failed (exit 1)" and "ValueError: bad input" in got["raises"]["output_tail"]
    assert got["segv"]["status"] == "crashed (signal 11)"
    hang = got["hangs"]
    assert hang["status"] == "timeout after 3 s" and 3 <= hang["wall_s"] < 20 and hang["limit_s"] == 3
    assert hang["output_tail"] == "waiting"
    pid = hang["lines"][0]["pid"]
    deadline = time.monotonic() + 10
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(pid), "the timed-out part's child process survived"
    assert got["pytest-like"]["status"] == "ok"


def test_budgets():
    """A part gets at most what is left of the run's and its group's budgets; parts that no longer
    fit are not started."""
    sleep = [PY, "-c", "import time; time.sleep(60)"]
    parts = [G.Part("t1", sleep, 30, group="tests"), G.Part("t2", sleep, 30, group="tests"),
             G.Part("b1", sleep, 30), G.Part("b2", [PY, "-c", "pass"], 30)]
    t0 = time.monotonic()
    got = G.run_parts(parts, budget_s=6, group_budgets={"tests": 2.5}, min_start_s=1.5)
    assert time.monotonic() - t0 < 20
    assert [o["status"] for o in got] == ["timeout after 2.5 s", "not run: tests budget",
                                          f"timeout after {got[2]['limit_s']:g} s", "not run: budget"]
    assert got[0]["limit_s"] == 2.5 and 2.5 <= got[2]["limit_s"] <= 3.5


FAKE_TESTS = '''
import time
import pytest

@pytest.fixture
def broken():
    raise RuntimeError("broken fixture")

def test_pass():
    pass

def test_fail():
    assert 1 == 2

def test_skip():
    pytest.skip("not here")

def test_error(broken):
    pass

def test_hang():
    time.sleep(60)

def test_after():
    pass
'''


def test_pytest_record_of_a_run_cut_short(tmp_path):
    """The plugin's lines survive the kill: counts, failures, the test it hung in, the tests after."""
    path = tmp_path / "test_fake.py"
    path.write_text(FAKE_TESTS)
    argv = [PY, "-m", "pytest", str(path), "-q", "-p", "bench.pytest_record", "-p", "no:cacheprovider"]
    (out,) = G.run_parts([G.Part("tests:fake", argv, 15, ok_codes=(0, 1))], budget_s=60, min_start_s=1)
    assert out["status"] == "timeout after 15 s"
    s = G.summarize_tests(out["lines"])
    assert {k: s[k] for k in ("collected", "passed", "failed", "errors", "skipped", "not_run")} == {
        "collected": 6, "passed": 1, "failed": 1, "errors": 1, "skipped": 1, "not_run": 1}
    assert len(s["unfinished"]) == 1 and s["unfinished"][0].endswith("test_fake.py::test_hang")
    failures = {f["nodeid"].split("::")[1]: f for f in s["failures"]}
    assert failures["test_fail"]["when"] == "call" and "assert 1 == 2" in failures["test_fail"]["message"]
    assert failures["test_error"]["when"] == "setup" and "broken fixture" in failures["test_error"]["message"]


def test_plan_covers_every_family_and_triton_test_file():
    """Facts, then a pytest part per test file with Triton-backend tests (``-k triton``), the long
    ones last, then every op family's benchmark; no test parts without pytest."""
    files = G.cuda_test_files()
    known = {"tests/test_bound.py", "tests/test_masks.py", "tests/test_select.py", "tests/test_spmm_triton.py",
             "tests/test_threshold_kernels.py"}
    assert known <= set(files) and not {"tests/test_gpu_check.py", "tests/test_spmm.py"} & set(files)
    assert list(files)[-len(G.TEST_LIMITS):] == list(G.TEST_LIMITS)
    parts = G.plan({})
    tests = [p for p in parts if p.group == "tests"]
    assert parts[0].name == "facts" and parts[1:1 + len(tests)] == tests
    assert [(p.argv[3], p.limit_s) for p in tests] == list(files.items())
    assert all(p.argv[4:6] == ["-k", G.TEST_SELECTION] and "bench.pytest_record" in p.argv for p in tests)
    benches = {p.name.removeprefix("bench:") for p in parts if p.name.startswith("bench:")}
    assert benches == set(families.FAMILIES) - {"train_step"}
    assert [p.name for p in G.plan(None)] == ["facts"] + [f"bench:{f}" for f in G.BENCH_FAMILIES]


def _env():
    return {**H.environment("cpu"), "device": "cuda", "device_name": GPU}


def _stats(t):
    return {"median_s": t, "q1_s": t, "q3_s": t, "min_s": t, "max_s": t, "reps": 3}


def _fake_outcomes():
    env = _env()
    rows = families._rows("threshold", "st3", "16M", 1 << 24, "fp32", "fwd",
                          {p: _stats(t) for p, t in (("eager", 4e-4), ("compile", 1e-4), ("sparsekern", 5e-5))})
    rows += families._rows("select", "global_threshold", "resnet50", 25_502_912, "fp32", "fwd",
                           {"eager": _stats(1e-2), "cat+kthvalue": _stats(5e-3),
                            "torch.quantile": {"error": "RuntimeError: too big"},  # a baseline's: no problem
                            "sparsekern": {"error": "RuntimeError: x"}})
    rows[2]["bandwidth_fraction"] = 0.85  # the sparsekern row of the threshold case
    rows = [{**{k: env[k] for k in report.RUN_KEYS}, **r} for r in rows]
    fail = {"nodeid": "tests/test_bound.py::test_asl_kernels[triton-x]", "when": "call", "outcome": "failed",
            "message": "AssertionError: tensors differ"}
    return [
        {"name": "facts", "status": "ok", "limit_s": 60, "wall_s": 5.0,
         "lines": [{"gpu": GPU, "capability": "9.0", "smem_per_block_optin": 232448, "aot_smem_limit": 232448,
                    "copy_gbps": 2900.0, "environment": env}]},
        {"name": "tests:tests/test_bound.py", "status": "ok", "limit_s": 60, "wall_s": 20.0,
         "lines": [{"collected": 2}, {"nodeid": "a", "when": "start"},
                   {"nodeid": "a", "when": "call", "outcome": "passed"}, {"nodeid": fail["nodeid"], "when": "start"},
                   fail]},
        {"name": "tests:tests/test_masks.py", "status": "timeout after 60 s", "limit_s": 60, "wall_s": 60.0,
         "lines": [{"collected": 3}, {"nodeid": "tests/test_masks.py::hung", "when": "start"}], "output_tail": "..."},
        {"name": "bench:threshold", "status": "ok", "limit_s": 100, "wall_s": 30.0,
         "lines": [{"env": env}, {"rows": rows[:3]}]},
        {"name": "bench:select", "status": "timeout after 45 s", "limit_s": 45, "wall_s": 45.0,
         "lines": [{"env": env}, {"rows": rows[3:]}], "output_tail": "select ..."},  # its finished case kept
        {"name": "bench:bound", "status": "failed (exit 1)", "limit_s": 60, "wall_s": 3.0, "lines": [],
         "output_tail": "Traceback ...\nValueError: no"},
        {"name": "bench:masks", "status": "not run: budget", "limit_s": 0.0, "wall_s": 0.0, "lines": []},
    ]


def test_results_files_from_fake_outcomes(tmp_path):
    doc = G.build(_fake_outcomes(), None, "python -m bench.gpu_check", 420.0, 400.0, H.cpu_snapshot())
    stem = G.write(doc, str(tmp_path))
    today = datetime.date.today().isoformat()
    assert os.path.basename(stem) == f"nvidia-h100-80gb-hbm3-{today}-gpu-check"
    saved = json.loads(open(stem + ".json").read())
    assert saved["schema"] == G.SCHEMA and saved["ok"] is False
    report.validate(saved["bench"])
    assert {r["case"] for r in saved["bench"]["rows"]} == {"threshold/st3/16M/fp32/fwd",
                                                          "select/global_threshold/resnet50/fp32/fwd"}
    assert saved["bench"]["meta"]["failed_families"] == {
        "select": "timeout after 45 s", "bound": "failed (exit 1)", "masks": "not run: budget"}
    assert saved["problems"] == [
        "tests:tests/test_masks.py: timeout after 60 s", "bench:select: timeout after 45 s",
        "bench:bound: failed (exit 1)", "bench:masks: not run: budget",
        "CUDA tests: 1 failed, 0 errors, 1 unfinished, 2 not run (of 5 collected)",
        "benchmarks: 1 sparsekern provider errors, e.g. select/global_threshold/resnet50/fp32/fwd sparsekern: "
        "RuntimeError: x"]
    t = saved["tests"]
    assert (t["collected"], t["passed"], t["failed"], t["not_run"]) == (5, 1, 1, 2)
    parts = {p["name"]: p for p in saved["parts"]}
    assert "lines" not in parts["facts"] and parts["bench:bound"]["output_tail"].endswith("ValueError: no")
    targets = {x["target"]: x["status"] for x in saved["bench"]["targets"]}
    assert targets["select/global_threshold/resnet50/fp32/fwd: sparsekern ≥ 20× cat+kthvalue"] == "NOT MEASURED"
    assert targets["threshold/st3/16M/fp32/fwd: sparsekern ≥ 1× compile"] == "PASS"
    assert targets["threshold/st3/16M/fp32/fwd: sparsekern ≥ 80% of copy bandwidth"] == "PASS"
    md = open(stem + ".md").read()
    head = md.split("## Hardware and software")[0]
    assert "**PROBLEMS:**" in head and "**bench:masks: not run: budget**" in head
    assert "| copy_gbps | 2900 GB/s |" in md and "| capability | 9.0 |" in md
    assert "`tests/test_bound.py::test_asl_kernels[triton-x]` (call): AssertionError: tensors differ" in md
    assert "`tests/test_masks.py::hung` (unfinished)" in md
    assert "| bench:masks | not run: budget | 0.0 | 0.0 |" in md and "ValueError: no" in md
    assert "### threshold" in md and "### select" in md and "| 85% |" in md
    assert "| st3 | 16M | fp32 | fwd |" in md and "Targets: 2 PASS, 1 NOT MEASURED." in md


def test_pytest_missing_is_reported_first(tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pytest" else find_spec(name, *a))
    env, note = G.ensure_pytest(str(tmp_path / "no-wheels"), str(tmp_path / "target"))
    assert env is None and note.startswith("pytest missing: CUDA tests not run")
    files = G.cuda_test_files()
    outcomes = [{"name": f"tests:{f}", "status": G.NO_PYTEST, "limit_s": 0.0, "wall_s": 0.0, "lines": []}
                for f in files]
    doc = G.build(outcomes, note, "python -m bench.gpu_check", 420.0, 1.0, H.cpu_snapshot())
    assert doc["problems"] == [note] and doc["bench"] is None and doc["tests"]["pytest"] == note
    stem = G.write(doc, str(tmp_path))
    assert os.path.basename(stem) == f"unknown-gpu-{datetime.date.today().isoformat()}-gpu-check"
    md = open(stem + ".md").read()
    assert md.split("\n\n")[1:3] == ["**PROBLEMS:**", f"- **{note}**"]
    assert md.count(G.NO_PYTEST) == 2 * len(files)  # the tests table and the parts table
    assert f"| tests/test_bound.py | {G.NO_PYTEST} | – | – | – | – | – | – | 0.0 |" in md
    assert "No benchmark rows" in md


def test_aot_shared_memory_assumption_is_checked():
    """The AOT compile check's shared memory per block against the device's: a mismatch is a problem."""
    facts = {"name": "facts", "status": "ok", "limit_s": 60, "wall_s": 5.0,
             "lines": [{"gpu": GPU, "capability": "9.0", "smem_per_block_optin": 232448, "aot_smem_limit": 166912}]}
    doc = G.build([facts], None, "python -m bench.gpu_check", 420.0, 5.0, H.cpu_snapshot())
    assert doc["problems"] == ["the AOT check (sparsekern/triton/aot.py SMEM_LIMITS) assumes 166912 B of shared "
                               "memory per block for capability 9.0; this GPU allows 232448 B"]
