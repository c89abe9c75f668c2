"""Feature file readers: every layout users already have, and clear errors for bad files."""

import h5py
import numpy as np
import pytest
import torch

from qgmil.data import BagFileError, inspect_bag, read_bag, read_coords, read_extra, read_features, write_bag
from qgmil.numbers import positive_number

RNG = np.random.default_rng(0)
FEATS = RNG.normal(size=(17, 6)).astype(np.float32)
COORDS = (RNG.integers(0, 50, size=(17, 2)) * 256).astype(np.int64)


def _trident(path):
    with h5py.File(path, "w") as f:
        f["features"] = FEATS
        f["coords"] = COORDS
        f["coords"].attrs.update({"patch_size": 256, "patch_size_level0": 512, "level0_magnification": 40})
        f["features"].attrs["encoder"] = "uni_v1"


def _clam(path):
    with h5py.File(path, "w") as f:
        f["features"] = FEATS
        f["coords"] = COORDS
        f["coords"].attrs.update({"patch_level": 0, "patch_size": 256, "downsample": [1.0, 1.0]})


def _stamp(path):
    with h5py.File(path, "w") as f:
        f["feats"] = FEATS.astype(np.float16)
        f["coords"] = COORDS.astype(np.float32) * 0.5
        f.attrs.update({"unit": "um", "extractor": "ctranspath", "tile_size_um": 256.0, "tile_size_px": 224})


def _qgmil(path):
    write_bag(path, FEATS, COORDS, attrs={"encoder": "resnet50_trunc", "mpp": 0.5}, extras={
        "instance_labels": np.arange(17) % 2, "instance_names": [f"cell_{i}.png" for i in range(17)]})


def _pt(path):
    torch.save(torch.from_numpy(FEATS), path)


def _pt_dict(path):
    torch.save({"feats": torch.from_numpy(FEATS), "coords": torch.from_numpy(COORDS)}, path)


def _npy(path):
    np.save(path, FEATS)


def _batched_h5(path):  # some pipelines keep a leading batch axis: (1, N, D)
    with h5py.File(path, "w") as f:
        f["features"] = FEATS[None]


LAYOUTS = {
    "trident.h5": (_trident, "trident", "px"),
    "clam.h5": (_clam, "clam", "px"),
    "stamp.h5": (_stamp, "stamp", "um"),
    "own.h5": (_qgmil, "qgmil", "px"),
    "clam.pt": (_pt, "pt", None),
    "dict.pth": (_pt_dict, "pt", "px"),
    "plain.npy": (_npy, "npy", None),
    "batched.hdf5": (_batched_h5, "clam", None),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_every_layout_reads_the_same_features(tmp_path, name):
    make, layout, unit = LAYOUTS[name]
    path = tmp_path / name
    make(path)
    tolerance = 1e-3 if layout == "stamp" else 0  # STAMP stores float16
    info = inspect_bag(path)
    assert (info.layout, info.num_instances, info.dim) == (layout, 17, 6)
    np.testing.assert_allclose(read_features(path), FEATS, atol=tolerance)
    rows = np.array([0, 3, 16])
    np.testing.assert_allclose(read_features(path, rows), FEATS[rows], atol=tolerance)
    bag = read_bag(path)
    assert bag.layout == layout and len(bag) == 17 and bag.dim == 6
    np.testing.assert_allclose(bag.features, FEATS, atol=tolerance)
    assert bag.coord_unit == unit
    coords, coord_unit = read_coords(path)
    assert coord_unit == unit
    if unit is not None:
        expected = COORDS * 0.5 if layout == "stamp" else COORDS
        np.testing.assert_allclose(bag.coords, expected)
        np.testing.assert_allclose(coords, expected)
    else:
        assert bag.coords is None and coords is None


def test_provenance_and_extra_datasets_travel_with_the_bag(tmp_path):
    _qgmil(tmp_path / "own.h5")
    bag = read_bag(tmp_path / "own.h5")
    assert bag.attrs["encoder"] == "resnet50_trunc" and bag.attrs["mpp"] == 0.5
    assert bag.attrs["format"] == "qgmil-bag"
    np.testing.assert_array_equal(bag.extras["instance_labels"], np.arange(17) % 2)
    assert bag.extras["instance_names"][3] == "cell_3.png"

    _trident(tmp_path / "t.h5")
    attrs = read_bag(tmp_path / "t.h5").attrs
    assert attrs["patch_size_level0"] == 512 and attrs["encoder"] == "uni_v1"
    _stamp(tmp_path / "s.h5")
    assert read_bag(tmp_path / "s.h5").attrs["extractor"] == "ctranspath"


def test_write_bag_is_atomic_and_checks_shapes(tmp_path):
    with pytest.raises(BagFileError, match="coords shape"):
        write_bag(tmp_path / "b.h5", FEATS, COORDS[:5])
    with pytest.raises(BagFileError, match="2-D"):
        write_bag(tmp_path / "b.h5", FEATS[0])
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_bytes(b"not an hdf5 file"), "not a readable HDF5 file"),
        (lambda p: h5py.File(p, "w").create_dataset("embeddings", data=FEATS), "no 'features'.*holds embeddings"),
        (lambda p: h5py.File(p, "w").create_dataset("features", data=FEATS[0]), "must be 2-D"),
    ],
)
def test_bad_h5_files_name_the_file_and_the_problem(tmp_path, make, message):
    path = tmp_path / "bad.h5"
    make(path)
    with pytest.raises(BagFileError, match=message) as err:
        read_bag(path)
    assert str(path) in str(err.value)
    with pytest.raises(BagFileError, match=message):
        inspect_bag(path)


def test_bad_files_of_other_types(tmp_path):
    with pytest.raises(BagFileError, match="not found"):
        read_features(tmp_path / "missing.h5")
    (tmp_path / "x.csv").write_text("1,2\n")
    with pytest.raises(BagFileError, match="unknown feature file type '.csv'"):
        read_bag(tmp_path / "x.csv")
    torch.save({"embeddings": torch.zeros(3, 2)}, tmp_path / "d.pt")
    with pytest.raises(BagFileError, match="without a 'features'"):
        read_bag(tmp_path / "d.pt")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(BagFileError, match="obj.npy: features have dtype object"):  # refused from the header
        read_features(tmp_path / "obj.npy")
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(BagFileError, match="not a readable .npy"):
        read_features(tmp_path / "junk.npy")


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pt_files_are_never_unpickled(tmp_path, capsys):
    torch.save({"features": torch.zeros(2, 3), "evil": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(BagFileError, match="not a readable tensor file"):
        read_bag(tmp_path / "evil.pt")
    assert "must never run" not in capsys.readouterr().out


@pytest.mark.parametrize("name", LAYOUTS)
def test_read_extra_reads_one_dataset_as_read_bag_does(tmp_path, name):
    make, _, _ = LAYOUTS[name]
    path = tmp_path / name
    make(path)
    extras = read_bag(path).extras
    for key in ("instance_labels", "instance_names", "features", "feats", "coords", "nothing"):
        got = read_extra(path, key)
        if key in extras:
            assert np.array_equal(np.asarray(got), np.asarray(extras[key]))
        else:
            assert got is None, key
    if name == "own.h5":
        np.testing.assert_array_equal(read_extra(path, "instance_labels"), np.arange(17) % 2)
        assert read_extra(path, "instance_names")[3] == "cell_3.png"


@pytest.mark.parametrize("value, expected", [
    (0.5, 0.5), ("0.2527", 0.2527), (np.float32(2.0), 2.0), (np.int64(256), 256.0), (b"40", 40.0),
    (None, None), ("", None), ("n/a", None), ([0.5], None), (0, None), (-1.0, None), (float("nan"), None),
    (float("inf"), None), (True, None), (np.bool_(True), None),
])
def test_positive_number_reads_sizes_and_resolutions(value, expected):
    """One reader for optional metadata numbers (slide properties are text, h5 attrs numpy scalars)."""
    assert positive_number(value) == (pytest.approx(expected) if expected is not None else None)
