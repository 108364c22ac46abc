"""``sk.sparsify`` / ``Sparsifier`` / ``CubicSchedule``: swapping, thresholds, checkpoints, finalize, training."""
import copy
import io
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import sparsekern as sk
from sparsekern.nn import SparseConv2d, SparseLinear
from sparsekern import sparsifier as sparsifier_module
from sparsekern.sparsifier import CubicSchedule, Sparsifier, sparsify
from utils import expected_quantile, synthetic_images

METHOD_NAMES = ["str", "st3", "st3_sigma", "feather", "gmp"]
#: (method, scope): every magnitude method at its default scope, plus the non-default ones.
RUNS = [("str", None), ("st3", None), ("st3_sigma", None), ("feather", None), ("gmp", None),
        ("gmp", "global"), ("st3", "layer")]


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))


def _data(n=512, seed=0):
    return synthetic_images(n, seed)


def _sparsify(model, method, **kw):
    if method == "str":
        return sparsify(model, "str", **kw)
    kw.setdefault("sparsity", 0.8)
    return sparsify(model, method, **kw)


def _optimizer(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


def _train(model, sparsifier, opt, x, y, steps, gen):
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (64,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sparsifier.step()
        losses.append(loss.detach())
    return losses


# --- CubicSchedule --------------------------------------------------------------------------------

def test_cubic_schedule_values():
    s = CubicSchedule(10, 50, 0.9, initial_sparsity=0.1)
    assert s(0) == 0.1 and s(10) == 0.1 and s(50) == 0.9 and s(1000) == 0.9
    assert s(30) == pytest.approx(0.9 + (0.1 - 0.9) * 0.5 ** 3)
    vals = [s(t) for t in range(60)]
    assert all(a <= b for a, b in zip(vals, vals[1:]))
    assert "final_sparsity=0.9" in repr(s)


@pytest.mark.parametrize("args, match", [
    ((5, 5, 0.5), "start_step < end_step"), ((-1, 5, 0.5), "start_step"), ((0, 2.5, 0.5), "end_step"),
    ((0, 5, 1.5), "final_sparsity"), ((0, 5, 0.5, math.nan), "initial_sparsity"),
])
def test_cubic_schedule_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        CubicSchedule(*args)


# --- thresholds -----------------------------------------------------------------------------------

def _jiggle(model):
    """Move the weights as an optimizer would."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))


@pytest.mark.parametrize("method", ["st3", "feather", "gmp"])
def test_thresholds_follow_schedule_per_layer(method):
    model = _net()
    sched = CubicSchedule(2, 6, 0.6)
    sp = sparsify(model, method, schedule=sched, scope="layer")
    assert sp.target() == 0.0 and sp.sparsity()["overall"] == 0.0
    for layer in sp.layers.values():
        assert layer.threshold.item() == 0.0
    for step in range(1, 8):
        _jiggle(model)
        sp.step()
        assert sp.step_count == step and sp.target() == sched(step)
        for layer in sp.layers.values():
            a = layer.weight.detach().abs().numpy()
            expected = expected_quantile([layer.weight], sched(step)) if sched(step) > 0 else 0.0  # 0: keep all nonzeros
            assert layer.threshold.item() == expected
            pruned = (layer.effective_weight() == 0).float().mean().item()
            assert pruned == pytest.approx(sched(step), abs=1.0 / a.size + 1e-9)


@pytest.mark.parametrize("method, scope", [("st3", None), ("st3_sigma", None), ("feather", None), ("gmp", "global")])
def test_thresholds_follow_schedule_global(method, scope):
    """t_l = T / c_l with T the fp32 quantile of concat(|w|·c_l) (SPEC §2, §9); t = 0 at target 0."""
    model = _net()
    sched = CubicSchedule(2, 6, 0.6)
    sp = sparsify(model, method, schedule=sched, scope=scope)
    assert sp.scope == "global" and all(m.threshold.item() == 0.0 for m in sp.layers.values())
    c = np.array(sp.scales, dtype=np.float32)
    assert (c == 1).all() == (method != "st3_sigma")
    for step in range(1, 8):
        _jiggle(model)
        sp.step()
        layers = list(sp.layers.values())
        keys = np.concatenate([np.abs(m.weight.detach().numpy()).ravel() * c[i] for i, m in enumerate(layers)])
        T = np.float32(expected_quantile([m.weight for m in layers], sched(step), scales=c)
                       if sched(step) > 0 else 0.0)
        assert [m.threshold.item() for m in layers] == [T / c_l for c_l in c]
        kept = sum(int((m.effective_weight() != 0).sum()) for m in layers)
        assert kept / keys.size == pytest.approx(1 - sched(step), abs=1.5 / keys.size)


def test_st3_sigma_scales_are_sqrt_of_shape_sum():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(6, 9, (3, 5), groups=3), nn.Conv2d(9, 4, 1), nn.Flatten(), nn.Linear(10, 7))
    sp = sparsify(model, "st3_sigma", sparsity=0.5)
    # Conv: K_out + C_in/groups + R + S (not fan-in); Linear: out + in
    assert sp.scales == [math.sqrt(9 + 2 + 3 + 5), math.sqrt(4 + 9 + 1 + 1), math.sqrt(7 + 10)]
    assert sparsify(_net(), "st3", sparsity=0.5).scales == [1.0, 1.0, 1.0]
    assert sparsify(_net(), "gmp", sparsity=0.5).scales is None  # per-layer: no scales


def test_global_threshold_is_global():
    """Layers of very different magnitudes: one threshold prunes the small one most, overall on target."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 40), nn.Linear(40, 40), nn.Linear(40, 10))
    with torch.no_grad():
        model[0].weight.mul_(0.2)
        model[2].weight.mul_(5.0)
    for method, scope in [("st3", None), ("feather", None), ("gmp", "global")]:
        rep = sparsify(copy.deepcopy(model), method, sparsity=0.5, scope=scope).sparsity()
        assert rep["overall"] == pytest.approx(0.5, abs=1 / 3600)
        assert rep["layers"]["0"] > 0.9 and rep["layers"]["2"] < 0.1, rep
    rep = sparsify(copy.deepcopy(model), "gmp", sparsity=0.5).sparsity()  # gmp default: per layer
    assert all(v == pytest.approx(0.5, abs=1 / 400) for v in rep["layers"].values()), rep


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_one_selection_call_per_step(scope, monkeypatch):
    calls = {"global_magnitude_threshold": [], "magnitude_thresholds": []}
    for name, calls_of in calls.items():
        def counted(tensors, *args, _op=getattr(sk, name), _calls=calls_of, **kw):
            _calls.append(len(tensors))
            return _op(tensors, *args, **kw)
        monkeypatch.setattr(sparsifier_module, name, counted)
    model = _net()
    sp = sparsify(model, "gmp", schedule=CubicSchedule(0, 4, 0.7), scope=scope)
    assert calls == {"global_magnitude_threshold": [], "magnitude_thresholds": []}  # target 0: t = 0
    for _ in range(6):
        _jiggle(model)
        sp.step()
    used = "global_magnitude_threshold" if scope == "global" else "magnitude_thresholds"
    assert calls.pop(used) == [3] * 6 and calls.popitem()[1] == []  # one call, all 3 layers


def test_defaults_and_repr():
    assert [sparsify(_net(), m, sparsity=0.5).scope for m in ("st3", "st3_sigma", "feather", "gmp")] == \
        ["global", "global", "global", "layer"]
    assert repr(sparsify(_net(), "st3_sigma", sparsity=0.5)) == \
        "Sparsifier(method=st3_sigma, layers=3, step=0, target=0.5, scope=global)"
    assert repr(sparsify(_net(), "feather", sparsity=0.5, scope="layer")).endswith("scope=layer)")
    assert sparsify(_net(), "str").scope is None
    with pytest.warns(UserWarning, match="scope are ignored"):
        assert sparsify(_net(), "str", scope="global").scope is None


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_nan_weight_raises_on_cpu(scope):
    model = _net()
    sp = sparsify(model, "gmp", sparsity=0.5, scope=scope)
    with torch.no_grad():
        sp.layers["2"].param[0, 0, 0, 0] = math.nan  # the raw weight (model[2].weight is the effective one)
    with pytest.raises(FloatingPointError, match=r"tensors\[1\]"):
        sp.step()
    assert sp.step_count == 0  # a step that raises does not advance


def test_sparsity_report_and_zero_target():
    model = _net()
    sp = sparsify(model, "st3", sparsity=0.0)
    assert all(torch.equal(m.effective_weight(), m.weight) for m in sp.layers.values())  # identity
    rep = sp.sparsity()
    assert set(rep) == {"overall", "layers", "model", "dense", "dead"} and set(rep["layers"]) == {"0", "2", "6"}
    assert rep["overall"] == rep["model"] == 0.0 and rep["dense"] == rep["dead"] == []
    sp = sparsify(_net(), "gmp", sparsity=1.0)
    assert sp.sparsity()["overall"] == 1.0


# --- swapping -------------------------------------------------------------------------------------

def test_sparsify_swaps_in_place_and_shares_parameters():
    model = _net()
    params = list(model.parameters())
    opt = _optimizer(model)  # built before the swap: must still train the sparse layers
    sp = sparsify(model, "gmp", sparsity=0.5)
    modules = list(model)
    assert [type(m).__name__ for m in model] == ["SparsifiedConv2d", "ReLU", "SparsifiedConv2d", "ReLU",
                                                 "AdaptiveAvgPool2d", "Flatten", "SparsifiedLinear"]
    assert all(isinstance(m, type(d)) for m, d in zip(model, _net()))  # subclasses of their own classes
    assert list(model.parameters()) == params and list(sp.layers) == ["0", "2", "6"]
    before = sp.layers["0"].param.detach().clone()
    F.cross_entropy(model(torch.randn(4, 3, 8, 8)), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    assert not torch.equal(sp.layers["0"].param, before)
    assert torch.equal(model[0].weight, sp.layers["0"].effective_weight())
    assert set(model.state_dict()) == {f"{i}.{k}" for i in "026" for k in ("weight", "bias", "threshold")}


def test_exclude_shared_and_subclassed_modules():
    class MyLinear(nn.Linear):
        pass

    shared = nn.Linear(4, 4)
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), shared, nn.ReLU(), shared,
                          MyLinear(4, 4), nn.Linear(4, 4))
    sp = sparsify(model, "st3", sparsity=0.5, exclude=["0.1", "5"])
    assert type(model[0][0]).__name__ == "SparsifiedLinear" and type(model[0][1]) is nn.Linear
    assert type(model[5]) is nn.Linear
    assert type(model[1]).__name__ == "SparsifiedLinear" and model[1] is model[3]  # sharing survives
    assert type(model[4]).__name__ == "SparsifiedMyLinear" and isinstance(model[4], MyLinear)  # subclasses too
    assert list(sp.layers) == ["0.0", "1", "4"] and sp.dense == {"0.1": "excluded", "5": "excluded"}
    sp.finalize()
    assert type(model[1]) is nn.Linear and model[1] is model[3] and type(model[4]) is MyLinear

    model = _net()
    sp = sparsify(model, "gmp", sparsity=0.5, exclude="0")  # a single name, not its characters
    assert list(sp.layers) == ["2", "6"]
    sp = sparsify(_net(), "gmp", sparsity=0.5, exclude=lambda name, m: m.weight.numel() < 1000)
    assert list(sp.layers) == ["2"]
    model = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), nn.Linear(2, 2))
    assert list(sparsify(model, "gmp", sparsity=0.5, exclude=["0"]).layers) == ["1"]  # whole subtree


# --- checkpoints ----------------------------------------------------------------------------------

@pytest.mark.parametrize("method, scope", RUNS)
def test_resume_mid_training_is_bit_identical(method, scope, one_thread):
    x, y = _data(256)
    sched = None if method == "str" else CubicSchedule(0, 10, 0.8)
    kw = {} if scope is None else {"scope": scope}
    model = _net()
    sp = _sparsify(model, method, schedule=sched, sparsity=None, **kw)
    opt = _optimizer(model)
    gen = torch.Generator().manual_seed(1)
    _train(model, sp, opt, x, y, 5, gen)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sparsifier": sp.state_dict(),
                "gen": gen.get_state()}, buf)
    loss_a = _train(model, sp, opt, x, y, 2, gen)

    buf.seek(0)
    ckpt = torch.load(buf)
    fresh = _net(seed=123)
    sp2 = _sparsify(fresh, method, schedule=sched, sparsity=None, **kw)
    opt2 = _optimizer(fresh)
    fresh.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    sp2.load_state_dict(ckpt["sparsifier"])
    gen2 = torch.Generator()
    gen2.set_state(ckpt["gen"])
    assert sp2.step_count == 5
    loss_b = _train(fresh, sp2, opt2, x, y, 2, gen2)
    assert all(torch.equal(a, b) for a, b in zip(loss_a, loss_b))
    sa, sb = model.state_dict(), fresh.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert sp2.state_dict() == sp.state_dict()


def test_load_state_dict_of_another_method_or_scope():
    sp = sparsify(_net(), "st3", sparsity=0.5)
    with pytest.raises(ValueError, match="method 'gmp'"):
        sp.load_state_dict(sparsify(_net(), "gmp", sparsity=0.5).state_dict())
    with pytest.raises(ValueError, match="scope 'layer'.*runs 'global'"):
        sp.load_state_dict(sparsify(_net(), "st3", sparsity=0.5, scope="layer").state_dict())
    with pytest.raises(ValueError, match="scope 'layer'"):  # checkpoints without a scope were per layer
        sp.load_state_dict({"method": "st3", "step": 3})
    sp.load_state_dict({"method": "st3", "scope": "global", "step": 3})
    assert sp.state_dict() == {"method": "st3", "scope": "global", "step": 3, "frozen": False}
    for bad in (-5, 3.7, True, "3"):
        with pytest.raises(ValueError, match="step must be an int >= 0"):
            sp.load_state_dict({"method": "st3", "scope": "global", "step": bad})
    with pytest.raises(ValueError, match="from Sparsifier.state_dict"):
        sp.load_state_dict({"method": "st3"})
    with pytest.raises(ValueError, match="call freeze"):
        sp.load_state_dict({"method": "st3", "scope": "global", "step": 3, "frozen": True})
    assert sp.step_count == 3


# --- finalize -------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHOD_NAMES)
def test_finalize_bakes_in_same_outputs(method):
    model = _net()
    sp = _sparsify(model, method, sparsity=None if method == "str" else 0.7,
                   **({"s_init": -2.5} if method == "str" else {}))  # sigmoid(-2.5) ≈ 0.08: prunes
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        y = model(x)
    before = sp.sparsity()
    assert before["overall"] > 0.1
    out = sp.finalize()
    assert out is model
    assert {type(m) for m in model} == {nn.Conv2d, nn.ReLU, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear}
    assert set(model.state_dict()) == {f"{i}.{k}" for i in "026" for k in ("weight", "bias")}
    with torch.no_grad():
        assert torch.equal(model(x), y)  # same weights, same conv/linear calls
    assert sp.sparsity() == before
    with pytest.raises(RuntimeError, match="finalize"):
        sp.step()


# --- training -------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, scope", RUNS)
def test_training_reaches_target(method, scope, one_thread):
    """End of the schedule: global scope meets the target overall within 0.5 % with unequal
    layers; per-layer scope meets it in every layer."""
    steps = 160
    x, y = _data()
    model = _net()
    if method == "str":  # s learns; weight decay on s (in the optimizer) raises the threshold
        sp = sparsify(model, "str", s_init=-5.0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-3)
    else:
        sp = sparsify(model, method, schedule=CubicSchedule(0, steps // 2, 0.8), scope=scope)
        opt = _optimizer(model)
    losses = torch.stack(_train(model, sp, opt, x, y, steps, torch.Generator().manual_seed(1)))
    assert losses[-10:].mean() < 0.5 * losses[:10].mean()
    rep = sp.sparsity()
    if method == "str":
        assert rep["overall"] > 0.2 and all(m.s.item() > -5.0 for m in sp.layers.values()), rep
    elif sp.scope == "global":
        assert abs(rep["overall"] - 0.8) < 0.005, rep
        layers = rep["layers"].values()
        assert max(layers) - min(layers) > 0.05, rep
    else:
        assert abs(rep["overall"] - 0.8) < 0.01
        assert all(abs(v - 0.8) < 0.01 for v in rep["layers"].values()), rep


# --- errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [1.5, -0.1, math.nan, math.inf])
def test_bad_sparsity_value(bad):
    with pytest.raises(ValueError, match="sparsity"):
        sparsify(_net(), "st3", sparsity=bad)


def test_bad_inputs():
    with pytest.raises(TypeError, match="sparsity"):
        sparsify(_net(), "st3", sparsity="0.5")
    with pytest.raises(ValueError, match="unknown method 'prune'; known: asl, feather, gmp, nm, st3, st3_sigma, starfire, str"):
        sparsify(_net(), "prune", sparsity=0.5)
    with pytest.raises(ValueError, match="no weight to sparsify"):
        sparsify(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3)), "st3", sparsity=0.5)
    with pytest.raises(ValueError, match="left dense.*excluded"):
        sparsify(_net(), "st3", sparsity=0.5, exclude=lambda n, m: True)
    with pytest.raises(ValueError, match="not modules"):
        sparsify(_net(), "st3", sparsity=0.5, exclude=["fc"])
    lin = nn.Linear(3, 3)  # a bare layer is a model too
    assert list(sparsify(lin, "st3", sparsity=0.5).layers) == [""] and (lin.weight == 0).sum() >= 4
    with pytest.raises(ValueError, match="needs a target"):
        sparsify(_net(), "gmp")
    with pytest.raises(TypeError, match="schedule"):
        sparsify(_net(), "gmp", schedule=0.5)
    with pytest.raises(ValueError, match="disagrees"):
        sparsify(_net(), "gmp", sparsity=0.5, schedule=CubicSchedule(0, 10, 0.9))
    with pytest.raises(ValueError, match=r"scope must be one of \('global', 'layer'\).*'everything'"):
        sparsify(_net(), "gmp", sparsity=0.5, scope="everything")
    with pytest.raises(ValueError, match=r"one of \('global',\) for method 'st3_sigma', got 'layer'"):
        sparsify(_net(), "st3_sigma", sparsity=0.5, scope="layer")
    sp = sparsify(_net(), "gmp", schedule=lambda step: 0.5 if step < 1 else 2.0)
    with pytest.raises(ValueError, match=r"schedule\(1\)"):
        sp.step()


def test_method_specific_options():
    assert sparsify(_net(), "feather", sparsity=0.97).method.theta == 0.5  # authors' rule
    assert sparsify(_net(), "feather", schedule=CubicSchedule(0, 9, 0.9)).method.theta == 1.0
    sp = sparsify(_net(), "feather", sparsity=0.97, theta=0.8, p=2.0)
    assert (sp.method.theta, sp.method.p) == (0.8, 2.0)
    with pytest.raises(ValueError, match="theta"):
        sparsify(_net(), "feather", schedule=lambda step: 0.5)  # rule needs the final sparsity
    assert sparsify(_net(), "feather", schedule=lambda step: 0.5, theta=1.0).target(3) == 0.5
    assert sparsify(_net(), "st3", sparsity=0.5, rescale=False).method.rescale is False
    with pytest.warns(UserWarning, match="ignored"):
        sp = sparsify(_net(), "str", sparsity=0.9)
    assert sp.target() is None and sp.final_sparsity is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sp = sparsify(_net(), "str", granularity="channel")
    sp.step()
    assert sp.step_count == 1 and isinstance(sp, Sparsifier) and "method=str" in repr(sp)


def test_top_level_exports():
    assert sk.sparsify is sparsify and sk.Sparsifier is Sparsifier and sk.CubicSchedule is CubicSchedule
    assert sk.nn.SparseConv2d is SparseConv2d


@pytest.mark.parametrize("method", ["st3", "gmp"])
def test_compiled_model_trains_like_eager(method, one_thread):
    """Thresholds are buffers updated in place by step(): the compiled graph reads the new values,
    never recompiles, and the run matches eager bit for bit (aot_eager: same kernels)."""
    x, y = _data(128)
    runs = []
    for compiled in (False, True):
        model = _net()
        sp = sparsify(model, method, schedule=CubicSchedule(0, 4, 0.7))
        torch._dynamo.reset()  # other tests compiled nn.Sequential.forward too
        fwd = torch.compile(model, fullgraph=True, backend="aot_eager") if compiled else model
        with torch._dynamo.config.patch(error_on_recompile=True):
            runs.append(_train(fwd, sp, _optimizer(model), x, y, 6, torch.Generator().manual_seed(1)))
    assert all(torch.equal(a, b) for a, b in zip(*runs))
