"""Sparse layers (``sparsekern.nn``) and their methods: construction, state, repr, gradients, compile."""
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import sparsekern as sk
from sparsekern.methods import METHODS, make_method
from sparsekern.nn import SparseConv2d, SparseLinear

METHOD_NAMES = ["str", "st3", "st3_sigma", "feather", "gmp"]
STATE = {"str": "s", "st3": "threshold", "st3_sigma": "threshold", "feather": "threshold", "gmp": "threshold"}
OPS = ["str", "st3", "feather", "gmp"]  # one per forward op (st3_sigma's forward is st3's)


def _prune_half(layer):
    """Put the method's threshold at ≈ the median |w| so the layer really prunes."""
    with torch.no_grad():
        t = layer.raw_weight.detach().abs().float().median()
        if hasattr(layer, "threshold"):
            layer.threshold.fill_(t)
        else:  # STR: sigmoid(s) = t
            layer.s.fill_(torch.logit(t))


def _dense_conv(**kw):
    torch.manual_seed(0)
    cfg = dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, dilation=1, groups=2,
               bias=True, padding_mode="reflect")
    cfg.update(kw)
    return nn.Conv2d(**cfg)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_conv_from_dense_to_dense_round_trip(method):
    dense = _dense_conv()
    layer = SparseConv2d.from_dense(dense, method)
    assert layer.raw_weight is dense.weight and layer.bias is dense.bias  # shared, so old optimizers still work
    assert list(layer.parameters())[0] is dense.weight
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                 "padding_mode"):
        assert getattr(layer, attr) == getattr(dense, attr)
    _prune_half(layer)
    x = torch.randn(2, 4, 9, 9)
    w = layer.effective_weight()
    assert torch.equal(layer.weight, w)  # the attribute is the effective weight, so functional use is sparse too
    assert w.shape == dense.weight.shape and (w == 0).float().mean() >= 0.4
    y = layer(x)
    torch.testing.assert_close(y, F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), w, dense.bias, 2, 0, 1, 2),
                               rtol=0, atol=0)
    back = layer.to_dense()
    assert type(back) is nn.Conv2d
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                 "padding_mode"):
        assert getattr(back, attr) == getattr(dense, attr)
    assert torch.equal(back.weight, w) and torch.equal(back.bias, dense.bias)
    assert back.bias is not dense.bias and back.weight.requires_grad
    assert torch.equal(back(x), y)


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_round_trip_and_state_dict_keys(method, bias):
    torch.manual_seed(0)
    dense = nn.Linear(10, 7, bias=bias)
    layer = SparseLinear.from_dense(dense, method)
    _prune_half(layer)
    expected = {"weight", STATE[method]} | ({"bias"} if bias else set())
    assert set(layer.state_dict()) == expected
    x = torch.randn(5, 10)
    y = layer(x)
    assert torch.equal(y, F.linear(x, layer.effective_weight(), dense.bias))
    back = layer.to_dense()
    assert type(back) is nn.Linear and set(back.state_dict()) == ({"weight", "bias"} if bias else {"weight"})
    assert torch.equal(back(x), y)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_state_dict_round_trip_into_fresh_layer(method):
    src = SparseConv2d.from_dense(_dense_conv(), method)
    _prune_half(src)
    dst = SparseConv2d(4, 6, 3, stride=2, padding=1, groups=2, padding_mode="reflect", method=method)
    dst.load_state_dict(src.state_dict())
    x = torch.randn(1, 4, 8, 8)
    assert torch.equal(dst(x), src(x))


def test_method_state_layout():
    conv = _dense_conv()
    t = SparseConv2d.from_dense(conv, "st3").threshold
    assert t.shape == () and t.dtype == torch.float32 and t.item() == 0.0
    assert SparseConv2d.from_dense(conv, "str").s.shape == ()
    assert SparseConv2d.from_dense(conv, "str", granularity="channel").s.shape == (6,)
    s = SparseConv2d.from_dense(conv, "str", granularity="weight", s_init=-7.0).s
    assert s.shape == conv.weight.shape and isinstance(s, nn.Parameter) and (s == -7.0).all()
    assert s.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_keeps_dtype_and_state_stays_fp32(method, dtype):
    dense = nn.Linear(8, 4).to(dtype)
    layer = SparseLinear.from_dense(dense, method)
    assert layer.raw_weight.dtype == dtype and getattr(layer, STATE[method]).dtype == torch.float32
    _prune_half(layer)
    y = layer(torch.randn(3, 8, dtype=dtype))
    assert y.dtype == dtype
    assert layer.to_dense().weight.dtype == dtype


def test_extra_repr():
    r = repr(SparseConv2d.from_dense(_dense_conv(), "feather", p=2.0, theta=0.5))
    assert r.startswith("SparseConv2d(4, 6, kernel_size=(3, 3), stride=(2, 2)")
    assert "groups=2" in r and "padding_mode=reflect" in r and "method=feather, p=2.0, theta=0.5" in r
    r = repr(SparseLinear.from_dense(nn.Linear(3, 2), "str", granularity="channel"))
    assert r == ("SparseLinear(in_features=3, out_features=2, bias=True, method=str, s_init=-5.0, "
                 "activation=sigmoid, granularity=channel)")
    assert "method=st3, rescale=False" in repr(SparseLinear(3, 2, method="st3", rescale=False))
    assert repr(SparseLinear(3, 2, method="gmp")).endswith("method=gmp)")
    assert repr(SparseLinear(3, 2, method="st3_sigma")).endswith("method=st3_sigma, rescale=True)")


def test_gradients_follow_the_method():
    """STR: true sub-gradient (pruned get 0, s learns); ST-3: dense STE; Feather: θ on pruned; GMP: masked."""
    torch.manual_seed(0)
    grads = {}
    for method, opts in [("str", {}), ("st3", {}), ("feather", {"theta": 0.25}), ("gmp", {})]:
        layer = SparseLinear.from_dense(nn.Linear(16, 8), method, **opts)
        _prune_half(layer)
        x = torch.randn(4, 16)
        layer(x).sum().backward()
        pruned = layer.effective_weight().detach() == 0
        dense_grad = torch.ones(4, 8).t() @ x  # ∂(sum of outputs)/∂W, shared by every method
        grads[method] = (layer.raw_weight.grad, pruned, dense_grad)
        if method == "str":
            assert layer.s.grad is not None and layer.s.grad.item() != 0
    g, pruned, dense = grads["str"]
    assert (g[pruned] == 0).all() and torch.allclose(g[~pruned], dense[~pruned])
    g, pruned, dense = grads["st3"]
    assert torch.allclose(g, dense)
    g, pruned, dense = grads["feather"]
    assert torch.allclose(g[pruned], 0.25 * dense[pruned]) and torch.allclose(g[~pruned], dense[~pruned])
    g, pruned, dense = grads["gmp"]
    assert (g[pruned] == 0).all() and torch.allclose(g[~pruned], dense[~pruned])


def test_magnitude_method_scales_and_scopes():
    """ST-3σ: c_l = sqrt(sum of the weight's shape) — Conv K_out + C_in/groups + R + S, Linear
    out + in (SPEC §2); the others weigh every layer by 1."""
    conv = SparseConv2d(6, 9, (3, 5), groups=3, method="st3_sigma")
    lin = SparseLinear(10, 7, method="st3_sigma")
    assert conv.method.scale(conv) == math.sqrt(9 + 2 + 3 + 5) and lin.method.scale(lin) == math.sqrt(17)
    for method in ("st3", "feather", "gmp"):
        layer = SparseConv2d(6, 9, (3, 5), groups=3, method=method)
        assert layer.method.scale(layer) == 1.0 and layer.method.scopes == ("global", "layer")
    assert METHODS["st3_sigma"].scopes == ("global",)
    assert {m: METHODS[m].default_scope for m in ("st3", "st3_sigma", "feather", "gmp")} == \
        {"st3": "global", "st3_sigma": "global", "feather": "global", "gmp": "layer"}


def test_st3_sigma_forward_is_st3():
    st3 = SparseConv2d.from_dense(_dense_conv(), "st3")
    sigma = SparseConv2d.from_dense(_dense_conv(), "st3_sigma")
    _prune_half(st3)
    _prune_half(sigma)
    assert torch.equal(st3.effective_weight(), sigma.effective_weight())


def test_st3_zero_threshold_is_identity():
    layer = SparseConv2d.from_dense(_dense_conv(), "st3")
    assert torch.equal(layer.effective_weight(), layer.raw_weight)


def _net(method, **opts):
    torch.manual_seed(0)
    return nn.Sequential(
        SparseConv2d(3, 8, 3, padding=1, method=method, **opts), nn.ReLU(),
        SparseConv2d(8, 16, 3, stride=2, padding=1, method=method, **opts), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), SparseLinear(16, 4, method=method, **opts))


def _grads(net, x):
    net.zero_grad()
    out = net(x)
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in net.parameters()]


@pytest.fixture
def fresh_dynamo():
    """Every method's layers recompile nn.Sequential.forward (a guard on the method's type):
    start from an empty cache so the recompile limit is never reached across tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("method", OPS)
def test_compile_fullgraph_forward_backward_exact(method, fresh_dynamo):
    """Dynamo + AOT autograd (fake tensors through the custom ops), no graph break: bit-equal to eager."""
    net = _net(method)
    for m in net:
        if isinstance(m, (SparseConv2d, SparseLinear)):
            _prune_half(m)
    x = torch.randn(4, 3, 8, 8)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    out_c, grads_c = _grads(compiled, x)
    out_e, grads_e = _grads(net, x)
    assert torch.equal(out_c, out_e)
    assert all(torch.equal(a, b) for a, b in zip(grads_c, grads_e))


@pytest.mark.parametrize("method", OPS)
def test_compile_inductor_matches_eager(method, fresh_dynamo):
    """Default backend. Inductor generates its own code for pool/mean/relu and may reorder their
    fp32 reductions, so outputs and grads agree to rounding (a few ulps), not bitwise."""
    net = _net(method)
    for m in net:
        if isinstance(m, (SparseConv2d, SparseLinear)):
            _prune_half(m)
    x = torch.randn(4, 3, 8, 8)
    out_c, grads_c = _grads(torch.compile(net, fullgraph=True), x)
    out_e, grads_e = _grads(net, x)
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown method 'nope'; known: asl, feather, gmp, nm, st3, st3_sigma, starfire, str"):
        SparseLinear(3, 2, method="nope")
    with pytest.raises(TypeError, match="nn.Linear"):
        SparseLinear.from_dense(nn.Conv2d(1, 1, 1), "st3")
    with pytest.raises(TypeError):
        SparseLinear(3, 2, method="st3", p=2.0)  # not an ST-3 option
    with pytest.raises(TypeError, match="Method instance"):
        make_method(METHODS["gmp"](), theta=0.5)
    with pytest.raises(ValueError, match="theta"):
        SparseLinear(3, 2, method="feather", theta=1.5)
    with pytest.raises(ValueError, match="p must"):
        SparseLinear(3, 2, method="feather", p=0)
    with pytest.raises(ValueError, match="activation"):
        SparseLinear(3, 2, method="str", activation="relu")
    with pytest.raises(ValueError, match="granularity"):
        SparseLinear(3, 2, method="str", granularity="row")
    with pytest.warns(UserWarning, match="s_init"):
        SparseLinear(3, 2, method="str", s_init=100.0)


def test_one_method_instance_serves_many_layers():
    meth = make_method("str", activation="exp")
    a, b = SparseLinear(3, 2, method=meth), SparseLinear(5, 4, method=meth)
    assert a.method is b.method and a.s is not b.s
    assert torch.equal(a.effective_weight(), sk.str_threshold(a.raw_weight, a.s, activation="exp"))
