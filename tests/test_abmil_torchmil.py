"""`abmil` and `abmil_gated` against torchmil's ABMIL (Castro-Macías et al.), identical weights, eval mode.

How torchmil is configured to be the same model:
  - instance embedding: torchmil's ABMIL has none by default (feat_ext = Identity); it gets ours,
    Linear(in_dim, dim) -> ReLU -> Dropout, as `feat_ext` (dropout is the identity in eval mode).
  - attention: torchmil's AttentionPool(att_act="tanh", gated=False/True) is eq. 8/9 as ours:
    fc1 = V, fc_gated = U, fc2 = w. torchmil's fc2 has no bias; ours (attn_w) has one, as the
    official AttentionDeepMIL code. A constant added to every score leaves the softmax unchanged,
    so the bias is dropped in the mapping and the outputs agree to rounding.
  - classifier: torchmil's is Linear(dim, 1) (one logit, BCE): it equals our num_classes = 1 head.
    For C > 1 classes torchmil's `classifier` is replaced by a torchmil LazyLinear(dim, C).
  - torchmil's attention output (return_att=True) is the score before the softmax; the weights are
    torchmil's masked_softmax of it.
Intended difference: torchmil pools with X^T softmax(f), so a NaN or inf in a padded row reaches the
pooled vector through 0 * NaN; ours zeroes padded rows first, so with NaN padding our outputs equal
torchmil's with finite padding (tested below).
"""

import pytest
import torch

from qgmil.data import pad_bags
from qgmil.models.abmil import ABMIL, ABMILConfig

torchmil_models = pytest.importorskip("torchmil.models")
torchmil_nn = pytest.importorskip("torchmil.nn")

IN_DIM, DIM, ATTN_DIM = 20, 32, 16


def pair(gated: bool, num_classes: int, seed: int = 0):
    """Our ABMIL and torchmil's ABMIL with the same weights, both in eval mode."""
    torch.manual_seed(seed)
    ours = ABMIL(ABMILConfig(in_dim=IN_DIM, num_classes=num_classes, dim=DIM, attn_dim=ATTN_DIM, gated=gated,
                             dropout=0.25)).eval()
    feat_ext = torch.nn.Sequential(torch.nn.Linear(IN_DIM, DIM), torch.nn.ReLU(), torch.nn.Dropout(0.25))
    theirs = torchmil_models.ABMIL(in_shape=(IN_DIM,), att_dim=ATTN_DIM, att_act="tanh", gated=gated,
                                   feat_ext=feat_ext)
    if num_classes > 1:
        theirs.classifier = torchmil_nn.LazyLinear(DIM, num_classes)
    p = ours.state_dict()
    mapped = {
        "feat_ext.0.weight": p["embed.proj.weight"], "feat_ext.0.bias": p["embed.proj.bias"],
        "pool.fc1.module.weight": p["pool.attn_v.weight"], "pool.fc1.module.bias": p["pool.attn_v.bias"],
        "pool.fc2.weight": p["pool.attn_w.weight"],  # no bias in torchmil: softmax is shift-invariant
        "classifier.module.weight": p["head.weight"], "classifier.module.bias": p["head.bias"],
    }
    if gated:
        mapped |= {"pool.fc_gated.module.weight": p["pool.attn_u.weight"],
                   "pool.fc_gated.module.bias": p["pool.attn_u.bias"]}
    theirs.load_state_dict(mapped, strict=True)  # every torchmil parameter has its counterpart
    assert p["pool.attn_w.bias"].abs().item() > 0  # the dropped bias really is there in ours
    return ours, theirs.eval()


def torchmil_outputs(model, x, mask):
    """torchmil's logits (B, C), attention weights (B, N) and pooled vector (B, dim)."""
    logits, scores = model(x, mask, return_att=True)
    weights = torchmil_nn.masked_softmax(scores, mask)
    pooled = model.pool(model.feat_ext(x), mask)
    return logits.reshape(x.shape[0], -1), weights, pooled


def batch(sizes=(12, 7, 1), pad_value=0.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    bags = [torch.randn(n, IN_DIM, generator=g) for n in sizes]
    x, mask = pad_bags(bags)
    if callable(pad_value):
        x = torch.where(mask[..., None], x, pad_value(x.shape))
    else:
        x = x.masked_fill(~mask[..., None], pad_value)
    return x, mask


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("num_classes", [1, 3])
@pytest.mark.parametrize("use_mask", [False, True])
def test_matches_torchmil_abmil(gated, num_classes, use_mask):
    ours, theirs = pair(gated, num_classes)
    if use_mask:  # padding holds large finite values, which torchmil embeds and then weights by 0
        x, mask = batch(pad_value=lambda shape: 50 * torch.randn(shape, generator=torch.Generator().manual_seed(2)))
    else:
        x, mask = batch(sizes=(12, 12, 12))
        mask = None
    with torch.no_grad():
        out = ours(x, mask)
        logits, attention, pooled = torchmil_outputs(theirs, x, mask)
    assert out.logits.shape == logits.shape == (3, num_classes)
    close(out.logits, logits)
    close(out.attention, attention)
    close(out.embedding, pooled)
    if use_mask:
        assert (attention[~mask] == 0).all() and (out.attention[~mask] == 0).all()


@pytest.mark.parametrize("gated", [False, True])
def test_each_padded_bag_matches_torchmil_on_the_bag_alone(gated):
    ours, theirs = pair(gated, num_classes=2, seed=4)
    x, mask = batch(sizes=(9, 5, 2), pad_value=7.0)
    with torch.no_grad():
        out = ours(x, mask)
        for i in range(3):
            n = int(mask[i].sum())
            logits, attention, pooled = torchmil_outputs(theirs, x[i:i + 1, :n], None)
            close(out.logits[i:i + 1], logits)
            close(out.attention[i:i + 1, :n], attention)
            close(out.embedding[i:i + 1], pooled)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_padding_ours_equals_torchmil_with_finite_padding(gated, bad):
    """The one intended difference: non-finite padding cannot reach our outputs."""
    ours, theirs = pair(gated, num_classes=3, seed=2)
    x_bad, mask = batch(pad_value=bad)
    x_zero, _ = batch(pad_value=0.0)
    with torch.no_grad():
        out = ours(x_bad, mask)
        logits, attention, pooled = torchmil_outputs(theirs, x_zero, mask)
    assert torch.isfinite(out.logits).all()
    close(out.logits, logits)
    close(out.attention, attention)
    close(out.embedding, pooled)
