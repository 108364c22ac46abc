"""sparsify on layer kinds and access patterns of third-party code: functional weight use, Linear
subclasses, nn.MultiheadAttention, transformers' Conv1D, tied weights, zero-initialised layers,
layers pruned to 100 %, atomic failure, freeze() for fine-tuning (issue 13)."""
import copy
import io
import math
import warnings

import pytest
import torch
import transformers
from torch import nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

import sparsekern as sk

MAGNITUDE = ["st3", "st3_sigma", "feather", "gmp"]
ALL = MAGNITUDE + ["str", "asl", "starfire", "nm"]


def _kw(method, s=0.5):
    if method in ("starfire", "nm"):
        return {"era": (0, 2)} | ({"sparsity": s} if method == "starfire" else {})
    return {} if method == "str" else {"sparsity": s}


def _load_effective(dense, sp):
    """``dense`` (a plain copy of the model before sparsify) loaded with the sparsified model's
    state and its effective weights: what the sparsified forward must compute."""
    keys = dense.state_dict().keys()
    dense.load_state_dict({k: v for k, v in sp.model.state_dict().items() if k in keys})
    with torch.no_grad():
        for sw in sp.layers.values():
            mod = dense.get_submodule(sw.name.rpartition(".")[0] if sw.pname != "weight" else sw.name)
            w = sw.effective_weight().detach()
            getattr(mod, sw.pname).copy_(w.t() if sw.transposed else w)
    return dense


def _train(model, sp, x, steps=3, loss_fn=lambda out: out.square().mean()):
    opt = torch.optim.SGD(sp.param_groups(model, lr=0.05, weight_decay=1e-4), momentum=0.9)
    for _ in range(steps):
        loss = loss_fn(model(x)) + sp.loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sp.step()


class SwinLikeAttention(nn.Module):
    """torchvision's ShiftedWindowAttention pattern: the parent reads its child's weight."""

    def __init__(self, dim=8):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = F.linear(x, self.qkv.weight, self.qkv.bias).chunk(3, -1)
        a = torch.softmax(q @ k.transpose(-2, -1), -1) @ v
        return F.linear(a, self.proj.weight, self.proj.bias)


@pytest.mark.parametrize("method", ALL)
def test_functional_weight_access_sees_the_sparse_weight(method):
    torch.manual_seed(0)
    model = SwinLikeAttention()
    fresh = copy.deepcopy(model)
    x = torch.randn(2, 5, 8)
    sp = sk.sparsify(model, method, **_kw(method))
    assert list(sp.layers) == ["qkv", "proj"]
    _train(model, sp, x)
    assert sp.sparsity()["overall"] > 0
    y = model(x)
    torch.testing.assert_close(y, _load_effective(fresh, sp)(x), rtol=1e-5, atol=1e-6)
    sp.finalize()
    torch.testing.assert_close(model(x), y, rtol=0, atol=0)  # finalize changes nothing


@pytest.mark.parametrize("method", ["st3", "gmp", "str", "nm"])
def test_multihead_attention_and_linear_subclasses(method):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=24, dropout=0.0, batch_first=True)
    fresh = copy.deepcopy(layer)
    x = torch.randn(2, 6, 16)
    sp = sk.sparsify(layer, method, **_kw(method))
    # out_proj is a Linear subclass (NonDynamicallyQuantizableLinear) that MHA uses functionally
    assert list(sp.layers) == ["self_attn.in_proj_weight", "self_attn.out_proj", "linear1", "linear2"]
    assert "self_attn.in_proj_" + {"st3": "threshold", "gmp": "threshold", "str": "s", "nm": "mask"}[method] \
        in layer.state_dict()
    _train(layer, sp, x)
    assert all(f > 0 for f in sp.sparsity()["layers"].values()), sp.sparsity()
    torch.testing.assert_close(layer(x), _load_effective(fresh, sp)(x), rtol=1e-5, atol=1e-6)
    layer.eval()  # MHA's inference fast path reads the same attributes
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _load_effective(fresh, sp).eval()(x), rtol=1e-5, atol=1e-6)


def test_multihead_attention_separate_qkv_weights():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, kdim=6, vdim=4, batch_first=True)
    sp = sk.sparsify(mha, "gmp", sparsity=0.5, scope="layer")
    assert list(sp.layers) == ["q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj"]
    assert set(mha.state_dict()) >= {"q_proj_threshold", "k_proj_threshold", "v_proj_threshold", "out_proj.threshold"}
    q, k, v = torch.randn(2, 3, 8), torch.randn(2, 5, 6), torch.randn(2, 5, 4)
    for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
        assert (getattr(mha, name) == 0).float().mean() == 0.5
    y, _ = mha(q, k, v)
    sp.finalize()
    torch.testing.assert_close(mha(q, k, v)[0], y, rtol=0, atol=0)


@pytest.mark.parametrize("method", ALL)
def test_hf_conv1d_is_pruned_along_its_output_dim(method):
    """Conv1D stores [in, out]: per-output-channel rules (ST-3's rescale, channel thresholds,
    N:M along in) act on weight.t()."""
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(12, 8), nn.ReLU(), Conv1D(4, 12))  # Conv1D(nf=out, nx=in)
    fresh = copy.deepcopy(model)
    x = torch.randn(3, 8)
    options = {"granularity": "channel"} if method in ("str", "asl") else {}
    sp = sk.sparsify(model, method, **_kw(method), **options)
    assert [sw.transposed for sw in sp.layers.values()] == [True, True]
    assert tuple(sp.layers["0"].weight.shape) == (12, 8)  # canonical [out, in]
    if method in ("str", "asl"):
        assert getattr(sp.layers["0"], "s" if method == "str" else "r").shape == (12,)
    _train(model, sp, x)
    eff = sp.layers["0"].effective_weight()
    assert torch.equal(model[0].weight, eff.t())
    if method == "nm":  # 2:4 along the 8 inputs of each output
        assert ((eff.reshape(12, 2, 4) != 0).sum(-1) <= 2).all()
    if method == "st3":  # the rescale is per output channel (a column of the stored weight)
        w, t = sp.layers["0"].weight.detach(), sp.layers["0"].threshold
        torch.testing.assert_close(eff, sk.st3_threshold(w, t), rtol=0, atol=0)
    torch.testing.assert_close(model(x), _load_effective(fresh, sp)(x), rtol=1e-5, atol=1e-6)


def _gpt2(**kw):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, **kw)
    return transformers.GPT2LMHeadModel(cfg)


def test_gpt2_tied_head_pruned_once_and_stays_tied():
    model = _gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    ids = torch.randint(0, 50, (2, 7))
    sp = sk.sparsify(model, "gmp", sparsity=0.5, scope="layer")
    names = list(sp.layers)
    assert "lm_head" in names and "transformer.wte" not in names and len(names) == 2 * 4 + 1  # c_attn, c_proj, c_fc, mlp.c_proj
    assert model.lm_head._parameters["weight"] is model.transformer.wte._parameters["weight"]
    # the embedding reads the same sparse weight as the head
    assert torch.equal(model.transformer.wte.weight, model.lm_head.weight)
    assert (model.transformer.wte.weight == 0).float().mean() == 0.5
    _train(model, sp, ids, loss_fn=lambda out: out.logits.square().mean())
    logits = model(ids).logits
    sp.finalize()
    assert model.lm_head.weight is model.transformer.wte.weight
    torch.testing.assert_close(model(ids).logits, logits, rtol=0, atol=0)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = _gpt2()
    fresh.load_state_dict(torch.load(buf))
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    torch.testing.assert_close(fresh(ids).logits, logits, rtol=0, atol=0)


def test_excluding_the_head_keeps_the_tied_embedding_dense():
    model = _gpt2()
    sp = sk.sparsify(model, "st3", sparsity=0.5, exclude=["lm_head"])
    assert "lm_head" not in sp.layers and sp.dense["lm_head"] == "excluded"
    assert type(model.lm_head) is nn.Linear and (model.transformer.wte.weight != 0).all()
    rep = sp.sparsity()
    total = sum(sw.param.numel() for sw in sp.layers.values())
    assert rep["model"] == pytest.approx(rep["overall"] * total / (total + model.lm_head.weight.numel()))


def test_zero_initialised_layer_trains_before_pruning_starts():
    """gmp's masked gradient 1[|w| > t] would keep an exactly-zero head at 0 forever at t = 0."""
    for kw in ({"sparsity": 0.0}, {"schedule": sk.CubicSchedule(3, 6, 0.5)}):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
        nn.init.zeros_(model[2].weight)
        sp = sk.sparsify(model, "gmp", **kw)
        x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
        _train(model, sp, x, steps=2, loss_fn=lambda out: F.cross_entropy(out, y))
        assert (sp.layers["2"].param != 0).all(), kw


def test_str_warns_about_an_all_zero_weight():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    nn.init.zeros_(model[2].weight)
    with pytest.warns(UserWarning, match=r"\['2'\] are all zero"):
        sk.sparsify(model, "str")


def _mobile():
    """A head far larger than the body and a tiny depthwise layer: global pruning kills layers."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    with torch.no_grad():
        model[1].weight.mul_(0.01)
        model[3].weight.mul_(10)
    return model


def test_a_layer_pruned_to_100_percent_warns_and_min_density_prevents_it():
    with pytest.warns(UserWarning, match=r"100 % pruned.*'1'"):
        sp = sk.sparsify(_mobile(), "st3", sparsity=0.7)
    assert "1" in sp.sparsity()["dead"]
    model = _mobile()
    sp = sk.sparsify(model, "st3", sparsity=0.7, min_density=0.2)
    rep = sp.sparsity()
    assert rep["dead"] == [] and all(s <= 0.8 + 1e-9 for s in rep["layers"].values()), rep
    assert rep["layers"]["1"] == pytest.approx(0.8, abs=1 / 72)
    n = sum(sw.param.numel() for sw in sp.layers.values())
    assert rep["overall"] == pytest.approx(0.7, abs=2 / n)  # the model-wide target still holds
    sp = sk.sparsify(_mobile(), "gmp", sparsity=0.9, min_density=0.25)  # per layer: capped at 0.75
    assert all(s == pytest.approx(0.75, abs=0.02) for s in sp.sparsity()["layers"].values())
    with pytest.warns(UserWarning, match=r"100 % pruned.*'0', '1', '3'"):  # learned: checked every 50 steps
        sk.sparsify(_mobile(), "str", s_init=5.0)  # sigmoid(5) = 0.993 > every |w|
    with pytest.raises(ValueError, match="min_density applies"):
        sk.sparsify(_mobile(), "str", min_density=0.1)
    with pytest.raises(ValueError, match="min_density must be < 1"):
        sk.sparsify(_mobile(), "gmp", sparsity=0.5, min_density=1.0)


def _snapshot(model):
    return ([type(m) for m in model.modules()], {k: v.clone() for k, v in model.state_dict().items()})


@pytest.mark.parametrize("method", ALL)
def test_sparsify_is_atomic(method):
    model = _mobile()
    with torch.no_grad():
        model[3].weight[0, 0] = math.nan
    before = _snapshot(model)
    with pytest.raises(FloatingPointError, match="'3' has NaN"):
        sk.sparsify(model, method, **_kw(method))
    after = _snapshot(model)
    assert before[0] == after[0] and before[1].keys() == after[1].keys()
    assert all(torch.equal(before[1][k], after[1][k]) or k == "3.weight" for k in before[1])  # NaN != NaN
    with torch.no_grad():
        model[3].weight[0, 0] = 0.5
    sk.sparsify(model, method, **_kw(method))  # retry after fixing the cause works
    model = _mobile().double()
    with pytest.raises(TypeError, match="'0' is torch.float64"):
        sk.sparsify(model, method, **_kw(method))
    assert all(type(m).__name__ in ("Sequential", "Conv2d", "Flatten", "Linear") for m in model.modules())


def test_bad_option_after_candidates_leaves_the_model_untouched():
    model = _mobile()
    before = _snapshot(model)
    with pytest.raises(ValueError, match="fc_inputs"):
        sk.sparsify(model, "starfire", sparsity=0.5, era=(0, 2), fc_inputs={"3": "nope"})
    after = _snapshot(model)
    assert before[0] == after[0] and all(torch.equal(before[1][k], after[1][k]) for k in before[1])


def test_sparsify_twice_or_onto_a_taken_attribute_is_refused_untouched():
    model = _mobile()
    sp = sk.sparsify(model, "gmp", sparsity=0.5)
    before = _snapshot(model)
    with pytest.raises(ValueError, match="'0' is already sparse"):
        sk.sparsify(model, "st3", sparsity=0.5)
    after = _snapshot(model)
    assert before[0] == after[0] and all(torch.equal(before[1][k], after[1][k]) for k in before[1])
    sp.finalize()
    sk.sparsify(model, "st3", sparsity=0.5)  # a finalized model can be sparsified again

    model = _mobile()
    model[3].register_buffer("mask", torch.ones(3))  # the user's own buffer, where nm keeps its mask
    before = _snapshot(model)
    with pytest.raises(ValueError, match="'3' already has an attribute 'mask'"):
        sk.sparsify(model, "nm", era=(0, 2))
    after = _snapshot(model)
    assert before[0] == after[0] and all(torch.equal(before[1][k], after[1][k]) for k in before[1])


@pytest.mark.parametrize("method", ALL)
def test_freeze_keeps_the_mask_through_fine_tuning(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 8))
    x = torch.randn(4, 4, 6, 6)
    sp = sk.sparsify(model, method, **_kw(method, 0.6))
    _train(model, sp, x, steps=3)
    y = model(x)
    assert sp.freeze() is sp
    torch.testing.assert_close(model(x), y, rtol=1e-6, atol=1e-6)  # same function, now a fixed mask
    assert set(model.state_dict()) == {f"{i}.{k}" for i in "03" for k in ("weight", "bias", "mask")}
    pruned = {n: sw.param == 0 for n, sw in sp.layers.items()}
    assert sum(int(p.sum()) for p in pruned.values()) > 0
    _train(model, sp, x, steps=3)  # momentum and weight decay cannot regrow a pruned weight
    for n, sw in sp.layers.items():
        assert torch.equal(sw.param == 0, pruned[n]) and torch.equal(sw.param.grad[pruned[n]].abs().sum(),
                                                                     torch.tensor(0.0))
    state = (copy.deepcopy(model.state_dict()), sp.state_dict())
    assert state[1]["frozen"] is True
    y = model(x)
    fresh = copy.deepcopy(model)
    sp.finalize()
    torch.testing.assert_close(model(x), y, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="after finalize"):
        sp.freeze()
    # resume: sparsify the same way, freeze, then load
    torch.manual_seed(1)
    resumed = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 8))
    sp2 = sk.sparsify(resumed, method, **_kw(method, 0.6))
    sp2.freeze()
    resumed.load_state_dict(state[0])
    sp2.load_state_dict(state[1])
    torch.testing.assert_close(resumed(x), fresh(x), rtol=0, atol=0)


def test_first_forward_names_a_weight_used_behind_the_attribute():
    class Sneaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return F.linear(self.a(x), self.b._parameters["weight"])

    model = Sneaky()
    sk.sparsify(model, "gmp", sparsity=0.5)
    with pytest.warns(UserWarning, match=r"did not read.*\['b'\]"):
        model(torch.randn(2, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only the first forward is probed
        model(torch.randn(2, 4))


def test_conv_kinds_and_what_each_method_supports():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(4, 8, 3), nn.Conv1d(8, 8, 1), nn.Flatten(), nn.Linear(8 * 6, 8),
                          nn.Unflatten(1, (1, 2, 2, 2)), nn.Conv3d(1, 4, 1), nn.Conv3d(4, 8, 2, groups=4))
    x = torch.randn(2, 4, 8)
    with pytest.warns(UserWarning, match=r"stay dense.*'0'.*R×S.*'6'"):
        sp = sk.sparsify(copy.deepcopy(model), "starfire", sparsity=0.5, era=(0, 1))
    assert list(sp.layers) == ["1", "3", "5"]
    with pytest.warns(UserWarning, match=r"stay dense.*'5': 'nm: reduction dim .* 1 not divisible"):
        sp = sk.sparsify(copy.deepcopy(model), "nm", era=(0, 1))
    assert "6" not in sp.layers and "0" in sp.layers
    for method in MAGNITUDE + ["str", "asl"]:
        m = copy.deepcopy(model)
        sp = sk.sparsify(m, method, **_kw(method))
        assert list(sp.layers) == ["0", "1", "3", "5", "6"]
        _train(m, sp, x, steps=1)


def test_include_replaces_the_default_choice():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 4))
    sp = sk.sparsify(model, "gmp", sparsity=0.5, include=lambda n, m: isinstance(m, (nn.Embedding, nn.Linear)))
    assert list(sp.layers) == ["0", "1", "3"]
    ids = torch.randint(0, 10, (2, 5))
    assert torch.equal(model[0](ids), F.embedding(ids, sp.layers["0"].effective_weight()))
    assert (model[0].weight == 0).float().mean() == 0.5
    plain = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    with pytest.raises(ValueError, match=r"include picks '1' \(LayerNorm\), which has no ≥ 2-D 'weight'"):
        sk.sparsify(plain, "gmp", sparsity=0.5, include=lambda n, m: n == "1")
    assert type(plain[0]) is nn.Linear
    with pytest.raises(TypeError, match="include must be a predicate"):
        sk.sparsify(plain, "gmp", sparsity=0.5, include=["0"])


def test_assigning_a_parameter_does_not_run_the_method():
    """Module.register_parameter checks hasattr(self, name) first: on a sparse module that must
    not compute the effective weight (FSDP2, tie_weights and users re-assign Parameters)."""
    model = nn.Sequential(nn.Linear(4, 4))
    sp = sk.sparsify(model, "gmp", sparsity=0.5)
    calls = []
    method = sp.layers["0"].method
    original = type(method).sparse_weight
    type(method).sparse_weight = lambda self, layer: calls.append(1) or original(self, layer)
    try:
        new = nn.Parameter(torch.randn(4, 4))
        model[0].weight = new
        assert calls == [] and sp.layers["0"].param is new
        lin = sk.nn.SparseLinear(4, 4, method="gmp")
        lin.weight = nn.Parameter(torch.randn(4, 4))
        assert calls == []
    finally:
        type(method).sparse_weight = original
    assert torch.equal(model[0].weight, sp.layers["0"].effective_weight())
