"""sparsekern.inference: CSR modules vs dense layers, convert() end to end, pickling,
state_dict round trips, clear errors."""
import io
import math
import pickle

import pytest
import torch
from torch import nn

import sparsekern as sk
from sparsekern.inference import CSRConv1x1, CSRConv2d, CSRLinear

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
    conv, report = sk.inference.convert(model, min_speedup=0.0, example_input=x, reps=1)
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
    conv, report = sk.inference.convert(model, min_speedup=math.inf, reps=1)
    assert all(r.format == "dense" for r in report) and all(isinstance(m, nn.Linear) for m in conv[::2])
    assert report[0].input_shape == (1, 20)
    conv, report = sk.inference.convert(model, min_speedup=0.0, reps=1)
    assert all(r.format == "csr" for r in report)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), expect, **TOL)


def test_convert_root_linear_and_skips():
    lin = prune_(nn.Linear(8, 4), 0.5).eval()
    conv, report = sk.inference.convert(lin, min_speedup=0.0, reps=1)
    assert isinstance(conv, CSRLinear)
    half = nn.ModuleDict({"used": nn.Linear(8, 4).half(), "unused": nn.Linear(4, 4)})
    half.forward = lambda x: half["used"](x)
    _, report = sk.inference.convert(half, min_speedup=0.0, example_input=torch.randn(2, 8).half(), reps=1)
    assert report[0].format == "dense" and "dtype" in report[0].note
    assert report[1].format == "dense" and "not run" in report[1].note
    with pytest.raises(ValueError, match="min_speedup"):
        sk.inference.convert(lin, min_speedup=-1.0)


def test_pickle_and_state_dict_roundtrip():
    model = prune_(SmallCNN(), 0.9).eval()
    x = torch.randn(1, 3, 8, 8)
    conv, _ = sk.inference.convert(model, min_speedup=0.0, example_input=x, reps=1)
    with torch.no_grad():
        expect = conv(x)
        torch.testing.assert_close(pickle.loads(pickle.dumps(conv))(x), expect)
        buf = io.BytesIO()
        torch.save(conv.state_dict(), buf)
        # a converted model of another pruning (other nnz) takes the saved weights
        other, _ = sk.inference.convert(prune_(SmallCNN(), 0.5, seed=3).eval(), min_speedup=0.0,
                                        example_input=x, reps=1)
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
    for shape in [(1, 6, 9, 9), (2, 6, 12, 7), (1, 6, 9, 9)]:  # repeated size: cached offsets
        x = torch.randn(shape)
        torch.testing.assert_close(m(x), conv(x).detach(), **TOL)
    with pytest.raises(ValueError, match="groups 1"):
        CSRConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2))
