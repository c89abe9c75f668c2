"""The shared layers (attention pooling, instance embedding, classifier head) against hand computations,
and the shared config field types, for every architecture."""

import math

import pytest
import torch
from pydantic import ValidationError

import qgmil
from qgmil.layers import AttentionPool, ClassifierHead, InstanceEmbed, RMSNorm
from qgmil.models.registry import check_model, model_entry

D, A = 6, 4


def bags(seed=0, batch=3, n=9):
    """x (B, N, D) and a mask with a full bag, a padded one and a bag of one instance."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, D, generator=g)
    mask = torch.ones(batch, n, dtype=torch.bool)
    mask[1, 5:] = False
    mask[2, 1:] = False
    return x, mask


def reference(pool: AttentionPool, bag: torch.Tensor):
    """Ilse et al. eq. 8 / 9 for every branch in float64 on one bag of real instances (n, D):
    returns pooled (K, D), attention (K, n), scores (K, n)."""
    p = {k: v.detach().double() for k, v in pool.state_dict().items()}
    h = bag.double()
    if "norm.weight" in p:  # RMSNorm
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + pool.norm.eps) * p["norm.weight"]
    inner = torch.tanh(h @ p["attn_v.weight"].T + p["attn_v.bias"])
    if pool.gated:
        inner = inner * torch.sigmoid(h @ p["attn_u.weight"].T + p["attn_u.bias"])
    s = (inner @ p["attn_w.weight"].T + p["attn_w.bias"]).T  # (K, n)
    a = torch.exp(s - s.max(-1, keepdim=True).values)
    a = a / a.sum(-1, keepdim=True)
    return a @ h, a, s


def make_pool(seed=0, **kwargs) -> AttentionPool:
    torch.manual_seed(seed)
    return AttentionPool(D, A, **kwargs).eval()


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("branches", [1, 3])
@pytest.mark.parametrize("norm", [False, True])
def test_attention_pool_matches_hand_computation(gated, branches, norm):
    pool = make_pool(gated=gated, branches=branches, norm=RMSNorm(D) if norm else None)
    if norm:
        torch.nn.init.uniform_(pool.norm.weight, 0.5, 1.5)
    x, mask = bags()
    with torch.no_grad():
        pooled, attention, scores = pool.attend(x, mask)
        z, a = pool(x, mask)
    b, n = mask.shape
    assert pooled.shape == (b, branches, D) and attention.shape == scores.shape == (b, branches, n)
    if branches == 1:
        assert z.shape == (b, D) and a.shape == (b, n)
        assert torch.equal(z, pooled[:, 0]) and torch.equal(a, attention[:, 0])
    else:
        assert torch.equal(z, pooled) and torch.equal(a, attention)
    for i in range(b):
        k = int(mask[i].sum())
        ref_z, ref_a, ref_s = reference(pool, x[i, :k])
        torch.testing.assert_close(pooled[i].double(), ref_z, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(attention[i, :, :k].double(), ref_a, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(scores[i, :, :k].double(), ref_s, rtol=1e-5, atol=1e-6)
        assert (attention[i, :, k:] == 0).all()  # exactly 0 on padding
    torch.testing.assert_close(attention.sum(-1), torch.ones(b, branches))


def test_branches_share_v_and_u_and_each_has_its_own_w():
    multi = make_pool(branches=3)
    x, mask = bags()
    with torch.no_grad():
        _, attention, _ = multi.attend(x, mask)
        for k in range(3):
            single = make_pool()
            state = {n: t for n, t in multi.state_dict().items() if not n.startswith("attn_w")}
            single.load_state_dict({**state, "attn_w.weight": multi.attn_w.weight[k:k + 1],
                                    "attn_w.bias": multi.attn_w.bias[k:k + 1]})
            # a (dim, 3) and a (dim, 1) matmul may take different CPU kernels: equal up to float rounding
            torch.testing.assert_close(single(x, mask)[1], attention[:, k], rtol=1e-6, atol=1e-7)


def test_saturated_gate_is_the_plain_formula():
    plain, gated = make_pool(gated=False), make_pool(gated=True)
    gated.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        gated.attn_u.weight.zero_()
        gated.attn_u.bias.fill_(100.0)  # sigmoid = 1 exactly in float32
        x, mask = bags()
        torch.testing.assert_close(gated(x, mask), plain(x, mask), rtol=0, atol=0)


@pytest.mark.parametrize("pad", [float("nan"), float("inf"), -float("inf"), 1e30])
@pytest.mark.parametrize("branches", [1, 3])
def test_padding_values_do_not_leak(pad, branches):
    pool = make_pool(branches=branches)
    x, mask = bags()
    with torch.no_grad():
        clean_z, clean_a, clean_s = pool.attend(x.masked_fill(~mask[..., None], 0.0), mask)
        z, a, s = pool.attend(x.masked_fill(~mask[..., None], pad), mask)
    real = mask[:, None, :].expand_as(a)
    assert torch.equal(a, clean_a) and (a[~real] == 0).all()  # the attention never sees padded values
    assert torch.equal(s[real], clean_s[real])  # nor do the scores of real instances
    if math.isfinite(pad):  # the pooled vector reads padded rows with weight 0: finite ones add nothing
        torch.testing.assert_close(z, clean_z, rtol=0, atol=0)
    for i in range(x.shape[0]):  # and every bag equals itself unpadded
        k = int(mask[i].sum())
        with torch.no_grad():
            alone_z, alone_a, _ = pool.attend(x[i:i + 1, :k])
        torch.testing.assert_close(a[i, :, :k], alone_a[0], rtol=1e-6, atol=1e-7)
        if math.isfinite(pad):
            torch.testing.assert_close(z[i], alone_z[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 2, 4, 8])
@pytest.mark.parametrize("kwargs", [dict(gated=False), dict(gated=True), dict(branches=3, dropout=0.25),
                                    dict(norm=RMSNorm(D))], ids=["plain", "gated", "branches", "norm"])
def test_chunked_equals_unchunked(chunk, kwargs):
    pool = make_pool(**kwargs)
    x, mask = bags()
    seen = []
    pool.attn_v.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[1]))
    with torch.no_grad():
        whole = pool.attend(x, mask)
        assert seen == [9]
        seen.clear()
        chunked = pool.attend(x, mask, chunk=chunk)
        assert seen == [min(chunk, 9 - start) for start in range(0, 9, chunk)]  # scored chunk by chunk
    for u, v in zip(whole, chunked):  # position-wise layers: the same numbers (up to BLAS blocking)
        torch.testing.assert_close(v, u, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(pool(x, mask, chunk=chunk), pool(x, mask), rtol=1e-6, atol=1e-7)


def test_dropout_in_branches_only_in_training_and_zero_draws_nothing():
    x, mask = bags()
    drop = make_pool(branches=2, dropout=0.5)
    none = make_pool(branches=2)
    assert drop.drop.p == 0.5
    with torch.no_grad():
        assert torch.equal(drop.eval()(x, mask)[1], none(x, mask)[1])  # eval: no dropout
        drop.train()
        assert not torch.equal(drop(x, mask)[1], drop(x, mask)[1])  # training: a fresh mask each call
        none.train()
        state = torch.get_rng_state()
        none(x, mask)
        assert torch.equal(torch.get_rng_state(), state)  # dropout 0 draws no random number


def test_parameter_names_and_creation_order():
    def layout(pool):
        return [(k, tuple(v.shape)) for k, v in pool.state_dict().items()]

    assert layout(AttentionPool(D, A, gated=False)) == [
        ("attn_v.weight", (A, D)), ("attn_v.bias", (A,)), ("attn_w.weight", (1, A)), ("attn_w.bias", (1,))]
    assert layout(AttentionPool(D, A, branches=3)) == [
        ("attn_v.weight", (A, D)), ("attn_v.bias", (A,)), ("attn_u.weight", (A, D)), ("attn_u.bias", (A,)),
        ("attn_w.weight", (3, A)), ("attn_w.bias", (3,))]
    assert layout(AttentionPool(D, A, norm=RMSNorm(D)))[0] == ("norm.weight", (D,))
    assert isinstance(AttentionPool(D, A).norm, torch.nn.Identity) and AttentionPool(D, A, gated=False).attn_u is None
    assert [k for k, _ in InstanceEmbed(5, D).state_dict().items()] == ["proj.weight", "proj.bias"]
    assert [k for k, _ in InstanceEmbed(5, D, bias=False).state_dict().items()] == ["proj.weight"]
    assert [k for k, _ in ClassifierHead(D, 3, 2).state_dict().items()] == [
        "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]


def test_instance_embed_and_classifier_head_formulas():
    torch.manual_seed(0)
    embed, head = InstanceEmbed(5, D, dropout=0.3).eval(), ClassifierHead(D, 3, 2, dropout=0.3).eval()
    x = torch.randn(2, 7, 5)
    with torch.no_grad():
        h = embed(x)
        torch.testing.assert_close(h, torch.relu(x @ embed.proj.weight.T + embed.proj.bias))
        logits = head(h[:, 0])
        hidden = torch.relu(h[:, 0] @ head.fc1.weight.T + head.fc1.bias)
        torch.testing.assert_close(logits, hidden @ head.fc2.weight.T + head.fc2.bias)
        embed.train()
        assert (embed(x) == 0).float().mean() > (h == 0).float().mean()  # dropout after the ReLU in training
    assert h.shape == (2, 7, D) and logits.shape == (2, 2)


# ------------------------------------------------------------------------------------------------
# Config fields: out-of-range values are errors that name the key, for every architecture.

BAD_VALUES = {
    "abmil": dict(dim=0, attn_dim=0, dropout=1.0),
    "pooling_mil": dict(dim=0, dropout=-0.1),
    "clam": dict(dim=0, attn_dim=0, dropout=1.0, k_sample=0, inst_weight=-1.0),
    "acmil": dict(dim=0, attn_dim=0, n_token=0, n_masked_patch=-1, mask_drop=1.0, dropout=-0.1,
                  branch_loss_weight=float("nan"), diversity_weight=-1.0),
    "dtfd_mil": dict(dim=0, attn_dim=0, num_groups=0, distill_k=0, res_layers=-1, dropout=1.0, dropout_tier2=1.0,
                     tier1_loss_weight=float("inf")),
    "dsmil": dict(embed_dim=0, q_dim=0, dropout=1.0, dropout_v=-0.5, instance_loss_weight=-1.0),
    "transmil": dict(dim=0, heads=0, dim_head=0, num_landmarks=0, pinv_iterations=-1, residual_kernel=32,
                     dropout=1.0),
    "qgmil": dict(dim=0, depth=0, heads=0, kv_heads=0, head_dim=0, dropout=1.0, attn_dropout=-0.1),
}
GOOD_EDGES = {  # the other side of each boundary is accepted
    "acmil": dict(n_masked_patch=0, mask_drop=0.0, diversity_weight=0.0),
    "dtfd_mil": dict(res_layers=0, tier1_loss_weight=0.0),
    "transmil": dict(pinv_iterations=0, residual_kernel=1),
    "clam": dict(inst_weight=0.0, k_sample=1),
    "abmil": dict(dim=1, dropout=0.0),
}
CASES = [(arch, key, value) for arch, bad in BAD_VALUES.items()
         for key, value in {"in_dim": 0, "num_classes": 0, **bad}.items()]


def config_class(arch: str):
    return qgmil.models.registry.architecture(arch).Config


def test_every_architecture_has_its_bad_values():
    assert set(BAD_VALUES) == {model_entry(name).arch.arch for name in qgmil.list_models()}


@pytest.mark.parametrize("arch, key, value", CASES, ids=[f"{a}-{k}" for a, k, _ in CASES])
def test_config_rejects_out_of_range_values_naming_the_key(arch, key, value):
    fields = {"in_dim": 8, "num_classes": 2, key: value}
    with pytest.raises(ValidationError) as err:
        config_class(arch)(**fields)
    assert [e["loc"] for e in err.value.errors()] == [(key,)]
    assert isinstance(err.value, ValueError) and f"\n{key}\n" in str(err.value)
    if key not in ("in_dim", "num_classes"):  # the registry's message names the key too
        name = next(n for n in qgmil.list_models() if model_entry(n).arch.arch == arch)
        with pytest.raises(ValueError, match=rf"^{key}: "):
            check_model(name, {key: value})
    cfg = config_class(arch)(in_dim=8, num_classes=2)  # validate_assignment: the same check on assignment
    with pytest.raises(ValidationError, match=key):
        setattr(cfg, key, value)


@pytest.mark.parametrize("arch", sorted(GOOD_EDGES))
def test_config_accepts_the_boundary_values(arch):
    cfg = config_class(arch)(in_dim=1, num_classes=2, **GOOD_EDGES[arch])
    assert all(getattr(cfg, k) == v for k, v in GOOD_EDGES[arch].items())
