"""sparsekern.inference: the sparse modules (csr, block, nm, ck) vs dense layers, the cost
model's format choice, convert() end to end, pickling, state_dict round trips, clear errors."""
import importlib
import io
import math
import pickle
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import sparsekern as sk
from sparsekern.inference import (BSRConv1x1, BSRLinear, CKConv2d, CSRConv1x1, CSRConv2d, CSRGroupConv2d, CSRLinear,
                                  NMConv1x1, NMLinear, SemiStructuredLinear, rank_formats)
from sparsekern.inference.modules import supports_semi_structured

convert_module = importlib.import_module("sparsekern.inference.convert")  # the name is the function

TOL = dict(atol=1e-4, rtol=1e-4)


def prune_(model, sparsity, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(torch.rand(p.shape, generator=g) >= sparsity)
    return model


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.pw = nn.Conv2d(16, 32, 1)
        self.down = nn.Conv2d(32, 32, 1, stride=2, bias=False)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10, bias=False)

    def forward(self, x):
        x = torch.relu(self.pw(torch.relu(self.stem(x))))
        x = self.down(x).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize("density", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("bias", [False, True])
def test_csr_linear_module(density, bias):
    lin = prune_(nn.Linear(37, 21, bias=bias), 1 - density).eval()
    m = CSRLinear.from_dense(lin).eval()
    for shape in [(37,), (1, 37), (5, 37), (2, 3, 37)]:
        x = torch.randn(shape)
        torch.testing.assert_close(m(x), lin(x).detach(), **TOL)
    torch.testing.assert_close(m.weight_dense(), lin.weight.detach())
    assert math.isclose(m.density, int((lin.weight != 0).sum()) / lin.weight.numel())


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("bias", [False, True])
def test_csr_conv1x1_module(stride, bias):
    conv = prune_(nn.Conv2d(12, 20, 1, stride=stride, bias=bias), 0.8).eval()
    m = CSRConv1x1.from_dense(conv).eval()
    for n in (1, 2):
        x = torch.randn(n, 12, 7, 9)
        torch.testing.assert_close(m(x), conv(x).detach(), **TOL)
    with pytest.raises(ValueError, match="1×1"):
        CSRConv1x1.from_dense(nn.Conv2d(3, 4, 3))


def test_convert_small_cnn_equals_dense():
    model = prune_(SmallCNN(), 0.9).eval()
    x = torch.randn(2, 3, 8, 8)
    expect = model(x).detach()
    conv, report = sk.inference.convert(model, min_speedup=0.0, example_input=x, reps=1, formats="csr",
                                        return_report=True)
    assert isinstance(conv.pw, CSRConv1x1) and isinstance(conv.down, CSRConv1x1)
    assert isinstance(conv.fc1, CSRLinear) and isinstance(conv.fc2, CSRLinear)
    assert isinstance(conv.stem, CSRConv2d)
    rows = {r.name: r for r in report}
    assert rows["stem"].format == "csr" and rows["fc1"].format == "csr"
    assert rows["fc1"].input_shape == (2, 512) and rows["pw"].input_shape == (2, 16, 8, 8)
    assert 0.0 < rows["fc1"].density < 0.2 and rows["fc1"].speedup > 0
    assert "fc1" in str(report)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), expect, **TOL)


def test_convert_mlp_without_example_and_min_speedup():
    model = prune_(nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5)), 0.5).eval()
    x = torch.randn(4, 20)
    expect = model(x).detach()
    conv, report = sk.inference.convert(model, min_speedup=math.inf, reps=1, return_report=True)
    assert all(r.format == "dense" for r in report) and all(isinstance(m, nn.Linear) for m in conv[::2])
    assert report[0].input_shape == (1, 20) and "below min_speedup" in report[0].note
    conv = sk.inference.convert(model, min_speedup=0.0, reps=1)  # the DESIGN contract: the model
    assert all(isinstance(m, (CSRLinear, BSRLinear, NMLinear)) for m in conv[::2])
    with torch.no_grad():
        torch.testing.assert_close(conv(x), expect, **TOL)


def test_convert_root_linear_and_skips():
    lin = prune_(nn.Linear(8, 4), 0.5).eval()
    conv = sk.inference.convert(lin, min_speedup=0.0, reps=1, formats=["csr"])
    assert isinstance(conv, CSRLinear)
    double = nn.ModuleDict({"used": nn.Linear(8, 4).double(), "unused": nn.Linear(4, 4)})
    double.forward = lambda x: double["used"](x)
    _, report = sk.inference.convert(double, min_speedup=0.0, example_input=torch.randn(2, 8).double(), reps=1,
                                     return_report=True)
    assert report[0].format == "dense" and "dtype" in report[0].note
    assert report[1].format == "dense" and "not run" in report[1].note
    with pytest.raises(ValueError, match="min_speedup"):
        sk.inference.convert(lin, min_speedup=-1.0)
    with pytest.raises(ValueError, match="unknown formats"):
        sk.inference.convert(lin, formats=("coo",))


def test_pickle_and_state_dict_roundtrip():
    model = prune_(SmallCNN(), 0.9).eval()
    x = torch.randn(1, 3, 8, 8)
    conv = sk.inference.convert(model, min_speedup=0.0, example_input=x, reps=1, formats="csr")
    with torch.no_grad():
        expect = conv(x)
        torch.testing.assert_close(pickle.loads(pickle.dumps(conv))(x), expect)
        buf = io.BytesIO()
        torch.save(conv.state_dict(), buf)
        # a converted model of another pruning (other nnz) takes the saved weights
        other = sk.inference.convert(prune_(SmallCNN(), 0.5, seed=3).eval(), min_speedup=0.0,
                                     example_input=x, reps=1, formats="csr")
        buf.seek(0)
        other.load_state_dict(torch.load(buf))
        torch.testing.assert_close(other(x), expect)
    assert set(conv.state_dict()) >= {"fc1.rowptr", "fc1.col", "fc1.val", "fc1.bias", "pw.val"}
    assert "fc2.bias" not in conv.state_dict()


def test_errors():
    m = CSRLinear.from_dense(prune_(nn.Linear(6, 3), 0.5))
    x = torch.randn(2, 6)
    with pytest.raises(RuntimeError, match="inference-only"):
        m.train()(x)
    with torch.no_grad():
        m.train()(x)  # training flag without grad is fine
    m.eval()
    with pytest.raises(ValueError, match="float32"):
        m(x.double())
    with pytest.raises(ValueError, match="meta"):
        m(x.to("meta"))
    with pytest.raises(ValueError, match="6 input features"):
        m(torch.randn(2, 5))
    c = CSRConv1x1.from_dense(nn.Conv2d(6, 3, 1)).eval()
    with pytest.raises(ValueError, match="4-D"):
        c(torch.randn(6, 2))
    with pytest.raises(TypeError, match="nn.Module"):
        sk.inference.convert(torch.randn(3))


@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 1, 1), (1, 2, 2)])
def test_csr_conv2d_module(stride, padding, dilation):
    conv = prune_(nn.Conv2d(6, 10, 3, stride, padding, dilation), 0.8).eval()
    m = CSRConv2d.from_dense(conv).eval()
    for shape in [(1, 6, 9, 9), (2, 6, 12, 7), (5, 6, 9, 9), (1, 6, 9, 9), (5, 6, 9, 9), (0, 6, 9, 9)]:  # cached
        x = torch.randn(shape)
        torch.testing.assert_close(m(x), conv(x).detach(), **TOL)
    with pytest.raises(ValueError, match="groups 1"):
        CSRConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2))


@pytest.mark.parametrize("inp,groups,out,k,stride,padding,dilation", [
    (8, 8, 8, 3, 1, 1, 1), (8, 8, 16, 3, 2, 1, 1), (6, 3, 9, 3, 1, 2, 2), (4, 2, 4, (3, 5), (2, 1), (0, 2), 1),
    (5, 1, 3, 3, 1, 1, 1)])
@pytest.mark.parametrize("bias", [False, True])
def test_csr_group_conv2d_module(inp, groups, out, k, stride, padding, dilation, bias):
    def make(sparsity, seed):
        return prune_(nn.Conv2d(inp, out, k, stride, padding, dilation, groups=groups, bias=bias), sparsity, seed).eval()

    conv = make(0.6, 0)
    m = CSRGroupConv2d.from_dense(conv).eval()
    assert m.groups == groups and m.in_features == inp and f"groups={groups}" in repr(m)
    assert m.density == pytest.approx(float((conv.weight != 0).float().mean()))
    torch.testing.assert_close(m.weight_dense(), conv.weight.detach().reshape(out, -1))
    with torch.no_grad():
        for shape in [(1, inp + 1, 9, 11), (3, inp + 1, 12, 7), (0, inp + 1, 9, 9)]:
            x = torch.randn(shape)[:, 1:]  # non-contiguous
            torch.testing.assert_close(m(x), conv(x), **TOL)
        other = CSRGroupConv2d.from_dense(make(0.2, 3)).eval()  # other nnz: buffers resized
        other.load_state_dict(m.state_dict())
        torch.testing.assert_close(other(x), m(x))
        torch.testing.assert_close(pickle.loads(pickle.dumps(m))(x), m(x))
    with pytest.raises(ValueError, match="zero padding"):
        CSRGroupConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="groups"):
        CSRGroupConv2d(torch.randn(4, 1, 3, 3), groups=3)
    with pytest.raises(ValueError, match=f"{inp} input features"):
        m(torch.randn(1, inp + 1, 9, 9))


def test_convert_depthwise_separable_equals_dense():
    model = prune_(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1, groups=8),
                                 nn.ReLU(), nn.Conv2d(8, 16, 1), nn.Conv2d(16, 16, 3, padding=1, groups=4),
                                 nn.Conv2d(16, 16, 3, padding=1, groups=16, padding_mode="circular")), 0.5).eval()
    x = torch.randn(2, 3, 11, 10)
    expect = model(x).detach()
    conv, report = sk.inference.convert(model, min_speedup=0.0, example_input=x, reps=1, formats="csr",
                                        return_report=True)
    assert isinstance(conv[2], CSRGroupConv2d) and isinstance(conv[5], CSRGroupConv2d)
    assert type(conv[6]) is nn.Conv2d and "padding mode" in report[-1].note
    assert [r.kind for r in report] == ["Conv2d", "GroupConv2d", "Conv1x1", "GroupConv2d", "Conv2d"]
    with torch.no_grad():
        torch.testing.assert_close(conv(x), expect, **TOL)


# --- block, N:M and CK modules ----------------------------------------------------------------------

def nm_weight(out, inp, n, m, seed=0):
    w = torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))
    return w * sk.nm_mask(w, n, m)


LINEAR_CASES = [  # (class, options, weight maker)
    (CSRLinear, {}, lambda o, i: prune_(nn.Linear(i, o), 0.9).weight),
    (BSRLinear, {"block": (4, 4)}, lambda o, i: prune_(nn.Linear(i, o), 0.9).weight),
    (BSRLinear, {"block": (3, 5)}, lambda o, i: nn.Linear(i, o).weight),  # fully dense
    (BSRLinear, {"block": (2, 2)}, lambda o, i: torch.zeros(o, i)),  # all zero
    (NMLinear, {"n": 2, "m": 4}, lambda o, i: nm_weight(o, i, 2, 4)),
    (NMLinear, {"n": 1, "m": 8}, lambda o, i: nm_weight(o, i, 1, 8)),
]


@pytest.mark.parametrize("cls,opts,make", LINEAR_CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_linear_modules(cls, opts, make, bias):
    lin = nn.Linear(40, 21, bias=bias).eval()
    with torch.no_grad():
        lin.weight.copy_(make(21, 40))
    m = cls.from_dense(lin, **opts).eval()
    with torch.no_grad():
        for shape in [(40,), (1, 40), (5, 40), (2, 3, 40), (0, 40)]:
            x = torch.randn(shape)
            torch.testing.assert_close(m(x), lin(x), **TOL)
        torch.testing.assert_close(m.weight_dense(), lin.weight)
        assert math.isclose(m.density, int((lin.weight != 0).sum()) / lin.weight.numel())
        assert "density" in repr(m)
        y = pickle.loads(pickle.dumps(m))(torch.randn(3, 40))  # pickles
        assert y.shape == (3, 21)


@pytest.mark.parametrize("cls,opts", [(CSRConv1x1, {}), (BSRConv1x1, {"block": (4, 2)}), (NMConv1x1, {"n": 2, "m": 4})])
@pytest.mark.parametrize("stride", [1, 2])
def test_conv1x1_modules(cls, opts, stride):
    conv = nn.Conv2d(16, 12, 1, stride=stride).eval()
    with torch.no_grad():
        conv.weight.copy_(nm_weight(12, 16, 2, 4).reshape(12, 16, 1, 1))
    m = cls.from_dense(conv, **opts).eval()
    with torch.no_grad():
        for n in (1, 2):
            x = torch.randn(n, 16, 7, 9)
            torch.testing.assert_close(m(x), conv(x), **TOL)
    with pytest.raises(ValueError, match="1×1"):
        cls.from_dense(nn.Conv2d(16, 12, 3), **opts)


@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 1, 1), (1, 2, 2), (1, 0, 1)])
@pytest.mark.parametrize("bias", [False, True])
def test_ck_conv2d_module(stride, padding, dilation, bias):
    conv = nn.Conv2d(8, 10, 3, stride, padding, dilation, bias=bias).eval()
    with torch.no_grad():
        conv.weight.mul_(sk.ck_mask(conv.weight, 0.7))
    m = CKConv2d.from_dense(conv).eval()
    with torch.no_grad():
        for shape in [(1, 8, 9, 9), (2, 8, 12, 7), (5, 8, 9, 9), (1, 8, 9, 9), (5, 8, 9, 9)]:  # cached taps
            x = torch.randn(shape)
            torch.testing.assert_close(m(x), conv(x), **TOL)
        torch.testing.assert_close(m.weight_dense(), conv.weight)
        assert math.isclose(m.density, int((conv.weight != 0).sum()) / conv.weight.numel())
        x = torch.randn(1, 8, 9, 9)
        torch.testing.assert_close(pickle.loads(pickle.dumps(m))(x), conv(x), **TOL)
    with pytest.raises(ValueError, match="groups 1"):
        CKConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2))


def test_new_modules_state_dict_roundtrip():
    g = torch.Generator().manual_seed(0)
    lin_a, lin_b = prune_(nn.Linear(16, 8), 0.7), prune_(nn.Linear(16, 8), 0.3, seed=1)
    conv_a, conv_b = nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(4, 6, 3, padding=1)
    with torch.no_grad():
        conv_a.weight.mul_(sk.ck_mask(conv_a.weight, 0.75))
        conv_b.weight.mul_(sk.ck_mask(conv_b.weight, 0.25))
    pairs = [(BSRLinear.from_dense(lin_a, block=(2, 4)), BSRLinear.from_dense(lin_b, block=(4, 4)), torch.randn(3, 16, generator=g)),
             (NMLinear(nm_weight(8, 16, 2, 4), torch.randn(8)), NMLinear(nm_weight(8, 16, 1, 8, seed=2), torch.randn(8), n=1, m=8),
              torch.randn(3, 16, generator=g)),
             (CKConv2d.from_dense(conv_a), CKConv2d.from_dense(conv_b), torch.randn(1, 4, 5, 5, generator=g))]
    for a, b, x in pairs:
        a.eval(), b.eval()
        with torch.no_grad():
            expect = a(x)
            buf = io.BytesIO()
            torch.save(a.state_dict(), buf)
            buf.seek(0)
            b.load_state_dict(torch.load(buf))
            torch.testing.assert_close(b(x), expect)


def test_new_modules_errors():
    with pytest.raises(ValueError, match="not 2:4"):
        NMLinear(torch.randn(4, 8), n=2, m=4)
    with pytest.raises(ValueError, match="float32"):
        BSRLinear(torch.randn(4, 8).half())
    m = BSRLinear(torch.randn(4, 8))
    with pytest.raises(RuntimeError, match="inference-only"):
        m.train()(torch.randn(2, 8))
    m.eval()
    with pytest.raises(ValueError, match="float32"):
        m(torch.randn(2, 8).double())
    with pytest.raises(ValueError, match="8 input features"):
        m(torch.randn(2, 7))
    c = CKConv2d(torch.randn(3, 2, 3, 3)).eval()
    with pytest.raises(ValueError, match="4-D"):
        c(torch.randn(2, 5, 5))
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        c(torch.randn(1, 2, 2, 2))


# --- the cost model's choice (no timing) and convert end to end -----------------------------------------

def sparse_candidates(module, shape):
    return [c for c in rank_formats(module, shape) if c.format != "dense"]


def test_cost_model_choices():
    lin = nn.Linear(256, 128)
    with torch.no_grad():
        lin.weight.copy_(nm_weight(128, 256, 1, 8))
    cands = sparse_candidates(lin, (64, 256))
    assert cands[0].format == "nm" and cands[0].params == {"n": 1, "m": 8}  # N:M: fewest index bytes
    with torch.no_grad():
        lin.weight.mul_(0).add_(torch.randn(128, 256))  # dense: not N:M, no nm candidate
    cands = rank_formats(lin, (64, 256))
    assert "nm" not in {c.format for c in cands} and cands[0].format == "dense"
    with torch.no_grad():
        lin.weight.mul_(sk.block_mask(lin.weight, 4, 0.9))
    for batch in (1, 64):
        top = sparse_candidates(lin, (batch, 256))[0]
        assert top.format == "block" and top.params["block"] in ((4, 4), (1, 8), (4, 1)), top
        assert top.predicted_ms < rank_formats(lin, (batch, 256))[-1].predicted_ms
    conv = nn.Conv2d(64, 64, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(sk.ck_mask(conv.weight, 0.9))
    cands = sparse_candidates(conv, (1, 64, 14, 14))
    assert [c.format for c in cands] == ["ck", "csr"]  # KxK: csr and ck only; whole kernels: ck
    assert isinstance(cands[0].build(), CKConv2d)
    strided = nn.Conv2d(8, 8, 3, stride=2, padding=1)  # strided KxK: the grouped kernel (groups 1) too
    cands = [c for c in sparse_candidates(strided, (1, 8, 15, 15)) if c.params == {"kernel": "grouped"}]
    assert len(cands) == 1 and cands[0].format == "csr"
    grouped = cands[0].build().eval()
    assert isinstance(grouped, CSRGroupConv2d) and grouped.groups == 1
    x = torch.randn(2, 8, 15, 15)
    with torch.no_grad():
        torch.testing.assert_close(grouped(x), strided(x), **TOL)
    assert not [c for c in rank_formats(conv, (1, 64, 14, 14)) if c.params == {"kernel": "grouped"}]  # stride 1
    cands = rank_formats(nn.Conv2d(4, 4, 3, groups=2), (1, 4, 8, 8))
    assert {c.format for c in cands} == {"dense", "csr"}  # grouped: csr_group_conv
    assert isinstance(next(c for c in cands if c.format == "csr").build(), CSRGroupConv2d)
    assert [c.format for c in rank_formats(nn.Conv2d(4, 4, 3, padding="same", groups=2), (1, 4, 8, 8))] == ["dense"]
    assert [c.format for c in rank_formats(nn.Linear(8, 8).double(), (1, 8))] == ["dense"]
    assert {c.format for c in rank_formats(nn.Linear(8, 8).half(), (1, 8))} == {"dense", "bitmap"}  # issue 16
    assert {c.format for c in rank_formats(nn.Conv2d(8, 8, 1).half(), (1, 8, 4, 4))} == {"dense", "bitmap"}
    assert [c.format for c in rank_formats(nn.Conv2d(8, 8, 3).half(), (1, 8, 4, 4))] == ["dense"]
    assert {c.format for c in rank_formats(lin, (64, 256), formats=("csr",))} == {"dense", "csr"}


class NMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.pw = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16 * 6 * 6, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.pw(torch.relu(self.conv(x)))).flatten(1))


@pytest.mark.parametrize("formats,types", [
    ("nm", {"pw": NMConv1x1, "fc": NMLinear, "conv": nn.Conv2d}),
    ("ck", {"pw": nn.Conv2d, "fc": nn.Linear, "conv": CKConv2d}),
    ("block", {"pw": BSRConv1x1, "fc": BSRLinear, "conv": nn.Conv2d}),
    (None, {}),
])
def test_convert_each_format_equals_dense(formats, types):
    model = NMNet().eval()
    with torch.no_grad():
        model.conv.weight.mul_(sk.ck_mask(model.conv.weight, 0.75))
        model.pw.weight.mul_(sk.nm_mask(model.pw.weight, 2, 4))
        model.fc.weight.mul_(sk.nm_mask(model.fc.weight, 1, 4))
    x = torch.randn(2, 4, 6, 6)
    expect = model(x).detach()
    conv, report = sk.inference.convert(model, min_speedup=0.0, example_input=x, reps=1, formats=formats,
                                        return_report=True)
    for name, t in types.items():
        assert type(getattr(conv, name)) is t, (name, report)
    for r in report:
        assert r.format == "dense" or formats is None or r.format == formats
        assert r.format == "dense" or (r.speedup > 0 and r.predicted > 0 and r.sparse_ms > 0)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), expect, **TOL)
    assert "predicted" in str(report)


def test_convert_guard_never_keeps_a_slower_layer():
    model = prune_(SmallCNN(), 0.9).eval()
    x = torch.randn(1, 3, 8, 8)
    expect = model(x).detach()
    conv, report = sk.inference.convert(model, min_speedup=1.0, example_input=x, reps=2, return_report=True)
    for r in report:  # accepted only when both measurements reach min_speedup
        assert r.format == "dense" or r.speedup >= 1.0, r
        assert r.dense_ms is not None
    with torch.no_grad():
        torch.testing.assert_close(conv(x), expect, **TOL)


# --- layers read from outside their forward stay dense (issue 13, item 8) -------------------------

SPARSE_TYPES = (CSRLinear, BSRLinear, NMLinear, CSRConv1x1, BSRConv1x1, NMConv1x1, CSRConv2d, CKConv2d)


def dense_rows(report):
    return {r.name: r.note for r in report if r.format == "dense"}


def encoder_layer(batch_first):
    return prune_(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=batch_first), 0.6).eval()


@pytest.mark.parametrize("example", [True, False])
def test_convert_keeps_transformer_encoder_layer_readers_dense(example):
    """MHA hands out_proj.weight to F.multi_head_attention_forward; a batch-first encoder layer's
    eval fast path hands linear1/linear2's weights to one fused op (and leaves that path when a
    module has hooks: the probe must not use hooks). All three stay dense, with or without
    example_input, and the layer computes as before on both paths (no grad: fast path; grad:
    Python path). Swapping them failed with AttributeError: 'CSRLinear' object has no attribute 'weight'."""
    layer = encoder_layer(batch_first=True)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        expect = layer(x)
    conv, report = sk.inference.convert(layer, min_speedup=0.0, example_input=x if example else None, reps=1,
                                        return_report=True)
    dense = dense_rows(report)
    assert set(dense) == {"self_attn.out_proj", "linear1", "linear2"}, report
    assert "MultiheadAttention" in dense["self_attn.out_proj"] and "fast path" in dense["linear1"], report
    assert all(type(conv.get_submodule(n)) in (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)
               for n in dense)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), expect, **TOL)
    torch.testing.assert_close(conv(x).detach(), expect, **TOL)  # grad enabled: the Python path


def test_convert_sequence_first_encoder_layer_converts_its_feed_forward():
    """Not batch-first: no fast path, linear1/linear2 run their own forward and convert; out_proj
    (read by MHA) stays dense."""
    layer = encoder_layer(batch_first=False)
    x = torch.randn(5, 2, 32)
    with torch.no_grad():
        expect = layer(x)
        conv, report = sk.inference.convert(layer, min_speedup=0.0, example_input=x, reps=1, return_report=True)
        assert set(dense_rows(report)) == {"self_attn.out_proj"}, report
        assert isinstance(conv.linear1, SPARSE_TYPES) and isinstance(conv.linear2, SPARSE_TYPES)
        torch.testing.assert_close(conv(x), expect, **TOL)


def weight_of(module):
    """A helper reading a child's weight (not visible as ``self.<child>.weight`` in the caller)."""
    return module.weight


def tf_pad(x, conv):
    """TensorFlow "SAME" padding from the conv's own attributes (transformers' MobileNetV2)."""
    (sh, sw), (kh, kw), (dh, dw) = conv.stride, conv.kernel_size, conv.dilation
    ph = max((math.ceil(x.shape[-2] / sh) - 1) * sh + (kh - 1) * dh + 1 - x.shape[-2], 0)
    pw = max((math.ceil(x.shape[-1] / sw) - 1) * sw + (kw - 1) * dw + 1 - x.shape[-1], 0)
    return nn.functional.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2.0 * super().forward(x)


class SwinLike(nn.Module):
    """torchvision swin's shifted_window_attention reads ``F.linear(x, self.qkv.weight, ...)``
    (qkv's forward never runs); ``gate`` is read the same way through a helper; ``fc`` runs and
    is also read through the helper; ``scaled`` overrides forward; ``proj`` and ``out`` are plain."""

    def __init__(self):
        super().__init__()
        self.qkv, self.proj, self.gate = nn.Linear(16, 48), nn.Linear(16, 16), nn.Linear(16, 16)
        self.fc, self.scaled, self.out = nn.Linear(16, 16), ScaledLinear(16, 16), nn.Linear(16, 8)

    def forward(self, x):
        q, k, v = nn.functional.linear(x, self.qkv.weight, self.qkv.bias).chunk(3, -1)
        h = self.proj(torch.softmax(q @ k.transpose(-2, -1) / 4.0, -1) @ v)
        h = self.fc(h) + nn.functional.linear(h, weight_of(self.gate)) + nn.functional.linear(h, weight_of(self.fc))
        return self.out(self.scaled(h))


class TFPadNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, stride=2)
        self.pw = nn.Conv2d(8, 8, 1)
        self.unbatched = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = self.pw(tf_pad(self.conv(tf_pad(x, self.conv)), self.pw))
        return torch.stack([self.unbatched(img) for img in h])  # [C, H, W] inputs


def test_convert_keeps_layers_read_from_outside_dense():
    """Each layer whose weight something other than its own forward reads stays dense, the
    reader named; a parent reading other attributes (TF padding: stride, kernel_size, dilation)
    keeps a layer dense only where the sparse module would give it another value (CSRConv1x1's int
    stride), a KxK conv (tuples, as nn.Conv2d) converts; a forward-overriding subclass and a conv
    fed unbatched inputs stay dense; outputs unchanged."""
    model = prune_(SwinLike(), 0.6).eval()
    x = torch.randn(2, 6, 16)
    with torch.no_grad():
        expect = model(x)
        conv, report = sk.inference.convert(model, min_speedup=0.0, example_input=x, reps=1, return_report=True)
        dense = dense_rows(report)
        assert set(dense) == {"qkv", "gate", "fc", "scaled"}, report
        assert "SwinLike.forward reads self.qkv.weight" in dense["qkv"], report
        assert "weight_of" in dense["gate"] and "weight_of" in dense["fc"], report
        assert "overrides Linear.forward" in dense["scaled"], report
        assert isinstance(conv.proj, SPARSE_TYPES) and isinstance(conv.out, SPARSE_TYPES)
        torch.testing.assert_close(conv(x), expect, **TOL)

        net = prune_(TFPadNet(), 0.6).eval()
        x = torch.randn(2, 4, 9, 9)
        expect = net(x)
        conv, report = sk.inference.convert(net, min_speedup=0.0, example_input=x, reps=1, return_report=True)
        dense = dense_rows(report)
        assert set(dense) == {"pw", "unbatched"}, report
        assert ".stride" in dense["pw"] and "CSRConv1x1" in dense["pw"], report
        assert "[N, C, H, W]" in dense["unbatched"], report
        assert isinstance(conv.conv, (CSRConv2d, CKConv2d, CSRGroupConv2d))
        torch.testing.assert_close(conv(x), expect, **TOL)


def test_convert_without_example_sees_readers_in_the_source():
    """No example_input: an ancestor's forward that reads ``self.<path>.weight`` keeps that layer
    dense (the source is read, nothing runs); the rest converts."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.Module()
            self.attn.qkv, self.proj = nn.Linear(16, 48), nn.Linear(16, 16)

        def forward(self, x):
            q, k, v = nn.functional.linear(x, self.attn.qkv.weight, self.attn.qkv.bias).chunk(3, -1)
            return self.proj(torch.softmax(q @ k.transpose(-2, -1), -1) @ v)

    model = prune_(nn.Sequential(Block(), nn.Linear(16, 4)), 0.6).eval()
    x = torch.randn(1, 3, 16)
    with torch.no_grad():
        expect = model(x)
        conv, report = sk.inference.convert(model, min_speedup=0.0, reps=1, return_report=True)
        dense = dense_rows(report)
        assert list(dense) == ["0.attn.qkv"] and "Block.forward reads self.attn.qkv.weight" in dense["0.attn.qkv"]
        assert isinstance(conv[0].proj, SPARSE_TYPES) and isinstance(conv[1], SPARSE_TYPES)
        torch.testing.assert_close(conv(x), expect, **TOL)


@pytest.mark.parametrize("example", [True, False])
def test_convert_transformers_conv1d(example):
    """transformers' Conv1D (GPT-2: ``x @ weight + bias``, weight ``[in, out]``) converts as a
    Linear of the transposed weight; a module shared by two parents is replaced in both."""
    shared = Conv1D(24, 16)  # nf = out, nx = in
    model = prune_(nn.Sequential(shared, nn.ReLU(), Conv1D(8, 24)), 0.7).eval()
    outer = nn.ModuleDict({"a": model, "b": nn.Sequential(shared)})
    outer.forward = lambda x: model(x) + outer["b"](x)[..., :8]
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        expect = outer(x)
        conv, report = sk.inference.convert(outer, min_speedup=0.0, example_input=x if example else None, reps=1,
                                            return_report=True)
        assert [r.kind for r in report] == ["Conv1D", "Conv1D"] and not dense_rows(report), report
        assert isinstance(model[0], SPARSE_TYPES) and model[0] is outer["b"][0] and isinstance(model[2], SPARSE_TYPES)
        torch.testing.assert_close(conv(x), expect, **TOL)


@pytest.mark.parametrize("make", [
    lambda: CSRLinear.from_dense(prune_(nn.Linear(24, 10), 0.7)),
    lambda: NMLinear.from_dense(nn.Linear(24, 10), n=4, m=4),
    lambda: BSRLinear.from_dense(prune_(nn.Linear(24, 10), 0.7), block=(2, 4)),
    lambda: CSRConv1x1.from_dense(prune_(nn.Conv2d(24, 10, 1, stride=2), 0.7)),
    lambda: CSRConv2d.from_dense(prune_(nn.Conv2d(24, 10, 3, padding=1), 0.7)),
    lambda: CKConv2d.from_dense(prune_(nn.Conv2d(24, 10, 3, stride=2, dilation=2), 0.7)),
    lambda: CSRGroupConv2d.from_dense(prune_(nn.Conv2d(24, 24, 3, stride=2, padding=1, groups=24), 0.5)),
    lambda: CSRGroupConv2d.from_dense(prune_(nn.Conv2d(24, 12, 3, padding=1, groups=4), 0.5)),
])
def test_modules_compile_equal_eager(make):
    """The modules' eager path calls the C++ kernels directly; torch.compile traces the
    registered ops (fake kernels) instead, the KxK convs as one opaque op each (in one graph,
    ``fullgraph=True``): same results, also through AOT functionalization."""
    m = make().eval()
    x = torch.randn(3, 24, 9, 9) if "Conv" in type(m).__name__ else torch.randn(3, 24)
    with torch.no_grad():
        expect = m(x)
        torch.testing.assert_close(torch.compile(m, backend="eager")(x), expect, **TOL)
        for backend in ("eager", "aot_eager"):
            torch.testing.assert_close(torch.compile(m, fullgraph=True, backend=backend)(x), expect, **TOL)
        assert m(x).equal(expect)  # the eager caches still serve later calls


@pytest.mark.parametrize("fmt, cls", [("csr", CSRConv2d), ("ck", CKConv2d)])
def test_kxk_conv_op_and_caches(fmt, cls):
    """``sparsekern::<fmt>_conv2d`` (the KxK modules' op under torch.compile) passes opcheck; the
    eager caches are per weight, input size and thread: modules called from several threads at
    once, and a module whose weight was replaced, give their own weight's result."""
    conv = prune_(nn.Conv2d(6, 5, 3, stride=2, padding=1), 0.6)
    m = cls.from_dense(conv).eval()
    b = m._buffers
    x = torch.randn(2, 6, 9, 9)
    torch.library.opcheck(getattr(torch.ops.sparsekern, f"{fmt}_conv2d"),
                          (x, b["rowptr"], b[m._index], b["val"], b["bias"], 5, [3, 3], [2, 2], [1, 1], [1, 1]))
    with torch.no_grad():
        expect = conv(x)
        xs = [torch.randn(3, 6, 9, 9, generator=torch.Generator().manual_seed(i)) for i in range(4)]
        with ThreadPoolExecutor(4) as pool:
            for xi, y in zip(xs, pool.map(lambda xi: [m(xi) for _ in range(5)][-1], xs)):
                torch.testing.assert_close(y, conv(xi), **TOL)
        torch.testing.assert_close(m(x), expect, **TOL)
        other = prune_(nn.Conv2d(6, 5, 3, stride=2, padding=1), 0.3, seed=2)
        m.load_state_dict(cls.from_dense(other).state_dict())  # new buffers: caches start over
        torch.testing.assert_close(m(x), other(x), **TOL)


def test_eval_module_input_requiring_grad_has_no_silent_backward():
    m = CSRLinear.from_dense(prune_(nn.Linear(8, 4), 0.5)).eval()
    y = m(torch.randn(2, 8, requires_grad=True))
    with pytest.raises(RuntimeError, match="derivative for sparsekern::csr_mm is not implemented"):  # C++ Autograd kernel
        y.sum().backward()


# --- CUDA paths without a GPU (simulated: what is faked is said in each test) ---------------------

def test_time_pair_synchronizes_cuda_around_each_sample(monkeypatch):
    """On CUDA a sample's clock reads wait for the device: every call is followed by a
    ``torch.cuda.synchronize`` before the clock is read (else it times the launch). Simulated: x
    is a stand-in whose device is cuda, synchronize and the clock are recorders; the CPU path
    (no synchronize) is checked with a real tensor."""
    events, now = [], [0.0]

    def clock():
        events.append("clock")
        now[0] += 1e-3
        return now[0]

    monkeypatch.setattr(convert_module.time, "perf_counter", clock)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append(("sync", device)))
    x = SimpleNamespace(device=torch.device("cuda", 0))
    record = (lambda x: events.append("a"), lambda x: events.append("b"))
    best = convert_module._time_pair(*record, x, reps=2)
    assert len(best) == 2 and all(t > 0 for t in best)
    assert {"a", "b", "clock"} <= set(events) and ("sync", x.device) in events
    for i, e in enumerate(events):
        if e == "clock":  # the last call before each clock read is a synchronize
            assert [f for f in events[:i] if f != "clock"][-1] == ("sync", x.device), events[:i + 1]
    events.clear()
    convert_module._time_pair(*record, torch.ones(1), reps=1)
    assert events and not any(isinstance(e, tuple) for e in events)


def two_four(out, inp, dtype=torch.float16):
    """A 2:4 weight ``[out, in]`` (two nonzeros in every 4 inputs)."""
    w = torch.randn(out, inp)
    return (w * sk.nm_mask(w, 2, 4)).to(dtype)


@pytest.mark.parametrize("cusparselt", [True, False])
def test_semi_structured_shapes_follow_torch(monkeypatch, cusparselt):
    """The 2:4 predicate is torch's: fp16/bf16, 2:4, both sides multiples of 16×16 (cuSPARSELt)
    or 32×64 (CUTLASS, when cuSPARSELt is missing). Simulated: cuSPARSELt's availability."""
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: cusparselt)
    backend = torch.sparse.SparseSemiStructuredTensorCUSPARSELT if cusparselt else \
        torch.sparse.SparseSemiStructuredTensorCUTLASS
    assert convert_module.supports_semi_structured is supports_semi_structured
    assert supports_semi_structured(two_four(32, 64))
    assert supports_semi_structured(two_four(64, 128, torch.bfloat16))
    assert supports_semi_structured(two_four(16, 32)) == cusparselt  # CUTLASS: 32 rows, 64 columns
    assert supports_semi_structured(two_four(48, 64)) == cusparselt
    for w in [two_four(8, 16), two_four(32, 72), two_four(0, 64), two_four(32, 64, torch.float32),
              two_four(32, 64).reshape(32, 64, 1), torch.randn(32, 64).half()]:  # last: not 2:4
        assert not supports_semi_structured(w), tuple(w.shape)
    c = backend._DTYPE_SHAPE_CONSTRAINTS[torch.float16]
    with pytest.raises(ValueError, match=f"multiples of {c.sparse_min_rows} and {c.sparse_min_cols}"):
        SemiStructuredLinear(two_four(8, 16))


def test_convert_keeps_a_2to4_layer_dense_when_torch_cannot_take_its_shape(monkeypatch):
    """A 2:4 fp16 Linear [8, 16] (in % 4 == 0, but not a multiple of torch's minimum shape) stays
    dense instead of failing in to_sparse_semi_structured; [32, 64] gets the 2:4 candidate.
    Simulated: a CUDA device with compute capability >= 8.0 (``_device_formats`` gives "2:4"
    for the CPU fp16 weight), and building the module (recorded, never run on CPU)."""
    built = []
    monkeypatch.setattr(convert_module, "_device_formats", lambda w: {"2:4"})
    monkeypatch.setattr(SemiStructuredLinear, "from_dense", classmethod(lambda cls, m: built.append(m)))
    small = nn.Linear(16, 8).half()
    with torch.no_grad():
        small.weight.copy_(two_four(8, 16))
    assert [c.format for c in rank_formats(small, (1, 16))] == ["dense"]
    model, report = sk.inference.convert(nn.Sequential(small), min_speedup=0.0, reps=1, return_report=True)
    assert isinstance(model[0], nn.Linear) and report[0].format == "dense" and not built
    assert "no sparse format" in report[0].note
    big = nn.Linear(64, 32).half()
    with torch.no_grad():
        big.weight.copy_(two_four(32, 64))
    assert "2:4" in {c.format for c in rank_formats(big, (1, 64))}
