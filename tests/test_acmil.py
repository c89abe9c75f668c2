"""ACMIL (Zhang et al. 2024): torchmil has no ACMIL, so the official ACMIL_GA forward pass and training
loss are re-derived here with plain tensor ops (one bag at a time, as the official code runs), and the
defining properties are tested: multiple branch attention, STKIM, the diversity loss."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import qgmil
from qgmil.data import pad_bags
from qgmil.models.acmil import ACMIL, ACMILConfig, diversity_loss, stkim_mask

SMALL = dict(in_dim=12, num_classes=3, dim=16, attn_dim=8)


def build(seed=0, **overrides) -> ACMIL:
    torch.manual_seed(seed)
    return ACMIL(ACMILConfig(**{**SMALL, **overrides}))


def padded(sizes=(30, 4, 12, 1), seed=1, pad_value=0.0):
    g = torch.Generator().manual_seed(seed)
    return pad_bags([torch.randn(n, SMALL["in_dim"], generator=g) for n in sizes], pad_value=pad_value)


def official_forward(model: ACMIL, bag: torch.Tensor, train: bool = False):
    """The official ACMIL_GA forward on one bag (n, in_dim) of real instances, in float64.

    Returns branch logits (T, C), slide logits (C,), the attention logits after STKIM (T, n) and the
    branch-pooled features. In training, STKIM draws exactly as the official code: torch.rand(T, K),
    argsort, the first int(K * mask_drop) of the top-K indices masked (K = min(n_masked_patch, n)).
    """
    cfg = model.config
    p = {k: v.detach().double() for k, v in model.state_dict().items()}
    h = torch.relu(bag.double() @ p["embed.0.weight"].T)  # DimReduction: Linear without bias, ReLU
    gate = torch.tanh(h @ p["pool.attn_v.weight"].T + p["pool.attn_v.bias"]) * torch.sigmoid(
        h @ p["pool.attn_u.weight"].T + p["pool.attn_u.bias"]
    )
    a = (gate @ p["pool.attn_w.weight"].T + p["pool.attn_w.bias"]).T  # (T, n)
    if train and cfg.n_masked_patch > 0:
        t, n = a.shape
        k = min(cfg.n_masked_patch, n)
        top = torch.topk(a, k, dim=-1).indices
        picked = torch.argsort(torch.rand(t, k), dim=-1)[:, : int(k * cfg.mask_drop)]
        drop = torch.ones(t, n)
        drop.scatter_(-1, top[torch.arange(t)[:, None], picked], 0)
        a = a.masked_fill(drop == 0, -1e9)
    soft = torch.softmax(a, dim=1)
    branch_feats = soft @ h  # (T, dim)
    branch = torch.stack([
        branch_feats[k] @ p[f"branch_heads.{k}.weight"].T + p[f"branch_heads.{k}.bias"]
        for k in range(len(model.branch_heads))
    ]) if len(model.branch_heads) else None
    bag_feat = soft.mean(0) @ h
    slide = bag_feat @ p["head.weight"].T + p["head.bias"]
    return branch, slide, a, bag_feat


def official_loss_terms(branch, slide, a, label: int, n_token: int):
    """Step3_WSI_classification_ACMIL.py, train_one_epoch, for one bag: (slide CE, branch CE, diversity)."""
    labels = torch.tensor([label])
    loss1 = F.cross_entropy(slide[None], labels)
    loss0 = F.cross_entropy(branch, labels.repeat_interleave(n_token)) if n_token > 1 else torch.tensor(0.0)
    attn = torch.softmax(a[None], dim=-1)
    diff = torch.tensor(0.0, dtype=torch.float64)
    for i in range(n_token):
        for j in range(i + 1, n_token):
            diff = diff + F.cosine_similarity(attn[:, i], attn[:, j], dim=-1).mean() / (n_token * (n_token - 1) / 2)
    return loss1, loss0, diff


@pytest.mark.parametrize("pad_value", [0.0, float("nan")])
def test_eval_matches_official_forward_per_bag(pad_value):
    model = build().eval()
    x, mask = padded(pad_value=pad_value)
    with torch.no_grad():
        out = model(x, mask)
    assert out.aux_losses == {}
    assert out.branch_attention.shape == (4, 5, 30)
    for i in range(x.shape[0]):
        n = int(mask[i].sum())
        _, slide, a, bag_feat = official_forward(model, x[i, :n])
        soft = torch.softmax(a, dim=1)
        torch.testing.assert_close(out.logits[i].double(), slide, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.branch_attention[i, :, :n].double(), soft, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(out.attention[i, :n].double(), soft.mean(0), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(out.embedding[i].double(), bag_feat, rtol=1e-5, atol=1e-6)
        assert (out.branch_attention[i, :, n:] == 0).all() and (out.attention[i, n:] == 0).all()


def test_attention_is_the_branch_mean_and_pools_the_embedding():
    model = build().eval()
    x, mask = padded()
    with torch.no_grad():
        out = model(x, mask)
        h = model.embed(x.masked_fill(~mask[..., None], 0))
        branch_feats = torch.bmm(out.branch_attention, h)  # (B, T, dim)
    torch.testing.assert_close(out.attention, out.branch_attention.mean(1))
    # The bag prediction: the bag classifier on the mean of the branch-pooled features.
    torch.testing.assert_close(out.embedding, branch_feats.mean(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logits, model.head(branch_feats.mean(1)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [40, 10])
def test_training_masks_and_losses_match_official_under_the_same_seed(n):
    """One bag of n >= K instances: the same random draws as the official code, so the same STKIM
    masks, and the aux losses equal the official loss terms (bag CE excluded: the trainer adds it)."""
    model = build().train()
    bag = torch.randn(n, SMALL["in_dim"], generator=torch.Generator().manual_seed(5))
    torch.manual_seed(11)
    out = model(bag, labels=torch.tensor([2]))
    torch.manual_seed(11)
    branch, slide, a, bag_feat = official_forward(model, bag, train=True)
    torch.testing.assert_close(out.branch_attention[0].double(), torch.softmax(a, dim=1), rtol=1e-5, atol=1e-7)
    assert ((out.branch_attention[0] == 0).sum(-1) == 6).all()  # int(10 * 0.6) masked in every branch
    torch.testing.assert_close(out.logits[0].double(), slide, rtol=1e-5, atol=1e-6)
    loss1, loss0, diff = official_loss_terms(branch, slide, a, 2, model.config.n_token)
    assert set(out.aux_losses) == {"branch_ce", "diversity"}
    torch.testing.assert_close(out.aux_losses["branch_ce"].double(), loss0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.aux_losses["diversity"].double(), diff, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(F.cross_entropy(out.logits, torch.tensor([2])).double(), loss1, rtol=1e-5, atol=1e-6)


def test_every_branch_sums_to_one_over_real_instances_and_is_zero_on_padding():
    model = build()
    x, mask = padded()
    for train in (True, False):
        model.train(train)
        torch.manual_seed(3)
        out = model(x, mask, labels=torch.tensor([0, 1, 2, 0]))
        torch.testing.assert_close(out.branch_attention.sum(-1), torch.ones(4, 5))
        torch.testing.assert_close(out.attention.sum(-1), torch.ones(4))
        assert (out.branch_attention.permute(0, 2, 1)[~mask] == 0).all()
        assert (out.attention[~mask] == 0).all()
        assert (out.branch_attention >= 0).all()


@pytest.mark.parametrize("k,drop", [(10, 0.6), (5, 0.6), (3, 0.5), (50, 0.3)])
def test_stkim_masks_only_real_instances_among_the_top_k_in_training(k, drop):
    model = build(n_masked_patch=k, mask_drop=drop).train()
    x, mask = padded(sizes=(30, 4, 12, 1, 2, 9))
    n_real = mask.sum(1)
    with torch.no_grad():
        h = model.embed(x.masked_fill(~mask[..., None], 0))
        scores = model.scores(h, mask)  # (B, T, N) before STKIM, -inf on padding
    seen_masked = torch.zeros_like(scores, dtype=torch.bool)
    for seed in range(30):
        torch.manual_seed(seed)
        out = model(x, mask)
        masked = (out.branch_attention == 0) & mask[:, None, :]  # real instances given no attention
        seen_masked |= masked
        for b in range(x.shape[0]):
            n = int(n_real[b])
            k_b = min(k, n)
            expected = math.floor(k_b * drop)
            assert (masked[b].sum(-1) == expected).all(), (b, masked[b].sum(-1), expected)
            top = scores[b].topk(k_b, dim=-1).indices  # (T, k_b) among real instances
            in_top = torch.zeros(scores.shape[1:], dtype=torch.bool).scatter(-1, top, True)
            assert not (masked[b] & ~in_top).any(), "STKIM masked an instance outside the top-k"
            assert (out.branch_attention[b, :, n:] == 0).all()
    # Random: over many draws more of the top-k get masked than one draw masks.
    assert (seen_masked[0].sum(-1) > math.floor(min(k, 30) * drop)).all()
    # In eval nothing is masked: every real instance keeps a positive weight in every branch.
    model.eval()
    with torch.no_grad():
        clean = model(x, mask).branch_attention
    assert ((clean > 0) == mask[:, None, :]).all()


def test_stkim_never_selects_padding_even_with_the_highest_padded_scores():
    """Padding scores are -inf before the top-K, however large the logits would have been there."""
    scores = torch.randn(3, 2, 8)
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[0, :8], mask[1, :3], mask[2, :5] = True, True, True
    scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    for seed in range(20):
        torch.manual_seed(seed)
        dropped = stkim_mask(scores, mask.sum(1), k=10, mask_drop=0.6)
        assert not (dropped & ~mask[:, None, :]).any()
        assert dropped.sum(-1).tolist() == [[4, 4], [1, 1], [3, 3]]  # floor(min(10, n) * 0.6)
    assert stkim_mask(scores, mask.sum(1), k=0, mask_drop=0.6) is None
    assert stkim_mask(scores[1:2], mask[1:2].sum(1), k=1, mask_drop=0.6) is None  # floor(1 * 0.6) = 0


def test_eval_is_deterministic_and_never_masks():
    model = build().eval()
    x, mask = padded()
    with torch.no_grad():
        torch.manual_seed(0)
        first = model(x, mask)
        torch.manual_seed(123)
        second = model(x, mask, labels=torch.tensor([0, 1, 2, 0]))
    torch.testing.assert_close(first.logits, second.logits, rtol=0, atol=0)
    torch.testing.assert_close(first.branch_attention, second.branch_attention, rtol=0, atol=0)
    assert ((first.branch_attention > 0) == mask[:, None, :]).all()
    # Training draws differ from seed to seed.
    model.train()
    torch.manual_seed(0)
    a = model(x, mask).branch_attention
    torch.manual_seed(1)
    b = model(x, mask).branch_attention
    assert not torch.equal(a, b)
    # Without STKIM, training and eval compute the same thing (no dropout by default).
    plain = build(n_masked_patch=0)
    with torch.no_grad():
        torch.testing.assert_close(plain.train()(x, mask).logits, plain.eval()(x, mask).logits, rtol=0, atol=0)


def test_diversity_loss_is_zero_for_disjoint_branches_and_maximal_for_identical_ones():
    n, t = 20, 5
    # Disjoint supports: branch k attends only to instances 4k..4k+3 (any weights there).
    disjoint = torch.zeros(2, t, n)
    for k in range(t):
        disjoint[:, k, 4 * k: 4 * k + 4] = torch.rand(2, 4) + 0.1
    disjoint = disjoint / disjoint.sum(-1, keepdim=True)
    assert diversity_loss(disjoint) == 0
    same = torch.rand(3, 1, n).softmax(-1).expand(3, t, n)
    torch.testing.assert_close(diversity_loss(same), torch.tensor(1.0))
    # In between for anything else, and never above identical branches (non-negative attentions).
    for seed in range(10):
        a = torch.randn(4, t, n, generator=torch.Generator().manual_seed(seed)).mul(3).softmax(-1)
        value = diversity_loss(a)
        assert 0 < value < 1
        # The official formula: pairwise cosine similarity, mean over bags, divided by the pair count.
        official = sum(
            F.cosine_similarity(a[:, i], a[:, j], dim=-1).mean() / (t * (t - 1) / 2)
            for i, j in itertools.combinations(range(t), 2)
        )
        torch.testing.assert_close(value, official)
    assert diversity_loss(torch.rand(2, 1, n).softmax(-1)) == 0  # one branch: no pair


def test_auxiliary_losses_composition_and_weights():
    x, mask = padded()
    labels = torch.tensor([0, 1, 2, 0])
    model = build()
    torch.manual_seed(0)
    out = model.train()(x, mask, labels=labels)
    # Branch CE: the mean over branches (and bags) of each branch head's CE on its own pooled features.
    h = model.embed(x.masked_fill(~mask[..., None], 0))
    feats = torch.bmm(out.branch_attention, h)
    per_branch = [F.cross_entropy(head(feats[:, k]), labels) for k, head in enumerate(model.branch_heads)]
    torch.testing.assert_close(out.aux_losses["branch_ce"], torch.stack(per_branch).mean())
    torch.testing.assert_close(out.aux_losses["diversity"], diversity_loss(out.branch_attention))
    weighted = build(branch_loss_weight=0.5, diversity_weight=2.0)
    torch.manual_seed(0)
    out2 = weighted.train()(x, mask, labels=labels)
    torch.testing.assert_close(out2.aux_losses["branch_ce"], 0.5 * out.aux_losses["branch_ce"])
    torch.testing.assert_close(out2.aux_losses["diversity"], 2.0 * out.aux_losses["diversity"])
    # No labels (the tasks other than classification): the diversity term alone; eval mode: no auxiliary loss.
    torch.manual_seed(0)
    unlabelled = model(x, mask).aux_losses
    assert list(unlabelled) == ["diversity"]
    torch.testing.assert_close(unlabelled["diversity"], out.aux_losses["diversity"])
    assert model.eval()(x, mask, labels=labels).aux_losses == {}


def test_single_branch_has_no_branch_head_nor_auxiliary_loss():
    """n_token = 1 is gated ABMIL with STKIM: the official script drops the branch and diversity losses."""
    model = build(n_token=1).train()
    assert len(model.branch_heads) == 0
    x, mask = padded()
    out = model(x, mask, labels=torch.tensor([0, 1, 2, 0]))
    assert out.aux_losses == {}
    assert out.branch_attention.shape == (4, 1, 30)
    torch.testing.assert_close(out.attention, out.branch_attention[:, 0])


def test_binary_single_logit_branch_loss():
    model = build(num_classes=1).train()
    x, mask = padded()
    labels = torch.tensor([0, 1, 1, 0])
    torch.manual_seed(0)
    out = model(x, mask, labels=labels)
    assert out.logits.shape == (4, 1)
    h = model.embed(x.masked_fill(~mask[..., None], 0))
    feats = torch.bmm(out.branch_attention, h)
    expected = torch.stack([
        F.binary_cross_entropy_with_logits(head(feats[:, k])[:, 0], labels.float())
        for k, head in enumerate(model.branch_heads)
    ]).mean()
    torch.testing.assert_close(out.aux_losses["branch_ce"], expected)


def test_preset_defaults_and_config_validation():
    model = qgmil.create_model("acmil", in_dim=1024, num_classes=2)
    cfg = model.config
    assert model.arch == "acmil" and model.name == "acmil"
    assert (cfg.dim, cfg.attn_dim, cfg.n_token, cfg.n_masked_patch, cfg.mask_drop) == (512, 128, 5, 10, 0.6)
    assert (cfg.branch_loss_weight, cfg.diversity_weight, cfg.dropout) == (1.0, 1.0, 0.0)
    assert model.embed[0].bias is None and model.embed[0].out_features == 512  # official DimReduction
    assert model.pool.attn_w.out_features == 5 and len(model.branch_heads) == 5
    assert model.pool.attn_v.out_features == 128 and model.head.in_features == 512
    for bad in (dict(n_token=0), dict(mask_drop=1.0), dict(n_masked_patch=-1), dict(diversity_weight=-1.0),
                dict(dropout=-0.1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ACMILConfig(in_dim=8, num_classes=2, **bad)
    with pytest.raises(ValueError, match="not_a_field"):
        qgmil.create_model("acmil", in_dim=8, num_classes=2, not_a_field=1)


def test_inference_runs_in_chunks_and_bf16_autocast():
    model = build().eval()
    model.inference_chunk = 7
    seen = []
    model.embed.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[1]))
    x, mask = padded(sizes=(30, 12))
    with torch.no_grad():
        chunked = model(x, mask)
        model.inference_chunk = None
        full = model(x, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, mask)
    assert seen[:5] == [7, 7, 7, 7, 2]
    torch.testing.assert_close(chunked.logits, full.logits, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(low.logits).all() and (low.branch_attention.permute(0, 2, 1)[~mask] == 0).all()
    torch.testing.assert_close(low.branch_attention.float().sum(-1), torch.ones(2, 5), atol=2e-2, rtol=0)
    torch.testing.assert_close(low.logits.float(), full.logits, atol=5e-2, rtol=5e-2)
