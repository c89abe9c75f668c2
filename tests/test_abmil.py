"""ABMIL (Ilse et al. 2018) against a plain re-implementation of its equations, and its `gated` flag."""

import pytest
import torch

import qgmil
from qgmil.layers import AttentionPool
from qgmil.models.abmil import ABMIL, ABMILConfig

SMALL = dict(in_dim=16, num_classes=3, dim=32, attn_dim=8, dropout=0.0)


def build(seed=0, **overrides) -> ABMIL:
    torch.manual_seed(seed)
    return ABMIL(ABMILConfig(**{**SMALL, **overrides})).eval()


def x_and_mask(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 10, 16, generator=g)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[1, 6:] = False
    mask[2, 1:] = False  # a bag of one instance
    return x, mask


def reference(model: ABMIL, bag: torch.Tensor):
    """The paper's equations with plain tensor ops in float64, on one bag of real instances (n, in_dim).

    h_k = ReLU(W x_k + b);  s_k = w^T tanh(V h_k) [* sigmoid(U h_k)] + c;  a = softmax(s);  z = sum a_k h_k.
    """
    p = {k: v.detach().double() for k, v in model.state_dict().items()}
    x = bag.double()
    h = torch.clamp(x @ p["embed.proj.weight"].T + p["embed.proj.bias"], min=0)
    inner = torch.tanh(h @ p["pool.attn_v.weight"].T + p["pool.attn_v.bias"])
    if model.config.gated:
        inner = inner * torch.sigmoid(h @ p["pool.attn_u.weight"].T + p["pool.attn_u.bias"])
    s = (inner @ p["pool.attn_w.weight"].T + p["pool.attn_w.bias"])[:, 0]
    e = torch.exp(s - s.max())
    a = e / e.sum()
    z = (a[:, None] * h).sum(0)
    logits = z @ p["head.weight"].T + p["head.bias"]
    return logits, a, z


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("pad_value", [0.0, float("nan")])
def test_matches_reference_equations(gated, use_mask, pad_value):
    model = build(gated=gated)
    x, mask = x_and_mask()
    if not use_mask:
        mask = torch.ones_like(mask)
    x = x.masked_fill(~mask[..., None], pad_value)
    with torch.no_grad():
        out = model(x, mask if use_mask else None)
    assert out.aux_losses == {} and out.layer_attention is None
    for i in range(x.shape[0]):
        n = int(mask[i].sum())
        logits, a, z = reference(model, x[i, :n])
        torch.testing.assert_close(out.logits[i].double(), logits, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.attention[i, :n].double(), a, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(out.embedding[i].double(), z, rtol=1e-5, atol=1e-6)
        assert (out.attention[i, n:] == 0).all()
    torch.testing.assert_close(out.attention.sum(-1), torch.ones(3))


def test_gate_parameters_exist_only_when_gated():
    plain, gated = build(gated=False), build(gated=True)
    assert isinstance(plain.pool, AttentionPool) and isinstance(gated.pool, AttentionPool)  # one block, a flag
    assert not plain.pool.gated and plain.pool.attn_u is None and gated.pool.gated
    plain_names = {n for n, _ in plain.named_parameters()}
    gated_names = {n for n, _ in gated.named_parameters()}
    assert gated_names - plain_names == {"pool.attn_u.weight", "pool.attn_u.bias"}
    assert plain_names <= gated_names
    assert isinstance(gated.pool.norm, torch.nn.Identity)  # no QG-MIL extras in ABMIL's pooling


def test_gated_flag_changes_attention_and_saturated_gate_recovers_plain():
    x, mask = x_and_mask()
    plain, gated = build(gated=False), build(gated=True)
    gated.load_state_dict(plain.state_dict(), strict=False)  # same embedding, V, w, head
    with torch.no_grad():
        a_plain = plain(x, mask).attention
        a_gated = gated(x, mask).attention
        assert not torch.allclose(a_plain, a_gated)
        # With the gate held open (sigmoid(U h) = 1 exactly), eq. 9 reduces to eq. 8.
        gated.pool.attn_u.weight.zero_()
        gated.pool.attn_u.bias.fill_(100.0)
        torch.testing.assert_close(gated(x, mask).attention, a_plain, rtol=0, atol=0)


def test_presets_defaults_and_config_validation():
    assert {"abmil", "abmil_gated"} <= set(qgmil.list_models("abmil*"))
    a = qgmil.create_model("abmil", in_dim=1024, num_classes=2)
    g = qgmil.create_model("abmil_gated", in_dim=1024, num_classes=2)
    assert a.arch == g.arch == "abmil" and a.name == "abmil" and g.name == "abmil_gated"
    assert not a.config.gated and g.config.gated
    assert (a.config.dim, a.config.attn_dim, a.config.dropout) == (512, 128, 0.25)
    assert a.embed.drop.p == 0.25 and a.head.in_features == 512 and a.pool.attn_v.out_features == 128
    assert qgmil.create_model("abmil", in_dim=8, num_classes=2, attn_dim=256).pool.attn_v.out_features == 256
    with pytest.raises(ValueError, match="not_a_field"):
        qgmil.create_model("abmil", in_dim=8, num_classes=2, not_a_field=1)
    with pytest.raises(ValueError, match="dropout"):
        ABMILConfig(in_dim=8, num_classes=2, dropout=1.0)
    with pytest.raises(ValueError, match="attn_dim"):
        ABMILConfig(in_dim=8, num_classes=2, attn_dim=0)


@pytest.mark.parametrize("gated", [False, True])
def test_inference_embeds_instances_in_chunks(gated):
    model = build(gated=gated)
    model.inference_chunk = 7
    seen = []
    model.embed.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[1]))
    x = torch.randn(1, 30, 16)
    with torch.no_grad():
        model(x)
    assert seen == [7, 7, 7, 7, 2]
    seen.clear()
    model(x)  # with gradients recorded: the whole bag at once
    assert seen == [30]


@pytest.mark.parametrize("name", ["abmil", "abmil_gated"])
def test_bf16_autocast(name):
    torch.manual_seed(0)
    model = qgmil.create_model(name, in_dim=16, num_classes=3).eval()
    x, mask = x_and_mask()
    with torch.no_grad():
        ref = model(x, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, mask)
    assert torch.isfinite(low.logits).all()
    assert (low.attention[~mask] == 0).all()
    torch.testing.assert_close(low.attention.float().sum(-1), torch.ones(3), atol=2e-2, rtol=0)
    torch.testing.assert_close(low.logits.float(), ref.logits, atol=5e-2, rtol=5e-2)
