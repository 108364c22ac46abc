"""``sk.sparsify`` / ``Sparsifier`` / ``CubicSchedule``: swapping, thresholds, checkpoints, finalize, training."""
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
from sparsekern.sparsifier import CubicSchedule, Sparsifier, layer_magnitude_thresholds, sparsify

METHOD_NAMES = ["str", "st3", "feather", "gmp"]
MAGNITUDE = ["st3", "feather", "gmp"]


@pytest.fixture
def one_thread():
    """Tiny nets run fastest on one thread (and do not fight other jobs for cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))


def _data(n=512, seed=0):
    """4 classes of 3×8×8 images: a fixed random template per class plus unit noise."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(4, 3, 8, 8, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    return templates[y] + torch.randn(n, 3, 8, 8, generator=g), y


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

@pytest.mark.parametrize("n", [1, 2, 7, 216, 1000])
@pytest.mark.parametrize("s", [0.0, 0.3, 0.5, 0.8, 0.999, 1.0])
def test_layer_threshold_is_numpy_quantile(n, s):
    w = torch.randn(n, generator=torch.Generator().manual_seed(n))
    w[: n // 3] = w[n // 3: 2 * (n // 3)]  # ties
    (t,) = layer_magnitude_thresholds([w.to(torch.bfloat16).float()], s)
    assert t.dtype == torch.float32 and t.shape == ()
    assert t.item() == np.quantile(w.to(torch.bfloat16).float().abs().numpy(), s)


@pytest.mark.parametrize("method", MAGNITUDE)
def test_thresholds_follow_schedule_per_layer(method):
    model = _net()
    sched = CubicSchedule(2, 6, 0.6)
    sp = sparsify(model, method, schedule=sched)
    assert sp.target() == 0.0 and sp.sparsity()["overall"] == 0.0
    for layer in sp.layers.values():
        assert layer.threshold.item() == 0.0
    for step in range(1, 8):
        with torch.no_grad():  # move the weights as an optimizer would
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        sp.step()
        assert sp.step_count == step and sp.target() == sched(step)
        for layer in sp.layers.values():
            a = layer.weight.detach().abs().numpy()
            expected = np.quantile(a, sched(step)) if sched(step) > 0 else 0.0  # 0: keep all nonzeros
            assert layer.threshold.item() == expected
            pruned = (layer.effective_weight() == 0).float().mean().item()
            assert pruned == pytest.approx(sched(step), abs=1.0 / a.size + 1e-9)


def test_sparsity_report_and_zero_target():
    model = _net()
    sp = sparsify(model, "st3", sparsity=0.0)
    assert all(torch.equal(m.effective_weight(), m.weight) for m in sp.layers.values())  # identity
    rep = sp.sparsity()
    assert set(rep) == {"overall", "layers"} and set(rep["layers"]) == {"0", "2", "6"} and rep["overall"] == 0.0
    sp = sparsify(_net(), "gmp", sparsity=1.0)
    assert sp.sparsity()["overall"] == 1.0


# --- swapping -------------------------------------------------------------------------------------

def test_sparsify_swaps_in_place_and_shares_parameters():
    model = _net()
    params = list(model.parameters())
    opt = _optimizer(model)  # built before the swap: must still train the sparse layers
    sp = sparsify(model, "gmp", sparsity=0.5)
    assert [type(m) for m in model] == [SparseConv2d, nn.ReLU, SparseConv2d, nn.ReLU, nn.AdaptiveAvgPool2d,
                                        nn.Flatten, SparseLinear]
    assert list(model.parameters()) == params and list(sp.layers) == ["0", "2", "6"]
    before = model[0].weight.detach().clone()
    F.cross_entropy(model(torch.randn(4, 3, 8, 8)), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    assert not torch.equal(model[0].weight, before)
    assert set(model.state_dict()) == {f"{i}.{k}" for i in "026" for k in ("weight", "bias", "threshold")}


def test_exclude_shared_and_subclassed_modules():
    class MyLinear(nn.Linear):
        pass

    shared = nn.Linear(4, 4)
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), shared, nn.ReLU(), shared,
                          MyLinear(4, 4), nn.Linear(4, 4))
    sp = sparsify(model, "st3", sparsity=0.5, exclude=["0.1", "5"])
    assert type(model[0][0]) is SparseLinear and type(model[0][1]) is nn.Linear and type(model[5]) is nn.Linear
    assert type(model[1]) is SparseLinear and model[1] is model[3]  # weight tying survives
    assert type(model[4]) is MyLinear  # subclasses may have their own forward: left alone
    assert list(sp.layers) == ["0.0", "1"]
    sp.finalize()
    assert type(model[1]) is nn.Linear and model[1] is model[3]

    model = _net()
    sp = sparsify(model, "gmp", sparsity=0.5, exclude="0")  # a single name, not its characters
    assert list(sp.layers) == ["2", "6"]
    sp = sparsify(_net(), "gmp", sparsity=0.5, exclude=lambda name, m: m.weight.numel() < 1000)
    assert list(sp.layers) == ["2"]
    model = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), nn.Linear(2, 2))
    assert list(sparsify(model, "gmp", sparsity=0.5, exclude=["0"]).layers) == ["1"]  # whole subtree


# --- checkpoints ----------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHOD_NAMES)
def test_resume_mid_training_is_bit_identical(method, one_thread):
    x, y = _data(256)
    sched = None if method == "str" else CubicSchedule(0, 10, 0.8)
    model = _net()
    sp = _sparsify(model, method, schedule=sched, sparsity=None)
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
    sp2 = _sparsify(fresh, method, schedule=sched, sparsity=None)
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


def test_load_state_dict_of_another_method():
    sp = sparsify(_net(), "st3", sparsity=0.5)
    with pytest.raises(ValueError, match="method 'gmp'"):
        sp.load_state_dict(sparsify(_net(), "gmp", sparsity=0.5).state_dict())


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

@pytest.mark.parametrize("method", METHOD_NAMES)
def test_training_reaches_target(method, one_thread):
    steps = 160
    x, y = _data()
    model = _net()
    if method == "str":  # s learns; weight decay on s (in the optimizer) raises the threshold
        sp = sparsify(model, "str", s_init=-5.0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-3)
    else:
        sp = sparsify(model, method, schedule=CubicSchedule(0, steps // 2, 0.8))
        opt = _optimizer(model)
    losses = torch.stack(_train(model, sp, opt, x, y, steps, torch.Generator().manual_seed(1)))
    assert losses[-10:].mean() < 0.5 * losses[:10].mean()
    rep = sp.sparsity()
    if method == "str":
        assert rep["overall"] > 0.2 and all(m.s.item() > -5.0 for m in sp.layers.values()), rep
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
    with pytest.raises(ValueError, match="unknown method 'prune'.*feather, gmp, st3, str"):
        sparsify(_net(), "prune", sparsity=0.5)
    with pytest.raises(ValueError, match="no nn.Conv2d or nn.Linear"):
        sparsify(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3)), "st3", sparsity=0.5)
    with pytest.raises(ValueError, match="excluded"):
        sparsify(_net(), "st3", sparsity=0.5, exclude=lambda n, m: True)
    with pytest.raises(ValueError, match="not modules"):
        sparsify(_net(), "st3", sparsity=0.5, exclude=["fc"])
    with pytest.raises(ValueError, match="wrap it"):
        sparsify(nn.Linear(3, 3), "st3", sparsity=0.5)
    with pytest.raises(ValueError, match="needs a target"):
        sparsify(_net(), "gmp")
    with pytest.raises(TypeError, match="schedule"):
        sparsify(_net(), "gmp", schedule=0.5)
    with pytest.raises(ValueError, match="disagrees"):
        sparsify(_net(), "gmp", sparsity=0.5, schedule=CubicSchedule(0, 10, 0.9))
    with pytest.raises(ValueError, match="scope"):
        sparsify(_net(), "gmp", sparsity=0.5, scope="everything")
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
