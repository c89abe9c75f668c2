"""TransMIL (Shao et al. 2021): a float64 re-derivation of the official forward, lucidrains' nystrom-attention
(which the official code uses) and torchmil's TransMIL as oracles when installed, masks, attention, scale."""

import inspect
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import qgmil
from qgmil.data import pad_bags
from qgmil.models.transmil import NystromAttention, TransMIL, TransMILConfig, moore_penrose_iter_pinv

# Small enough for CPU tests, large enough that bags span several landmark groups (l = ceil(n / m) > 1).
SMALL = dict(in_dim=12, num_classes=3, dim=32, heads=4, dim_head=8, num_landmarks=8, residual_kernel=5,
             dropout=0.0)


def build(seed=0, **overrides) -> TransMIL:
    torch.manual_seed(seed)
    return TransMIL(TransMILConfig(**{**SMALL, **overrides})).eval()


def perturb(model, seed=1, scale=0.3):
    """Move every parameter away from its init (biases 0, LayerNorm 1, ...) so no term hides behind a zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def bags(*sizes, in_dim=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, in_dim, generator=g) for n in sizes]


# ---------------------------------------------------------------------------------------------
# Reference: the official forward written out step by step in float64, one bag, plain tensor ops. Nystrom
# attention as lucidrains' package: front zero padding to a multiple of m, landmarks = means of l consecutive
# tokens, (attn1 pinv(attn2)) (attn3 V) in that association, depthwise residual conv on V, out[-n:].


def ref_layer_norm(x, p, prefix):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * p[prefix + ".weight"] + p[prefix + ".bias"]


def ref_softmax(s):
    e = torch.exp(s - s.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def ref_nystrom(x, p, prefix, cfg):
    n, heads, dh, m = x.shape[0], cfg.heads, cfg.dim_head, cfg.num_landmarks
    total = math.ceil(n / m) * m
    l = total // m  # noqa: E741
    xp = torch.cat([torch.zeros(total - n, x.shape[1], dtype=x.dtype), x])
    qkv = xp @ p[prefix + ".to_qkv.weight"].T
    inner = heads * dh
    a1s, a2s, a3s, vs = [], [], [], []
    for h in range(heads):
        q = qkv[:, h * dh:(h + 1) * dh] / math.sqrt(dh)
        k = qkv[:, inner + h * dh:inner + (h + 1) * dh]
        v = qkv[:, 2 * inner + h * dh:2 * inner + (h + 1) * dh]
        ql = torch.stack([q[i * l:(i + 1) * l].mean(0) for i in range(m)])
        kl = torch.stack([k[i * l:(i + 1) * l].mean(0) for i in range(m)])
        a1s.append(ref_softmax(q @ kl.T))
        a2s.append(ref_softmax(ql @ kl.T))
        a3s.append(ref_softmax(ql @ k.T))
        vs.append(v)
    # pinv initial scale: maxima over all heads together
    max_row_sum = max(a.abs().sum(1).max() for a in a2s)
    max_col_sum = max(a.abs().sum(0).max() for a in a2s)
    eye = torch.eye(m, dtype=x.dtype)
    r = cfg.residual_kernel // 2
    outs = []
    for h in range(heads):
        a2 = a2s[h]
        z = a2.T / (max_row_sum * max_col_sum)
        for _ in range(cfg.pinv_iterations):
            az = a2 @ z
            z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
        out = (a1s[h] @ z) @ (a3s[h] @ vs[h])
        w = p[prefix + ".res_conv.weight"][h, 0, :, 0]
        vpad = torch.cat([torch.zeros(r, dh, dtype=x.dtype), vs[h], torch.zeros(r, dh, dtype=x.dtype)])
        out = out + sum(w[j] * vpad[j:j + total] for j in range(cfg.residual_kernel))
        outs.append(out)
    out = torch.cat(outs, 1) @ p[prefix + ".to_out.0.weight"].T + p[prefix + ".to_out.0.bias"]
    return out[:n] if cfg.legacy_nystrom_slice else out[-n:]


def reference(model: TransMIL, bag: torch.Tensor):
    """logits, attention (n,), embedding of one bag of real instances (n, in_dim), in float64."""
    cfg = model.config
    p = {k: v.detach().double() for k, v in model.state_dict().items()}
    h = torch.clamp(bag.double() @ p["_fc1.0.weight"].T + p["_fc1.0.bias"], min=0)
    n = h.shape[0]
    side = 1
    while side * side < n:
        side += 1
    grid = torch.cat([h, h[: side * side - n]])
    seq = torch.cat([p["cls_token"][0], grid])
    seq = seq + ref_nystrom(ref_layer_norm(seq, p, "layer1.norm"), p, "layer1.attn", cfg)
    grid = seq[1:].T.reshape(cfg.dim, side, side)  # token t at row t // side, column t % side
    g = grid.clone()
    for name, size in (("proj", 7), ("proj1", 5), ("proj2", 3)):  # depthwise, zero padding, as shifted sums
        w, r = p[f"pos_layer.{name}.weight"][:, 0], size // 2
        padded = F.pad(grid, (r, r, r, r))
        g = g + p[f"pos_layer.{name}.bias"][:, None, None]
        for dy in range(size):
            for dx in range(size):
                g = g + w[:, dy, dx, None, None] * padded[:, dy:dy + side, dx:dx + side]
    seq = torch.cat([seq[:1], g.reshape(cfg.dim, -1).T])
    normed = ref_layer_norm(seq, p, "layer2.norm")
    seq = seq + ref_nystrom(normed, p, "layer2.attn", cfg)
    embedding = ref_layer_norm(seq[0], p, "norm")
    logits = embedding @ p["_fc2.weight"].T + p["_fc2.bias"]
    # exact attention of the CLS query over the side^2 instance tokens of layer 2, mean over heads, copies folded
    qkv = normed @ p["layer2.attn.to_qkv.weight"].T
    inner = cfg.heads * cfg.dim_head
    a = 0
    for hd in range(cfg.heads):
        q = qkv[0, hd * cfg.dim_head:(hd + 1) * cfg.dim_head]
        k = qkv[1:, inner + hd * cfg.dim_head:inner + (hd + 1) * cfg.dim_head]
        a = a + ref_softmax(k @ q / math.sqrt(cfg.dim_head)) / cfg.heads
    folded = a[:n].clone()
    for t in range(side * side - n):
        folded[t] += a[n + t]
    return logits, folded, embedding


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("n", [1, 2, 5, 7, 16, 30, 70])
def test_matches_float64_reference(n, legacy):
    """n = 1 (a 1 x 1 grid), sizes below and above the landmark count (l = 1 .. 9 tokens per landmark),
    perfect squares (no copies) and not; float64 model against the float64 reference; with nystrom-attention
    0.0.9's output slice too."""
    model = perturb(build(legacy_nystrom_slice=legacy)).double()
    bag = bags(n)[0].double()
    with torch.no_grad():
        out = model(bag)
    logits, attention, embedding = reference(model, bag)
    torch.testing.assert_close(out.logits[0], logits, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.embedding[0], embedding, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.attention[0], attention, rtol=1e-10, atol=1e-12)
    assert abs(float(out.attention.sum()) - 1) < 1e-12


def test_float32_default_sizes_match_reference():
    """The official sizes (dim 512, 8 x 64 heads, 256 landmarks, kernel 33) in float32 against float64."""
    torch.manual_seed(0)
    model = qgmil.create_model("transmil", in_dim=64, num_classes=2).eval()
    perturb(model, scale=0.05)
    for n in (300,):  # l = 2 tokens per landmark
        bag = bags(n, in_dim=64)[0]
        with torch.no_grad():
            out = model(bag)
        logits, attention, embedding = reference(model, bag)
        torch.testing.assert_close(out.logits[0].double(), logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out.embedding[0].double(), embedding, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out.attention[0].double(), attention, rtol=1e-4, atol=1e-6)


def test_pinv_iteration_converges_to_the_inverse():
    g = torch.Generator().manual_seed(0)
    a = torch.softmax(torch.randn(3, 16, 16, generator=g, dtype=torch.float64) * 0.5, -1)
    z = moore_penrose_iter_pinv(a, 30)
    torch.testing.assert_close(z, torch.linalg.inv(a), rtol=1e-8, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# Oracles: lucidrains' package (the official code's dependency) and torchmil, when installed.


class _LucidrainsAttention(torch.nn.Module):
    """Adapter: lucidrains' NystromAttention behind our TransLayer's call (the CLS attention is not compared)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, chunk=None, return_first_query_attention=False):
        out = self.inner(x)
        if not return_first_query_attention:
            return out
        return out, torch.full((1, 1, x.shape[1] - 1), 1 / (x.shape[1] - 1))  # placeholder, not compared


def lucidrains_attention(cfg):
    nystrom_attention = pytest.importorskip("nystrom_attention")
    return nystrom_attention.NystromAttention(
        dim=cfg.dim, dim_head=cfg.dim_head, heads=cfg.heads, num_landmarks=cfg.num_landmarks,
        pinv_iterations=cfg.pinv_iterations, residual=True, residual_conv_kernel=cfg.residual_kernel,
        dropout=cfg.dropout,
    ).eval()


def installed_is_legacy() -> bool:
    """nystrom-attention up to 0.0.10 (0.0.9 is the official pin) slices out[:, :n]; 0.0.11 on out[:, -n:]."""
    module = pytest.importorskip("nystrom_attention.nystrom_attention")
    return "out[:, :n]" in inspect.getsource(module)


@pytest.mark.parametrize("n", [1, 5, 8, 9, 37, 64])
def test_attention_matches_lucidrains_package(n):
    torch.manual_seed(0)
    cfg = TransMILConfig(**SMALL)
    ours = NystromAttention(cfg.dim, cfg.dim_head, cfg.heads, cfg.num_landmarks, cfg.pinv_iterations,
                            cfg.residual_kernel, cfg.dropout, legacy_slice=installed_is_legacy()).eval()
    perturb(ours)
    theirs = lucidrains_attention(cfg)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(1, n, cfg.dim)
    with torch.no_grad():
        expected = theirs(x)
        torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(x, chunk=3), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [10, 300])
def test_model_matches_official_composition_with_lucidrains_attention(n):
    """The whole model with lucidrains' attention modules swapped in (what the official code runs), at the
    official sizes, on one bag: same logits (with `legacy_nystrom_slice` when the installed package is 0.0.9)."""
    legacy = installed_is_legacy()
    torch.manual_seed(0)
    ours = qgmil.create_model("transmil", in_dim=64, num_classes=2, legacy_nystrom_slice=legacy).eval()
    perturb(ours, scale=0.05)
    official = qgmil.create_model("transmil", in_dim=64, num_classes=2).eval()
    for layer in (official.layer1, official.layer2):
        layer.attn = _LucidrainsAttention(lucidrains_attention(ours.config))
    state = ours.state_dict()
    official.load_state_dict({k.replace(".attn.", ".attn.inner."): v for k, v in state.items()})
    x = bags(n, in_dim=64)[0]
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, official(x).logits, rtol=1e-5, atol=1e-5)


def test_matches_torchmil_with_identical_weights():
    """torchmil's TransMIL runs the same Nystrom algorithm (front padding, landmark means, pinv, out[-n:]) but
    differs from the official model in three places: no ReLU after fc1, no output projection (to_out) and no
    residual value conv in the attention, and one logit. With weights that neutralise exactly those (fc1
    pre-activations kept positive, to_out = identity, res_conv = 0, num_classes = 1) the logits agree."""
    torchmil_transmil = pytest.importorskip("torchmil.models").TransMIL
    in_dim, dim, heads = 16, 64, 8
    torch.manual_seed(0)
    theirs = torchmil_transmil(in_shape=(in_dim,), att_dim=dim, n_heads=heads, n_landmarks=16,
                               pinv_iterations=6, dropout=0.0, use_mlp=False).eval()
    ours = qgmil.create_model("transmil", in_dim=in_dim, num_classes=1, dim=dim, heads=heads,
                              dim_head=dim // heads, num_landmarks=16).eval()
    with torch.no_grad():
        perturb(theirs, scale=0.1)
        theirs.fc1.bias.add_(20.0)  # ReLU becomes the identity on these inputs (checked below)
        t = theirs.state_dict()
        mapping = {"_fc1.0.weight": "fc1.weight", "_fc1.0.bias": "fc1.bias", "cls_token": "cls_token",
                   "norm.weight": "norm.weight", "norm.bias": "norm.bias",
                   "_fc2.weight": "classifier.weight", "_fc2.bias": "classifier.bias"}
        for conv in ("proj", "proj1", "proj2"):
            for kind in ("weight", "bias"):
                mapping[f"pos_layer.{conv}.{kind}"] = f"pos_layer.{conv}.{kind}"
        for i, layer in enumerate(("layer1", "layer2")):
            mapping[f"{layer}.norm.weight"] = f"layers.{i}.norm1.weight"
            mapping[f"{layer}.norm.bias"] = f"layers.{i}.norm1.bias"
            mapping[f"{layer}.attn.to_qkv.weight"] = f"layers.{i}.att_module.qkv_nn.weight"
        state = {k: t[v] for k, v in mapping.items()}
        for layer in ("layer1", "layer2"):
            state[f"{layer}.attn.to_out.0.weight"] = torch.eye(dim)
            state[f"{layer}.attn.to_out.0.bias"] = torch.zeros(dim)
            state[f"{layer}.attn.res_conv.weight"] = torch.zeros(heads, 1, 33, 1)
        ours.load_state_dict(state)
        for n in (7, 50):  # l = 1 and l = 4
            x = bags(n, in_dim=in_dim)[0]
            assert (x @ t["fc1.weight"].T + t["fc1.bias"]).min() > 0
            expected = theirs(x[None])
            torch.testing.assert_close(ours(x).logits[:, 0], expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Masks, order, attention, config.


def test_padded_batch_equals_each_bag_alone_and_mask_may_have_holes():
    model = perturb(build())
    items = bags(9, 1, 17, 4)
    x, mask = pad_bags(items, pad_value=float("nan"))
    with torch.no_grad():
        batched = model(x, mask)
        for i, bag in enumerate(items):
            alone = model(bag)
            torch.testing.assert_close(batched.logits[i], alone.logits[0], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(batched.attention[i, : len(bag)], alone.attention[0], rtol=1e-6, atol=1e-7)
            assert (batched.attention[i, len(bag):] == 0).all()
        # Real instances need not be a prefix: the mask picks them, in their order.
        bag = items[2]
        holes = torch.full((1, 25, 12), float("inf"))
        where = torch.tensor([0, 2, 3, 5, 8, 9, 10, 11, 13, 14, 16, 17, 19, 20, 21, 23, 24])
        holes[0, where] = bag
        hole_mask = torch.zeros(1, 25, dtype=torch.bool)
        hole_mask[0, where] = True
        out = model(holes, hole_mask)
        torch.testing.assert_close(out.logits, model(bag).logits, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out.attention[0, where], model(bag).attention[0], rtol=1e-6, atol=1e-7)
        assert (out.attention[0, ~hole_mask[0]] == 0).all()


def test_square_padding_copies_first_instances_and_folds_their_attention():
    """n = 7: side 3, tokens 7 and 8 copy instances 0 and 1. Appending those copies explicitly (n = 9, a perfect
    square, nothing added) gives the same logits; the attention then splits what the folded version sums."""
    model = perturb(build())
    bag = bags(7)[0]
    explicit = torch.cat([bag, bag[:2]])
    with torch.no_grad():
        folded, unfolded = model(bag), model(explicit)
    torch.testing.assert_close(folded.logits, unfolded.logits, rtol=1e-6, atol=1e-6)
    a = unfolded.attention[0]
    torch.testing.assert_close(folded.attention[0], torch.cat([a[:2] + a[7:], a[2:7]]), rtol=1e-6, atol=1e-7)


def test_instance_order_matters():
    model = perturb(build())
    assert model.permutation_invariant is False and qgmil.models.MILModel.permutation_invariant is True
    bag = bags(16)[0]
    with torch.no_grad():
        assert not torch.allclose(model(bag).logits, model(bag.flip(0)).logits, atol=1e-4)


def test_attention_contract_under_training_mode():
    model = build(dropout=0.1).train()
    x, mask = pad_bags(bags(6, 3))
    out = model(x, mask)
    torch.testing.assert_close(out.attention.sum(-1), torch.ones(2))
    assert (out.attention[~mask] == 0).all() and (out.attention >= 0).all()
    assert out.layer_attention is None and out.branch_attention is None and out.aux_losses == {}


def test_presets_defaults_names_and_config_validation():
    model = qgmil.create_model("transmil", in_dim=1024, num_classes=2)
    assert model.arch == "transmil" and model.name == "transmil" and "transmil" in qgmil.list_models()
    cfg = model.config
    assert (cfg.dim, cfg.heads, cfg.dim_head, cfg.num_landmarks, cfg.pinv_iterations, cfg.residual_kernel,
            cfg.dropout) == (512, 8, 64, 256, 6, 33, 0.1)
    # The official module's parameter names and shapes (models/TransMIL.py with nystrom-attention).
    expected = {"cls_token": (1, 1, 512), "_fc1.0.weight": (512, 1024), "_fc1.0.bias": (512,),
                "norm.weight": (512,), "norm.bias": (512,), "_fc2.weight": (2, 512), "_fc2.bias": (2,)}
    for conv, k in (("proj", 7), ("proj1", 5), ("proj2", 3)):
        expected[f"pos_layer.{conv}.weight"] = (512, 1, k, k)
        expected[f"pos_layer.{conv}.bias"] = (512,)
    for layer in ("layer1", "layer2"):
        expected.update({f"{layer}.norm.weight": (512,), f"{layer}.norm.bias": (512,),
                         f"{layer}.attn.to_qkv.weight": (1536, 512), f"{layer}.attn.to_out.0.weight": (512, 512),
                         f"{layer}.attn.to_out.0.bias": (512,), f"{layer}.attn.res_conv.weight": (8, 1, 33, 1)})
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    assert model.layer1.attn.to_out[1].p == 0.1
    with pytest.raises(ValueError, match="not_a_field"):
        qgmil.create_model("transmil", in_dim=8, num_classes=2, not_a_field=1)
    with pytest.raises(ValueError, match="residual_kernel"):
        TransMILConfig(in_dim=8, num_classes=2, residual_kernel=32)
    with pytest.raises(ValueError, match="num_landmarks"):
        TransMILConfig(in_dim=8, num_classes=2, num_landmarks=0)
    with pytest.raises(ValueError, match="dropout"):
        TransMILConfig(in_dim=8, num_classes=2, dropout=1.0)


def test_bf16_autocast():
    model = perturb(build(), scale=0.1)
    x, mask = pad_bags(bags(30, 12))
    with torch.no_grad():
        ref = model(x, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, mask)
    assert torch.isfinite(low.logits).all()
    assert (low.attention[~mask] == 0).all()
    torch.testing.assert_close(low.attention.float().sum(-1), torch.ones(2), atol=1e-3, rtol=0)
    torch.testing.assert_close(low.logits.float(), ref.logits, atol=0.1, rtol=0.1)


SCALE_CHILD = """
import json, resource, sys, torch, qgmil
torch.set_num_threads(2)
torch.manual_seed(0)
model = qgmil.create_model("transmil", in_dim=1024, num_classes=2).eval()
with torch.no_grad():
    model(torch.randn(1000, 1024))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = model(torch.randn(50_000, 1024))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_gib": peak / 2**20, "base_gib": base / 2**20,
                  "finite": bool(torch.isfinite(out.logits).all()), "sum": float(out.attention.sum())}))
"""


def test_50k_instance_bag_inference_within_8_gib():
    """50,000 x 1024 (a 224 x 224 PPEG grid, 197 tokens per landmark) in a fresh process: peak RSS < 8 GiB."""
    result = subprocess.run([sys.executable, "-c", SCALE_CHILD], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["finite"] and abs(info["sum"] - 1) < 1e-4
    assert info["peak_gib"] < 8.0, info
