"""STARFIRE and N:M (SPEC §5, §7) in ``sk.sparsify``: the pruning era (before: all kept; during:
masks rebuilt from the current weights at the ramped target; after: frozen), pruned weights exactly
0 with zero gradient through SGD with momentum and weight decay, per-layer patterns, finalize,
bit-identical resume, option errors."""
import io
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import sparsekern as sk
from sparsekern import reference as ref
from sparsekern.methods import NM, Starfire
from sparsekern.methods import starfire as starfire_module
from sparsekern.sparsifier import CubicSchedule, LinearSchedule, sparsify
from utils import synthetic_images

SPATIAL, POINTWISE = ("0", "2"), ("4", "8")  # 3×3 convs; 1×1 conv and Linear


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))


def _data(n=256, seed=0):
    return synthetic_images(n, seed)


def _optimizer(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-3)


def _backward(model, opt, x, y, gen):
    idx = torch.randint(0, x.shape[0], (32,), generator=gen)
    loss = F.cross_entropy(model(x[idx]), y[idx])
    opt.zero_grad()
    loss.backward()
    return loss.detach()


def _train(model, sp, opt, x, y, steps, gen):
    losses = []
    for _ in range(steps):
        losses.append(_backward(model, opt, x, y, gen))
        opt.step()
        sp.step()
    return losses


def _fine(w: torch.Tensor, s: float) -> torch.Tensor:
    """``|w| > np.quantile(|w|, s)`` in fp32, every row keeping its largest |w| (SPEC §5)."""
    a = w.abs().numpy()
    keep = torch.from_numpy(a > np.quantile(a, s))
    flat = keep.view(keep.shape[0], -1)
    for row in torch.nonzero(~flat.any(1)).flatten():
        flat[row, int(np.argmax(a.reshape(a.shape[0], -1)[row]))] = True
    return keep


def _expected(method: Starfire, w: torch.Tensor, s: float) -> torch.Tensor:
    """The mask the method must build for weight ``w`` at target ``s``, from the eager references."""
    if w.dim() == 4 and w.shape[2] * w.shape[3] > 1:
        if method.conv3x3 == "window":
            return ref.window_mask(w, s, max_nonzero=method.max_nonzero)
        if method.conv3x3 == "ck":
            return ref.ck_mask(w, s, group=method.ck_group)
        return ref.intra_mask(w, s, window_fraction=method.window_fraction, group=method.ck_group)
    if method.fc == "block":
        return ref.block_mask(w.flatten(1), method.block, s).view_as(w)
    return _fine(w, s)


# --- the era --------------------------------------------------------------------------------------

@pytest.mark.parametrize("conv3x3, ramp", [("window", "cubic"), ("ck", "linear"), ("intra", "cubic")])
def test_era_before_during_after(conv3x3, ramp, one_thread):
    start, end, final = 2, 6, 0.7
    x, y = _data()
    gen = torch.Generator().manual_seed(1)
    model = _net()
    sp = sparsify(model, "starfire", sparsity=final, era=(start, end), ramp=ramp, conv3x3=conv3x3)
    opt = _optimizer(model)
    layers = sp.layers
    sched = {"cubic": CubicSchedule, "linear": LinearSchedule}[ramp](start, end, final)
    assert list(layers) == [*SPATIAL, *POINTWISE] and all(m.mask.all() for m in layers.values())
    drifted, frozen, dense_at_end = False, None, None
    for step in range(1, end + 6):
        _backward(model, opt, x, y, gen)
        for m in layers.values():  # masked_weight's backward: pruned weights get no gradient
            assert not m.weight.grad[~m.mask].any()
        opt.step()
        old = {n: m.mask.clone() for n, m in layers.items()}
        w0 = {n: m.weight.detach().masked_fill(~m.mask, 0) for n, m in layers.items()}
        drifted |= any(m.weight[~m.mask].any().item() for m in layers.values())
        sp.step()
        s = sched(step)
        assert sp.target() == s
        for n, m in layers.items():
            assert not m.weight[~m.mask].any()  # a pruned weight is exactly 0 after every step
            assert torch.equal(m.effective_weight(), m.weight)
            if step <= start:
                assert m.mask.all(), (step, n)
            elif step <= end:
                assert torch.equal(m.mask, _expected(sp.method, w0[n], s) & old[n]), (step, n)
                assert not (m.mask & ~old[n]).any()  # nothing pruned comes back
                kernels = m.mask.flatten(2) if n in SPATIAL else None
                if n in SPATIAL and conv3x3 == "window":  # 9 − round(9s) kept in every 3×3 kernel
                    assert (kernels.sum(-1) == 9 - math.floor(9 * s + 0.5)).all()
                if n in SPATIAL and conv3x3 == "ck":  # whole kernels; K − round(K·s) per input channel
                    assert (kernels.all(-1) | ~kernels.any(-1)).all()
                    K = m.weight.shape[0]
                    assert (kernels.all(-1).sum(0) == K - math.floor(K * s + 0.5)).all()
                if n in POINTWISE:
                    assert (m.mask.flatten(1).any(1)).all()  # every output row keeps a weight
                    # the quantile is exact to one weight; the row rule adds at most one per row
                    assert abs((~m.mask).float().mean().item() - s) <= (m.mask.shape[0] + 1) / m.mask.numel()
            else:
                assert torch.equal(m.mask, frozen[n]), (step, n)
        if step == end:
            frozen = {n: m.mask.clone() for n, m in layers.items()}
            dense_at_end = {n: m.weight.detach().clone() for n, m in layers.items()}
            rep = sp.sparsity()
            assert abs(rep["overall"] - final) < 0.05, rep
    assert drifted  # momentum moved pruned weights in optimizer.step(); Sparsifier.step() re-zeroed them
    for n, m in layers.items():  # training went on for the kept weights
        assert not torch.equal(m.weight[m.mask], dense_at_end[n][m.mask])


def test_nothing_changes_before_the_era():
    x, y = _data(64)
    model = _net()
    sp = sparsify(model, "starfire", sparsity=0.5, era=(3, 5), conv3x3="window")
    _train(model, sp, _optimizer(model), x, y, 3, torch.Generator().manual_seed(0))
    assert sp.target() == 0.0 and sp.sparsity()["overall"] == 0.0
    assert all(m.mask.all() for m in sp.layers.values())


# --- per-layer patterns ---------------------------------------------------------------------------

def _one_shot(model, **kw):
    """One step through an era (0, 1): the final mask, built from the weights as they are."""
    sp = sparsify(model, "starfire", era=(0, 1), **kw)
    before = {n: m.weight.detach().clone() for n, m in sp.layers.items()}
    sp.step()
    return sp, before


def test_block_pattern_for_pointwise_layers():
    sp, w = _one_shot(_net(), sparsity=0.75, conv3x3="window", fc="block", block=2)
    for n in POINTWISE:
        mask = sp.layers[n].mask
        assert torch.equal(mask, ref.block_mask(w[n].flatten(1), 2, 0.75).view_as(mask))
        flat = mask.flatten(1)
        assert flat.any(1).all()  # every output row keeps a weight
        blocks = flat.view(flat.shape[0] // 2, 2, -1, 2).transpose(1, 2).flatten(2)
        assert (blocks.all(-1) | ~blocks.any(-1)).all()  # whole 2×2 blocks only
        kept, n_blocks = blocks.all(-1).sum().item(), blocks.shape[0] * blocks.shape[1]
        # round(nb·s) pruned, then the row rule gives an empty block row its best block back
        least = n_blocks - math.floor(n_blocks * 0.75 + 0.5)
        assert least <= kept <= least + blocks.shape[0]
    for n in SPATIAL:
        assert (sp.layers[n].mask.flatten(2).sum(-1) == 9 - 7).all()  # round(9·0.75) = 7 pruned


def test_fine_pattern_keeps_one_per_row_at_full_sparsity():
    sp, w = _one_shot(_net(), sparsity=1.0, conv3x3="ck")
    for n in POINTWISE:
        flat = sp.layers[n].mask.flatten(1)
        assert (flat.sum(1) == 1).all()
        assert torch.equal(flat.float().argmax(1), w[n].abs().flatten(1).argmax(1))
    assert not any(sp.layers[n].mask.any() for n in SPATIAL)


def test_wider_kernels_get_the_conv_pattern():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, (1, 5)), nn.Conv2d(6, 6, 1))
    sp, w = _one_shot(model, sparsity=0.6, conv3x3="window", max_nonzero=1)
    assert (sp.layers["0"].mask.flatten(2).sum(-1) == 1).all()  # 5 − round(3) = 2, at most 1
    assert torch.equal(sp.layers["1"].mask, _fine(w["1"], 0.6))


def test_state_dict_holds_a_bool_mask_and_finalize_bakes_it_in():
    model = _net()
    sp, _ = _one_shot(model, sparsity=0.6)
    sd = model.state_dict()
    assert set(sd) == {f"{i}.{k}" for i in "0248" for k in ("weight", "bias", "mask")}
    assert all(sd[f"{i}.mask"].dtype == torch.bool for i in "0248")
    assert "method=starfire, conv3x3=intra, fc=fine, ck_group=in, window_fraction=0.5, era=(0, 1), ramp=cubic" in repr(model[0])
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    before = sp.sparsity()
    assert before["overall"] > 0.5
    sp.finalize()
    assert {type(m) for m in model} == {nn.Conv2d, nn.ReLU, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear}
    assert set(model.state_dict()) == {f"{i}.{k}" for i in "0248" for k in ("weight", "bias")}
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    assert sp.sparsity() == before


# --- N:M ------------------------------------------------------------------------------------------

def _groups(mask: torch.Tensor, m: int) -> torch.Tensor:
    """Kept count of every group of ``m`` along C_in at each (k, r, s) (channels last) or along ``in``."""
    if mask.dim() == 4:
        mask = mask.permute(0, 2, 3, 1)
    return mask.reshape(-1, m).sum(1)


def test_nm_ramps_through_the_era_then_freezes(one_thread):
    x, y = _data()
    gen = torch.Generator().manual_seed(0)
    model = _net()
    with pytest.warns(UserWarning, match=r"stay dense.*'0': 'nm: reduction dim .* 3 not divisible by m=4'"):
        sp = sparsify(model, "nm", n=2, m=4, era=(1, 5), ramp="linear")
    assert type(model[0]) is nn.Conv2d and list(sp.layers) == ["2", "4", "8"]
    assert sp.final_sparsity == 0.5 and sp.target(3) == 0.25
    opt = _optimizer(model)
    for step, pruned in zip(range(1, 8), [0, 1, 1, 2, 2, 2, 2]):  # round(4·s(t)) per group of 4
        _backward(model, opt, x, y, gen)
        opt.step()
        w0 = {n: m.weight.detach().masked_fill(~m.mask, 0) for n, m in sp.layers.items()}
        old = {n: m.mask.clone() for n, m in sp.layers.items()}
        sp.step()
        for n, m in sp.layers.items():
            assert (_groups(m.mask, 4) == 4 - pruned).all(), (step, n)
            assert not m.weight[~m.mask].any()
            if 1 < step <= 5 and pruned:
                assert torch.equal(m.mask, ref.nm_mask(w0[n], 4 - pruned, 4) & old[n])
            if step > 5:
                assert torch.equal(m.mask, old[n])
    assert sp.sparsity()["layers"] == {"2": 0.5, "4": 0.5, "8": 0.5}


def test_nm_options():
    assert sparsify(_net(), "nm", sparsity=0.75, n=1, m=4, era=(0, 2), exclude=["0"]).final_sparsity == 0.75
    with pytest.raises(ValueError, match="disagrees with 2:4"):
        sparsify(_net(), "nm", sparsity=0.6, era=(0, 2), exclude=["0"])
    for n, m in [(4, 4), (0, 4), (2.0, 4), (True, 4)]:
        with pytest.raises(ValueError, match="0 < n < m"):
            sparsify(_net(), "nm", n=n, m=m, era=(0, 2))
    with pytest.raises(ValueError, match="divisible by m=8"):
        sparsify(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Linear(4, 2)), "nm", n=2, m=8, era=(0, 2))
    assert isinstance(sparsify(_net(), "nm", era=(0, 2), exclude=["0"]).method, NM)


# --- checkpoints ----------------------------------------------------------------------------------

@pytest.mark.parametrize("method, kw", [("starfire", {"sparsity": 0.7, "conv3x3": "window", "fc": "block", "block": 2}),
                                        ("nm", {"exclude": ["0"]})])
def test_resume_mid_era_is_bit_identical(method, kw, one_thread):
    x, y = _data()
    model = _net()
    sp = sparsify(model, method, era=(2, 6), **kw)
    opt = _optimizer(model)
    gen = torch.Generator().manual_seed(1)
    _train(model, sp, opt, x, y, 4, gen)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sparsifier": sp.state_dict(),
                "gen": gen.get_state()}, buf)
    loss_a = _train(model, sp, opt, x, y, 5, gen)  # through the end of the era and past it

    buf.seek(0)
    ckpt = torch.load(buf)
    fresh = _net(seed=123)
    sp2 = sparsify(fresh, method, era=(2, 6), **kw)
    opt2 = _optimizer(fresh)
    fresh.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    sp2.load_state_dict(ckpt["sparsifier"])
    gen2 = torch.Generator()
    gen2.set_state(ckpt["gen"])
    loss_b = _train(fresh, sp2, opt2, x, y, 5, gen2)
    assert all(torch.equal(a, b) for a, b in zip(loss_a, loss_b))
    sa, sb = model.state_dict(), fresh.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert sp2.state_dict() == sp.state_dict() == {"method": method, "scope": None, "step": 9, "frozen": False}


# --- errors ---------------------------------------------------------------------------------------

def test_linear_schedule():
    s = LinearSchedule(2, 6, 0.8)
    assert [s(t) for t in (0, 2, 3, 4, 6, 9)] == [0.0, 0.0, 0.2, 0.4, 0.8, 0.8]
    assert repr(s).startswith("LinearSchedule(start_step=2")


@pytest.mark.parametrize("kw, match", [
    ({}, r"needs era=\(start_step, end_step\)"),
    ({"era": (5, 5)}, "0 <= start_step < end_step"),
    ({"era": (-1, 3)}, "era must be"),
    ({"era": (0, 2.5)}, "era must be"),
    ({"era": 10}, "era must be"),
    ({"era": (0, 4), "ramp": "quadratic"}, r"ramp must be one of \('cubic', 'linear'\)"),
    ({"era": (0, 4), "conv3x3": "kernel"}, "conv3x3 must be one of"),
    ({"era": (0, 4), "fc": "coarse"}, "fc must be one of"),
    ({"era": (0, 4), "fc": "block"}, "needs block=n"),
    ({"era": (0, 4), "block": 2}, r"block= applies only with fc='block'"),
    ({"era": (0, 4), "conv3x3": "ck", "window_fraction": 0.3}, "window_fraction= applies only with conv3x3='intra'"),
    ({"era": (0, 4), "max_nonzero": 3}, "max_nonzero= applies only with conv3x3='window'"),
    ({"era": (0, 4), "conv3x3": "window", "ck_group": "out"}, "ck_group= applies only with conv3x3='ck' or 'intra'"),
    ({"era": (0, 4), "fc_inputs": ["8", "4"]}, "fc_inputs must be a dict"),
    ({"era": (0, 4), "fc_inputs": {"9": "4"}}, "fc_inputs names '9', not a sparsified layer"),
    ({"era": (0, 4), "fc_inputs": {"4": "2"}}, "'4' is not a Linear"),
    ({"era": (0, 4), "schedule": CubicSchedule(0, 4, 0.5)}, "schedule=/scope= do not apply"),
    ({"era": (0, 4), "scope": "global"}, "schedule=/scope= do not apply"),
])
def test_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        sparsify(_net(), "starfire", sparsity=0.5, **kw)


def test_mask_op_errors_surface_at_sparsify_and_leave_the_model_untouched(monkeypatch):
    with pytest.raises(ValueError, match="needs a target"):
        sparsify(_net(), "starfire", era=(0, 4))

    def refuse(w, block, sparsity):
        raise ValueError(f"block {block} does not fit {tuple(w.shape)}")

    monkeypatch.setattr(starfire_module, "block_mask", refuse)
    model = _net()
    keys = set(model.state_dict())
    with pytest.raises(ValueError, match="block 3 does not fit"):  # not only once the era starts
        sparsify(model, "starfire", sparsity=0.5, era=(100, 200), fc="block", block=3)
    assert type(model[0]) is nn.Conv2d and type(model[8]) is nn.Linear and set(model.state_dict()) == keys


def test_fc_inputs_drop_inputs_of_dead_channels(one_thread):
    """fc_inputs={"fc": conv}: after each rebuild the FC loses the inputs whose conv channel died
    (CK prunes it at every input channel), and they stay 0 through training after the era."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    with torch.no_grad():
        model[2].weight[1] *= 1e-3  # filter 1: the smallest kernel of every input channel
    with pytest.raises(ValueError, match="multiple of the conv's K=6"):  # 64 inputs, 6 channels
        sparsify(model, "starfire", sparsity=0.5, era=(0, 6), conv3x3="ck", fc_inputs={"4": "0"})
    x, y = torch.randn(64, 3, 4, 4), torch.randint(0, 5, (64,))
    opt, gen = _optimizer(model), torch.Generator().manual_seed(0)
    sp = sparsify(model, "starfire", sparsity=0.5, era=(0, 6), conv3x3="ck", fc_inputs={"4": "2"})
    assert "fc_inputs={'4': '2'}" in sp.method.extra_repr()
    conv, fc = model[2], model[4]
    for step in range(1, 12):
        _train(model, sp, opt, x, y, 1, gen)
        alive = conv.mask.flatten(1).any(1)
        assert (fc.mask <= sk.prune_fc_inputs(conv.mask, fc.weight)).all()
        if step >= 6:  # the era's target 0.5 prunes 2 of the 4 kernels of every input channel
            assert not alive[1] and not fc.mask[:, 16:32].any() and (fc.weight[:, 16:32] == 0).all()
    assert fc.mask[:, :16].any() and fc.mask[:, 32:].any()
    # the same run without fc_inputs keeps some of those inputs
    torch.manual_seed(0)
    model2 = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1),
                           nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    with torch.no_grad():
        model2[2].weight[1] *= 1e-3
    sp2 = sparsify(model2, "starfire", sparsity=0.5, era=(0, 6), conv3x3="ck")
    _train(model2, sp2, _optimizer(model2), x, y, 8, torch.Generator().manual_seed(0))
    assert model2[4].mask[:, 16:32].any()


@pytest.mark.parametrize("method, kw", [
    ("starfire", {"sparsity": 0.5}), ("starfire", {"sparsity": 0.5, "fc": "block", "block": 2}),
    ("nm", {"n": 2, "m": 4})])
@pytest.mark.parametrize("layer", ["2", "8"])
def test_nan_weight_raises_naming_the_layer(method, kw, layer):
    """Issue 14: STARFIRE and N:M kept training on a NaN weight (its mask ranks NaN first) where
    the magnitude methods raise. On CPU, from the first step past the era's start (in the era
    and after it), ``step()`` raises FloatingPointError naming the layer before anything changes:
    weights, masks and the step count are as they were. Before the era nothing is checked."""
    model = _net()
    sp = sparsify(model, method, era=(1, 4), exclude=["0"] if method == "nm" else (), **kw)
    sp.step()  # step 1 = start: nothing happens yet
    for step in (1, 5):  # in the era, then after it (masks frozen)
        while sp.step_count < step:
            sp.step()
        with torch.no_grad():
            sp.layers[layer].param.view(-1)[3] = math.nan
        before = {k: v.clone() for k, v in model.state_dict().items()}
        for _ in range(2):
            with pytest.raises(FloatingPointError, match=f"weight '{layer}' contains NaN"):
                sp.step()
            assert sp.step_count == step
            after = model.state_dict()
            assert all(torch.equal(before[k].nan_to_num(7.0), after[k].nan_to_num(7.0)) for k in before)
        with torch.no_grad():
            sp.layers[layer].param.view(-1)[3] = 0.25
        sp.step()  # fixed: trains on
        assert sp.step_count == step + 1
