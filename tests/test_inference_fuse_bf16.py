"""Issue 16: BatchNorm folding, ReLU and residual-block fusion and the separable max pool of
``convert`` (outputs equal the unfused model), convert's batch choice, and the bf16 / fp16 bitmap format (``bitmap_mm``,
``BitmapLinear``): kernel vs reference and dense, opcheck, compile / export, a transformers Llama
converted end to end."""
import copy
import os
import pickle
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekern as sk
from bench.models import Bottleneck, mobilenet_v1
from sparsekern import reference
from sparsekern.inference import (BitmapConv1x1, BitmapLinear, CKConv2d, CSRConv1x1, CSRConv2d, CSRGroupConv2d,
                                  CSRLinear, SeparableMaxPool2d, formats)
from sparsekern.inference.fuse import batchnorm_pairs, fuse_relu, fuse_residual_blocks, trace
from sparsekern.ops import spmm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FP32 = dict(atol=1e-5, rtol=1e-5)
#: one rounding of an fp32 sum to the 16-bit dtype (both sides accumulate in fp32, in other orders)
TOL16 = {torch.bfloat16: dict(atol=1e-5, rtol=2 ** -7), torch.float16: dict(atol=1e-5, rtol=2 ** -10)}


def _sparse(shape, density, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < density)).to(dtype)


def _calibrated(model, seed=0):
    """BatchNorm statistics of one random batch (non-trivial mean/var), eval mode."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    with torch.no_grad():
        model.train()(torch.randn(4, *model.input_shape, generator=torch.Generator().manual_seed(seed)))
    return model.eval()


class TinyResNet(nn.Sequential):
    input_shape = (16, 12, 12)

    def __init__(self):
        super().__init__(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.MaxPool2d(3, 2, 1), Bottleneck(16, 8), Bottleneck(32, 8, stride=2))


# --- BatchNorm folding, max pool --------------------------------------------------------------------

@pytest.mark.parametrize("min_speedup", [0.0, float("inf")])
def test_convert_folds_batchnorm_equal_outputs(min_speedup):
    model = _calibrated(TinyResNet())
    with torch.no_grad():
        model[0].weight.mul_(torch.rand_like(model[0].weight) < 0.3)
    x = torch.randn(2, 16, 12, 12)
    with torch.no_grad():
        ref = model(x)
    conv, report = sk.inference.convert(copy.deepcopy(model), example_input=x, min_speedup=min_speedup, reps=1,
                                        return_report=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in conv.modules())
    assert not any(type(m) is nn.MaxPool2d for m in conv.modules())
    assert sum("folded" in r.note for r in report) == 1 + 4 + 4  # stem; 3 convs + downsample per block
    with torch.no_grad():
        torch.testing.assert_close(conv(x), ref, **FP32)


def test_batchnorm_pairs_rules():
    class Shared(nn.Module):  # conv output used twice; bn in train mode; bn after a non-conv
        def __init__(self):
            super().__init__()
            self.a, self.bn_a = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
            self.b, self.bn_b = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
            self.c, self.bn_c = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.a(x)
            return self.bn_a(y) + y + self.bn_b(self.b(x)) + self.bn_c(self.c(x))

    m = Shared().eval()
    m.bn_b.train()
    assert batchnorm_pairs(m)[0] == [("c", "bn_c")]

    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x)) if x.sum() > 0 else x

    pairs, note = batchnorm_pairs(Untraceable().eval())
    assert pairs == [] and "cannot trace" in note


def test_convert_leaves_model_untouched_on_bad_arguments():
    model = _calibrated(TinyResNet())
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="reps"):
        sk.inference.convert(model, reps=0)
    with pytest.raises(ValueError, match="batch_size"):
        sk.inference.convert(model, batch_size=0)
    with pytest.raises(ValueError, match="either example_input or batch_size"):
        sk.inference.convert(model, example_input=torch.randn(1, 16, 12, 12), batch_size=2)
    assert isinstance(model[1], nn.BatchNorm2d) and type(model[3]) is nn.MaxPool2d
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_mobilenet_folds_depthwise_and_pointwise():
    model = mobilenet_v1()
    model.input_shape = (3, 64, 64)
    model = _calibrated(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    conv = sk.inference.convert(copy.deepcopy(model), example_input=x, min_speedup=float("inf"), reps=1)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in conv.modules())
    with torch.no_grad():
        torch.testing.assert_close(conv(x), ref, atol=1e-4, rtol=1e-4)  # 27 folded layers deep


def test_converted_mobilenet_depthwise_sparse_compiles_and_exports():
    """MobileNetV1 pruned to STR's budget: every depthwise conv becomes a CSRGroupConv2d (BN folded
    into it), outputs equal the finalized model's; the converted model compiles and exports."""
    from bench.bench_spmm import pruned_resnet50

    model = pruned_resnet50(model="mobilenet_v1", calibration_batch=2)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    conv = sk.inference.convert(copy.deepcopy(model), example_input=x, min_speedup=0.0, reps=1, formats=("csr",))
    dw = [m for m in conv.modules() if isinstance(m, sk.inference.CSRGroupConv2d) and m.groups > 1]
    assert len(dw) == 13 and all(m.groups == m.in_features for m in dw)
    assert sum(getattr(m, "relu", None) is True for m in conv.modules()) == 27  # every conv's ReLU fused
    assert not any(isinstance(m, nn.ReLU) for m in conv.modules())
    with torch.no_grad():
        eager = conv(x)
        torch.testing.assert_close(eager, ref, atol=1e-4, rtol=1e-4)  # 27 folded layers deep
        torch.testing.assert_close(torch.compile(conv, fullgraph=True, backend="eager")(x), eager, atol=0, rtol=0)
        torch.testing.assert_close(torch.export.export(conv, (x,)).module()(x), eager, atol=0, rtol=0)


@pytest.mark.parametrize("k,s,p", [(3, 2, 1), (2, 2, 0), (3, 1, 1), ((3, 2), (2, 1), (1, 0)), (5, 3, 2),
                                   (2, 2, 1), (1, 1, 0), (4, 3, 2)])
@pytest.mark.parametrize("hw", [(7, 7), (12, 9), (3, 5), (1, 2)])
def test_separable_maxpool_equals_torch(k, s, p, hw):
    x = torch.randn(3, 2, *hw).transpose(0, 1)  # non-contiguous
    x[0, 0, 0, 0] = float("nan")
    x[1, 1, -1, -1] = float("-inf")
    pool = nn.MaxPool2d(k, s, p)
    assert SeparableMaxPool2d.supports(pool)
    try:
        ref = pool(x)
    except RuntimeError:  # input smaller than the window: both refuse
        with pytest.raises(ValueError, match="smaller than the"):
            SeparableMaxPool2d.from_dense(pool)(x)
        return
    torch.testing.assert_close(SeparableMaxPool2d.from_dense(pool)(x), ref, equal_nan=True, atol=0, rtol=0)


def test_separable_maxpool_refuses_other_pools():
    assert not SeparableMaxPool2d.supports(nn.MaxPool2d(3, 2, ceil_mode=True))
    assert not SeparableMaxPool2d.supports(nn.MaxPool2d(3, 2, dilation=2))
    assert not SeparableMaxPool2d.supports(nn.MaxPool2d(3, 2, return_indices=True))
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        SeparableMaxPool2d(3)(torch.randn(3, 8, 8))


# --- convert's batch -----------------------------------------------------------------------------

def test_convert_without_example_warns_and_batch_size_sets_the_shape():
    lin = nn.Sequential(nn.Linear(64, 32)).eval()
    with pytest.warns(UserWarning, match="batch 1"):
        _, report = sk.inference.convert(copy.deepcopy(lin), min_speedup=0.0, reps=1, return_report=True)
    assert report[0].input_shape == (1, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, report = sk.inference.convert(copy.deepcopy(lin), min_speedup=0.0, reps=1, batch_size=16,
                                         return_report=True)
    assert report[0].input_shape == (16, 64)


# --- bitmap format and kernel ----------------------------------------------------------------------

DT16 = [torch.bfloat16, torch.float16]
SHAPES = [(1, 1), (7, 5), (33, 130), (16, 64), (5, 200), (0, 10), (4, 0)]


@pytest.mark.parametrize("dtype", DT16)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [0.0, 0.3, 0.5, 1.0])
def test_bitmap_format_roundtrip(dtype, shape, density):
    w = _sparse(shape, density, dtype)
    rowptr, mask, val = formats.bitmap_from_dense(w)
    assert mask.shape == (shape[0], 8 * -(-shape[1] // 64)) and mask.dtype == torch.uint8
    assert val.numel() == int((w != 0).sum()) + formats.BITMAP_SLACK and val.dtype == dtype
    assert torch.equal(formats.bitmap_to_dense(rowptr, mask, val, shape), w)
    assert torch.equal(reference.bitmap_to_dense(rowptr, mask, val, shape), w)


@pytest.mark.parametrize("dtype", DT16)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("batch", [0, 1, 3, 4, 7])
@pytest.mark.parametrize("bias", [False, True])
def test_bitmap_mm_equals_reference_and_dense(dtype, shape, batch, bias):
    w = _sparse(shape, 0.4, dtype, seed=1)
    b = torch.randn(shape[0]).to(dtype) if bias else torch.empty(0, dtype=dtype)
    x = torch.randn(batch, shape[1]).to(dtype)
    args = (*formats.bitmap_from_dense(w), b, x, shape[0])
    y = spmm.bitmap_mm(*args)
    assert y.shape == (batch, shape[0]) and y.dtype == dtype
    dense = (x.float() @ w.float().t() + (b.float() if bias else 0)).to(dtype)
    torch.testing.assert_close(y, reference.bitmap_mm(*args), **TOL16[dtype])
    torch.testing.assert_close(y, dense, **TOL16[dtype])


@pytest.mark.parametrize("isa", ["2", "1", "0"])
def test_bitmap_mm_lower_isa_paths(isa):
    """The AVX-512 path without BF16 (bf16 by shifts and FMAs), the AVX2 and the scalar paths,
    forced by SPARSEKERN_BITMAP_ISA (a CPU otherwise runs only its highest: vdpbf16ps for bf16
    where it has AVX512-BF16), equal the reference and catch a bad mask bit."""
    code = """
import pytest, torch
from sparsekern import reference
from sparsekern.inference import formats
from sparsekern.ops import spmm
from tests.test_inference_fuse_bf16 import DT16, SHAPES, TOL16, _sparse
for dtype in DT16:
    for shape in SHAPES + [(3, 1000)]:
        for density in (0.4, 1.0):
            w = _sparse(shape, density, dtype, seed=2)
            for batch in (1, 2, 3, 4, 6):
                x = torch.randn(batch, shape[1]).to(dtype)
                args = (*formats.bitmap_from_dense(w), torch.randn(shape[0]).to(dtype), x, shape[0])
                torch.testing.assert_close(spmm.bitmap_mm(*args), reference.bitmap_mm(*args), **TOL16[dtype])
w = _sparse((8, 16), 0.5, torch.bfloat16)
rowptr, mask, val = formats.bitmap_from_dense(w)
mask[0, 0] ^= 1
with pytest.raises(RuntimeError, match="set bits do not match rowptr"):
    spmm.bitmap_mm(rowptr, mask, val, torch.empty(0, dtype=w.dtype), torch.randn(2, 16).to(w.dtype), 8)
"""
    env = {**os.environ, "SPARSEKERN_BITMAP_ISA": isa, "PYTHONPATH": REPO}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=REPO)


def test_bitmap_mm_non_contiguous_x_and_2to4():
    w = _sparse((24, 128), 1.0, torch.bfloat16)
    w = w * sk.nm_mask(w.float(), 2, 4).to(w.dtype)
    xt = torch.randn(128, 3).to(torch.bfloat16).t()  # [3, 128], not contiguous
    y = spmm.bitmap_mm(*formats.bitmap_from_dense(w), torch.empty(0, dtype=w.dtype), xt, 24)
    torch.testing.assert_close(y, (xt.float() @ w.float().t()).to(w.dtype), **TOL16[torch.bfloat16])


def test_bitmap_mm_errors():
    w = _sparse((8, 16), 0.5, torch.bfloat16)
    rowptr, mask, val = formats.bitmap_from_dense(w)
    none, x = torch.empty(0, dtype=w.dtype), torch.randn(2, 16).to(w.dtype)
    with pytest.raises(TypeError, match="val must be bfloat16 or float16"):
        spmm.bitmap_mm(rowptr, mask, val.float(), none.float(), x.float(), 8)
    with pytest.raises(TypeError, match="x is torch.float16 but val is torch.bfloat16"):
        spmm.bitmap_mm(rowptr, mask, val, none, x.half(), 8)
    bad = mask.clone()
    bad[0, 0] ^= 1  # one bit more or less than rowptr says
    with pytest.raises(RuntimeError, match="set bits do not match rowptr"):
        spmm.bitmap_mm(rowptr, bad, val, none, x, 8)
    with pytest.raises(RuntimeError, match="slack"):
        spmm.bitmap_mm(rowptr, mask, val[:-8], none, x, 8)
    with pytest.raises(RuntimeError, match="columns but mask holds"):
        spmm.bitmap_mm(rowptr, mask, val, none, torch.randn(2, 80).to(w.dtype), 8)


def test_bitmap_mm_opcheck_and_compile():
    w = _sparse((9, 70), 0.4, torch.bfloat16)
    args = formats.bitmap_from_dense(w)
    for x in (torch.randn(1, 70), torch.randn(5, 70)):
        torch.library.opcheck(torch.ops.sparsekern.bitmap_mm,
                              (*args, torch.randn(9).to(w.dtype), x.to(w.dtype), 9))
    lin = BitmapLinear(w).eval()
    f = torch.compile(lin, fullgraph=True, backend="eager")
    x = torch.randn(2, 3, 70).to(w.dtype)
    with torch.no_grad():
        torch.testing.assert_close(f(x), lin(x), atol=0, rtol=0)


# --- BitmapLinear, convert of bf16 / fp16 models -------------------------------------------------------

@pytest.mark.parametrize("dtype", DT16)
def test_bitmap_linear_module(dtype):
    lin = nn.Linear(70, 33).to(dtype).eval()
    with torch.no_grad():
        lin.weight.mul_(torch.rand(33, 70) < 0.4)
    m = BitmapLinear.from_dense(lin).eval()
    x = torch.randn(2, 5, 70).to(dtype)
    with torch.no_grad():
        torch.testing.assert_close(m(x), lin(x), **TOL16[dtype])
    assert torch.equal(m.weight_dense(), lin.weight.detach())
    assert abs(m.density - float((lin.weight != 0).float().mean())) < 1e-6
    other = BitmapLinear(_sparse((33, 70), 0.9, dtype, seed=5), torch.zeros(33, dtype=dtype))
    other.load_state_dict(m.state_dict())
    with torch.no_grad():
        assert torch.equal(other(x), m(x))
    with pytest.raises(ValueError, match="bfloat16 / float16"):
        BitmapLinear(torch.randn(4, 4))
    with pytest.raises(ValueError, match="input must be a"):
        m(x.float())
    with pytest.raises(ValueError, match="70 input features"):
        m(torch.randn(2, 71).to(dtype))


@pytest.mark.parametrize("dtype", DT16)
@pytest.mark.parametrize("stride", [1, 2])
def test_bitmap_conv1x1_module(dtype, stride):
    """Equals the dense 16-bit 1×1 conv (within one rounding), strided and non-contiguous inputs,
    empty batch; channels-last output chains into the next one; state_dict; errors."""
    conv = nn.Conv2d(20, 12, 1, stride=stride).to(dtype).eval()
    with torch.no_grad():
        conv.weight.mul_(torch.rand(12, 20, 1, 1) < 0.4)
    m = BitmapConv1x1.from_dense(conv).eval()
    nxt = nn.Conv2d(12, 7, 1, bias=False).to(dtype).eval()
    m2 = BitmapConv1x1.from_dense(nxt).eval()
    assert m.stride == stride and torch.equal(m.weight_dense(), conv.weight.detach())
    with torch.no_grad():
        for x in (torch.randn(2, 20, 7, 9).to(dtype), torch.randn(3, 9, 7, 20).to(dtype).permute(0, 3, 2, 1),
                  torch.randn(0, 20, 4, 4).to(dtype)):
            y = m(x)
            torch.testing.assert_close(y, conv(x), **TOL16[dtype])
            torch.testing.assert_close(m2(y), nxt(y), **TOL16[dtype])
        other = BitmapConv1x1(_sparse((12, 20, 1, 1), 0.9, dtype, seed=3), torch.zeros(12, dtype=dtype), stride)
        other.load_state_dict(m.state_dict())
        x = torch.randn(1, 20, 5, 5).to(dtype)
        assert torch.equal(other.eval()(x), m(x))
    with pytest.raises(ValueError, match=r"\[out, in, 1, 1\]"):
        BitmapConv1x1(torch.randn(4, 4).to(dtype))
    with pytest.raises(ValueError, match="1×1 Conv2d"):
        BitmapConv1x1.from_dense(nn.Conv2d(4, 4, 3).to(dtype))
    with pytest.raises(ValueError, match=r"expected \[N, 20, H, W\]"):
        m(torch.randn(2, 21, 3, 3).to(dtype))
    with pytest.raises(ValueError, match="input must be a"):
        m(torch.randn(2, 20, 3, 3))


def test_convert_bf16_convnet():
    """A bf16 net of 1×1 convs (BN folded) converts to BitmapConv1x1, equal outputs, exports."""
    model = nn.Sequential(nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 16, 1, stride=2),
                          nn.Conv2d(16, 8, 3, padding=1)).to(torch.bfloat16).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 4:
                p.mul_(torch.rand(p.shape) < 0.4)
    x = torch.randn(1, 16, 9, 9).to(torch.bfloat16)
    with torch.no_grad():
        ref = model(x)
    conv, report = sk.inference.convert(copy.deepcopy(model), example_input=x, min_speedup=0.0, reps=1,
                                        return_report=True)
    assert isinstance(conv[0], BitmapConv1x1) and isinstance(conv[3], BitmapConv1x1) and conv[3].stride == 2
    assert isinstance(conv[4], nn.Conv2d)  # 3×3 bf16: dense
    with torch.no_grad():
        torch.testing.assert_close(conv(x), ref, atol=2 ** -6, rtol=2 ** -6)  # a few layers deep, BN folded
        torch.testing.assert_close(torch.export.export(conv, (x,)).module()(x), conv(x), atol=0, rtol=0)


def test_convert_bf16_mlp_export():
    model = nn.Sequential(nn.Linear(64, 96), nn.SiLU(), nn.Linear(96, 64, bias=False)).to(torch.bfloat16).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(torch.rand(p.shape) < 0.5)
    x = torch.randn(1, 64).to(torch.bfloat16)
    with torch.no_grad():
        ref = model(x)
    conv, report = sk.inference.convert(copy.deepcopy(model), example_input=x, min_speedup=0.0, reps=1,
                                        return_report=True)
    assert [r.format for r in report] == ["bitmap", "bitmap"]
    assert all(isinstance(conv[i], BitmapLinear) for i in (0, 2))
    with torch.no_grad():
        torch.testing.assert_close(conv(x), ref, **TOL16[torch.bfloat16])
        ep = torch.export.export(conv, (x,))
        torch.testing.assert_close(ep.module()(x), conv(x), atol=0, rtol=0)


def test_convert_transformers_llama_bf16_end_to_end():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.mul_(torch.rand(m.weight.shape) < 0.4)
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        ref = model(ids).logits
    conv, report = sk.inference.convert(copy.deepcopy(model), example_input=ids, min_speedup=0.0, reps=1,
                                        return_report=True)
    assert len(report) == 2 * 7 + 1 and all(r.format == "bitmap" for r in report)
    with torch.no_grad():
        out = conv(ids).logits
    # each layer rounds once to bf16 from an fp32 sum (as torch's bf16 linear): equal within bf16
    # rounding propagated through 2 layers (logits are O(1))
    torch.testing.assert_close(out, ref, atol=2 ** -6, rtol=2 ** -6)


def test_converted_folded_model_compiles_and_exports():
    model = _calibrated(TinyResNet())
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(torch.rand_like(m.weight) < 0.2)
    x = torch.randn(1, 16, 12, 12)
    conv = sk.inference.convert(copy.deepcopy(model), example_input=x, min_speedup=0.0, reps=1)
    assert any(getattr(m, "format", None) in ("csr", "ck", "block", "nm") for m in conv.modules())
    with torch.no_grad():
        eager = conv(x)
        torch.testing.assert_close(eager, model(x), **FP32)
        torch.testing.assert_close(torch.compile(conv, fullgraph=True, backend="eager")(x), eager, atol=0, rtol=0)
        torch.testing.assert_close(torch.export.export(conv, (x,)).module()(x), eager, atol=0, rtol=0)


def test_convert_leaves_model_untouched_when_the_probe_forward_fails():
    model = _calibrated(TinyResNet())
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError):
        sk.inference.convert(model, example_input=torch.randn(1, 5, 12, 12), reps=1)  # 5 channels, not 16
    assert isinstance(model[1], nn.BatchNorm2d) and type(model[3]) is nn.MaxPool2d
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bitmap_op_called_directly_takes_strided_x_and_raises_type_errors():
    w = _sparse((8, 70), 0.5, torch.bfloat16)
    rowptr, mask, val = formats.bitmap_from_dense(w)
    none = torch.empty(0, dtype=w.dtype)
    op = torch.ops.sparsekern.bitmap_mm  # the C++ CPU kernel without the Python checks
    xt = torch.randn(70, 3).to(w.dtype).t()
    assert torch.equal(op(rowptr, mask, val, none, xt, 8), op(rowptr, mask, val, none, xt.contiguous(), 8))
    with pytest.raises(TypeError, match="x is torch.float16 but val is torch.bfloat16"):
        op(rowptr, mask, val, none, xt.half(), 8)
    with pytest.raises(TypeError, match="val must be bfloat16 or float16"):
        op(rowptr, mask, val.float(), none.float(), xt.float(), 8)


# --- ReLU fusion ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name,relus,blocks", [("mobilenet_v1", 27, 0), ("resnet50", 1, 16)])
def test_fuse_relu_and_blocks_whole_model_equal_unfused(name, relus, blocks):
    """STR-pruned MobileNetV1 / ResNet-50 converted: fuse_relu runs in its kernel each ReLU module
    that follows one conv only (MobileNetV1: all 27; ResNet: the stem's), fuse_residual_blocks then
    each bottleneck's shared ``self.relu`` (after conv1, conv2) and its ``relu(y + identity)`` (into
    conv3); the model keeps its class, outputs (batch 1: fused in the kernels; 3: the modules' add)
    equal the unfused converted model's and, within the whole-model tolerance, the finalized model's."""
    from bench.bench_spmm import pruned_resnet50

    model = pruned_resnet50(model=name, calibration_batch=2)
    x = torch.randn(1, 3, 64, 64)
    unfused = sk.inference.convert(copy.deepcopy(model), example_input=x, min_speedup=0.0, reps=1,
                                   formats=("csr",), fuse_relu=False, fuse_blocks=False)
    assert not any(getattr(m, "relu", None) is True for m in unfused.modules())
    conv = copy.deepcopy(unfused)
    names = fuse_relu(conv)
    assert len(names) == relus and all(conv.get_submodule(n).relu for n in names)
    fused, skipped = fuse_residual_blocks(conv)
    expected = {f"layer{i + 1}.{b}.conv{c}": "residual add + ReLU" if c == 3 else "ReLU"
                for i, n in enumerate((3, 4, 6, 3)[:blocks and 4]) for b in range(n) for c in (1, 2, 3)}
    assert fused == expected and not skipped
    assert type(conv) is type(model) and sum(isinstance(m, torch.fx.GraphModule) for m in conv.modules()) == blocks
    with torch.no_grad():
        for xb in (x, torch.randn(3, 3, 64, 64)):
            out = conv(xb)
            torch.testing.assert_close(out, unfused(xb), atol=0, rtol=0)
            torch.testing.assert_close(out, model(xb), atol=1e-4, rtol=1e-4)  # as the unfused model's (27+ layers deep)


def _dense_conv(groups=1, k=3, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(4, 4, k, padding=k // 2, groups=groups)
    with torch.no_grad():
        conv.weight.mul_(torch.rand_like(conv.weight) < 0.5)
    return conv


class _ReluSites(nn.Module):
    """Converted layers followed by each kind of ReLU, and the cases that must not fuse."""

    def __init__(self):
        super().__init__()
        self.a, self.e, self.g = (CSRConv2d.from_dense(_dense_conv(seed=i)) for i in range(3))
        self.b = CKConv2d.from_dense(_dense_conv(seed=3))
        self.c = CSRGroupConv2d.from_dense(_dense_conv(groups=4, seed=4))
        self.d, self.f = (CSRConv1x1.from_dense(_dense_conv(k=1, seed=i)) for i in (5, 6))
        self.fc = CSRLinear.from_dense(nn.Linear(4, 3))
        self.bn = nn.Identity()  # a folded BatchNorm
        self.relu_a, self.relu_c, self.relu_d, self.relu_fc = nn.ReLU(), nn.ReLU(inplace=True), nn.ReLU(), nn.ReLU()
        self.relu = nn.ReLU(inplace=True)  # reused

    def forward(self, x):
        a = self.relu_a(self.bn(self.a(x)))  # fused through the identity
        b = F.relu(self.b(a))  # functional: not fused (would need the graph rewritten)
        c = self.relu_c(self.c(b))  # fused
        d = self.d(c)
        d = self.relu_d(d) + d  # output used twice: not fused
        e = self.e(d) + 1  # no ReLU
        f = self.f(self.f(e).relu())  # layer called twice: not fused
        g = self.relu(self.g(f))  # a ReLU module reused below: not fused
        h = self.relu(g - a)
        return self.relu_fc(self.fc(h.mean((2, 3))))  # fused (Linear)


def test_fuse_relu_rules():
    model = _ReluSites().eval()
    x = torch.randn(2, 4, 9, 7)
    with torch.no_grad():
        ref = model(x)
    fused = copy.deepcopy(model)
    assert sorted(fuse_relu(fused)) == ["a", "c", "fc"]
    assert type(fused) is _ReluSites and type(fused.relu) is nn.ReLU and type(fused.relu_d) is nn.ReLU
    assert all(type(getattr(fused, n)) is nn.Identity for n in ("relu_a", "relu_c", "relu_fc"))
    assert not any(getattr(fused, n).relu for n in "bdefg")
    assert "relu=True" in repr(fused.a) and "relu=True" in repr(fused.fc) and "relu=False" in repr(fused.d)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref, atol=0, rtol=0)
        torch.testing.assert_close(copy.deepcopy(fused)(x), ref, atol=0, rtol=0)  # relu survives a copy
        assert fuse_relu(fused) == []  # nothing left to fuse
        torch.testing.assert_close(torch.export.export(fused, (x,)).module()(x), ref, atol=0, rtol=0)


def test_fuse_relu_leaves_untraceable_models():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = CSRConv2d.from_dense(_dense_conv())

        def forward(self, x):
            y = self.conv(x)
            return F.relu(y) if y.sum() > 0 else y  # data-dependent: torch.fx cannot trace

    model = Branchy().eval()
    assert fuse_relu(model) == [] and not model.conv.relu
    assert "relu=False" in repr(model.conv)


# --- residual blocks ------------------------------------------------------------------------------

class TvBasicBlock(nn.Module):
    """torchvision's ``BasicBlock``: one ``self.relu`` called twice, ``out += identity``."""
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False), nn.BatchNorm2d(planes)
        self.downsample, self.stride = downsample, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TvBottleneck(nn.Module):
    """torchvision's ``Bottleneck``: one ``self.relu`` called three times, ``out += identity``."""
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, planes * 4, 1, bias=False), nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample, self.stride = downsample, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


def _downsample(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 1, 2, bias=False), nn.BatchNorm2d(cout))


class TvNet(nn.Module):
    input_shape = (3, 12, 12)

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.layer1 = nn.Sequential(TvBasicBlock(8, 8), TvBasicBlock(8, 16, 2, _downsample(8, 16)))
        self.layer2 = nn.Sequential(TvBottleneck(16, 4), TvBottleneck(16, 8, 2, _downsample(16, 32)))
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        return self.fc(self.layer2(self.layer1(self.stem(x))).mean((2, 3)))


def _pruned(model, density=0.4, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(torch.rand(m.weight.shape, generator=g) < density)
    return model


def _hf_resnet(layer_type):
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    model = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                      layer_type=layer_type, num_labels=5))
    model.input_shape = (3, 32, 32)
    return _calibrated(_pruned(model))


def _check_fused_blocks(model, blocks, expected, out=lambda y: y):
    """``model`` (finalized, eval) converted without ``fuse_blocks``, then fused: the layers of
    ``expected`` ({name: what}) fused and each block of ``blocks`` (names) a GraphModule of its
    class's name with its attributes; same class and state_dict keys; outputs at batch 1 and 3
    equal the unfused model's, the finalized model's within fp32 rounding; deep copies, pickles and
    ``torch.compile`` give the same; convert's report notes them."""
    xs = [torch.randn(b, *model.input_shape, generator=torch.Generator().manual_seed(b)) for b in (1, 3)]
    kw = dict(example_input=xs[0], min_speedup=0.0, reps=1, formats=("csr", "ck"))
    unfused = sk.inference.convert(copy.deepcopy(model), fuse_blocks=False, **kw)
    assert not any(isinstance(m, torch.fx.GraphModule) for m in unfused.modules())
    assert not any(unfused.get_submodule(n).relu for n, what in expected.items() if "add" in what)
    conv = copy.deepcopy(unfused)
    fused, skipped = fuse_residual_blocks(conv)
    assert fused == expected and not skipped
    assert type(conv) is type(model) and list(conv.state_dict()) == list(unfused.state_dict())
    for name in blocks:
        block, original = conv.get_submodule(name), model.get_submodule(name)
        assert isinstance(block, torch.fx.GraphModule) and type(block).__name__ == type(original).__name__
        assert [n for n, _ in block.named_children()] == [n for n, _ in unfused.get_submodule(name).named_children()]
        assert getattr(block, "stride", None) == getattr(original, "stride", None)
    assert all(conv.get_submodule(n).relu == what.endswith("ReLU") for n, what in expected.items())
    copies = [copy.deepcopy(conv), pickle.loads(pickle.dumps(conv)), torch.compile(conv, backend="eager")]
    with torch.no_grad():
        for x in xs:
            y = out(conv(x))
            torch.testing.assert_close(y, out(unfused(x)), atol=0, rtol=0)
            torch.testing.assert_close(y, out(model(x)), **FP32)
            for c in copies:
                torch.testing.assert_close(out(c(x)), y, atol=0, rtol=0)
    for c in copies[:2]:
        assert list(c.state_dict()) == list(conv.state_dict())
        assert all(getattr(c.get_submodule(n), "stride", None) == getattr(model.get_submodule(n), "stride", None)
                   for n in blocks)
    conv, report = sk.inference.convert(copy.deepcopy(model), return_report=True, **kw)
    notes = {r.name: r.note for r in report}
    assert all(notes[n].endswith(f"; {what} fused") for n, what in expected.items()), report
    with torch.no_grad():
        torch.testing.assert_close(out(conv(xs[1])), out(model(xs[1])), **FP32)


def test_fuse_blocks_torchvision_basic_and_bottleneck():
    """torchvision-style blocks (shared ``self.relu``, ``out += identity``, downsample): conv1's
    (and conv2's) shared ReLU and the last conv's ``relu(out + identity)`` fused."""
    model = _calibrated(_pruned(TvNet()))
    expected = {"layer1.0.conv1": "ReLU", "layer1.0.conv2": "residual add + ReLU",
                "layer1.1.conv1": "ReLU", "layer1.1.conv2": "residual add + ReLU"}
    expected.update({f"layer2.{b}.conv{c}": "residual add + ReLU" if c == 3 else "ReLU"
                     for b in (0, 1) for c in (1, 2, 3)})
    _check_fused_blocks(model, ["layer1.0", "layer1.1", "layer2.0", "layer2.1"], expected)
    assert sk.inference.convert(copy.deepcopy(model), min_speedup=0.0, reps=1, batch_size=1).layer2[1].expansion == 4


@pytest.mark.parametrize("layer_type", ["bottleneck", "basic"])
def test_fuse_blocks_transformers_resnet_through_its_traceable_parts(layer_type):
    """transformers' ResNet does not trace as a whole (its embeddings check the channels): its
    stages do, so their BatchNorms fold, their ReLU modules fuse, and each layer's
    ``hidden_state += residual; activation(hidden_state)`` goes into its last conv; the model keeps
    its class and config."""
    model = _hf_resnet(layer_type)
    assert trace(model)[0] is None
    last = "layer.2" if layer_type == "bottleneck" else "layer.1"
    layers = [f"resnet.encoder.stages.{s}.layers.0" for s in (0, 1)]
    _check_fused_blocks(model, layers, {f"{n}.{last}.convolution": "residual add + ReLU" for n in layers},
                        out=lambda y: y.logits)
    conv = sk.inference.convert(copy.deepcopy(model), min_speedup=0.0, reps=1, batch_size=1)
    assert conv.config.to_dict() == model.config.to_dict()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in conv.modules())


class _Block(nn.Module):
    """A block running ``forward(self, x)`` (a module function: traced through) on its layers."""

    def __init__(self, forward, **layers):
        super().__init__()
        self.run = forward
        for name, m in layers.items():
            setattr(self, name, m)

    def forward(self, x):
        return self.run(self, x)


def _ran_in_place(s, x):
    y = F.relu(s.a(x))  # fused: the block becomes a GraphModule
    x += y  # in place on the block's input: still in place in the graph module
    return x


#: name: (forward, fused or None): each rule of fuse_residual_blocks on layer ``a`` (4 channels) of a block
_RULES = {
    "reversed_module_relu": (lambda s, x: s.relu(x + s.bn(s.a(x))), "residual add + ReLU"),
    "torch_add_f_relu": (lambda s, x: F.relu(torch.add(s.a(x), x), inplace=True), "residual add + ReLU"),
    "iadd_relu_": (lambda s, x: _iadd(s.a(x), x).relu_(), "residual add + ReLU"),
    "method_add_torch_relu": (lambda s, x: torch.relu(s.a(x).add(x)), "residual add + ReLU"),
    "add_": (lambda s, x: s.a(x).add_(x), "residual add"),
    "broadcast_param": (lambda s, x: s.a(x) + s.shift, "residual add"),  # [4, 1, 1]: the modules' add
    "later_residual": (lambda s, x: s.relu(s.a(x) + s.b(x)), "residual add + ReLU"),  # a moves after b
    "shared_relu": (lambda s, x: s.relu(s.relu(s.a(x)) - x), "ReLU"),  # only the first call goes
    "iadd_on_residual": (lambda s, x: _iadd(r := x * 2, s.a(x)) + r, None),  # r += e writes into r
    "add_on_residual": (lambda s, x: (r := x * 2).add_(s.a(x)) + r, None),
    "alpha": (lambda s, x: torch.add(s.a(x), x, alpha=2), None),
    "layer_twice": (lambda s, x: s.a(s.a(x)) + x, None),
    "output_twice": (lambda s, x: F.relu(y := s.a(x)) * y, None),
    "mutated_input": (lambda s, x: _a_then_relu_input(s, x), None),  # a cannot move past relu_(x)
    "number": (lambda s, x: s.a(x) + x.shape[1], None),
    "no_residual_kernel": (lambda s, x: F.relu(s.g(x) + x), None),  # CSRGroupConv2d: ReLU only
    "in_place_input": (_ran_in_place, "ReLU"),
}


def _iadd(a, b):
    a += b
    return a


def _a_then_relu_input(s, x):
    y = s.a(x)
    x.relu_()
    return y + x


class _Rules(nn.Module):
    def __init__(self):
        super().__init__()
        for i, (name, (forward, _)) in enumerate(_RULES.items()):
            setattr(self, name, _Block(forward, a=CSRConv2d.from_dense(_dense_conv(seed=i)),
                                       b=CSRConv1x1.from_dense(_dense_conv(k=1, seed=100 + i)), bn=nn.Identity(),
                                       g=CSRGroupConv2d.from_dense(_dense_conv(groups=4, seed=200 + i)),
                                       relu=nn.ReLU(inplace=True), shift=nn.Parameter(torch.randn(4, 1, 1))))
        self.top = CSRConv2d.from_dense(_dense_conv(seed=300))
        inner = _Block(lambda s, x: s.a(s.relu(s.b(x))) + x, a=CSRConv2d.from_dense(_dense_conv(seed=301)),
                       b=CSRConv2d.from_dense(_dense_conv(seed=302)), relu=nn.ReLU())
        self.nested = _Block(lambda s, x: F.relu(s.inner(x)), inner=inner)  # a's pattern ends in the outer block
        self.fc = CSRLinear.from_dense(nn.Linear(4, 4))
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        h = self.pool(x).flatten(1)
        outs = [F.relu(self.fc(h) + h), self.top(x) + x]  # in the model's own forward: left
        return outs + [self.nested(x)] + [getattr(self, name)(x.clone()) for name in _RULES]


class _SparseBottleneck(nn.Module):
    """``relu(c(relu(a(x))) + x)`` with 1×1 convs of one sparse module class (a shared ReLU module)."""

    def __init__(self, make):
        super().__init__()
        self.a, self.c = make(0), make(1)
        self.relu = nn.ReLU()

    def forward(self, x):
        y = self.c(self.relu(self.a(x)))
        y += x
        return self.relu(y)


class _Wrap(nn.Module):
    def __init__(self, make):
        super().__init__()
        self.block = _SparseBottleneck(make)

    def forward(self, x):
        return self.block(x)


@pytest.mark.parametrize("cls,kwargs", [(sk.inference.BSRConv1x1, {"block": (4, 1)}),
                                        (sk.inference.NMConv1x1, {"n": 2, "m": 4}),
                                        (sk.inference.BSRLinear, {"block": (2, 4)})])
def test_fuse_blocks_block_and_nm_layers(cls, kwargs):
    """Block (BSR) and N:M layers take the fused ReLU and residual add too, in place on their
    kernel's fresh output (their ops have no epilogue): a bottleneck of them fuses as a CSR one,
    with outputs bit-equal to the unfused block's (batch 1 and 3; a Linear over the last dim)."""
    def make(seed):
        torch.manual_seed(seed)
        w = torch.randn(8, 8) * (torch.rand(8, 8) < 0.5)
        w = w * sk.nm_mask(w, 2, 4) if "n" in kwargs else w
        if cls is sk.inference.BSRLinear:
            return cls(w, torch.randn(8), **kwargs)
        return cls(w[:, :, None, None], torch.randn(8), **kwargs)

    model = _Wrap(make).eval()
    xs = [torch.randn(b, 8, 5, 3) if cls is not sk.inference.BSRLinear else torch.randn(b, 5, 8) for b in (1, 3)]
    with torch.no_grad():
        refs = [model(x) for x in xs]
    fused, skipped = fuse_residual_blocks(model)
    assert fused == {"block.a": "ReLU", "block.c": "residual add + ReLU"} and not skipped
    assert model.block.a.relu and model.block.c.relu and "relu=True" in repr(model.block.c)
    with torch.no_grad():
        for x, ref in zip(xs, refs):
            torch.testing.assert_close(model(x), ref, atol=0, rtol=0)
        torch.testing.assert_close(torch.export.export(model, (xs[0],)).module()(xs[0]), refs[0], atol=0, rtol=0)
        torch.testing.assert_close(torch.compile(model, fullgraph=True, backend="eager")(xs[1]), refs[1],
                                   atol=0, rtol=0)
    with pytest.raises(TypeError, match="residual must be a torch.Tensor"):
        model.block.c(xs[0], residual=1.0)


def test_fuse_residual_blocks_rules():
    model = _Rules().eval()
    xs = [torch.randn(b, 4, 7, 6) for b in (1, 2)]
    with torch.no_grad():
        refs = [model(x) for x in xs]
    fused, skipped = fuse_residual_blocks(model)
    assert fused == {f"{name}.a": what for name, (_, what) in _RULES.items() if what} | {
        "nested.inner.b": "ReLU", "nested.inner.a": "residual add + ReLU"}
    assert isinstance(model.nested, torch.fx.GraphModule) and isinstance(model.nested.inner, torch.fx.GraphModule)
    assert skipped == {"fc": "residual add + ReLU not fused: in the model's own forward (the model keeps its class)",
                       "top": "residual add not fused: in the model's own forward (the model keeps its class)"}
    assert type(model) is _Rules and not model.fc.relu
    for name, (_, what) in _RULES.items():
        block = getattr(model, name)
        assert isinstance(block, torch.fx.GraphModule) == bool(what) and type(block).__name__ == "_Block", name
        assert block.a.relu == bool(what and what.endswith("ReLU")) and block.run is _RULES[name][0]
    assert "relu" in model.shared_relu.code  # the module's second call stays
    with torch.no_grad():
        for x, ref in zip(xs, refs):
            for out, r in zip(model(x), ref):
                torch.testing.assert_close(out, r, atol=0, rtol=0)
        x = xs[0].clone()
        assert model.in_place_input(x) is x and not torch.equal(x, xs[0])  # x += y: still in place
    assert fuse_residual_blocks(model) == ({}, skipped)  # nothing left but the model's own
