"""DSMIL (Li et al. 2021) and DTFD-MIL (Zhang et al. 2022).

The official forward passes (dsmil-wsi dsmil.py + train_tcga.py; DTFD-MIL Main_DTFD_MIL.py) are
re-derived here with plain float64 tensor ops, one bag at a time as the official code runs, and our
batched, padded models must match them. torchmil implements both; with identical weights our models
match it wherever the two define the same computation, and the documented differences are pinned.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import qgmil
from qgmil.data import pad_bags
from qgmil.models.dsmil import DSMIL, DSMILConfig
from qgmil.models.dtfd import DTFDMIL, DTFDConfig

IN_DIM = 12


def bags_of(sizes, seed=1, dim=IN_DIM):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, dim, generator=g) for n in sizes]


def padded(sizes=(30, 4, 12, 1), seed=1, pad_value=0.0):
    return pad_bags(bags_of(sizes, seed), pad_value=pad_value)


def state64(model):
    return {k: v.detach().double() for k, v in model.state_dict().items()}


def gated_score(p, prefix, h):
    """Gated attention logits w^T (tanh(V h) * sigmoid(U h)) + c, (n, D) -> (n,)."""
    gate = torch.tanh(h @ p[f"{prefix}.attn_v.weight"].T + p[f"{prefix}.attn_v.bias"]) * torch.sigmoid(
        h @ p[f"{prefix}.attn_u.weight"].T + p[f"{prefix}.attn_u.bias"]
    )
    return (gate @ p[f"{prefix}.attn_w.weight"].T + p[f"{prefix}.attn_w.bias"])[:, 0]


# =============================================================================================== DSMIL


def build_dsmil(seed=0, **overrides) -> DSMIL:
    torch.manual_seed(seed)
    return DSMIL(DSMILConfig(**{"in_dim": IN_DIM, "num_classes": 3, "embed_dim": 16, "q_dim": 8, **overrides}))


def official_dsmil(model: DSMIL, bag: torch.Tensor):
    """dsmil.py FCLayer + BClassifier + MILNet on one bag (n, in_dim) of real instances, in float64.

    Returns instance logits (n, C), bag logits (C,), attention A (n, C), class embeddings B (C, D).
    """
    cfg, p = model.config, state64(model)
    feats = bag.double()
    if cfg.embed_dim is not None:
        feats = torch.relu(feats @ p["embed.0.weight"].T + p["embed.0.bias"])
    classes = feats @ p["instance_head.weight"].T + p["instance_head.bias"]  # i_classifier: N x C

    def q(f):
        if cfg.nonlinear_q:
            return torch.tanh(torch.relu(f @ p["q.0.weight"].T + p["q.0.bias"]) @ p["q.2.weight"].T + p["q.2.bias"])
        return f @ p["q.weight"].T + p["q.bias"]

    V = torch.relu(feats @ p["v.1.weight"].T + p["v.1.bias"]) if cfg.passing_v else feats
    Q = q(feats)
    _, m_indices = torch.sort(classes, 0, descending=True)
    q_max = q(feats[m_indices[0, :]])  # queries of the critical instances, C x Q
    A = torch.softmax(Q @ q_max.T / math.sqrt(Q.shape[1]), 0)  # N x C
    B = A.T @ V  # C x V
    C = torch.einsum("kcd,cd->k", p["fcc.weight"], B) + p["fcc.bias"]  # Conv1d(C, C, kernel_size=V)
    return classes, C, A, B


def test_dsmil_without_class_labels_trains_its_instance_classifier_through_the_mean_logit():
    """The max stream picks the critical instances; only its CE trains it, which needs class labels. Trained on
    `logits` alone (another task's loss), train_combine="mean_logit" gives it a gradient, "bag" none."""
    x, mask = padded()
    grads = {}
    for combine in ("bag", "mean_logit"):
        model = build_dsmil(num_classes=1, train_combine=combine).train()
        out = model(x, mask)  # no labels: no max-instance CE
        assert out.aux_losses == {}
        out.logits.sum().backward()
        grads[combine] = model.instance_head.weight.grad
    assert grads["bag"] is None or float(grads["bag"].abs().sum()) == 0
    assert float(grads["mean_logit"].abs().sum()) > 0
    assert DSMIL.without_class_labels == {"train_combine": "mean_logit", "eval_combine": "mean_logit"}
    model = build_dsmil(num_classes=1, train_combine="mean_logit", eval_combine="mean_logit")
    out = model.train()(x, mask)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x, mask).logits, out.logits.detach())  # trained as it predicts


@pytest.mark.parametrize("overrides", [
    {}, {"embed_dim": None}, {"nonlinear_q": False}, {"passing_v": True}, {"num_classes": 2},
    {"embed_dim": None, "passing_v": True},
])
@pytest.mark.parametrize("pad_value", [0.0, float("nan")])
def test_dsmil_eval_matches_official_forward_per_bag(overrides, pad_value):
    x, mask = padded(pad_value=pad_value)
    outs = {}
    for combine in ("bag", "mean_prob", "mean_logit"):
        model = build_dsmil(eval_combine=combine, **overrides).eval()
        with torch.no_grad():
            outs[combine] = model(x, mask)
    c = model.config.num_classes
    for i in range(x.shape[0]):
        n = int(mask[i].sum())
        classes, bag, A, B = official_dsmil(model, x[i, :n])
        max_pred = classes.max(0).values
        tol = dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(outs["bag"].logits[i].double(), bag, **tol)
        # The official average of the two streams' probabilities (softmax over our C classes).
        torch.testing.assert_close(outs["mean_prob"].logits[i].double().softmax(-1),
                                   0.5 * bag.softmax(-1) + 0.5 * max_pred.softmax(-1), **tol)
        torch.testing.assert_close(outs["mean_logit"].logits[i].double(), 0.5 * (bag + max_pred), **tol)
        for out in outs.values():
            assert out.branch_attention.shape == (4, c, 30)
            torch.testing.assert_close(out.branch_attention[i, :, :n].double(), A.T, rtol=1e-5, atol=1e-7)
            assert (out.branch_attention[i, :, n:] == 0).all() and (out.attention[i, n:] == 0).all()
            predicted = int(out.logits[i].argmax())
            torch.testing.assert_close(out.attention[i, :n].double(), A[:, predicted], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(out.embedding[i].double(), B.flatten(), **tol)


def test_dsmil_training_objective_is_the_official_one_rescaled():
    """0.5 * CE(bag) + 0.5 * CE(max) officially; here CE(train logits) + aux with weight 1 (x2)."""
    model = build_dsmil().train()
    x, mask = padded()
    labels = torch.tensor([0, 2, 1, 2])
    out = model(x, mask, labels=labels)
    assert set(out.aux_losses) == {"max_instance_ce"}
    bag_ce, max_ce = [], []
    for i in range(x.shape[0]):
        n = int(mask[i].sum())
        classes, bag, _, _ = official_dsmil(model, x[i, :n])
        torch.testing.assert_close(out.logits[i].double(), bag, rtol=1e-5, atol=1e-6)  # training: bag stream
        bag_ce.append(F.cross_entropy(bag[None], labels[i : i + 1]))
        max_ce.append(F.cross_entropy(classes.max(0).values[None], labels[i : i + 1]))
    official = 0.5 * torch.stack(bag_ce).mean() + 0.5 * torch.stack(max_ce).mean()
    ours = F.cross_entropy(out.logits, labels) + out.aux_losses["max_instance_ce"]
    torch.testing.assert_close(ours.double(), 2 * official, rtol=1e-5, atol=1e-6)
    half = build_dsmil(instance_loss_weight=0.5).train()(x, mask, labels=labels)
    torch.testing.assert_close(half.aux_losses["max_instance_ce"], 0.5 * out.aux_losses["max_instance_ce"])


@pytest.mark.parametrize("embed_dim", [None, 16])
def test_dsmil_padding_is_never_the_critical_instance(embed_dim):
    """Rig the instance classifier so that padded positions (zero features) would score highest."""
    model = build_dsmil(embed_dim=embed_dim).eval()
    with torch.no_grad():
        if embed_dim is not None:
            model.embed[0].weight.abs_()
            model.embed[0].bias.fill_(-0.5)  # padded h = relu(-0.5) = 0
        model.instance_head.weight.fill_(-1.0)
        model.instance_head.bias.fill_(0.0)  # padded logit 0 > every real logit
    items = [b.abs() + 0.1 for b in bags_of((9, 3, 6))]
    x, mask = pad_bags(items)
    with torch.no_grad():
        _, max_logits, critical, attention, _ = model.streams(x, mask)
        assert (critical < mask.sum(1, keepdim=True)).all()
        assert (max_logits < 0).all()
        for i, bag in enumerate(items):
            _, alone_max, alone_crit, alone_att, _ = model.streams(bag[None], None)
            assert torch.equal(critical[i], alone_crit[0])
            torch.testing.assert_close(max_logits[i], alone_max[0])
            torch.testing.assert_close(attention[i, :, : len(bag)], alone_att[0])


def test_dsmil_single_logit_uses_bce_and_the_official_binary_average():
    model = build_dsmil(num_classes=1)
    x, mask = padded()
    labels = torch.tensor([0, 1, 1, 0])
    out = model.train()(x, mask, labels=labels)
    with torch.no_grad():
        logits = model.eval()(x, mask).logits
    for i in range(x.shape[0]):
        n = int(mask[i].sum())
        classes, bag, _, _ = official_dsmil(model, x[i, :n])
        prob = 0.5 * torch.sigmoid(classes.max(0).values) + 0.5 * torch.sigmoid(bag)
        torch.testing.assert_close(torch.sigmoid(logits[i].double()), prob, rtol=1e-5, atol=1e-6)
    _, max_logits, _, _, _ = model.streams(*qgmil.models.base.as_batch(x, mask, IN_DIM))
    expected = F.binary_cross_entropy_with_logits(max_logits[:, 0], labels.float())
    torch.testing.assert_close(out.aux_losses["max_instance_ce"], expected)
    assert out.attention.shape == (4, 30) and out.branch_attention.shape == (4, 1, 30)


def test_dsmil_eval_prediction_combines_streams_and_labels_change_nothing():
    model = build_dsmil().eval()
    x, mask = padded()
    with torch.no_grad():
        a, b = model(x, mask), model(x, mask, labels=torch.tensor([0, 1, 2, 0]))
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    assert not a.aux_losses
    torch.testing.assert_close(a.logits.softmax(-1).sum(-1), torch.ones(4))


# ============================================================================================ DTFD-MIL


def build_dtfd(seed=0, **overrides) -> DTFDMIL:
    torch.manual_seed(seed)
    return DTFDMIL(DTFDConfig(**{"in_dim": IN_DIM, "num_classes": 3, "dim": 16, "attn_dim": 8, **overrides}))


def official_dtfd(model: DTFDMIL, bag: torch.Tensor, chunks: list):
    """Main_DTFD_MIL.py on one bag (n, in_dim) of real instances and a given split (`chunks`: index
    lists, the official `index_chunk_list`), in float64.

    Returns tier-1 logits (M, C), tier-2 logits (C,), the per-instance attention (n,) (tier-1 attention
    within the pseudo-bag times the pseudo-bag's tier-2 attention mass) and the tier-2 pooled vector.
    """
    cfg, p = model.config, state64(model)
    feat = torch.relu(bag.double() @ p["embed.proj.weight"].T)  # DimReduction: Linear(bias=False), ReLU
    for r in range(cfg.res_layers):
        inner = torch.relu(feat @ p[f"embed.res.{r}.block.0.weight"].T)
        feat = feat + torch.relu(inner @ p[f"embed.res.{r}.block.2.weight"].T)
    k = cfg.distill_k  # official instance_per_group = total_instance // numGroup
    sub_preds, pseudo_feats, owner, tier1_att = [], [], [], {}
    for g, tindex in enumerate(chunks):
        idx = torch.as_tensor(tindex, dtype=torch.long)
        tmid = feat[idx]
        tAA = torch.softmax(gated_score(p, "tier1", tmid), 0)
        tier1_att.update({int(i): float(a) for i, a in zip(idx, tAA)})
        tatt_feats = tmid * tAA[:, None]
        tatt_feat = tatt_feats.sum(0, keepdim=True)
        sub_preds.append(tatt_feat @ p["tier1_head.fc.weight"].T + p["tier1_head.fc.bias"])
        cam = torch.einsum("nf,cf->cn", tatt_feats, p["tier1_head.fc.weight"]).T  # get_cam_1d: n x cls
        cam_prob = torch.sigmoid(cam[:, 0]) if cam.shape[1] == 1 else torch.softmax(cam, 1)[:, -1]
        _, sort_idx = torch.sort(cam_prob, descending=True)
        if cfg.distill == "afs":
            picked = [tatt_feat]
        elif cfg.distill == "maxs":
            picked = [tmid[sort_idx[:k]]]
        else:
            picked = [tmid[torch.cat([sort_idx[:k], sort_idx[-k:]])]]
        pseudo_feats += picked
        owner += [g] * picked[0].shape[0]
    D = torch.cat(pseudo_feats)
    beta = torch.softmax(gated_score(p, "pool", D), 0)  # Attention_with_Classifier
    afeat = beta @ D
    pred = afeat @ p["head.fc.weight"].T + p["head.fc.bias"]
    mass = torch.zeros(len(chunks), dtype=torch.float64).index_add_(0, torch.as_tensor(owner), beta)
    attention = torch.zeros(len(bag), dtype=torch.float64)
    for g, tindex in enumerate(chunks):
        for i in tindex:
            attention[i] = tier1_att[int(i)] * mass[g]
    return torch.cat(sub_preds), pred, attention, afeat


def random_chunks(n, groups, seed):
    """The official split: shuffle, np.array_split into numGroup chunks (min(numGroup, n) here)."""
    perm = np.random.default_rng(seed).permutation(n)
    return [c.tolist() for c in np.array_split(perm, min(groups, n))]


def as_ids(chunk_lists, width):
    ids = torch.full((len(chunk_lists), width), -1, dtype=torch.long)
    for b, chunks in enumerate(chunk_lists):
        for g, c in enumerate(chunks):
            ids[b, c] = g
    return ids


DTFD_VARIANTS = [
    {}, {"distill": "maxs"}, {"distill": "maxmins"}, {"distill": "maxmins", "distill_k": 2},
    {"distill": "maxs", "num_classes": 2}, {"num_classes": 1, "distill": "maxs"}, {"res_layers": 1},
    {"num_groups": 7},
]


@pytest.mark.parametrize("overrides", DTFD_VARIANTS)
@pytest.mark.parametrize("pad_value", [0.0, float("nan")])
def test_dtfd_matches_official_forward_for_a_given_split(overrides, pad_value):
    model = build_dtfd(**overrides).eval()
    sizes = (30, 4, 12, 1)
    x, mask = padded(sizes, pad_value=pad_value)
    chunks = [random_chunks(n, model.config.num_groups, seed=i) for i, n in enumerate(sizes)]
    with torch.no_grad():
        out = model(x, mask, pseudo_bags=as_ids(chunks, 30))
    torch.testing.assert_close(out.attention.sum(-1), torch.ones(4))
    for i, n in enumerate(sizes):
        _, pred, attention, afeat = official_dtfd(model, x[i, :n], chunks[i])
        torch.testing.assert_close(out.logits[i].double(), pred, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.embedding[i].double(), afeat, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.attention[i, :n].double(), attention, rtol=1e-5, atol=1e-7)
        assert (out.attention[i, n:] == 0).all()


@pytest.mark.parametrize("overrides", [{}, {"distill": "maxmins"}, {"num_groups": 3}])
def test_dtfd_eval_split_is_attention_ranked_round_robin(overrides):
    """Eval: real instances ranked by tier-1 attention logit, rank r to pseudo-bag r mod min(M, n)."""
    model = build_dtfd(**overrides).eval()
    sizes = (30, 4, 12, 1)
    x, mask = padded(sizes, pad_value=float("inf"))
    p = state64(model)
    with torch.no_grad():
        out = model(x, mask)
        again = model(x, mask)
    torch.testing.assert_close(out.logits, again.logits, rtol=0, atol=0)
    for i, n in enumerate(sizes):
        feat = torch.relu(x[i, :n].double() @ p["embed.proj.weight"].T)
        order = torch.argsort(gated_score(p, "tier1", feat), descending=True).tolist()
        m = min(model.config.num_groups, n)
        chunks = [order[g::m] for g in range(m)]
        _, pred, attention, _ = official_dtfd(model, x[i, :n], chunks)
        torch.testing.assert_close(out.logits[i].double(), pred, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.attention[i, :n].double(), attention, rtol=1e-5, atol=1e-7)


def test_dtfd_training_split_is_random_balanced_and_only_over_real_instances():
    model = build_dtfd(num_groups=4).train()
    x, mask = padded((30, 4, 12, 1, 3, 9))
    scores = torch.randn(mask.shape)
    seen = []
    for seed in range(5):
        torch.manual_seed(seed)
        groups = model.split(scores, mask)
        torch.manual_seed(seed)
        assert torch.equal(groups, model.split(scores, mask))  # reproducible under a seed
        assert (groups[~mask] == -1).all()
        for b, n in enumerate(mask.sum(1).tolist()):
            sizes = torch.bincount(groups[b, :n], minlength=1)
            assert len(sizes) == min(4, n) and sizes.min() >= 1 and sizes.max() - sizes.min() <= 1
        seen.append(groups)
    assert any(not torch.equal(seen[0], other) for other in seen[1:])  # random from seed to seed
    # Eval never depends on the generator.
    model.eval()
    torch.manual_seed(0)
    first = model.split(scores, mask)
    torch.manual_seed(1)
    assert torch.equal(first, model.split(scores, mask))


def test_dtfd_tier1_loss_is_the_official_loss0_and_logits_the_official_tier2():
    model = build_dtfd(distill="maxmins").train()
    sizes = (30, 4, 12, 1)
    x, mask = padded(sizes)
    labels = torch.tensor([2, 0, 1, 1])
    chunks = [random_chunks(n, 4, seed=10 + i) for i, n in enumerate(sizes)]
    out = model(x, mask, labels=labels, pseudo_bags=as_ids(chunks, 30))
    assert set(out.aux_losses) == {"tier1_ce"}
    loss0 = []
    for i, n in enumerate(sizes):
        sub_preds, pred, _, _ = official_dtfd(model, x[i, :n], chunks[i])
        torch.testing.assert_close(out.logits[i].double(), pred, rtol=1e-5, atol=1e-6)
        loss0.append(F.cross_entropy(sub_preds, labels[i].repeat(len(chunks[i]))))  # official loss0, per slide
    torch.testing.assert_close(out.aux_losses["tier1_ce"].double(), torch.stack(loss0).mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("distill", ["afs", "maxmins"])
def test_dtfd_tier2_loss_trains_tier1_only_without_detach(distill):
    """Officially loss1 never updates tier 1 (its gradients are zeroed before tier 1's next step)."""
    x, mask = padded()
    labels = torch.tensor([2, 0, 1, 1])
    tier1 = ("embed.", "tier1.", "tier1_head.")
    for detach in (True, False):
        model = build_dtfd(distill=distill, detach_tiers=detach).train()
        F.cross_entropy(model(x, mask).logits, labels).backward()
        for name, p in model.named_parameters():
            if name.endswith("attn_w.bias"):
                continue  # softmax-invariant: a zero gradient up to rounding
            reached = p.grad is not None and bool(p.grad.abs().sum() > 0)
            if name.startswith(("pool.attn_v", "pool.attn_u", "pool.attn_w.weight", "head.")):
                assert reached, name
            elif name.startswith(tier1):
                # End to end, the tier-2 loss reaches the embedding and the tier-1 attention (AFS:
                # through z; MaxMinS: through the selected embeddings), never the tier-1 classifier.
                expected = not detach and not name.startswith("tier1_head.") and (
                    distill == "afs" or name.startswith("embed."))
                assert reached == expected, (detach, name)


def test_dtfd_attention_pools_the_embedding_with_afs():
    model = build_dtfd().eval()
    x, mask = padded()
    with torch.no_grad():
        out = model(x, mask)
        h = model.embed(x.masked_fill(~mask[..., None], 0))
    torch.testing.assert_close(out.embedding, torch.bmm(out.attention[:, None], h)[:, 0], rtol=1e-5, atol=1e-6)
    assert out.branch_attention is None


def test_dtfd_given_pseudo_bags_are_checked():
    model = build_dtfd().eval()
    x, mask = padded()
    with pytest.raises(ValueError, match="pseudo_bags must be"):
        model(x, mask, pseudo_bags=torch.zeros(4, 29, dtype=torch.long))
    with pytest.raises(ValueError, match="pseudo_bags must be"):
        model(x, mask, pseudo_bags=torch.zeros(4, 30))
    bad = torch.zeros(4, 30, dtype=torch.long)
    bad[0, 3] = -1
    with pytest.raises(ValueError, match=">= 0 on real instances"):
        model(x, mask, pseudo_bags=bad)
    ids = torch.zeros(4, 30, dtype=torch.long)
    ids[~mask] = -7  # ignored on padding
    with torch.no_grad():
        one = model(x, mask, pseudo_bags=ids)
        plain = build_dtfd(num_groups=1).eval()(x, mask)  # one pseudo-bag: the same partition
    torch.testing.assert_close(one.logits, plain.logits)


# =========================================================================================== torchmil


def test_dsmil_matches_torchmil_with_identical_weights():
    """torchmil's DSMIL is the binary case: our num_classes = 1 model, embedding as its feat_ext."""
    torchmil_models = pytest.importorskip("torchmil.models")
    for overrides in ({}, {"embed_dim": None, "nonlinear_q": False}):
        ours = build_dsmil(num_classes=1, eval_combine="bag", **overrides).eval()
        cfg = ours.config
        feat_ext = ours.embed if ours.embed is not None else torch.nn.Identity()
        ref = torchmil_models.DSMIL(in_shape=(IN_DIM,), att_dim=cfg.q_dim, nonlinear_q=cfg.nonlinear_q,
                                    nonlinear_v=False, feat_ext=feat_ext).eval()
        ref.q_nn.load_state_dict(ours.q.state_dict())
        ref.inst_classifier.load_state_dict(ours.instance_head.state_dict())
        ref.bag_classifier.weight.data.copy_(ours.fcc.weight.view(1, -1))
        ref.bag_classifier.bias.data.copy_(ours.fcc.bias)
        x = torch.stack(bags_of((10, 10, 10)))  # unpadded: torchmil's critical instance may be padding
        with torch.no_grad():
            Y, A, y_inst = ref(x, return_att=True, return_inst_pred=True)
            out = ours(x)
            torch.testing.assert_close(out.logits[:, 0], Y, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(out.branch_attention[:, 0], A[..., 0], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(out.attention, A[..., 0], rtol=1e-5, atol=1e-7)
            ours.config.eval_combine = "mean_logit"  # torchmil's predict: 0.5 * (bag + max) logits
            torch.testing.assert_close(ours(x).logits[:, 0], ref.predict(x), rtol=1e-5, atol=1e-6)
        labels = torch.tensor([1, 0, 1])
        ours.train(), ref.train()
        out = ours(x, labels=labels)
        _, losses = ref.compute_loss(labels, x)
        torch.testing.assert_close(F.binary_cross_entropy_with_logits(out.logits[:, 0], labels.float()),
                                   losses["BCEWithLogitsLoss"])
        torch.testing.assert_close(out.aux_losses["max_instance_ce"], losses["BCEWithLogitsLoss_max"])


def torchmil_dtfd(ours: DTFDMIL, mode: str):
    """torchmil's DTFDMIL with our weights: our embedding as feat_ext, its attention pools gated."""
    torchmil_models = pytest.importorskip("torchmil.models")
    from torchmil.nn import AttentionPool

    cfg = ours.config
    ref = torchmil_models.DTFDMIL(in_shape=(IN_DIM,), att_dim=cfg.attn_dim, n_groups=cfg.num_groups,
                                  distill_mode=mode, feat_ext=ours.embed)
    for name, pool in (("attention_pool", ours.tier1), ("u_attention_pool", ours.pool)):
        gated = AttentionPool(in_dim=cfg.dim, att_dim=cfg.attn_dim, gated=True)
        gated.fc1.module.load_state_dict(pool.attn_v.state_dict())
        gated.fc_gated.module.load_state_dict(pool.attn_u.state_dict())
        gated.fc2.weight.data.copy_(pool.attn_w.weight)  # torchmil has no bias there (softmax-invariant)
        setattr(ref, name, gated)
    ref.classifier.module.load_state_dict(ours.tier1_head.fc.state_dict())
    ref.u_classifier.module.load_state_dict(ours.head.fc.state_dict())
    return ref


def torchmil_split(seed, n, groups):
    """The permutation torchmil's forward draws after np.random.seed(seed), as pseudo-bag ids."""
    np.random.seed(seed)
    index = np.arange(n)
    np.random.shuffle(index)
    return [c.tolist() for c in np.array_split(index, min(groups, n))]


def test_dtfd_afs_matches_torchmil_with_identical_weights_and_split():
    ours = build_dtfd(num_classes=1).eval()
    ref = torchmil_dtfd(ours, "afs").eval()
    x = torch.stack(bags_of((13, 13, 13)))
    chunks = torchmil_split(5, 13, 4)
    ids = as_ids([chunks] * 3, 13)
    with torch.no_grad():
        np.random.seed(5)
        Y = ref(x)
        out = ours(x, pseudo_bags=ids)
    torch.testing.assert_close(out.logits[:, 0], Y, rtol=1e-5, atol=1e-6)
    labels = torch.tensor([1, 0, 1])
    ours.train(), ref.train()
    np.random.seed(5)
    _, losses = ref.compute_loss(labels, x)
    out = ours(x, labels=labels, pseudo_bags=ids)
    # torchmil names the bag loss "_t1" and the pseudo-bag loss "_t2".
    torch.testing.assert_close(F.binary_cross_entropy_with_logits(out.logits[:, 0], labels.float()),
                               losses["BCEWithLogitsLoss_t1"])
    torch.testing.assert_close(out.aux_losses["tier1_ce"], losses["BCEWithLogitsLoss_t2"])


def test_dtfd_torchmil_maxmin_keeps_every_instance():
    """torchmil's "maxmin" takes k = pseudo-bag size (every instance, twice): ours with a large
    distill_k, not the official k = 1."""
    ours = build_dtfd(num_classes=1, distill="maxmins", distill_k=13).eval()
    ref = torchmil_dtfd(ours, "maxmin").eval()
    x = torch.stack(bags_of((13, 13)))
    ids = as_ids([torchmil_split(2, 13, 4)] * 2, 13)
    with torch.no_grad():
        np.random.seed(2)
        Y = ref(x, torch.ones(2, 13, dtype=torch.bool))  # its maxmin path needs a mask
        out = ours(x, pseudo_bags=ids)
        official_k = build_dtfd(num_classes=1, distill="maxmins").eval()(x, pseudo_bags=ids)
    torch.testing.assert_close(out.logits[:, 0], Y, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(official_k.logits[:, 0], Y, rtol=1e-3, atol=1e-4)


# ============================================================================================ registry


@pytest.mark.parametrize("name,arch", [("dsmil", "dsmil"), ("dtfd_mil", "dtfd_mil")])
def test_presets_are_the_documented_defaults(name, arch):
    model = qgmil.create_model(name, in_dim=1024, num_classes=2)
    assert model.arch == arch and model.name == name
    if name == "dsmil":
        cfg = model.config
        assert (cfg.embed_dim, cfg.q_dim, cfg.nonlinear_q, cfg.passing_v, cfg.eval_combine) == (
            None, 128, True, False, "mean_prob")
        assert model.embed is None and model.fcc.weight.shape == (2, 2, 1024)
    else:
        cfg = model.config
        assert (cfg.dim, cfg.attn_dim, cfg.num_groups, cfg.distill, cfg.distill_k, cfg.detach_tiers) == (
            512, 128, 4, "afs", 1, True)
        assert model.embed.proj.bias is None
    with pytest.raises(ValueError, match="eval_combine|distill"):
        qgmil.create_model(name, in_dim=8, num_classes=2, **({"eval_combine": "x"} if name == "dsmil"
                                                                else {"distill": "x"}))
