"""``sk.count_flops`` (SPEC §8): the papers' ResNet-50 / MobileNetV1 totals, conv/linear formulas,
density scaling, pools; transformers text models from token ids (weight MACs by hand, attention
apart), MultiheadAttention and functional uses of weights; and ``bench.models`` against the
``bench.suites`` weight shapes."""
import pytest
import torch
import torch.nn.functional as F
import transformers
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
    model(torch.randn(1, 3, 8, 8))  # the first forward, which the Sparsifier checks, is a real one
    report = sk.count_flops(model, (3, 8, 8))
    conv0, conv2, fc = report.rows
    assert (conv0.params, conv0.nonzero) == (216, 162) and conv0.macs == 162 * 64
    for row, positions in ((conv2, 9), (fc, 1)):
        nonzero = int(torch.count_nonzero(model.get_submodule(row.name).weight))  # the effective weight
        assert row.nonzero == nonzero == round(row.params * 0.25) and row.macs == nonzero * positions
        assert row.type in ("SparsifiedConv2d", "SparsifiedLinear")
        assert nonzero < int(torch.count_nonzero(model.get_submodule(row.name)._parameters["weight"]))
    assert report.nonzero_params == 162 + conv2.nonzero + fc.nonzero
    assert report.macs == sum(r.macs for r in report.rows) < report.dense_macs
    sp.finalize()  # plain layers with baked zeros count the same
    assert sk.count_flops(model, (3, 8, 8)).macs == report.macs


@pytest.mark.parametrize("name", ["encoder_layer", "gpt2"])
def test_sparsified_attention_weights_and_transposed_conv1d_count_their_density(name):
    """Sparse weights where they live: MHA's functional ``in_proj_weight``, GPT-2's ``Conv1D``
    (``[in, out]``) and the ``lm_head`` tied to the wte Embedding; ``macs`` = dense·nonzero/params."""
    torch.manual_seed(0)
    if name == "gpt2":
        model, x = _tiny("gpt2"), torch.randint(0, 99, (2, 5))
    else:
        model, x = nn.TransformerEncoderLayer(16, 2, 40, batch_first=True), torch.randn(2, 5, 16)
    dense = sk.count_flops(model, example_inputs=x)
    sp = sk.sparsify(model, "gmp", sparsity=0.5)
    model(x)  # the first forward, which the Sparsifier checks, is a real one
    report = sk.count_flops(model, example_inputs=x)
    assert [r.name for r in report.rows] == [r.name for r in dense.rows]
    assert sorted(sp.layers) == sorted(r.name for r in report.rows if r.type != "attention")
    for row, d in zip(report.rows, dense.rows):
        assert (row.shape, row.params, row.dense_macs) == (d.shape, d.params, d.dense_macs)
        if row.type != "attention":
            nonzero = int(torch.count_nonzero(sp.layers[row.name].effective_weight()))
            assert row.nonzero == nonzero == row.params // 2 and row.macs == row.dense_macs // 2
    assert report.attention_macs == dense.attention_macs > 0


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


def test_exactly_one_input_argument_and_bad_example_inputs():
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(TypeError, match="input_size.*example_inputs.*both"):
        sk.count_flops(model, (3, 8, 8), example_inputs=torch.zeros(1, 3, 8, 8))
    with pytest.raises(TypeError, match="input_size.*example_inputs.*neither"):
        sk.count_flops(model)
    with pytest.raises(ValueError, match=r"input_size=\(3, 8\) \(input shape \(1, 3, 8\)"):
        sk.count_flops(model, (3, 8))  # a batch dim too few for Conv2d: the torch error is chained
    with pytest.raises(ValueError, match="example_inputs"):
        sk.count_flops(model, example_inputs=torch.zeros(3, 8, 8, 2))  # wrong channels
    for bad, exc in (([1, 2], ValueError), ("ids", TypeError), ({1: torch.zeros(2)}, TypeError),
                     (torch.tensor(1.0), ValueError), (torch.zeros(0, 3), ValueError), ({"x": None}, ValueError)):
        with pytest.raises(exc, match="example_inputs"):
            sk.count_flops(model, example_inputs=bad)


def _tiny(name):
    torch.manual_seed(0)
    if name == "bert":
        return transformers.BertModel(transformers.BertConfig(
            vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37))
    if name == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=99, n_embd=32, n_layer=2, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0))
    if name == "llama":  # grouped-query attention: 4 query heads, 2 key/value heads
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=37))
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4))


def _weight_macs(name, model, src, tgt):
    """Hand count per sample: every Linear/Conv1D weight ``in·out`` once per token it projects."""
    kinds = (nn.Linear, transformers.pytorch_utils.Conv1D)
    numel = {n: m.weight.numel() for n, m in model.named_modules() if isinstance(m, kinds)}
    if name == "bert":  # the pooler reads the first token only
        return sum(src * k for n, k in numel.items() if n != "pooler.dense") + numel["pooler.dense"]
    if name == "t5":  # decoder tokens, except the cross-attention keys/values of the encoder's tokens
        return sum((src if n.startswith("encoder.") or n.endswith(("EncDecAttention.k", "EncDecAttention.v"))
                    else tgt) * k for n, k in numel.items())
    return src * sum(numel.values())


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "t5"])
def test_transformers_text_models_from_token_ids(name):
    model = _tiny(name)
    src, tgt = 7, 5
    ids = torch.randint(0, 99, (3, src))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if name == "t5":
        inputs["decoder_input_ids"] = ids[:, :tgt]
    report = sk.count_flops(model, example_inputs=inputs)
    weights = [r for r in report.rows if r.type != "attention"]
    kinds = (nn.Linear, transformers.pytorch_utils.Conv1D)
    assert [r.name for r in weights] == [n for n, m in model.named_modules() if isinstance(m, kinds)]
    assert {r.type for r in weights} == ({"Conv1D", "Linear"} if name == "gpt2" else {"Linear"})
    assert report.params == sum(m.weight.numel() for m in model.modules() if isinstance(m, kinds))
    assert report.dense_macs == report.macs == _weight_macs(name, model, src, tgt)
    assert report.dense_macs == sum(r.dense_macs for r in weights)  # attention rows stay out
    # QKᵀ and AV: heads·L_q·L_k·head_dim each, per layer; heads·head_dim = 32 (the model width)
    layers = {"bert": 2 * src * src, "gpt2": 2 * src * src, "llama": 2 * src * src,
              "t5": 2 * (src * src + tgt * tgt + tgt * src)}[name]
    attention = [r for r in report.rows if r.type == "attention"]
    assert len(attention) == (6 if name == "t5" else 2)
    assert all((r.shape, r.params, r.nonzero) == ((), 0, 0) and r.macs == r.dense_macs for r in attention)
    assert report.attention_macs == sum(r.dense_macs for r in attention) == layers * 2 * 32
    assert "attention (not in total)" in str(report)
    one = {k: v[:1] for k, v in inputs.items()}
    assert sk.count_flops(model, example_inputs=one) == report  # per sample
    if name == "gpt2":  # lm_head is tied to the wte Embedding: counted as lm_head, the lookup is not
        assert model.lm_head.weight is model.transformer.wte.weight
        assert report.rows[-1] == LayerFlops("lm_head", "Linear", (99, 32), 3168, 3168, src * 3168, src * 3168)
    if name == "t5":
        names = [r.name for r in attention]
        assert names[2:4] == ["decoder.block.0.layer.0.SelfAttention", "decoder.block.0.layer.1.EncDecAttention"]
        assert [r.dense_macs for r in attention[2:4]] == [2 * tgt * tgt * 32, 2 * tgt * src * 32]


def test_transformers_model_is_untouched():
    model = _tiny("gpt2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sk.count_flops(model, example_inputs=torch.randint(0, 99, (2, 5)))
    after = model.state_dict()
    assert all(torch.equal(after[k], v) and after[k].device.type == "cpu" for k, v in before.items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_transformer_encoder_layer_counts_multihead_attention_functional_weights():
    """MultiheadAttention uses ``in_proj_weight`` and ``out_proj.weight`` functionally: both count."""
    layer = nn.TransformerEncoderLayer(16, 2, 40, batch_first=True)
    report = sk.count_flops(layer, example_inputs=torch.randn(2, 5, 16))
    assert [(r.name, r.type, r.shape, r.dense_macs) for r in report.rows] == [
        ("self_attn.in_proj_weight", "MultiheadAttention", (48, 16), 5 * 48 * 16),
        ("self_attn", "attention", (), 2 * 5 * 5 * 16),
        ("self_attn.out_proj", "NonDynamicallyQuantizableLinear", (16, 16), 5 * 16 * 16),
        ("linear1", "Linear", (40, 16), 5 * 40 * 16),
        ("linear2", "Linear", (16, 40), 5 * 16 * 40)]
    assert report.params == 48 * 16 + 16 * 16 + 2 * 40 * 16
    assert sk.count_flops(layer.eval(), example_inputs=torch.randn(2, 5, 16)) == report  # no fused fast path


def test_multihead_attention_cross_and_separate_projections():
    """Cross-attention splits ``in_proj_weight`` (q: L_q tokens, k/v: L_k); kdim/vdim give
    ``q/k/v_proj_weight``, each a row named like the Sparsifier's."""
    class Cross(nn.Module):
        def __init__(self, **kw):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True, **kw)

        def forward(self, q, kv, v=None):
            return self.attn(q, kv, kv if v is None else v)[0]

    q, kv = torch.randn(2, 3, 16), torch.randn(2, 7, 16)
    report = sk.count_flops(Cross(), example_inputs=(q, kv))
    assert [(r.name, r.dense_macs) for r in report.rows] == [
        ("attn.in_proj_weight", 3 * 16 * 16 + 7 * 32 * 16), ("attn", 2 * 3 * 7 * 16), ("attn.out_proj", 3 * 16 * 16)]
    report = sk.count_flops(Cross(kdim=10, vdim=12), example_inputs=(q, torch.randn(2, 7, 10), torch.randn(2, 7, 12)))
    assert [(r.name, r.shape, r.dense_macs) for r in report.rows] == [
        ("attn.q_proj_weight", (16, 16), 3 * 16 * 16), ("attn.k_proj_weight", (16, 10), 7 * 16 * 10),
        ("attn.v_proj_weight", (16, 12), 7 * 16 * 12), ("attn", (), 2 * 3 * 7 * 16),
        ("attn.out_proj", (16, 16), 3 * 16 * 16)]


class _SwinLike(nn.Module):
    """torchvision swin's attention: ``qkv`` is never called, its weight is used by ``F.linear``."""

    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(16, 48), nn.Linear(16, 16)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = F.linear(x, self.qkv.weight, self.qkv.bias).reshape(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


def test_weight_used_functionally_by_its_parent():
    report = sk.count_flops(_SwinLike(), example_inputs=torch.randn(4, 9, 16))
    assert [(r.name, r.type, r.dense_macs) for r in report.rows] == [
        ("", "attention", 2 * 9 * 9 * 16), ("qkv", "Linear", 9 * 48 * 16), ("proj", "Linear", 9 * 16 * 16)]
    assert sk.count_flops(_SwinLike(), (9, 16)) == report  # input_size: the same sample


def test_every_product_kind_by_operand():
    """mv/addmv with a weight, bmm with a broadcast weight, baddbmm of two activations; products
    with a buffer or a non-prunable parameter are not counted."""
    class Products(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.norm = nn.Linear(8, 4), nn.LayerNorm(8)
            self.register_buffer("proj", torch.randn(8, 8))

        def forward(self, x):  # x: [B, 6, 8]
            w = self.fc.weight
            a = torch.mv(w, x[0, 0]) + torch.addmv(self.fc.bias, w, x[0, 1])  # 2·32 (first sample only)
            b = torch.bmm(x, w.t().expand(x.shape[0], 8, 4))  # 6·8·4 per sample
            c = torch.baddbmm(x[:, :, :6], x, x.transpose(1, 2))  # 6·8·6 per sample
            d = x @ self.proj + x @ torch.diag(self.norm.weight)  # not counted
            return a.sum() + b.sum() + c.sum() + d.sum()

    report = sk.count_flops(Products(), example_inputs=torch.randn(2, 6, 8))
    assert [(r.name, r.type, r.dense_macs) for r in report.rows] == [
        ("", "attention", 6 * 8 * 6), ("fc", "Linear", (2 * 32 + 2 * 6 * 8 * 4) // 2)]


@pytest.mark.parametrize("conv, shape", [
    (nn.Conv1d(8, 8, 3, padding=1, groups=8), (8, 10)),  # depthwise
    (nn.Conv1d(8, 4, 5, stride=2, groups=2), (8, 21)),
    (nn.Conv3d(6, 6, 3, stride=(1, 2, 2), groups=6), (6, 5, 9, 9)),  # depthwise
    (nn.Conv3d(4, 8, (1, 3, 3), padding=(0, 1, 1), groups=2), (4, 3, 6, 6)),
])
def test_grouped_and_depthwise_conv1d_conv3d_from_a_batch(conv, shape):
    x = torch.randn(3, *shape)
    (row,) = sk.count_flops(nn.Sequential(conv), example_inputs=x).rows
    out = conv(x)
    assert row.params == conv.weight.numel()
    assert row.dense_macs == out[0].numel() * conv.weight[0].numel() == row.macs  # K_out·(C_in/g)·kernel·positions
    assert sk.count_flops(nn.Sequential(conv), shape).rows == (row,)


def test_top_level_export():
    assert "count_flops" in sk.__all__ and sk.FlopReport is FlopReport
