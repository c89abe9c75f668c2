"""MILDataset, bucketing sampler and padded batches: what the training loop will rely on."""

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qgmil
from qgmil.data import (
    BucketBatchSampler, MILDataset, collate_bags, make_loader, padding_fraction, read_features, set_epoch, write_bag,
)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    """24 bags of 3..200 instances (dim 8) with coords and instance labels; 2 slides per patient."""
    root = tmp_path_factory.mktemp("bags")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):
        n = int(rng.integers(3, 200))
        coords = np.stack([np.arange(n) % 10, np.arange(n) // 10], 1) * 224
        write_bag(root / "features" / f"s{i}.h5", rng.normal(size=(n, 8)).astype(np.float32), coords,
                  extras={"instance_labels": np.full(n, i)})
        rows.append({"bag_id": f"s{i}", "label": ["a", "b", "c"][(i // 2) % 3], "patient_id": f"p{i // 2}"})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root


def load(root, **kw):
    return MILDataset.from_table(root / "labels.csv", root / "features", **kw)


def test_items_match_the_files(dataset_dir):
    ds = load(dataset_dir, with_coords=True)
    assert len(ds) == 24 and ds.classes == ["a", "b", "c"] and ds.in_dim == 8
    item = ds[5]
    np.testing.assert_array_equal(item.features.numpy(), read_features(dataset_dir / "features" / "s5.h5"))
    assert item.features.dtype == torch.float32 and item.bag_id == "s5" and item.label == 2
    assert item.coords.shape == (len(item.features), 2)
    assert ds.lengths[5] == len(item.features)
    assert ds.read_bag(5).extras["instance_labels"][0] == 5


def test_patient_bags_concatenate_their_slides(dataset_dir):
    slides = load(dataset_dir)
    patients = load(dataset_dir, bag_unit="patient")
    assert len(patients) == 12 and patients.bag_ids[0] == "p0"
    np.testing.assert_array_equal(patients.labels, slides.labels[::2])
    item = patients[3]
    expected = torch.cat([slides[6].features, slides[7].features])
    torch.testing.assert_close(item.features, expected)
    bag = patients.read_bag(3)
    assert bag.attrs["slides"] == ["s6", "s7"]
    np.testing.assert_array_equal(bag.extras["slide_index"], np.repeat([0, 1], [len(slides[6].features), len(slides[7].features)]))
    np.testing.assert_array_equal(bag.extras["instance_labels"], np.repeat([6, 7], [len(slides[6].features), len(slides[7].features)]))


def test_instance_subsampling_is_reproducible_and_changes_with_epoch(dataset_dir):
    full = load(dataset_dir)
    ds = load(dataset_dir, max_instances=20, seed=1)
    big = int(np.argmax(full.lengths))
    a = ds[big].features
    assert a.shape == (20, 8)
    rows = {tuple(r) for r in full[big].features.numpy()}
    assert all(tuple(r) in rows for r in a.numpy())  # real instances, none invented
    torch.testing.assert_close(ds[big].features, a)   # same (seed, epoch, index) -> same subset
    ds.set_epoch(1)
    assert not torch.equal(ds[big].features, a)
    small = int(np.argmin(full.lengths))
    torch.testing.assert_close(ds[small].features, full[small].features)  # short bags untouched


def test_fp16_cache(dataset_dir):
    ds = load(dataset_dir, cache="fp16").preload(progress=False)
    assert len(ds._cache) == 24
    np.testing.assert_array_equal(ds[4].features.numpy(),
                                  read_features(dataset_dir / "features" / "s4.h5").astype(np.float16).astype(np.float32))
    part = ds.subset(["s1", "s4"], max_instances=5)
    assert part._cache is ds._cache and part.bag_ids == ["s1", "s4"] and part.max_instances == 5


def test_auto_cache_keeps_a_dataset_that_fits_and_reads_each_file_once(dataset_dir, monkeypatch):
    """cache="auto" (the run default) is fp32 when the dataset's float32 features fit auto_cache_limit(): each
    file is read once, subsets share the cache and the decision, and the values are the files' own."""
    import qgmil.data.dataset as dataset_module

    ds = load(dataset_dir, cache="auto")
    assert ds.feature_bytes() == int(ds.lengths.sum()) * 8 * 4
    reads = []
    real_read = dataset_module.read_features
    monkeypatch.setattr(dataset_module, "read_features", lambda *a, **k: reads.append(a[0]) or real_read(*a, **k))
    part = ds.subset(["s1", "s4"])
    assert ds.cache_mode == part.cache_mode == "fp32" and part._cache is ds._cache
    for _ in range(3):
        np.testing.assert_array_equal(part[1].features.numpy(), read_features(dataset_dir / "features" / "s4.h5"))
        ds[4]
    assert reads == [dataset_dir / "features" / "s4.h5"]


def test_auto_cache_reads_from_the_files_when_the_dataset_does_not_fit(dataset_dir, monkeypatch):
    import qgmil.data.dataset as dataset_module

    ds = load(dataset_dir, cache="auto")
    monkeypatch.setattr(dataset_module, "auto_cache_limit", lambda: ds.feature_bytes() - 1)
    assert ds.cache_mode is None and ds.subset(["s1"]).cache_mode is None
    ds[3]
    assert not ds._cache


def test_auto_cache_limit_is_shared_by_torchrun_processes(monkeypatch):
    from qgmil.data.dataset import AUTO_CACHE_BYTES, auto_cache_limit

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    alone = auto_cache_limit()
    assert 0 < alone <= AUTO_CACHE_BYTES
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert auto_cache_limit() == alone // 4


def test_subset_rejects_unknown_ids(dataset_dir):
    with pytest.raises(ValueError, match="'nope' is not in the table"):
        load(dataset_dir).subset(["s1", "nope"])


def test_loader_batches_are_padded_and_masked_and_workers_agree(dataset_dir):
    ds = load(dataset_dir, with_coords=True)
    batches = {}
    for workers in (0, 2):
        loader = make_loader(ds, batch_size=5, num_workers=workers, seed=3)
        set_epoch(loader, 2)
        batches[workers] = list(loader)
    for b0, b2 in zip(batches[0], batches[2], strict=True):
        assert b0.bag_ids == b2.bag_ids
        torch.testing.assert_close(b0.x, b2.x)
    seen = []
    for batch in batches[0]:
        lengths = ds.lengths[batch.index.numpy()]
        assert batch.x.shape[:2] == batch.mask.shape == (len(batch), lengths.max())
        assert batch.mask.sum(1).tolist() == lengths.tolist()
        assert (batch.x[~batch.mask] == 0).all() and batch.coords.shape[:2] == batch.mask.shape
        assert batch.labels.tolist() == ds.labels[batch.index.numpy()].tolist()
        seen += batch.bag_ids
    assert sorted(seen) == sorted(ds.bag_ids)


def test_batched_logits_equal_single_bag_logits(dataset_dir):
    ds = load(dataset_dir)
    model = qgmil.create_model("qgmil", in_dim=8, num_classes=3).eval()
    batch = collate_bags([ds[i] for i in (0, 3, 9)])
    with torch.no_grad():
        together = model(batch.x, batch.mask).logits
        alone = torch.cat([model(ds[i].features).logits for i in (0, 3, 9)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 5000), min_size=1, max_size=120),
    batch_size=st.integers(1, 9),
    shuffle=st.booleans(),
    replicas=st.integers(1, 3),
    epoch=st.integers(0, 3),
)
def test_sampler_covers_every_bag_once_and_splits_global_batches_over_ranks(lengths, batch_size, shuffle, replicas, epoch):
    single = BucketBatchSampler(lengths, batch_size, shuffle=shuffle, seed=5)
    single.set_epoch(epoch)
    global_batches = list(single)
    assert len(global_batches) == len(single)
    assert sorted(i for b in global_batches for i in b) == list(range(len(lengths)))  # exactly once
    assert all(1 <= len(b) <= batch_size for b in global_batches)
    per_rank = []
    for rank in range(replicas):
        sampler = BucketBatchSampler(lengths, batch_size, shuffle=shuffle, num_replicas=replicas, rank=rank, seed=5)
        sampler.set_epoch(epoch)
        per_rank.append(list(zip(sampler, sampler.step_plan())))
        assert len(per_rank[-1]) == len(global_batches)  # every rank runs the same steps
    for step, batch in enumerate(global_batches):
        real = [i for r in per_rank for i in r[step][0] if not r[step][1][1]]
        assert sorted(real) == sorted(batch)  # the ranks' real shares make up the global batch
        assert all(r[step][1][0] == len(batch) for r in per_rank)


def test_bucketing_cuts_padding_and_depends_only_on_seed_and_epoch():
    lengths = np.random.default_rng(0).lognormal(8, 1, size=512).astype(int) + 1
    sampler = BucketBatchSampler(lengths, 8, seed=0)
    bucketed = list(sampler)
    assert bucketed == list(BucketBatchSampler(lengths, 8, seed=0))
    sampler.set_epoch(1)
    assert list(sampler) != bucketed
    random = [list(b) for b in np.random.default_rng(1).permutation(512).reshape(64, 8)]
    assert padding_fraction(bucketed, lengths) < 0.4 * padding_fraction(random, lengths)  # 0.19 vs 0.68


def test_class_balanced_sampling():
    labels = np.array([0] * 90 + [1] * 10)
    sampler = BucketBatchSampler(np.ones(100), 10, class_balanced=True, labels=labels)
    drawn = []
    for epoch in range(20):
        sampler.set_epoch(epoch)
        drawn += [i for b in sampler for i in b]
    share = (labels[drawn] == 1).mean()
    assert 0.45 < share < 0.55  # the 10% class is drawn half the time
    with pytest.raises(ValueError, match="needs labels"):
        BucketBatchSampler(np.ones(4), 2, class_balanced=True)


@settings(max_examples=30, deadline=None)
@given(lengths=st.lists(st.integers(0, 12), min_size=1, max_size=5), pad=st.sampled_from([0.0, -1.5]))
def test_pad_bags_matches_pad_sequence(lengths, pad):
    from qgmil.data import pad_bags

    bags = [torch.randn(n, 3) for n in lengths]
    x, mask = pad_bags(bags, pad_value=pad)
    torch.testing.assert_close(x, torch.nn.utils.rnn.pad_sequence(bags, batch_first=True, padding_value=pad))
    assert mask.sum(1).tolist() == lengths


def test_batches_never_alias_the_fp32_cache(dataset_dir):
    ds = load(dataset_dir, cache="fp32")
    before = ds[0].features.clone()
    for batch in make_loader(ds, batch_size=1, train=False):
        batch.x.mul_(0)  # a training loop may normalise inputs in place
    torch.testing.assert_close(ds[0].features, before)


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(1, 400), min_size=1, max_size=120), budget=st.integers(1, 2000),
       most=st.one_of(st.none(), st.integers(1, 40)), shuffle=st.booleans(), seed=st.integers(0, 5),
       packed=st.booleans())
def test_instance_budget_batches(lengths, budget, most, shuffle, seed, packed):
    """Under `batch_instances` every bag comes once per epoch, a batch holds at most `batch_size` bags and its
    size (padded: bags x longest; packed: the sum of lengths) stays within the budget unless it is one bag
    longer than the budget; the epoch's step count is what `steps_per_epoch` predicted."""
    from qgmil.data.sampler import BucketBatchSampler

    lengths = np.array(lengths)
    sampler = BucketBatchSampler(lengths, most, batch_instances=budget, packed=packed, shuffle=shuffle, seed=seed)
    for epoch in range(2):
        predicted = sampler.steps_per_epoch(range(epoch, epoch + 1))[0]
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == predicted == len(sampler)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        for b in batches:
            assert most is None or len(b) <= most
            size = lengths[b].sum() if packed else len(b) * lengths[b].max()
            assert size <= budget or len(b) == 1


def test_instance_budget_packs_small_bags_and_isolates_big_ones():
    from qgmil.data.sampler import BucketBatchSampler, padding_fraction

    lengths = np.r_[np.full(200, 10), [50_000]]
    batches = list(BucketBatchSampler(lengths, None, batch_instances=1000, shuffle=False))
    assert [len(b) for b in batches] == [100, 100, 1] and padding_fraction(batches, lengths) == 0.0
    fixed = BucketBatchSampler(lengths, 16, seed=3)
    assert list(fixed) == list(BucketBatchSampler(lengths, 16, batch_instances=None, seed=3))


def test_packed_batches_hold_the_padded_batches_bags(tmp_path):
    """pack=True: the same bags per batch as padded batches under the same limits, concatenated in order."""
    from qgmil.data import MILDataset, make_loader, prepare_dataset

    root = prepare_dataset("digit-bags", tmp_path / "d", bags=30, progress=False)
    data = MILDataset.from_table(root / "labels.csv", root / "features")
    padded = list(make_loader(data, 8, train=False))
    packed = list(make_loader(data, 8, train=False, pack=True))
    assert len(padded) == len(packed)
    for a, b in zip(padded, packed):
        assert a.bag_ids == b.bag_ids and b.lengths.tolist() == a.mask.sum(1).tolist()
        torch.testing.assert_close(b.x, a.x[a.mask], rtol=0, atol=0)
        assert torch.equal(b.mask, a.mask)
