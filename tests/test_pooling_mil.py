"""Mean/max pooling baselines against their equations (float64, one bag at a time) and torchmil's
MeanPool/MaxPool, and the meaning of their attention."""

import pytest
import torch

import qgmil
from qgmil.data import pad_bags
from qgmil.layers import max_pool
from qgmil.models.pooling_mil import PoolingMIL, PoolingMILConfig

SMALL = dict(in_dim=10, num_classes=3, dim=24, dropout=0.0)


def build(pooling, seed=0, **overrides) -> PoolingMIL:
    torch.manual_seed(seed)
    return PoolingMIL(PoolingMILConfig(**{**SMALL, "pooling": pooling, **overrides})).eval()


def padded(sizes=(9, 3, 1, 6), seed=1, pad_value=0.0):
    g = torch.Generator().manual_seed(seed)
    return pad_bags([torch.randn(n, SMALL["in_dim"], generator=g) for n in sizes], pad_value=pad_value)


def reference(model: PoolingMIL, bag: torch.Tensor):
    """h_i = ReLU(W x_i + b); z = mean_i h_i or z_d = max_i h_id; logits = head(z); the max attention of
    instance i = (1/D) sum_d [h_id = z_d] / #{j : h_jd = z_d}. In float64 on real instances (n, in_dim)."""
    p = {k: v.detach().double() for k, v in model.state_dict().items()}
    h = torch.relu(bag.double() @ p["embed.proj.weight"].T + p["embed.proj.bias"])
    n, d = h.shape
    if model.config.pooling == "mean":
        z, a = h.mean(0), torch.full((n,), 1.0 / n, dtype=torch.float64)
    else:
        z = h.max(0).values
        holders = (h == z).double()
        a = (holders / holders.sum(0)).sum(1) / d
    return z @ p["head.weight"].T + p["head.bias"], a, z


@pytest.mark.parametrize("pooling", ["mean", "max"])
@pytest.mark.parametrize("pad_value", [0.0, -1e4, float("nan"), float("inf")])
def test_matches_reference_equations(pooling, pad_value):
    model = build(pooling)
    x, mask = padded(pad_value=pad_value)
    with torch.no_grad():
        out = model(x, mask)
    assert out.aux_losses == {} and out.branch_attention is None
    for i in range(x.shape[0]):
        n = int(mask[i].sum())
        logits, a, z = reference(model, x[i, :n])
        torch.testing.assert_close(out.logits[i].double(), logits, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.embedding[i].double(), z, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.attention[i, :n].double(), a, rtol=1e-5, atol=1e-7)
        assert (out.attention[i, n:] == 0).all()
    torch.testing.assert_close(out.attention.sum(-1), torch.ones(4))


@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_pooled_vector_matches_torchmil(pooling):
    """The pooling itself against torchmil's MeanPool / MaxPool on the same embedded instances."""
    torchmil_nn = pytest.importorskip("torchmil.nn")
    model = build(pooling)
    x, mask = padded(pad_value=3.0)  # finite padding: torchmil's MeanPool multiplies it by the 0 mask
    with torch.no_grad():
        out = model(x, mask)
        h = model.embed(x)
        pool = torchmil_nn.MeanPool() if pooling == "mean" else torchmil_nn.MaxPool()
        torch.testing.assert_close(out.embedding, pool(h, mask), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model(x[:1]).embedding, pool(h[:1]), rtol=1e-5, atol=1e-6)


def test_mean_attention_is_uniform_over_real_instances():
    out = build("mean")(*padded())
    torch.testing.assert_close(out.attention[0, :9], torch.full((9,), 1 / 9))
    torch.testing.assert_close(out.attention[1], torch.tensor([1 / 3] * 3 + [0.0] * 6))
    torch.testing.assert_close(out.attention[2], torch.tensor([1.0] + [0.0] * 8))


def test_max_attention_counts_channel_wins_and_splits_ties():
    h = torch.tensor([[[1.0, 0.0, 5.0, 0.0], [2.0, 0.0, 5.0, 0.0], [0.0, 0.0, 1.0, 9.0]]])
    pooled, attention = max_pool(h)
    torch.testing.assert_close(pooled, torch.tensor([[2.0, 0.0, 5.0, 9.0]]))
    # channel 0 -> instance 1; channel 1 tied by all three; channel 2 tied by 0 and 1; channel 3 -> 2.
    expected = torch.tensor([[0 + 1 / 3 + 1 / 2, 1 + 1 / 3 + 1 / 2, 1 / 3 + 1]]) / 4
    torch.testing.assert_close(attention, expected)
    # Padding never wins, even where its value would be the largest.
    mask = torch.tensor([[True, True, False]])
    pooled, attention = max_pool(h, mask)
    torch.testing.assert_close(pooled, torch.tensor([[2.0, 0.0, 5.0, 0.0]]))
    torch.testing.assert_close(attention, torch.tensor([[1.5 / 4, 2.5 / 4, 0.0]]))
    # The gradient of a tied maximum is shared equally by its holders (amax), as the attention is.
    h = h.clone().requires_grad_()
    max_pool(h)[0][0, 1].backward()
    torch.testing.assert_close(h.grad[0, :, 1], torch.full((3,), 1 / 3))


def test_max_attention_is_permutation_equivariant_with_relu_ties():
    """After the ReLU many channels are 0 for every instance: tied maxima must not favour the first."""
    model = build("max", dim=64)
    with torch.no_grad():  # two dead channels (ReLU(-1) = 0 for every instance), as training produces
        model.embed.proj.weight[:2] = 0
        model.embed.proj.bias[:2] = -1
    bag = padded(sizes=(11,))[0][0]
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = model.embed(bag[None])
        assert ((h == 0).all(1)).any(), "the test needs a channel that every instance ties at 0"
        out, out_perm = model(bag), model(bag[perm])
    torch.testing.assert_close(out_perm.attention[0], out.attention[0, perm], rtol=1e-6, atol=1e-7)


def test_presets_defaults_and_config_validation():
    assert {"mean_pool", "max_pool"} <= set(qgmil.list_models())
    mean = qgmil.create_model("mean_pool", in_dim=1024, num_classes=2)
    mx = qgmil.create_model("max_pool", in_dim=1024, num_classes=2)
    assert mean.arch == mx.arch == "pooling_mil" and (mean.name, mx.name) == ("mean_pool", "max_pool")
    assert (mean.config.pooling, mx.config.pooling) == ("mean", "max")
    for m in (mean, mx):
        assert (m.config.dim, m.config.dropout) == (512, 0.25)
        assert m.embed.proj.in_features == 1024 and m.embed.proj.out_features == 512
        assert isinstance(m.embed.act, torch.nn.ReLU) and m.embed.drop.p == 0.25
        assert m.head.in_features == 512 and m.head.out_features == 2
    with pytest.raises(ValueError, match="pooling"):
        PoolingMILConfig(in_dim=8, num_classes=2, pooling="sum")
    with pytest.raises(ValueError, match="dropout"):
        PoolingMILConfig(in_dim=8, num_classes=2, dropout=1.0)
    with pytest.raises(ValueError, match="not_a_field"):
        qgmil.create_model("mean_pool", in_dim=8, num_classes=2, not_a_field=1)


@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_chunked_inference_and_bf16_autocast(pooling):
    model = build(pooling)
    model.inference_chunk = 4
    seen = []
    model.embed.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[1]))
    x, mask = padded()
    with torch.no_grad():
        chunked = model(x, mask)
        model.inference_chunk = None
        full = model(x, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, mask)
    assert seen[:3] == [4, 4, 1]
    torch.testing.assert_close(chunked.logits, full.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked.attention, full.attention, rtol=1e-6, atol=1e-7)
    assert torch.isfinite(low.logits).all() and (low.attention[~mask] == 0).all()
    torch.testing.assert_close(low.attention.float().sum(-1), torch.ones(4), atol=2e-2, rtol=0)
    torch.testing.assert_close(low.logits.float(), full.logits, atol=5e-2, rtol=5e-2)
