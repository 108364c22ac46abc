"""``python -m bench.train_demo``: one short epoch for dense + gmp + asl + nm, the report's fields and files."""
import json

import pytest

from bench import train_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo.md"
    result = train_demo.main(["--epochs", "1", "--methods", "gmp,asl,nm", "--infer-batches", "2",
                              "--infer-budget", "0.05", "--out", str(out)])
    return result, out


def test_rows_and_fields(demo):
    result, _ = demo
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == ["dense", "gmp", "asl", "nm"]
    assert result["ramp"] == train_demo.sparsity_ramp(result["steps_per_epoch"])
    for r in rows.values():
        assert 0.0 <= r["test_acc"] <= 1.0 and 0.0 <= r["sparsity_all_params"] <= 1.0
        assert r["params"] == rows["dense"]["params"] and r["dense_macs"] == rows["dense"]["dense_macs"]
        assert 0 < r["macs"] <= r["dense_macs"]
        assert r["step_ms"]["steps"] == result["steps_per_epoch"] and r["step_ms"]["median"] > 0
        assert r["step_vs_dense"] > 0
        [inf] = r["inference"]
        assert inf["batch"] == 2 and inf["dense_ms"] > 0 and inf["converted_ms"] > 0 and inf["speedup"] > 0
        assert inf["max_abs_diff"] <= 1e-5
        assert [layer["name"] for layer in inf["layers"]] == ["0", "2", "6"]
    dense = rows["dense"]
    assert dense["sparsity_layers"] is None and dense["sparsity_all_params"] == 0.0
    assert dense["macs"] == dense["dense_macs"] == 4_802_560 and dense["step_vs_dense"] == 1.0
    assert dense["test_acc"] > 0.5  # 22 steps of the dense CNN: far above chance (0.1)
    assert "modelled_sparsity" in rows["asl"]


def test_gmp_reaches_its_target_in_one_epoch(demo):
    """The ramp ends halfway through the epoch: per-layer GMP sits at 90 % in every layer."""
    gmp = next(r for r in demo[0]["rows"] if r["method"] == "gmp")
    assert gmp["target_sparsity"] == 0.9
    assert abs(gmp["sparsity_layers"] - 0.9) < 0.005
    assert all(abs(s - 0.9) < 0.01 for s in gmp["sparsity_per_layer"].values()), gmp["sparsity_per_layer"]
    assert 0.85 < gmp["sparsity_all_params"] < gmp["sparsity_layers"]  # biases stay dense
    assert gmp["macs"] == pytest.approx(0.1 * gmp["dense_macs"], rel=0.02)


def test_nm_is_2_4_with_the_first_conv_dense(demo):
    nm = next(r for r in demo[0]["rows"] if r["method"] == "nm")
    assert nm["sparsified_layers"] == ["2", "6"] and nm["sparsity_per_layer"] == {"2": 0.5, "6": 0.5}
    assert any("stay dense" in n and "not divisible by m=4" in n for n in nm["notes"])


def test_files_written(demo):
    result, out = demo
    text = out.read_text()
    assert "| method | test acc |" in text and "inference batch 2" in text
    assert [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")][1:] == \
        ["dense", "gmp", "asl", "nm"]
    assert "2:4 is 50 % sparsity" in text
    assert json.loads(out.with_suffix(".json").read_text()) == json.loads(json.dumps(result))


@pytest.mark.parametrize("argv, match", [(["--methods", "gmp,prune"], "unknown method prune"),
                                         (["--epochs", "0"], "--epochs"),
                                         (["--infer-batches", "0"], "positive ints")])
def test_bad_arguments(argv, match, capsys):
    with pytest.raises(SystemExit):
        train_demo.parse_args(argv)
    assert match in capsys.readouterr().err
