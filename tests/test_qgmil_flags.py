"""One test per QG-MIL constructor flag: each paper component is a field that does what it says."""

import pytest
import torch
from torch import nn

from qgmil.layers import MLP, GatedSelfAttention, RMSNorm, SwiGLU, make_norm
from qgmil.models import QGMIL, QGMILConfig

SMALL = dict(in_dim=16, num_classes=2, dim=32, heads=4, ffn_dim=64, dropout=0.0)


def build(seed=0, **overrides) -> QGMIL:
    torch.manual_seed(seed)
    return QGMIL(QGMILConfig(**{**SMALL, **overrides})).eval()


def x_and_mask(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 10, 16, generator=g)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False
    return x, mask


def modules(model, kind):
    return [m for m in model.modules() if isinstance(m, kind)]


def test_rmsnorm_matches_its_formula():
    norm = RMSNorm(8, eps=1e-6)
    norm.weight.data = torch.arange(1.0, 9.0)
    x = torch.randn(3, 8)
    expected = norm.weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(norm(x), expected)
    assert norm(x.bfloat16()).dtype == torch.float32  # fp32 weight * bf16 normalised input promotes


@pytest.mark.parametrize("kind, cls, eps", [("rms", RMSNorm, 1e-6), ("layer", nn.LayerNorm, 1e-5)])
def test_norm_flag_selects_norm_everywhere(kind, cls, eps):
    model = build(norm=kind)
    other = nn.LayerNorm if cls is RMSNorm else RMSNorm
    # embed, 2 per block, 2 QK norms, final, pooling
    assert len(modules(model, cls)) == 7 and not modules(model, other)
    # Official quirk kept: the embed/final/pool norms use the library default eps.
    assert model.final_norm.eps == eps and model.blocks[0].attn_norm.eps == 1e-6


def test_norm_choice_changes_output():
    x, mask = x_and_mask()
    rms, layer = build(norm="rms"), build(norm="layer")
    assert not torch.allclose(rms(x, mask).logits, layer(x, mask).logits)


def test_qk_norm_makes_attention_invariant_to_query_key_scale():
    x, mask = x_and_mask()
    for qk_norm, invariant in [(True, True), (False, False)]:
        model = build(qk_norm=qk_norm)
        before = model(x, mask, return_layer_attention=True).layer_attention[0]
        with torch.no_grad():
            model.blocks[0].attn.q_proj.weight.mul_(7.0)
            model.blocks[0].attn.k_proj.weight.mul_(7.0)
        after = model(x, mask, return_layer_attention=True).layer_attention[0]
        assert torch.allclose(before, after, atol=1e-4) == invariant
    assert isinstance(build(qk_norm=False).blocks[0].attn.q_norm, nn.Identity)


@pytest.mark.parametrize("gate, width", [("headwise", 4), ("elementwise", 32), ("none", None)])
def test_gate_flag_sets_gate_projection(gate, width):
    attn = build(gate=gate).blocks[0].attn
    if width is None:
        assert attn.gate_proj is None
    else:
        assert attn.gate_proj.out_features == width


@pytest.mark.parametrize("gate", ["headwise", "elementwise"])
def test_zero_gate_halves_the_attention_output(gate):
    """With gate logits 0 the sigmoid gate is exactly 1/2: same as no gate and a halved o_proj."""
    x, mask = x_and_mask()
    gated, plain = build(gate=gate), build(gate="none")
    state = {k: v for k, v in gated.state_dict().items() if "attn.gate_proj" not in k}
    state["blocks.0.attn.o_proj.weight"] = state["blocks.0.attn.o_proj.weight"] * 0.5
    plain.load_state_dict(state)
    with torch.no_grad():
        gated.blocks[0].attn.gate_proj.weight.zero_()
    torch.testing.assert_close(gated(x, mask).logits, plain(x, mask).logits)


def test_headwise_gate_scales_each_head_separately():
    attn = GatedSelfAttention(dim=8, heads=2, gate="headwise", qk_norm=False)
    x = torch.randn(1, 5, 8)
    q, k, v, gate = attn.project(x)
    assert gate.shape == (1, 5, 2, 1)
    attended = attn.attend(q, k, v)
    by_hand = attn.o_proj((attended * torch.sigmoid(attn.gate_proj(x)).unsqueeze(-1)).flatten(-2))
    torch.testing.assert_close(attn(x), by_hand)


@pytest.mark.parametrize("ffn, cls", [("swiglu", SwiGLU), ("mlp", MLP)])
def test_ffn_flag(ffn, cls):
    model = build(ffn=ffn)
    assert isinstance(model.blocks[0].ffn, cls)


def test_swiglu_matches_its_formula():
    ffn = SwiGLU(6, 10)
    x = torch.randn(4, 6)
    expected = ffn.down_proj(nn.functional.silu(ffn.gate_proj(x)) * ffn.up_proj(x))
    torch.testing.assert_close(ffn(x), expected)
    assert ffn.gate_proj.bias is None  # bias-free as in Qwen/LLaMA


@pytest.mark.parametrize("depth", [1, 3])
def test_depth(depth):
    assert len(build(depth=depth).blocks) == depth


def test_width_heads_head_dim_ffn_dim():
    model = build(dim=48, heads=6, head_dim=10, ffn_dim=40)
    attn = model.blocks[0].attn
    assert attn.q_proj.weight.shape == (60, 48) and attn.o_proj.weight.shape == (48, 60)
    assert model.blocks[0].ffn.up_proj.weight.shape == (40, 48)
    assert build().blocks[0].attn.head_dim == 8  # default dim // heads


def test_grouped_query_attention_equals_repeated_kv():
    x, mask = x_and_mask()
    gqa = build(kv_heads=2)
    assert gqa.blocks[0].attn.k_proj.weight.shape == (16, 32)
    full = build(kv_heads=4)
    state = gqa.state_dict()
    for name in ("k_proj", "v_proj"):  # kv head j serves query heads 2j and 2j+1
        w = state[f"blocks.0.attn.{name}.weight"].view(2, 8, 32)
        state[f"blocks.0.attn.{name}.weight"] = w.repeat_interleave(2, dim=0).reshape(32, 32)
    full.load_state_dict(state)
    torch.testing.assert_close(gqa(x, mask).logits, full(x, mask).logits)


def test_dropout_flag_only_acts_in_training():
    x, mask = x_and_mask()
    model = build(dropout=0.5)
    torch.testing.assert_close(model(x, mask).logits, model(x, mask).logits)
    model.train()
    assert not torch.allclose(model(x, mask).logits, model(x, mask).logits)


def test_qkv_bias_flag():
    attn = build(qkv_bias=True).blocks[0].attn
    assert all(p.bias is not None for p in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, attn.gate_proj))
    assert build().blocks[0].attn.q_proj.bias is None


def test_pooling_mean_is_uniform_and_max_counts_channel_wins():
    x, mask = x_and_mask()
    mean = build(pooling="mean")(x, mask)
    torch.testing.assert_close(mean.attention[1, :6], torch.full((6,), 1 / 6))
    mx = build(pooling="max")(x, mask)
    # Each of the 32 channels is won by one real instance: attention is a multiple of 1/32.
    torch.testing.assert_close((mx.attention * 32).round(), mx.attention * 32)
    assert (mx.attention[1, 6:] == 0).all()


def test_pooling_cls_uses_a_token_and_its_attention():
    x, mask = x_and_mask()
    model = build(pooling="cls")
    assert model.cls_token is not None and model.pool is None
    out = model(x, mask, return_layer_attention=True)
    cls_row = out.layer_attention[-1][:, :, 0, 1:].mean(1)
    torch.testing.assert_close(out.attention, cls_row / cls_row.sum(-1, keepdim=True))
    assert out.layer_attention[-1].shape == (2, 4, 11, 11)


def test_gated_attention_pooling_is_default():
    model = build()
    assert model.pool is not None and model.config.pooling == "gated_attention"


def test_layer_attention_only_on_request():
    x, mask = x_and_mask()
    model = build(depth=2)
    assert model(x, mask).layer_attention is None
    maps = model(x, mask, return_layer_attention=True).layer_attention
    assert len(maps) == 2 and maps[0].shape == (2, 4, 10, 10)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, 4, 10))
    assert (maps[0][1, :, :, 6:] == 0).all()  # nobody attends to padding


@pytest.mark.parametrize(
    "overrides, key",
    [(dict(norm="batch"), "norm"), (dict(gate="sometimes"), "gate"), (dict(dim=30, heads=4), "divisible"),
     (dict(heads=4, kv_heads=3), "kv_heads"), (dict(pooling="sum"), "pooling"), (dict(depth=0), "depth")],
)
def test_invalid_config_names_the_problem(overrides, key):
    with pytest.raises(ValueError, match=key):
        QGMILConfig(**{**SMALL, **overrides})


def test_bad_inputs_are_explained():
    model = build()
    with pytest.raises(ValueError, match="in_dim=16"):
        model(torch.randn(1, 5, 15))
    with pytest.raises(ValueError, match="no real instance"):
        model(torch.randn(2, 5, 16), torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool))
    with pytest.raises(ValueError, match="mask shape"):
        model(torch.randn(2, 5, 16), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.ones(2, 5, 16, dtype=torch.long))


def test_make_norm_rejects_unknown():
    with pytest.raises(ValueError, match="unknown norm"):
        make_norm("group", 4)
