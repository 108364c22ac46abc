"""``python -m bench`` end to end on the tiny suite (every family, small sizes: timings are not
checked, only that the run completes and writes a valid results file, the report and the plots),
and ``python -m bench.readme`` on a temporary README."""
import copy
import json
import re
import subprocess
import sys

import pytest

from bench import bench_train_step, families, harness, readme, report
from bench.__main__ import main

README = "# project\n\nintro\n\n## Benchmarks\n\n<!-- bench:start -->\nold numbers\n<!-- bench:end -->\n\n## More\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    main(["--suite", "tiny", "--device", "cpu", "--out", str(out), "--no-progress"])
    (path,) = out.glob("*-tiny.json")
    return path, json.loads(path.read_text())


def test_results_file(run):
    path, doc = run
    report.validate(doc)
    assert re.fullmatch(r"[a-z0-9-]+-\d{4}-\d\d-\d\d-tiny\.json", path.name)
    assert doc["meta"]["suite"] == "tiny" and not doc["meta"]["failed_families"]
    assert {r["family"] for r in doc["rows"]} == set(families.FAMILIES)
    assert not [r["case"] + " " + r["provider"] for r in doc["rows"] if "error" in r]
    for family, base in families.BASELINES.items():
        rows = [r for r in doc["rows"] if r["family"] == family]
        assert {"sparsekern", base} <= {r["provider"] for r in rows}, family
    steps = [r for r in doc["rows"] if r["family"] == "train_step" and r["provider"] == "sparsekern"]
    assert sorted(r["op"] for r in steps) == sorted(bench_train_step.METHODS)
    assert max(r["max_abs_diff"] for r in steps) < 1e-5  # eager composition == sk.sparsify
    assert {t["status"] for t in doc["targets"]} <= set(report.STATUSES)


def test_report_and_plots(run):
    path, doc = run
    stem = str(path)[:-5]
    md = open(stem + ".md").read()
    for family in families.FAMILIES:
        assert f"## {family}" in md
    assert doc["meta"]["device_name"] in md
    for png in ("-speedup.png", "-spmm-crossover.png"):
        with open(stem + png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert png[1:] in md


def test_validate_rejects_broken_rows(run):
    _, doc = run
    for breaks in (lambda d: d["rows"][0].pop("git_sha"),
                   lambda d: d["rows"][0].update(case="x/y"),
                   lambda d: d["rows"][0].update(min_s=1e9),
                   lambda d: d["meta"].pop("device_name"),
                   lambda d: d["targets"][0].update(status="OK")):
        bad = copy.deepcopy(doc)
        breaks(bad)
        with pytest.raises(ValueError):
            report.validate(bad)


def test_readme_section(run, tmp_path):
    path, doc = run
    target = tmp_path / "README.md"
    target.write_text(README)
    readme.main([str(path), "--readme", str(target)])
    text = target.read_text()
    assert text.startswith("# project\n\nintro\n\n## Benchmarks\n\n<!-- bench:start -->\n")
    assert text.endswith("<!-- bench:end -->\n\n## More\n") and "old numbers" not in text
    section = text.split("<!-- bench:start -->")[1]
    assert doc["meta"]["device_name"] in section and "| op | size | dtype | mode | baseline ms" in section
    readme.main([str(path), "--readme", str(target)])  # idempotent
    assert target.read_text() == text


@pytest.mark.parametrize("broken", [README.replace("<!-- bench:end -->\n", ""),
                                    README.replace("<!-- bench:start -->\n", ""),
                                    README + "<!-- bench:start -->\n",
                                    "<!-- bench:end -->\n<!-- bench:start -->\n"])
def test_readme_needs_markers(run, tmp_path, broken):
    path, _ = run
    target = tmp_path / "README.md"
    target.write_text(broken)
    with pytest.raises(SystemExit, match="bench:start"):
        readme.main([str(path), "--readme", str(target)])
    assert target.read_text() == broken


def test_filter_selects_cases():
    ctx = families.Context("cpu", "full", re.compile(r"threshold/st3/16M/fp32"))
    cases = families.threshold_cases(ctx)
    assert [(c["op"], c["mode"]) for c in cases] == [("st3_threshold", "fwd"), ("st3_threshold", "fwd+bwd")]
    assert len(families.threshold_cases(families.Context("cpu", "full"))) == 2 * (6 + 4 * 3)
    assert families.threshold_cases(families.Context("cpu", "full", re.compile("^select/"))) == []


def test_bandwidth_fraction_and_gpu_targets():
    """The CUDA-only columns, computed here with a CPU copy: ideal bytes over the copy rate."""
    ctx = families.Context("cpu", "tiny")
    rows = families._rows("threshold", "st3", "64K", 1 << 16, "fp32", "fwd",
                          {p: {"median_s": t, "q1_s": t, "q3_s": t, "min_s": t, "max_s": t, "reps": 3}
                           for p, t in (("eager", 4e-5), ("compile", 2e-5), ("sparsekern", 1e-5))})
    families._bandwidth(rows, 1 << 16, 4, 2, "cpu", ctx)
    sk = rows[-1]
    assert sk["bytes_moved"] == 2 * 4 << 16
    assert sk["bandwidth_fraction"] == pytest.approx(sk["bytes_moved"] / 1e-5 / 1e9 / sk["copy_gbps"])
    got = {t["target"]: t for t in families.targets(rows, "cuda")}
    bw = got["threshold/st3/64K/fp32/fwd: sparsekern ≥ 80% of copy bandwidth"]
    assert bw["value"] == sk["bandwidth_fraction"] and bw["status"] == ("PASS" if bw["value"] >= 0.8 else "FAIL")
    assert got["threshold/st3/64K/fp32/fwd: sparsekern ≥ 1× compile"]["status"] == "PASS"
    select = "select/global_threshold/resnet50/fp32/fwd: sparsekern ≥ 20× cat+kthvalue"  # a CUDA target
    assert got[select]["status"] == "NOT MEASURED"
    assert not [t for t in got if t.startswith("spmm/")]  # the sparse Linear targets are CPU targets
    assert "sparsekern of copy BW" in report.family_table(rows)


def test_bench_runs_without_pytest(tmp_path):
    """GPU images may lack pytest: every benchmark module imports without it and ``python -m bench``
    runs (here its spmm family on the tiny suite)."""
    code = ("import sys; sys.modules['pytest'] = None\n"
            "import bench.bench_bound, bench.bench_masks, bench.bench_select, bench.bench_spmm, "
            "bench.bench_spmm_gpu, bench.bench_threshold, bench.bench_train_step, bench.gpu_check\n"
            "from bench.__main__ import main\n"
            "main(['--suite', 'tiny', '--device', 'cpu', '--filter', '^spmm/', '--no-progress', "
            f"'--out', {str(tmp_path)!r}])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=harness.REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = tmp_path.glob("*-tiny.json")
    rows = json.loads(path.read_text())["rows"]
    assert {r["provider"] for r in rows} == {"dense", "torch_csr", "compile", "sparsekern"}
    assert {r["case"] for r in rows} == {"spmm/linear-b1/90%/fp32/infer", "spmm/maxpool-stem/b1/fp32/infer"}
