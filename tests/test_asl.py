"""ASL (SPEC §4): ``AdaptiveSparsityLoss`` values and gradients vs closed form, the ``asl`` method in
``sk.sparsify`` (r init, param groups, sparsity report, checkpoints, finalize) and training to a budget."""
import copy
import io
import math
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import sparsekern as sk
from sparsekern.losses import AdaptiveSparsityLoss, erf_sparsity
from sparsekern.methods import ASL
from sparsekern.methods.asl import initial_r
from utils import synthetic_images


def _gauss(x: float) -> float:
    """Closed-form ``∂erf(r/√2)/∂r`` (SPEC §4)."""
    return math.sqrt(2.0 / math.pi) * math.exp(-x * x / 2.0)


def _net(seed=0):
    """Conv/Linear weights drawn Gaussian (He std): the distribution ASL's sparsity model assumes."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4))
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / m.weight[0].numel()))
    return model


LAYERS = ["0", "2", "4", "8"]
SIZES = [432, 4608, 9216, 128]


def _data(n=512, seed=0):
    return synthetic_images(n, seed)


def _train(model, sp, opt, x, y, steps, gen):
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (64,), generator=gen)
        task = F.cross_entropy(model(x[idx]), y[idx])
        loss = task + sp.loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sp.step()
        losses.append(loss.detach())
    return losses


# --- erf sparsity model ---------------------------------------------------------------------------

def test_erf_sparsity_value_and_closed_form_gradient():
    r = torch.tensor([-1.5, 0.0, 0.3, 1.2816, 2.5, 6.0], dtype=torch.float64, requires_grad=True)
    for i in range(r.numel()):
        ri = r[i]
        s = erf_sparsity(ri)
        assert s.dtype == torch.float64 and s.item() == pytest.approx(math.erf(ri.item() / math.sqrt(2)), abs=1e-15)
        (g,) = torch.autograd.grad(s, r)
        assert g[i].item() == pytest.approx(_gauss(ri.item()), rel=1e-12, abs=1e-300)
    # per channel: the layer's modelled sparsity is the channel mean; each r_k gets 1/K of its slope
    s = erf_sparsity(r)
    (g,) = torch.autograd.grad(s, r)
    assert s.item() == pytest.approx(sum(math.erf(v / math.sqrt(2)) for v in r.tolist()) / 6, abs=1e-15)
    torch.testing.assert_close(g, torch.tensor([_gauss(v) / 6 for v in r.tolist()], dtype=torch.float64))
    assert erf_sparsity(torch.tensor(1.0)).dtype == torch.float32  # fp32 r: fp32 model
    assert erf_sparsity(torch.tensor(1.0, dtype=torch.bfloat16)).dtype == torch.float32


# --- loss values and gradients --------------------------------------------------------------------

R = [0.4, 1.1, -0.2, 2.0]
PARAMS = [100, 300, 500, 100]
FLOPS = [4000, 2000, 3000, 1000]


def _closed_form(mode, contribution="params", param_budget=None, flop_budget=None, lam=1.0, lam_params=10.0,
                 lam_flops=10.0):
    """(loss, [∂loss/∂r_l]) from the SPEC §4 formulas, in Python floats."""
    s = [math.erf(r / math.sqrt(2)) for r in R]
    g = [_gauss(r) for r in R]
    cp = [p / sum(PARAMS) for p in PARAMS]
    cf = [f / sum(FLOPS) for f in FLOPS]
    n = len(R)
    if mode == "avg":
        return lam * (1 - sum(s) / n), [-lam * gl / n for gl in g]
    if mode == "wavg":
        c = cp if contribution == "params" else cf
        return lam * (1 - sum(ci * si for ci, si in zip(c, s))), [-lam * ci * gl for ci, gl in zip(c, g)]
    loss, grad = 0.0, [0.0] * n
    for budget, lam_b, c in ((param_budget, lam_params, cp), (flop_budget, lam_flops, cf)):
        if budget is None:
            continue
        gap = 1 - sum(ci * si for ci, si in zip(c, s)) - budget
        if mode == "budget":
            loss += lam_b * gap ** 2
            grad = [gr + 2 * lam_b * gap * -ci * gl for gr, ci, gl in zip(grad, c, g)]
        elif gap > 0:
            loss += lam_b * gap
            grad = [gr + lam_b * -ci * gl for gr, ci, gl in zip(grad, c, g)]
    return loss, grad


VARIANTS = [
    dict(mode="avg"), dict(mode="avg", lam=2.5),
    dict(mode="wavg", contribution="params"), dict(mode="wavg", contribution="flops", lam=0.3),
    dict(mode="budget", param_budget=0.2), dict(mode="budget", flop_budget=0.7, lam_flops=3.0),
    dict(mode="budget", param_budget=0.2, flop_budget=0.3, lam_params=4.0, lam_flops=1.5),
    dict(mode="hinge", param_budget=0.2, flop_budget=0.9),  # params term active, flops term inactive
    dict(mode="hinge", param_budget=0.9),  # below budget: zero loss, zero gradient
]


@pytest.mark.parametrize("kw", VARIANTS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_loss_values_and_gradients_match_closed_form(kw, dtype):
    r = [torch.tensor(v, dtype=dtype, requires_grad=True) for v in R]
    loss_fn = AdaptiveSparsityLoss(params=PARAMS, flops=FLOPS, **kw)
    loss = loss_fn(r)
    grads = torch.autograd.grad(loss, r)
    value, expected = _closed_form(**kw)
    tol = dict(rel=1e-12, abs=1e-14) if dtype == torch.float64 else dict(rel=1e-5, abs=1e-6)
    assert loss.dim() == 0 and loss.dtype == dtype
    assert loss.item() == pytest.approx(value, **tol)
    assert [g.item() for g in grads] == pytest.approx(expected, **tol)


def test_density_is_the_modelled_kept_fraction():
    r = [torch.tensor(v, dtype=torch.float64) for v in R]
    loss_fn = AdaptiveSparsityLoss("avg", params=PARAMS, flops=FLOPS)
    s = [math.erf(v / math.sqrt(2)) for v in R]
    assert loss_fn.density(r, None).item() == pytest.approx(1 - sum(s) / 4)
    assert loss_fn.density(r).item() == pytest.approx(1 - sum(p * x for p, x in zip(PARAMS, s)) / sum(PARAMS))
    assert loss_fn.density(r, "flops").item() == pytest.approx(1 - sum(f * x for f, x in zip(FLOPS, s)) / sum(FLOPS))
    # per-channel r: each layer's modelled sparsity is its channel mean
    rc = [torch.full((3,), v, dtype=torch.float64) for v in R]
    assert loss_fn.density(rc).item() == pytest.approx(loss_fn.density(r).item(), abs=1e-15)


@pytest.mark.parametrize("kw, exc, match", [
    (dict(mode="budget", param_budget=-0.1), ValueError, "param_budget"),
    (dict(mode="budget", param_budget=1.2), ValueError, "param_budget"),
    (dict(mode="hinge", flop_budget=math.nan), ValueError, "flop_budget"),
    (dict(mode="budget", param_budget="0.5"), TypeError, "param_budget"),
    (dict(mode="budget"), ValueError, "param_budget= and/or flop_budget="),
    (dict(mode="budget", param_budget=0.5, params=None), ValueError, "needs params="),
    (dict(mode="budget", flop_budget=0.5, flops=None), ValueError, "needs flops="),
    (dict(mode="wavg", contribution="flops", flops=None), ValueError, "needs flops="),
    (dict(mode="wavg", contribution="macs"), ValueError, "contribution"),
    (dict(mode="sum"), ValueError, "mode"),
    (dict(mode="avg", lam=-1.0), ValueError, "lam"),
    (dict(mode="budget", param_budget=0.5, lam_params=math.nan), ValueError, "lam_params"),
    (dict(mode="avg", params=[1, -2]), ValueError, r"params\[1\]"),
    (dict(mode="avg", params=[0, 0]), ValueError, "positive sum"),
    (dict(mode="avg", params=[1, 2], flops=[1, 2, 3]), ValueError, "different numbers of layers"),
])
def test_loss_bad_arguments(kw, exc, match):
    kw = {"params": PARAMS, "flops": FLOPS, **kw}
    with pytest.raises(exc, match=match):
        AdaptiveSparsityLoss(**kw)


def test_loss_bad_r():
    loss_fn = AdaptiveSparsityLoss("budget", params=PARAMS, param_budget=0.5)
    with pytest.raises(ValueError, match="4 layers"):
        loss_fn([torch.tensor(1.0)] * 3)
    with pytest.raises(ValueError, match="at least one"):
        AdaptiveSparsityLoss("avg")([])
    with pytest.raises(FloatingPointError, match=r"r\[2\] is NaN"):
        loss_fn([torch.tensor(1.0), torch.tensor(1.0), torch.tensor([1.0, math.nan]), torch.tensor(1.0)])
    assert "param_budget=0.5" in repr(loss_fn) and "mode=budget" in repr(loss_fn)


# --- the asl method in sparsify -------------------------------------------------------------------

@pytest.mark.parametrize("s", [0.0, 0.5, 0.9, 1.0])
def test_r_init_and_default_budget(s):
    model = _net()
    sp = sk.sparsify(model, "asl", sparsity=s)
    assert list(sp.layers) == LAYERS and sp.target() == s and sp.scope is None
    assert [type(m).__name__ for m in model if m in {sw.module for sw in sp.layers.values()}] == \
        ["SparsifiedConv2d"] * 3 + ["SparsifiedLinear"]
    for m in sp.layers.values():
        assert isinstance(m.r, nn.Parameter) and m.r.shape == () and m.r.dtype == torch.float32
        assert math.erf(m.r.item() / math.sqrt(2)) == pytest.approx(0.6 * s, abs=1e-6)  # √2·erfinv(0.6 s)
    assert initial_r(s) == pytest.approx(math.sqrt(2) * torch.erfinv(torch.tensor(0.6 * s, dtype=torch.float64)).item())
    loss_fn = sp.sparsity_loss
    assert (loss_fn.mode, loss_fn.param_budget, loss_fn.flop_budget, loss_fn.lam_params) == ("budget", 1 - s, None, 10.0)
    assert loss_fn.c_params == pytest.approx([n / sum(SIZES) for n in SIZES])
    assert set(model.state_dict()) == {f"{i}.{k}" for i in LAYERS for k in ("weight", "bias", "r")}
    assert "method=asl" in repr(model[0]) and "granularity=layer" in repr(model[0])


def test_channel_granularity_and_options():
    sp = sk.sparsify(_net(), "asl", sparsity=0.8, granularity="channel", loss="hinge", lam_params=3.0)
    assert [tuple(m.r.shape) for m in sp.layers.values()] == [(16,), (32,), (32,), (4,)]
    assert (sp.sparsity_loss.mode, sp.sparsity_loss.lam_params) == ("hinge", 3.0)
    sp = sk.sparsify(_net(), "asl", sparsity=0.8, r_init=0.25, param_budget=0.3, flop_budget=0.5, input_size=(3, 8, 8))
    assert all(m.r.item() == 0.25 for m in sp.layers.values())
    assert (sp.sparsity_loss.param_budget, sp.sparsity_loss.flop_budget) == (0.3, 0.5)
    sp = sk.sparsify(_net(), "asl", sparsity=0.8, loss="avg", lam=0.5)
    assert sp.sparsity_loss.mode == "avg" and sp.sparsity_loss.param_budget is None
    # no target at all is fine when r_init and the budget are explicit
    sp = sk.sparsify(_net(), "asl", r_init=1.0, param_budget=0.25)
    assert sp.target() is None and sp.sparsity_loss.param_budget == 0.25


def test_flops_contributions_come_from_count_flops():
    model = _net()
    rows = {row.name: row.dense_macs for row in sk.count_flops(model, (3, 8, 8)).rows}
    sp = sk.sparsify(model, "asl", sparsity=0.8, loss="wavg", contribution="flops", input_size=(3, 8, 8))
    flops = [rows[n] for n in LAYERS]
    assert flops == [432 * 64, 4608 * 16, 9216 * 16, 128]
    assert sp.sparsity_loss.c_flops == pytest.approx([f / sum(flops) for f in flops])


def test_exclude_small_layers_as_the_authors():
    sp = sk.sparsify(_net(), "asl", sparsity=0.8, exclude=lambda name, m: m.weight.numel() < 1000)
    assert list(sp.layers) == ["2", "4"] and len(sp.sparsity_loss.c_params) == 2


@pytest.mark.parametrize("kw, exc, match", [
    (dict(sparsity=1.5), ValueError, "sparsity"),
    (dict(sparsity=math.nan), ValueError, "sparsity"),
    (dict(), ValueError, "needs a target"),
    (dict(r_init=1.0), ValueError, "needs a target"),  # budget loss without a budget
    (dict(sparsity=0.5, param_budget=-0.2), ValueError, "param_budget"),
    (dict(sparsity=0.5, flop_budget=1.5, input_size=(3, 8, 8)), ValueError, "flop_budget"),
    (dict(sparsity=0.5, flop_budget=0.5), ValueError, "input_size"),
    (dict(sparsity=0.5, loss="wavg", contribution="flops"), ValueError, "input_size"),
    (dict(sparsity=0.5, loss="l1"), ValueError, "mode"),
    (dict(sparsity=0.5, granularity="weight"), ValueError, "granularity"),
    (dict(sparsity=0.5, r_init=math.inf), ValueError, "r_init"),
])
def test_sparsify_asl_bad_arguments_leave_model_untouched(kw, exc, match):
    model = _net()
    with pytest.raises(exc, match=match):
        sk.sparsify(model, "asl", **kw)
    assert {type(m) for m in model if isinstance(m, (nn.Conv2d, nn.Linear))} == {nn.Conv2d, nn.Linear}


def test_schedule_and_scope_are_ignored_with_a_warning():
    with pytest.warns(UserWarning, match="schedule/scope are ignored"):
        sp = sk.sparsify(_net(), "asl", sparsity=0.7, schedule=sk.CubicSchedule(0, 10, 0.7))
    assert sp.schedule is None and sp.target() == 0.7


def test_loss_is_the_adaptive_sparsity_loss_of_the_layers_r():
    sp = sk.sparsify(_net(), "asl", sparsity=0.8)
    rs = [m.r for m in sp.layers.values()]
    loss = sp.loss()
    s = [math.erf(r.item() / math.sqrt(2)) for r in rs]
    density = 1 - sum(n * x for n, x in zip(SIZES, s)) / sum(SIZES)
    assert loss.item() == pytest.approx(10.0 * (density - 0.2) ** 2, rel=1e-5)
    loss.backward()
    gap = density - 0.2
    for r, n in zip(rs, SIZES):
        expected = 2 * 10.0 * gap * -(n / sum(SIZES)) * _gauss(r.item())
        assert r.grad.item() == pytest.approx(expected, rel=1e-5)
    zero = sk.sparsify(_net(), "gmp", sparsity=0.5).loss()  # methods without a sparsity loss
    assert zero.item() == 0.0 and zero.dim() == 0


def test_param_groups():
    model = _net()
    sp = sk.sparsify(model, "asl", sparsity=0.8)
    rs = [m.r for m in sp.layers.values()]
    groups = sp.param_groups(model, lr=0.1, weight_decay=5e-4)
    assert len(groups) == 2
    main, thr = groups
    assert (main["lr"], main["weight_decay"], thr["lr"], thr["weight_decay"]) == (0.1, 5e-4, 0.1 / 100, 0.0)
    assert [id(p) for p in thr["params"]] == [id(r) for r in rs]
    assert {id(p) for p in main["params"]} == {id(p) for p in model.parameters()} - {id(r) for r in rs}
    # a parameter list that omits the r (or repeats a parameter) still trains every r exactly once
    weights = [m.weight for m in sp.layers.values()]
    main, thr = sp.param_groups(weights + weights[:1] + rs[:1], lr=1.0)
    assert [id(p) for p in main["params"]] == [id(w) for w in weights] and len(thr["params"]) == 4
    torch.optim.SGD(sp.param_groups(model, 0.1, 5e-4), momentum=0.9)  # accepted as is
    model = _net()
    sp = sk.sparsify(model, "str")  # STR's s needs weight decay: one group
    assert [g["weight_decay"] for g in sp.param_groups(model, lr=0.1, weight_decay=1e-3)] == [1e-3]


def test_sparsity_reports_attained_and_modelled():
    model = _net()
    sp = sk.sparsify(model, "asl", sparsity=0.9, granularity="channel")
    with torch.no_grad():
        model[2].r.copy_(torch.linspace(-0.5, 2.0, 32))
    rep = sp.sparsity()
    assert set(rep) == {"overall", "layers", "model", "dense", "dead", "modelled"}
    assert set(rep["modelled"]) == {"overall", "layers"}
    zeros = 0
    for name, m in sp.layers.items():
        w = m.effective_weight()
        assert rep["layers"][name] == (w == 0).sum().item() / w.numel()
        zeros += (w == 0).sum().item()
        expected = sum(math.erf(v / math.sqrt(2)) for v in m.r.tolist()) / m.r.numel()
        assert rep["modelled"]["layers"][name] == pytest.approx(expected, abs=1e-6)
    assert rep["overall"] == zeros / sum(SIZES)
    assert rep["modelled"]["overall"] == pytest.approx(
        sum(rep["modelled"]["layers"][n] * k for n, k in zip(LAYERS, SIZES)) / sum(SIZES), abs=1e-7)
    assert 0.0 < rep["overall"] < 1.0
    assert "modelled" not in sk.sparsify(_net(), "gmp", sparsity=0.5).sparsity()


def test_attained_matches_model_on_gaussian_weights():
    """On Gaussian weights the attained sparsity is the erf model, up to sampling noise."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))
    for m in model:
        nn.init.normal_(m.weight, 0.0, 0.05)
    for s in (0.5, 0.9):
        sp = sk.sparsify(copy.deepcopy(model), "asl", sparsity=s, r_init=initial_r(s / 0.6))  # erf(r/√2) = s
        rep = sp.sparsity()
        assert rep["modelled"]["overall"] == pytest.approx(s, abs=1e-6)
        assert rep["overall"] == pytest.approx(s, abs=0.01), rep


def test_finalize_bakes_the_hard_threshold():
    model = _net()
    sp = sk.sparsify(model, "asl", sparsity=0.8)
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        y = model(x)
    before = sp.sparsity()
    assert before["overall"] > 0.3
    effective = {name: m.effective_weight().detach() for name, m in sp.layers.items()}
    assert sp.finalize() is model
    assert {type(sw.module) for sw in sp.layers.values()} == {nn.Conv2d, nn.Linear}
    assert set(model.state_dict()) == {f"{i}.{k}" for i in LAYERS for k in ("weight", "bias")}
    assert all(torch.equal(model.get_submodule(n).weight, w) for n, w in effective.items())
    with torch.no_grad():
        assert torch.equal(model(x), y)
    assert sp.sparsity() == before  # modelled too: the r values are kept
    with pytest.raises(RuntimeError, match="finalize"):
        sp.loss()


def test_resume_mid_training_is_bit_identical(one_thread):
    x, y = _data(256)

    def setup(seed):
        model = _net(seed)
        sp = sk.sparsify(model, "asl", sparsity=0.8, granularity="channel")
        return model, sp, torch.optim.SGD(sp.param_groups(model, lr=0.05, weight_decay=5e-4), momentum=0.9)

    model, sp, opt = setup(0)
    gen = torch.Generator().manual_seed(1)
    _train(model, sp, opt, x, y, 5, gen)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sparsifier": sp.state_dict(),
                "gen": gen.get_state()}, buf)
    loss_a = _train(model, sp, opt, x, y, 3, gen)

    buf.seek(0)
    ckpt = torch.load(buf)
    fresh, sp2, opt2 = setup(123)
    fresh.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    sp2.load_state_dict(ckpt["sparsifier"])
    gen2 = torch.Generator()
    gen2.set_state(ckpt["gen"])
    loss_b = _train(fresh, sp2, opt2, x, y, 3, gen2)
    assert all(torch.equal(a, b) for a, b in zip(loss_a, loss_b))
    sa, sb = model.state_dict(), fresh.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert sp2.state_dict() == sp.state_dict() == {"method": "asl", "scope": None, "step": 8, "frozen": False}


# --- training -------------------------------------------------------------------------------------

@pytest.mark.parametrize("s", [0.5, 0.8, 0.9])
def test_budget_loss_reaches_the_density_budget(s, one_thread):
    """Squared budget on parameters (λ_p = 100), 250 steps: the ATTAINED density (exact zeros)
    ends within ±2 % (absolute) of the budget 1 − s, and the net still learns."""
    x, y = _data()
    model = _net()
    sp = sk.sparsify(model, "asl", sparsity=s, lam_params=100.0)
    opt = torch.optim.SGD(sp.param_groups(model, lr=0.05, weight_decay=5e-4), momentum=0.9)
    losses = torch.stack(_train(model, sp, opt, x, y, 250, torch.Generator().manual_seed(1)))
    rep = sp.sparsity()
    assert abs((1 - rep["overall"]) - (1 - s)) < 0.02, rep
    assert abs(rep["modelled"]["overall"] - s) < 0.01, rep
    assert losses[-10:].mean() < 0.5 * losses[:10].mean()
    layers = rep["layers"].values()
    assert max(layers) - min(layers) > 0.1, rep  # learned, unequal per-layer sparsities


def test_hinge_loss_keeps_density_under_budget(one_thread):
    x, y = _data()
    model = _net()
    sp = sk.sparsify(model, "asl", sparsity=0.8, loss="hinge", lam_params=10.0)
    opt = torch.optim.SGD(sp.param_groups(model, lr=0.05, weight_decay=5e-4), momentum=0.9)
    _train(model, sp, opt, x, y, 250, torch.Generator().manual_seed(1))
    rep = sp.sparsity()
    assert 1 - rep["overall"] < 0.2 + 0.02, rep


def test_flop_budget_reaches_the_flop_density(one_thread):
    """FLOPs budget only: the attained MAC density (``count_flops``) ends within ±2 % of it."""
    x, y = _data()
    model = _net()
    sp = sk.sparsify(model, "asl", sparsity=0.8, flop_budget=0.25, lam_flops=100.0, input_size=(3, 8, 8))
    assert sp.sparsity_loss.param_budget is None
    opt = torch.optim.SGD(sp.param_groups(model, lr=0.05, weight_decay=5e-4), momentum=0.9)
    _train(model, sp, opt, x, y, 250, torch.Generator().manual_seed(1))
    report = sk.count_flops(model, (3, 8, 8))
    assert abs(report.macs / report.dense_macs - 0.25) < 0.02, str(report)


def test_top_level_exports():
    assert sk.AdaptiveSparsityLoss is AdaptiveSparsityLoss and "AdaptiveSparsityLoss" in sk.__all__
    assert sk.methods.METHODS["asl"] is ASL
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sk.sparsify(_net(), "asl", sparsity=0.5)
