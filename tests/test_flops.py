"""``sk.count_flops`` (SPEC §8): the papers' ResNet-50 / MobileNetV1 totals, conv/linear formulas,
density scaling, pools; and ``bench.models`` against the ``bench.suites`` weight shapes."""
import pytest
import torch
from torch import nn

import sparsekern as sk
from bench import suites
from bench.models import MODELS, mobilenet_v1, resnet50
from sparsekern.flops import FlopReport, LayerFlops


def _meta(build):
    with torch.device("meta"):
        return build()


def test_resnet50_matches_the_papers():
    """25,502,912 params (Conv/Linear weights only: torchvision's 25,557,032 also counts the fc
    bias and BN) and 4,089,284,608 MACs = conv + fc + the global pool's 2048·7·7 (SPEC §8)."""
    report = sk.count_flops(_meta(resnet50), (3, 224, 224))
    assert report.params == 25_502_912 == report.nonzero_params  # meta weights count as dense
    assert report.dense_macs == 4_089_284_608 == report.macs
    pool = [r for r in report.rows if r.type == "AdaptiveAvgPool2d"]
    assert pool == [LayerFlops("avgpool", "AdaptiveAvgPool2d", (2048, 7, 7), 0, 0, 100_352, 100_352)]
    assert len(report.rows) == 54 + 1
    assert report.rows[0] == LayerFlops("conv1", "Conv2d", (64, 3, 7, 7), 9408, 9408, 9408 * 112 * 112,
                                        9408 * 112 * 112)
    assert report.rows[-1] == LayerFlops("fc", "Linear", (1000, 2048), 2_048_000, 2_048_000, 2_048_000, 2_048_000)
    all_params = sum(p.numel() for p in _meta(resnet50).parameters())
    assert all_params == 25_557_032 == report.params + 1000 + 2 * 26_560  # + fc bias + BN weight/bias


def test_mobilenet_v1_matches_the_papers():
    """4,209,088 params; 568,740,352 published MACs = conv + fc without the pool, although the same
    table (STR, Table 8) lists the pool's 1024·7·7 = 50,176: SPEC §8's pool rule gives 568,790,528."""
    model = _meta(mobilenet_v1)
    report = sk.count_flops(model, (3, 224, 224))
    assert report.params == 4_209_088
    assert report.dense_macs == 568_790_528 == 568_740_352 + 50_176
    assert sk.count_flops(model, (3, 224, 224), count_pool=False).dense_macs == 568_740_352
    by_name = {r.name: r for r in report.rows}
    assert by_name["features.0.0"].dense_macs == 10_838_016  # Table 8, layer 1
    assert by_name["features.1.0"].dense_macs == 3_612_672  # layer 2 (dw)
    assert by_name["features.7.0"].dense_macs == 903_168  # layer 8 (dw, stride 2)
    assert by_name["avgpool"].dense_macs == 50_176


@pytest.mark.parametrize("name", sorted(MODELS))
def test_bench_models_agree_with_the_weight_suites(name):
    model = _meta(MODELS[name])
    shapes = [tuple(m.weight.shape) for m in model.modules() if type(m) in (nn.Conv2d, nn.Linear)]
    assert shapes == [tuple(s) for s in suites.SUITES[name]()]
    assert suites.numel(shapes) == suites.TOTALS[name]


@pytest.mark.parametrize("cfg", [
    dict(stride=1, padding=0, dilation=1, groups=1),
    dict(stride=2, padding=1, dilation=1, groups=1),
    dict(stride=3, padding=2, dilation=2, groups=1),
    dict(stride=1, padding=1, dilation=1, groups=4),
    dict(stride=2, padding=1, dilation=1, groups=8),  # depthwise
])
def test_conv_macs_formula(cfg):
    conv = nn.Conv2d(8, 16, (3, 5), **cfg)
    report = sk.count_flops(nn.Sequential(conv), (8, 17, 23))
    h = (17 + 2 * cfg["padding"] - cfg["dilation"] * 2 - 1) // cfg["stride"] + 1
    w = (23 + 2 * cfg["padding"] - cfg["dilation"] * 4 - 1) // cfg["stride"] + 1
    assert conv(torch.randn(1, 8, 17, 23)).shape[2:] == (h, w)
    (row,) = report.rows
    assert row.params == 16 * (8 // cfg["groups"]) * 15
    assert row.dense_macs == 16 * (8 // cfg["groups"]) * 3 * 5 * h * w == row.macs


def test_linear_on_any_leading_shape_and_conv1d_conv3d():
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3, bias=False))
    report = sk.count_flops(model, (5, 7, 16))  # per sample: 5·7 rows
    assert [r.dense_macs for r in report.rows] == [35 * 16 * 8, 35 * 8 * 3]
    assert sk.count_flops(model, 16).dense_macs == 16 * 8 + 8 * 3  # int input_size: one vector
    report = sk.count_flops(nn.Sequential(nn.Conv1d(4, 6, 3, stride=2)), (4, 11))
    assert report.dense_macs == 6 * 4 * 3 * 5
    report = sk.count_flops(nn.Sequential(nn.Conv3d(2, 3, 3, padding=1)), (2, 4, 5, 6))
    assert report.dense_macs == 3 * 2 * 27 * 4 * 5 * 6


def test_macs_scale_with_exact_zeros_of_plain_and_sparse_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2),
                          nn.Flatten(), nn.Linear(8 * 9, 10))
    with torch.no_grad():
        model[0].weight[:2] = 0.0  # 2 of 8 filters: 54 zeros of 216
    sp = sk.sparsify(model, "gmp", sparsity=0.75, exclude=["0"])
    report = sk.count_flops(model, (3, 8, 8))
    conv0, conv2, fc = report.rows
    assert (conv0.params, conv0.nonzero) == (216, 162) and conv0.macs == 162 * 64
    for row, positions in ((conv2, 9), (fc, 1)):
        nonzero = int(torch.count_nonzero(model.get_submodule(row.name).effective_weight()))
        assert row.nonzero == nonzero == round(row.params * 0.25) and row.macs == nonzero * positions
        assert row.type in ("SparseConv2d", "SparseLinear")
    assert report.nonzero_params == 162 + conv2.nonzero + fc.nonzero
    assert report.macs == sum(r.macs for r in report.rows) < report.dense_macs
    sp.finalize()  # plain layers with baked zeros count the same
    assert sk.count_flops(model, (3, 8, 8)).macs == report.macs


def test_shared_module_counts_per_call_and_params_once():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(self.fc(x))

    (row,) = sk.count_flops(Twice(), (4,)).rows
    assert (row.params, row.dense_macs) == (16, 32)


def test_only_global_average_pools_count():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.AvgPool2d(2), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(2),
                          nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4, 2))
    report = sk.count_flops(model, (3, 16, 16))
    assert [r.name for r in report.rows] == ["0", "4", "6"]  # only the last pool is global (2×2 → 1×1)
    assert report.rows[1].dense_macs == 4 * 2 * 2 and report.rows[1].shape == (4, 2, 2)
    assert [r.name for r in sk.count_flops(model, (3, 16, 16), count_pool=False).rows] == ["0", "6"]


def test_model_is_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 36, 2)).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = sk.count_flops(model, (3, 8, 8))
    assert isinstance(report, FlopReport) and report.params == 108 + 288
    after = model.state_dict()
    assert all(torch.equal(after[k], v) and after[k].device.type == "cpu" for k, v in state.items())
    assert model.training and not any(m._forward_hooks for m in model.modules())
    text = str(report)
    assert text.splitlines()[-1].split()[:2] == ["total", "396"] and "Conv2d" in text


@pytest.mark.parametrize("size, exc", [((), ValueError), ((3, 0, 8), ValueError), ((3, -1), ValueError),
                                       ((3, 8.0), ValueError), ("3x8", ValueError), (None, TypeError)])
def test_bad_input_size(size, exc):
    with pytest.raises(exc, match="input_size"):
        sk.count_flops(nn.Sequential(nn.Linear(3, 3)), size)


def test_top_level_export():
    assert "count_flops" in sk.__all__ and sk.FlopReport is FlopReport
