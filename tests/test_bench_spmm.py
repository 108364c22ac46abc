"""``bench/bench_spmm.py`` on tiny shapes (rows, tables, targets, PNG) and STR's ResNet-50 budget
(``bench.suites.STR_RESNET50_90``, Table 7) against the paper's totals and the model."""
import math

import pytest
import torch

import sparsekern as sk
from bench import bench_spmm as B
from bench import bench_spmm_gpu, families, harness, report, suites
from bench.models import prune_to_budget_, resnet50
from utils import TRITON_DEVICE

TINY = [B.linear_spec(3, features=33, out_features=17), B.conv_spec(5, 7, 1, 2, 0, 9),
        B.conv_spec(4, 6, 3, 1, 1, 8, layers=["a", "b"])]
FAST = {"budget_s": 0.001, "min_reps": 3, "max_reps": 3}


def test_crossover_rows_tables_and_png(tmp_path, one_thread):
    rows = B.crossover(TINY, (0.5, 0.9), progress=False, **FAST)
    assert [(r["shape"], r["sparsity"]) for r in rows] == [(s["name"], p) for s in TINY for p in (0.5, 0.9)]
    for r in rows:
        assert abs(r["density"] - (1 - r["sparsity"])) < 0.1  # exact quantile of a few hundred weights
        for p in B.PROVIDERS:
            assert r[p]["reps"] == 3 and 0 < r[p]["min_s"] <= r[p]["median_s"] <= r[p]["max_s"]
        assert r["vs_dense"] == pytest.approx(r["dense"]["median_s"] / r["sparsekern"]["median_s"])
        assert r["vs_torch_csr"] == pytest.approx(r["torch_csr"]["median_s"] / r["sparsekern"]["median_s"])
    table = B.crossover_table(rows)
    assert len(table) == 2 + len(TINY) and table[-1].startswith("| conv3x3 4->6 8x8 | 2 |")
    assert len(B.times_table(rows)) == 2 + len(rows)
    path = B.plot_crossover(rows, str(tmp_path / "spmm-crossover.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_crossover_sparsity():
    rows = [{"sparsity": s, "vs_dense": v} for s, v in ((0.5, 1.2), (0.7, 0.9), (0.8, 1.1), (0.9, 2.0))]
    assert B.crossover_sparsity(rows) == 0.8
    assert B.crossover_sparsity(rows[:2]) is None


def test_targets_from_rows():
    def row(batch, sparsity, dense, csr, **spec):
        return {"kind": "linear", "in": 4096, "out": 4096, "batch": batch, "sparsity": sparsity,
                **spec, "vs_dense": dense, "vs_torch_csr": csr}

    rows = [row(64, 0.9, 5.0, 1.2), row(64, 0.95, 7.5, 2.0), row(1, 0.9, 9.0, 9.0, kind="conv"),
            {"shape": B.TARGET_CONV["name"], "kind": "conv", "batch": 1, "sparsity": 0.9, "vs_dense": 2.4}]
    got = {t["target"]: t["status"] for t in B.check_targets(rows)}
    assert list(got.values()) == ["PASS", "PASS", "FAIL", "FAIL"]
    assert [t["text"].endswith("(PASS)") for t in B.check_targets(rows)] == [True, True, False, False]
    model = {"layers": [{"format": "csr", "speedup": 1.3, "relayer": {"speedup": 0.9}},
                        {"format": "dense", "speedup": 0.2}]}
    assert [t["status"] for t in B.check_targets([], model)] == ["NOT MEASURED"] * 4 + ["PASS", "FAIL"]


def test_resnet50_conv_specs():
    specs = B.resnet50_conv_specs()
    assert len(specs) == 23 and sum(len(s["layers"]) for s in specs) == 53  # every conv, once
    assert specs[0]["name"] == "conv7x7 3->64 224x224 s2" and specs[0]["layers"] == ["conv1"]


def test_str_budget_matches_table_7():
    """Per-layer weights equal the model's; the weighted sparsities give Table 7's totals
    (90.23 % overall, 92.47 % backbone) to the table's two decimals."""
    budget = suites.STR_RESNET50_90
    assert [p for _, p, _ in budget] == [math.prod(s) for s in suites.resnet50()]
    with torch.device("meta"):
        model = resnet50()
    assert [n for n, _, _ in budget] == [n for n, m in model.named_modules()
                                         if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    for key, exclude in (("overall", ()), ("backbone", ("fc",))):
        params, sparsity = suites.budget_sparsity(budget, exclude)
        assert params == suites.STR_RESNET50_90_TOTALS[key][0]
        assert round(sparsity, 2) == suites.STR_RESNET50_90_TOTALS[key][1]


def test_prune_to_budget():
    """Each layer gets its budget's sparsity (exact quantile); STR's 90 % model has 343 M MACs
    (sk.count_flops), the number the STR paper reports for it."""
    torch.manual_seed(0)
    model = prune_to_budget_(resnet50(), suites.STR_RESNET50_90)
    for name, numel, s in suites.STR_RESNET50_90:
        zeros = int((model.get_submodule(name).weight == 0).sum())
        assert abs(zeros / numel - s / 100) <= 1 / numel + 1e-9, name
    report = sk.count_flops(model, (3, 224, 224))
    assert round(1 - report.nonzero_params / report.params, 4) == 0.9023
    assert round(report.macs / 1e6) == 343
    with pytest.raises(ValueError, match="fc"):
        prune_to_budget_(resnet50(num_classes=10), suites.STR_RESNET50_90)


def test_cuda_family_rows(monkeypatch, tmp_path):
    """``families.run_spmm_cuda`` (the spmm family of ``python -m bench`` on CUDA) on a 32×32
    Linear, its Triton kernels on ``TRITON_DEVICE`` (the interpreter without a GPU): rows in the
    results schema, dense the baseline, ``csr_mm`` as sparsekern, the report's table and plot."""
    monkeypatch.setitem(bench_spmm_gpu.SHAPES, "4096x4096", (32, 32))
    streamed = []
    rows = families.run_spmm_cuda(families.Context(TRITON_DEVICE, "tiny", progress=False, on_rows=streamed.append))
    assert streamed == [rows]  # one case, handed over when it finished
    assert [(r["case"], r["provider"]) for r in rows] == [
        ("spmm/linear-b1/90%/fp32/infer", p) for p in ("dense", "torch_csr", "sparsekern", "sk_bsr")]
    assert not [r["error"] for r in rows if "error" in r]
    by = {r["provider"]: r for r in rows}
    speedup = by["dense"]["median_s"] / by["sparsekern"]["median_s"]
    assert by["sparsekern"]["speedup_vs_baseline"] == pytest.approx(speedup)
    assert by["sparsekern"]["shape"] == "linear 32x32 b1 fp32" and by["sparsekern"]["numel"] == 32 * 32
    env = harness.environment("cpu")
    doc = {"schema": report.SCHEMA, "rows": [{**{k: env[k] for k in report.RUN_KEYS}, **r} for r in rows],
           "meta": {**env, "command": "test", "suite": "tiny", "load_avg_1m_end": 0.0, "other_processes_cpus": 0.0,
                    "wall_s": 1.0, "family_wall_s": {"spmm": 1.0}}}
    report.validate(doc)
    assert "| linear-b1 | 90% | fp32 | infer |" in report.family_table(doc["rows"])
    png = report.plot_spmm_crossover(doc, str(tmp_path / "crossover.png"))
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
