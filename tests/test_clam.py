"""CLAM-SB and CLAM-MB (Lu et al. 2021): a plain per-bag re-implementation of the official algorithm,
torchmil's CLAM_SB with identical weights, and the defining properties of the multi-branch model and of
the instance-level clustering loss (top-k only over real instances, small bags, subtyping, gradients)."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import qgmil
from qgmil.data import pad_bags
from qgmil.models import clam as clam_module
from qgmil.models.clam import CLAM, CLAMConfig, top_bottom_instances

IN_DIM, DIM, ATTN_DIM = 16, 32, 8
SMALL = dict(in_dim=IN_DIM, dim=DIM, attn_dim=ATTN_DIM, dropout=0.0, k_sample=3)


def build(seed=0, num_classes=3, **overrides) -> CLAM:
    torch.manual_seed(seed)
    return CLAM(CLAMConfig(**{**SMALL, "num_classes": num_classes, **overrides}))


def batch(sizes=(11, 7, 3, 1), pad_value=0.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    items = [torch.randn(n, IN_DIM, generator=g) for n in sizes]
    x, mask = pad_bags(items, pad_value=pad_value)
    return items, x, mask


def reference(model: CLAM, bag: torch.Tensor, label: int | None = None):
    """The official algorithm on one bag of real instances (n, in_dim), plain tensor ops in float64.

    h = ReLU(W x + b); A = attention net (n, K) -> transposed (K, n) -> softmax over n; M = A h;
    SB: logits = classifiers(M_0); MB: logit_c = classifiers[c](M_c). Instance loss (when `label` is
    given) with k = min(k_sample, n // 2), cross-entropy, loops as in the official inst_eval/inst_eval_out.
    """
    cfg = model.config
    p = {k: v.detach().double() for k, v in model.state_dict().items()}
    h = torch.clamp(bag.double() @ p["embed.proj.weight"].T + p["embed.proj.bias"], min=0)
    inner = torch.tanh(h @ p["pool.attn_v.weight"].T + p["pool.attn_v.bias"])
    if cfg.gated:
        inner = inner * torch.sigmoid(h @ p["pool.attn_u.weight"].T + p["pool.attn_u.bias"])
    scores = (inner @ p["pool.attn_w.weight"].T + p["pool.attn_w.bias"]).T  # (K, n)
    attention = torch.softmax(scores, dim=1)
    pooled = attention @ h  # (K, dim)
    if cfg.multi_branch:
        logits = torch.stack([pooled[c] @ p[f"classifiers.{c}.weight"][0] + p[f"classifiers.{c}.bias"][0]
                              for c in range(cfg.num_classes)])
    else:
        logits = pooled[0] @ p["classifiers.weight"].T + p["classifiers.bias"]
    if label is None:
        return logits, attention, pooled, None

    def classify(c, rows):
        return h[rows] @ p[f"instance_classifiers.{c}.weight"].T + p[f"instance_classifiers.{c}.bias"]

    k = min(cfg.k_sample, h.shape[0] // 2)
    if k == 0:
        return logits, attention, pooled, None
    total = 0.0
    for c in range(cfg.num_classes):
        a = attention[c] if cfg.multi_branch else attention[0]
        top, bottom = torch.topk(a, k).indices, torch.topk(-a, k).indices
        if c == label:  # in the class: top k positive, bottom k negative
            inst_logits = torch.cat([classify(c, top), classify(c, bottom)])
            targets = torch.tensor([1] * k + [0] * k)
        elif cfg.subtyping:  # out of the class: top k negative
            inst_logits, targets = classify(c, top), torch.zeros(k, dtype=torch.long)
        else:
            continue
        total = total + F.cross_entropy(inst_logits, targets)
    if cfg.subtyping:
        total = total / cfg.num_classes
    return logits, attention, pooled, total


# ---------------------------------------------------------------------------------------------
# Forward pass and instance loss against the per-bag reference.


@pytest.mark.parametrize("multi_branch", [False, True])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("pad_value", [0.0, float("nan")])
def test_forward_matches_reference(multi_branch, gated, pad_value):
    model = build(multi_branch=multi_branch, gated=gated).eval()
    items, x, mask = batch(pad_value=pad_value)
    with torch.no_grad():
        out = model(x, mask)
    assert out.aux_losses == {}
    for i, bag in enumerate(items):
        n = len(bag)
        logits, attention, pooled, _ = reference(model, bag)
        torch.testing.assert_close(out.logits[i].double(), logits, rtol=1e-5, atol=1e-6)
        shown = int(logits.argmax()) if multi_branch else 0
        torch.testing.assert_close(out.attention[i, :n].double(), attention[shown], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(out.embedding[i].double(), pooled[shown], rtol=1e-5, atol=1e-6)
        assert (out.attention[i, n:] == 0).all()
        if multi_branch:
            torch.testing.assert_close(out.branch_attention[i, :, :n].double(), attention, rtol=1e-5, atol=1e-7)
            assert (out.branch_attention[i, :, n:] == 0).all()
        else:
            assert out.branch_attention is None


@pytest.mark.parametrize("multi_branch", [False, True])
@pytest.mark.parametrize("subtyping", [False, True])
@pytest.mark.parametrize("k_sample", [3, 8])
def test_instance_loss_matches_reference(multi_branch, subtyping, k_sample):
    """Bags of 11, 7, 3 and 1 real instances: k = min(k_sample, n // 2) each, the 1-instance bag skipped;
    the batch's loss is the mean over the other bags, times inst_weight."""
    model = build(multi_branch=multi_branch, subtyping=subtyping, k_sample=k_sample).train()
    items, x, mask = batch(pad_value=float("nan"))
    labels = torch.tensor([2, 0, 1, 1])
    out = model(x, mask, labels=labels)
    losses = [reference(model, bag, int(y))[3] for bag, y in zip(items, labels)]
    assert losses[3] is None  # one real instance: no top/bottom pair
    expected = model.config.inst_weight * torch.stack(losses[:3]).mean()
    assert set(out.aux_losses) == {"instance"}
    torch.testing.assert_close(out.aux_losses["instance"].double(), expected, rtol=1e-5, atol=1e-6)
    # Padding never matters: the batched loss is the mean of the losses of the bags alone.
    alone = [model(bag, labels=y[None]).aux_losses["instance"] for bag, y in zip(items[:3], labels[:3])]
    torch.testing.assert_close(out.aux_losses["instance"], torch.stack(alone).mean(), rtol=1e-5, atol=1e-6)


def test_official_weighting_and_defaults():
    model = qgmil.create_model("clam_sb", in_dim=1024, num_classes=2)
    cfg = model.config
    assert (cfg.dim, cfg.attn_dim, cfg.gated, cfg.dropout, cfg.k_sample, cfg.subtyping) == (512, 256, True, 0.25, 8, False)
    # Official total: 0.7 * bag + 0.3 * instance = 0.7 * (bag + inst_weight * instance).
    assert math.isclose(0.7 * (1.0 + cfg.inst_weight * 2.0), 0.7 * 1.0 + 0.3 * 2.0)
    assert model.embed.proj.out_features == 512 and model.embed.drop.p == 0.25
    assert model.pool.attn_v.out_features == 256 and model.pool.attn_u is not None and model.pool.drop.p == 0.25
    assert model.pool.attn_w.out_features == 1
    assert isinstance(model.classifiers, torch.nn.Linear) and model.classifiers.out_features == 2
    assert [tuple(c.weight.shape) for c in model.instance_classifiers] == [(2, 512), (2, 512)]

    mb = qgmil.create_model("clam_mb", in_dim=1024, num_classes=4)
    assert mb.arch == "clam" and mb.name == "clam_mb" and mb.config.multi_branch
    assert mb.pool.attn_w.out_features == 4
    assert [tuple(c.weight.shape) for c in mb.classifiers] == [(1, 512)] * 4
    assert len(mb.instance_classifiers) == 4
    assert qgmil.create_model("clam_sb", in_dim=8, num_classes=2, gated=False).pool.attn_u is None
    single = qgmil.create_model("clam_mb", in_dim=8, num_classes=1).train()  # one output: a survival risk
    out = single(torch.randn(5, 8), labels=torch.tensor([0]))
    assert out.logits.shape == (1, 1) and out.aux_losses == {}  # no classes: no instance clustering
    with pytest.raises(ValueError, match="inst_weight"):
        CLAMConfig(in_dim=8, num_classes=2, inst_weight=-1)
    with pytest.raises(ValueError, match="k_sample"):
        CLAMConfig(in_dim=8, num_classes=2, k_sample=0)


# ---------------------------------------------------------------------------------------------
# torchmil's CLAM_SB, identical weights.

class _CE(torch.nn.Module):
    """torchmil calls its instance loss as loss(logits (k, 2), targets (k, 1) float): cross-entropy."""

    def forward(self, logits, targets):
        return F.cross_entropy(logits, targets.squeeze(-1).long())


def torchmil_pair(gated: bool, k_sample: int = 3):
    """Our binary CLAM-SB (subtyping on) and torchmil's CLAM_SB with the same weights.

    torchmil's CLAM_SB has no instance embedding (feat_ext gets ours), its attention fc2 has no bias (a
    shift the softmax ignores), and its bag classifier gives one logit (replaced by a 2-logit LazyLinear).
    Its instance loss is SmoothTop1SVM or BCE; it gets cross-entropy here. It always adds the
    out-of-the-class term (our subtyping=True) and sums over bags without the official / C.
    """
    torchmil_models = pytest.importorskip("torchmil.models")
    torchmil_nn = pytest.importorskip("torchmil.nn")
    ours = build(num_classes=2, gated=gated, subtyping=True, k_sample=k_sample)
    feat_ext = torch.nn.Sequential(torch.nn.Linear(IN_DIM, DIM), torch.nn.ReLU())
    theirs = torchmil_models.CLAM_SB(in_shape=(IN_DIM,), att_dim=ATTN_DIM, att_act="tanh", k_sample=k_sample,
                                     gated=gated, feat_ext=feat_ext)
    theirs.classifier = torchmil_nn.LazyLinear(DIM, 2)
    theirs.inst_loss_fn = _CE()
    p = ours.state_dict()
    mapped = {
        "feat_ext.0.weight": p["embed.proj.weight"], "feat_ext.0.bias": p["embed.proj.bias"],
        "pool.fc1.module.weight": p["pool.attn_v.weight"], "pool.fc1.module.bias": p["pool.attn_v.bias"],
        "pool.fc2.weight": p["pool.attn_w.weight"],
        "classifier.module.weight": p["classifiers.weight"], "classifier.module.bias": p["classifiers.bias"],
    }
    for c in range(2):
        mapped |= {f"inst_classifiers.{c}.module.weight": p[f"instance_classifiers.{c}.weight"],
                   f"inst_classifiers.{c}.module.bias": p[f"instance_classifiers.{c}.bias"]}
    if gated:
        mapped |= {"pool.fc_gated.module.weight": p["pool.attn_u.weight"],
                   "pool.fc_gated.module.bias": p["pool.attn_u.bias"]}
    theirs.load_state_dict(mapped, strict=True)
    return ours, theirs


@pytest.mark.parametrize("gated", [False, True])
def test_clam_sb_matches_torchmil(gated):
    ours, theirs = torchmil_pair(gated)
    torchmil_nn = pytest.importorskip("torchmil.nn")
    items, x, mask = batch(sizes=(12, 9, 6), pad_value=0.0)  # >= 2 k real instances: same k in both
    labels = torch.tensor([1, 0, 1])
    with torch.no_grad():
        logits, scores, h = theirs(x, mask, return_att=True, return_emb=True)
        weights = torchmil_nn.masked_softmax(scores, mask)
        inst_sum = theirs.compute_inst_loss(scores, h, labels, mask)
        out = ours.eval()(x, mask)
        trained = ours.train()(x, mask, labels=labels)
    torch.testing.assert_close(out.logits, logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.attention, weights, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(trained.logits, logits, rtol=1e-5, atol=1e-6)  # dropout 0: same in training
    # Ours per bag: (in + out) / 2 (official subtyping), mean over bags, times inst_weight.
    ours_sum = trained.aux_losses["instance"] / ours.config.inst_weight * 2 * len(items)
    torch.testing.assert_close(ours_sum, inst_sum, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# CLAM-MB: one attention branch and one bag classifier per class.


def test_mb_branches_sum_to_one_and_logit_c_uses_branch_c():
    model = build(multi_branch=True).eval()
    _, x, mask = batch(pad_value=1e4)
    with torch.no_grad():
        out = model(x, mask)
        branches = out.branch_attention
        assert branches.shape == (4, 3, 11)
        torch.testing.assert_close(branches.sum(-1), torch.ones(4, 3))
        assert (branches.permute(0, 2, 1)[~mask] == 0).all() and (branches >= 0).all()
        assert not torch.allclose(branches[:, 0], branches[:, 1])  # the branches really differ
        # logit c = classifiers[c](sum_i a_ci h_i), with the branch of class c.
        h = model.embed(x.masked_fill(~mask[..., None], 0))
        for c in range(3):
            pooled = torch.bmm(branches[:, c : c + 1], h)[:, 0]
            torch.testing.assert_close(out.logits[:, c], model.classifiers[c](pooled)[:, 0], rtol=1e-5, atol=1e-6)
        # `attention` and `embedding` are the predicted class's branch (official CLAM-MB heatmaps).
        pred = out.logits.argmax(1)
        torch.testing.assert_close(out.attention, branches[torch.arange(4), pred], rtol=0, atol=0)
        torch.testing.assert_close(out.embedding, torch.bmm(branches, h)[torch.arange(4), pred])
        # Changing branch 1's attention parameters changes logit 1 only.
        model.pool.attn_w.weight[1].mul_(-3.0)
        changed = model(x, mask)
    assert not torch.allclose(changed.branch_attention[:, 1], branches[:, 1])
    torch.testing.assert_close(changed.branch_attention[:, [0, 2]], branches[:, [0, 2]], rtol=0, atol=0)
    torch.testing.assert_close(changed.logits[:, [0, 2]], out.logits[:, [0, 2]], rtol=0, atol=0)
    assert not torch.allclose(changed.logits[:, 1], out.logits[:, 1])


def test_mb_instance_loss_uses_each_class_branch():
    """In-the-class sampling uses branch y; out-of-the-class sampling for class j uses branch j. Reversing
    branch 1's ranking (negated scores: top and bottom swap) changes the loss of bags labelled 0 and 2
    only through classifier 1's out-of-the-class samples, so only with subtyping."""
    _, x, mask = batch(sizes=(11, 9))
    labels = torch.tensor([0, 2])

    def loss_with_branch_reversed(model, branch):
        with torch.no_grad():
            model.pool.attn_w.weight[branch].neg_()
            model.pool.attn_w.bias[branch].neg_()
            loss = model(x, mask, labels=labels).aux_losses["instance"]
            model.pool.attn_w.weight[branch].neg_()
            model.pool.attn_w.bias[branch].neg_()
        return loss

    for subtyping in (False, True):
        model = build(multi_branch=True, subtyping=subtyping).train()
        with torch.no_grad():
            base = model(x, mask, labels=labels).aux_losses["instance"]
        assert not torch.allclose(loss_with_branch_reversed(model, 0), base)  # bag 0's own branch
        reversed_1 = loss_with_branch_reversed(model, 1)
        if subtyping:
            assert not torch.allclose(reversed_1, base)
        else:
            torch.testing.assert_close(reversed_1, base, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Top-k sampling: only real instances, small bags.


def test_top_bottom_never_pick_padding():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 2, 10, generator=g)
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[0, :10], mask[1, :5], mask[2, :1] = True, True, True
    for pad in (1e30, -1e30, float("inf"), float("-inf"), float("nan")):
        padded = scores.masked_fill(~mask[:, None], pad)
        top, bottom, k, valid = top_bottom_instances(padded, mask, k_sample=4)
        assert k.tolist() == [4, 2, 0]
        assert valid.tolist() == [[True] * 4, [True, True, False, False], [False] * 4]
        for b in range(3):
            n, kb = int(mask[b].sum()), int(k[b])
            for br in range(2):
                order = scores[b, br, :n].argsort(descending=True)
                assert top[b, br, :kb].tolist() == order[:kb].tolist()
                assert bottom[b, br, :kb].tolist() == order.flip(0)[:kb].tolist()
                assert set(top[b, br, :kb].tolist()).isdisjoint(bottom[b, br, :kb].tolist())


@pytest.mark.parametrize("multi_branch", [False, True])
@pytest.mark.parametrize("favour", [1e30, -1e30])
def test_model_never_samples_padded_instances(multi_branch, favour):
    """Padded positions get huge attention scores (favouring them for the top-k, or the bottom-k): the
    sampled instances are still real ones and the loss is that of the bags without padding."""
    model = build(multi_branch=multi_branch, subtyping=True).train()
    items, x, mask = batch(sizes=(10, 4, 7))
    labels = torch.tensor([1, 0, 2])
    picked = []

    def capture(scores, mask_, k_sample):
        result = top_bottom_instances(scores, mask_, k_sample)
        picked.append((result, mask_))
        return result

    def favour_padding(module, inputs, output):
        return output.masked_fill(~mask[..., None], favour) if output.shape[1] == mask.shape[1] else output

    hook = model.pool.register_forward_hook(favour_padding)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(clam_module, "top_bottom_instances", capture)
        loss = model(x, mask, labels=labels).aux_losses["instance"]
    hook.remove()
    (top, bottom, k, valid), seen_mask = picked[0]
    assert torch.equal(seen_mask, mask)
    assert k.tolist() == [3, 2, 3]
    for b in range(3):
        n = int(mask[b].sum())
        assert (top[b][:, valid[b]] < n).all() and (bottom[b][:, valid[b]] < n).all()
    alone = [model(bag, labels=y[None]).aux_losses["instance"] for bag, y in zip(items, labels)]
    torch.testing.assert_close(loss, torch.stack(alone).mean(), rtol=1e-5, atol=1e-6)


def test_small_bags():
    """Bags of 1 real instance add no instance loss (a batch of only such bags gives exactly 0); a bag of
    2 uses k = 1 (its most attended instance positive, the other negative); no duplicates anywhere."""
    model = build().train()
    _, x, mask = batch(sizes=(1, 1))
    out = model(x, mask, labels=torch.tensor([0, 1]))
    assert out.aux_losses["instance"].item() == 0.0
    loss = F.cross_entropy(out.logits, torch.tensor([0, 1])) + out.aux_losses["instance"]
    loss.backward()  # still a valid objective
    bag = batch(sizes=(2,))[0][0]
    with torch.no_grad():
        model.instance_classifiers[1].weight.zero_()
        model.instance_classifiers[1].bias.copy_(torch.tensor([0.0, 1.0]))  # predicts "positive" for all
    got = model(bag, labels=torch.tensor([1])).aux_losses["instance"] / model.config.inst_weight
    expected = (F.cross_entropy(torch.tensor([[0.0, 1.0]]), torch.tensor([1]))
                + F.cross_entropy(torch.tensor([[0.0, 1.0]]), torch.tensor([0]))) / 2
    torch.testing.assert_close(got, expected)


# ---------------------------------------------------------------------------------------------
# The instance loss itself.


def test_instance_loss_is_log2_for_constant_classifiers():
    for subtyping in (False, True):
        model = build(multi_branch=True, subtyping=subtyping).train()
        with torch.no_grad():
            for c in model.instance_classifiers:
                c.weight.zero_(), c.bias.zero_()
        _, x, mask = batch(sizes=(11, 7, 3))
        loss = model(x, mask, labels=torch.tensor([0, 1, 2])).aux_losses["instance"]
        torch.testing.assert_close(loss, torch.tensor(model.config.inst_weight * math.log(2)))


def test_instance_loss_decreases_as_the_classifier_separates_top_from_bottom():
    """Plain attention with one hidden unit ranks instances by v.h; an instance classifier scoring
    t * (v.h - threshold), with the threshold between the bottom-k and top-k, drives the loss to 0 as t
    grows, and the reversed classifier drives it up."""
    model = build(num_classes=2, gated=False, attn_dim=1, k_sample=3).train()
    bag = batch(sizes=(12,))[0][0]
    with torch.no_grad():
        model.pool.attn_w.weight.fill_(1.0)
        h = model.embed(bag)
        v, c = model.pool.attn_v.weight[0], model.pool.attn_v.bias[0]
        proj = h @ v + c
        ranked = proj.sort(descending=True).values
        threshold = (ranked[2] + ranked[-3]) / 2  # between the 3 most and the 3 least attended

    def loss_at(t):
        with torch.no_grad():
            model.instance_classifiers[1].weight.copy_(torch.stack([torch.zeros_like(v), t * v]))
            model.instance_classifiers[1].bias.copy_(torch.tensor([0.0, t * (c - threshold)]))
        return model(bag, labels=torch.tensor([1])).aux_losses["instance"].item()

    losses = [loss_at(t) for t in (0.0, 0.5, 2.0, 10.0, 100.0)]
    assert math.isclose(losses[0], model.config.inst_weight * math.log(2), rel_tol=1e-6)
    assert all(a > b for a, b in itertools.pairwise(losses)), losses
    assert losses[-1] < 1e-3
    assert loss_at(-10.0) > losses[0]


def test_instance_loss_gradients():
    """The instance loss trains the embedding and the instance classifiers it uses, never the attention
    net (top-k selection has no gradient) nor the bag classifier; without subtyping only the bag's own
    class's instance classifier, with subtyping every class's."""
    _, x, mask = batch(sizes=(9, 6))
    labels = torch.tensor([2, 2])
    for multi_branch in (False, True):
        for subtyping in (False, True):
            model = build(multi_branch=multi_branch, subtyping=subtyping).train()
            model(x, mask, labels=labels).aux_losses["instance"].backward()
            grads = {n: p.grad for n, p in model.named_parameters()}
            assert grads["embed.proj.weight"].abs().sum() > 0
            assert all(g is None for n, g in grads.items() if n.startswith(("pool.", "classifiers")))
            trained = {c for c in range(3) if grads[f"instance_classifiers.{c}.weight"] is not None}
            assert all(grads[f"instance_classifiers.{c}.weight"].abs().sum() > 0 for c in trained)
            assert trained == ({0, 1, 2} if subtyping else {2})


def test_no_instance_loss_in_eval_without_labels_or_with_zero_weight():
    model = build().train()
    _, x, mask = batch()
    assert model(x, mask).aux_losses == {}
    assert build(inst_weight=0.0).train()(x, mask, labels=torch.tensor([0, 1, 2, 0])).aux_losses == {}
    assert model.eval()(x, mask, labels=torch.tensor([0, 1, 2, 0])).aux_losses == {}
    model.train()
    with pytest.raises(ValueError, match="labels"):
        model(x, mask, labels=torch.tensor([0, 3, 1, 1]))
    with pytest.raises(ValueError, match="labels"):
        model(x, mask, labels=torch.tensor([0, 1]))


@pytest.mark.parametrize("name", ["clam_sb", "clam_mb"])
def test_bf16_autocast(name):
    torch.manual_seed(0)
    model = qgmil.create_model(name, in_dim=IN_DIM, num_classes=3)
    _, x, mask = batch()
    labels = torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        ref = model.eval()(x, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, mask)
    assert torch.isfinite(low.logits).all() and (low.attention[~mask] == 0).all()
    torch.testing.assert_close(low.attention.float().sum(-1), torch.ones(4), atol=2e-2, rtol=0)
    torch.testing.assert_close(low.logits.float(), ref.logits, atol=5e-2, rtol=5e-2)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, mask, labels=labels)
    assert torch.isfinite(out.aux_losses["instance"])
    out.aux_losses["instance"].backward()
