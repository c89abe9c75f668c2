"""Contract tests, parametrised over every registered model."""

import pytest
import torch

import qgmil
from qgmil.data import pad_bags

IN_DIM, NUM_CLASSES = 24, 3
MODELS = qgmil.list_models()


def make(name, seed=0, **overrides):
    torch.manual_seed(seed)
    return qgmil.create_model(name, in_dim=IN_DIM, num_classes=NUM_CLASSES, **overrides).eval()


def bags(*sizes, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, IN_DIM, generator=g) for n in sizes]


def test_registry_lists_official_presets_and_ablations():
    expected = {"qgmil", "qgmil_elementwise", "qgmil_no_gate", "qgmil_layernorm", "qgmil_no_qknorm",
                "qgmil_minimal", "qgmil_deep", "qgmil_light", "qgmil_wo_rmsnorm", "qgmil_wo_qknorm",
                "qgmil_wo_gate", "qgmil_wo_swiglu"}
    assert expected <= set(MODELS)
    assert qgmil.list_models("qgmil_wo_*") == ["qgmil_wo_gate", "qgmil_wo_qknorm", "qgmil_wo_rmsnorm", "qgmil_wo_swiglu"]


def test_unknown_model_and_unknown_override_are_named():
    with pytest.raises(ValueError, match="qgmil_nope"):
        qgmil.create_model("qgmil_nope", in_dim=4, num_classes=2)
    with pytest.raises(ValueError, match="not_a_field"):
        qgmil.create_model("qgmil", in_dim=4, num_classes=2, not_a_field=1)


@pytest.mark.parametrize("name", MODELS)
def test_shapes_and_attention_contract(name):
    model = make(name)
    x, mask = pad_bags(bags(7, 3, 5))
    out = model(x, mask)
    assert out.logits.shape == (3, NUM_CLASSES)
    assert out.attention.shape == (3, 7)
    assert out.embedding.shape[0] == 3
    torch.testing.assert_close(out.attention.sum(-1), torch.ones(3))
    assert (out.attention[~mask] == 0).all()
    assert (out.attention >= 0).all()
    single = model(bags(7)[0])  # a 2-D input is one bag
    assert single.logits.shape == (1, NUM_CLASSES)


@pytest.mark.parametrize("name", MODELS)
def test_labels_auxiliary_losses_and_branch_attention(name):
    """Training with bag labels: auxiliary losses are finite scalars that backpropagate; in eval mode
    labels change nothing and no auxiliary loss is computed."""
    model = make(name).train()
    x, mask = pad_bags(bags(9, 4, 6))
    labels = torch.tensor([0, 2, 1])
    torch.manual_seed(0)
    out = model(x, mask, labels=labels)
    for key, value in out.aux_losses.items():
        assert value.dim() == 0 and torch.isfinite(value), key
    loss = torch.nn.functional.cross_entropy(out.logits, labels) + sum(out.aux_losses.values(), torch.zeros(()))
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    with torch.no_grad():
        with_labels, without = model(x, mask, labels=labels), model(x, mask)
    torch.testing.assert_close(with_labels.logits, without.logits, rtol=0, atol=0)
    assert not without.aux_losses
    if without.branch_attention is not None:
        branches = without.branch_attention
        assert branches.shape[0] == 3 and branches.shape[2] == 9
        torch.testing.assert_close(branches.sum(-1), torch.ones(branches.shape[:2]))
        assert (branches.permute(0, 2, 1)[~mask] == 0).all()


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("pad_value", [0.0, 1e4, float("nan"), float("inf")])
def test_padding_does_not_change_anything(name, pad_value):
    model = make(name)
    items = bags(9, 4, 6)
    x, mask = pad_bags(items, pad_value=pad_value)
    with torch.no_grad():
        batched = model(x, mask)
        for i, bag in enumerate(items):
            alone = model(bag)
            torch.testing.assert_close(batched.logits[i], alone.logits[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(batched.attention[i, : len(bag)], alone.attention[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", MODELS)
def test_permutation_invariance(name):
    model = make(name)
    if not model.permutation_invariant:
        pytest.skip(f"{name} depends on instance order by design (permutation_invariant = False)")
    bag = bags(11)[0]
    perm = torch.randperm(11)
    with torch.no_grad():
        out, out_perm = model(bag), model(bag[perm])
    torch.testing.assert_close(out_perm.logits, out.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_perm.attention[0], out.attention[0, perm], rtol=1e-5, atol=1e-6)


# Biases a softmax is invariant to: their gradient is exactly zero by construction.
SHIFT_INVARIANT = {"pool.attn_w.bias", "tier1.attn_w.bias"}  # a constant added before a softmax


@pytest.mark.parametrize("name", MODELS)
def test_gradient_reaches_every_parameter(name):
    """Through the training objective: cross-entropy plus the model's auxiliary losses (some parameters,
    such as ACMIL's branch heads, only train through those). Every class occurs, since some auxiliary
    parameters train only on bags of their own class (CLAM's instance classifiers without subtyping)."""
    model = make(name).train()
    x, mask = pad_bags(bags(6, 4, 5))
    labels = torch.tensor([0, 2, 1])
    out = model(x, mask, labels=labels)
    loss = torch.nn.functional.cross_entropy(out.logits, labels)
    (loss + sum(out.aux_losses.values(), torch.zeros(()))).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} gets no gradient"
        assert torch.isfinite(p.grad).all(), pname
        if pname not in SHIFT_INVARIANT:
            assert p.grad.abs().sum() > 0, f"{pname} has an all-zero gradient"


@pytest.mark.parametrize("name", MODELS)
def test_determinism_under_seed(name):
    a, b, c = make(name, seed=3), make(name, seed=3), make(name, seed=4)
    x = bags(5)[0]
    with torch.no_grad():
        torch.testing.assert_close(a(x).logits, b(x).logits, rtol=0, atol=0)
        assert not torch.equal(a(x).logits, c(x).logits)
    # Dropout in training mode is reproducible under a seed too.
    a.train(), b.train()
    torch.manual_seed(7)
    la = a(x).logits
    torch.manual_seed(7)
    torch.testing.assert_close(b(x).logits, la, rtol=0, atol=0)


@pytest.mark.parametrize("name", MODELS)
def test_checkpoint_roundtrip(name, tmp_path):
    model = make(name)
    path = qgmil.save_model(model, tmp_path / "m.safetensors", extra={"classes": ["a", "b", "c"]})
    loaded = qgmil.load_model(path)
    assert loaded.name == name and loaded.config == model.config
    x, mask = pad_bags(bags(5, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, mask).logits, model(x, mask).logits, rtol=0, atol=0)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left behind


@pytest.mark.parametrize("name", MODELS)
def test_chunked_inference_equals_full(name):
    model = make(name)
    x, mask = pad_bags(bags(40, 23))
    with torch.no_grad():
        model.inference_chunk = None
        full = model(x, mask)
        model.inference_chunk = 7  # several chunks, the last one partial
        chunked = model(x, mask)
    torch.testing.assert_close(chunked.logits, full.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked.attention, full.attention, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["qgmil", "qgmil_elementwise", "qgmil_layernorm"])
def test_bf16_autocast(name):
    """Mixed precision runs (on CPU here; the same autocast path serves GPUs) and stays near fp32."""
    model = make(name)
    x, mask = pad_bags(bags(30, 12))
    with torch.no_grad():
        ref = model(x, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, mask)
    assert torch.isfinite(low.logits).all()
    torch.testing.assert_close(low.attention.float().sum(-1), torch.ones(2), atol=2e-2, rtol=0)
    assert (low.attention[~mask] == 0).all()
    torch.testing.assert_close(low.embedding.float(), ref.embedding, atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(low.logits.float(), ref.logits, atol=5e-3, rtol=5e-2)


def test_tags_describe_every_model():
    from qgmil.models import ABLATION_SET
    from qgmil.models.registry import TAGS, model_entry

    assert set(qgmil.list_models(tags="ablation")) == set(ABLATION_SET)
    qg, base = set(qgmil.list_models(tags="qgmil")), set(qgmil.list_models(tags="baseline"))
    assert qg.isdisjoint(base) and qg | base == set(MODELS)  # every model is one or the other
    assert "transformer_mil" in base and "qgmil_light" in qg
    assert qgmil.list_models("qgmil_*", tags=["qgmil", "ablation"]) == [m for m in sorted(ABLATION_SET) if m != "qgmil"]
    assert all(model_entry(m).tags <= set(TAGS) for m in MODELS)
    with pytest.raises(ValueError, match="unknown tag.*nope"):
        qgmil.list_models(tags="nope")


@pytest.mark.parametrize("name", MODELS)
def test_multi_branch_tag_matches_the_output(name):
    """The `multi_branch` tag is exactly the models that return branch attention."""
    x, mask = pad_bags(bags(6, 4))
    out = make(name)(x, mask)
    assert (out.branch_attention is not None) == ("multi_branch" in qgmil.models.model_entry(name).tags)


@pytest.mark.parametrize("name", MODELS)
def test_has_unused_parameters_trait_is_exact(name):
    """A training step leaves parameters without gradient only in models that declare it (DDP reads the trait)."""
    model = make(name).train()
    x, mask = pad_bags(bags(12, 9))
    out = model(x, mask, labels=torch.tensor([0, 2]))
    (out.logits.sum() + sum(out.aux_losses.values(), torch.zeros(()))).backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert bool(unused) == type(model).has_unused_parameters, unused


def test_check_model_names_the_problem_without_building():
    from qgmil.models.registry import check_model

    check_model("qgmil", {"gate": "elementwise", "dropout": 0.1})
    with pytest.raises(ValueError, match="unknown model 'qgmill'.*qgmil"):
        check_model("qgmill")
    with pytest.raises(ValueError, match=r"dropot: not a field of qgmil \(fields: .*dropout"):
        check_model("qgmil", {"dropot": 0.1})
    with pytest.raises(ValueError, match="gate"):
        check_model("qgmil", {"gate": "sideways"})
    with pytest.raises(ValueError, match="in_dim: set from the data"):
        check_model("abmil", {"in_dim": 3})


PACKABLE = [m for m in MODELS if make(m).packable]


def test_packable_models():
    """The models that take packed bags; the others are padded by the engine."""
    assert {"qgmil", "qgmil_wo_gate", "transformer_mil", "abmil", "abmil_gated", "mean_pool", "max_pool"} <= set(PACKABLE)
    assert not make("qgmil", pooling="cls").packable


@pytest.mark.parametrize("name", PACKABLE)
@pytest.mark.parametrize("grad", [False, True])
def test_packed_equals_padded(name, grad):
    """Packed bags (concatenated, no padding) give the padded batch's logits, attention and embedding (1e-5),
    with and without gradients (the chunked inference path and the training path), and the same gradients."""
    from qgmil.data import pack_bags

    model = make(name)
    sizes = (11, 4, 7, 1)
    x, mask = pad_bags(bags(*sizes))
    packed, lengths = pack_bags(bags(*sizes))
    with torch.set_grad_enabled(grad):
        padded_out, packed_out = model(x, mask), model(packed, lengths=lengths)
    for key in ("logits", "attention", "embedding"):
        torch.testing.assert_close(getattr(packed_out, key), getattr(padded_out, key), rtol=1e-5, atol=1e-6, msg=key)
    assert (packed_out.attention[~mask] == 0).all()
    if grad:
        grads = []
        for out in (padded_out, packed_out):
            model.zero_grad()
            out.logits.square().sum().backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        assert grads[0].keys() == grads[1].keys()
        for n in grads[0]:
            torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("impl", ["loop", "nested"])
def test_segment_attention_is_per_bag_attention(impl):
    """Block-diagonal attention over packed bags equals each bag's own SDPA, both ways it can run."""
    from qgmil.layers import Segments, segment_attention

    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([5, 1, 9])
    q, k, v = (torch.randn(int(lengths.sum()), 4, 8, generator=g) for _ in range(3))
    out = segment_attention(q, k, v, Segments.from_lengths(lengths), impl=impl)
    start = 0
    for n in lengths.tolist():
        sl = slice(start, start + n)
        ref = torch.nn.functional.scaled_dot_product_attention(*(t[sl].transpose(0, 1)[None] for t in (q, k, v)))
        torch.testing.assert_close(out[sl], ref[0].transpose(0, 1), rtol=1e-5, atol=1e-6)
        start += n
