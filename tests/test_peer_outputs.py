"""qgmil's outputs in the peers' tools: extraction files TRIDENT reads as they are, `qgmil export features` copies in
TRIDENT's, CLAM's and STAMP's layouts, compared programmatically with files the peers themselves wrote
(../shared/fixtures/peer_files), and the round trip qgmil -> peer layout -> qgmil."""

import errno
import os
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from qgmil.cli import main
from qgmil.data import BagFileError, DataError, read_bag, write_bag
from qgmil.data.bagfile import TileFacts, peer_layout_of
from qgmil.data.export import ExportError, export_features

PEERS = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "peer_files"
TRIDENT = PEERS / "trident" / "10x_256px_0px_overlap" / "features_resnet50"
CLAM = PEERS / "clam"
STAMP = PEERS / "stamp" / "randconv64"
SLIDE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "CMU-1-Small-Region.svs"

ENCODER = "timm:test_vit (weights=random(seed=0))"  # what `qgmil extract` records for random test weights
MPP = 0.2527  # a 40x scan: micrometres are not whole pixels, so the way back must go through the mpp
SIZES = {"s0": 37, "s1": 5, "s2": 120}  # instances per bag


@pytest.fixture(scope="module")
def peers():
    if not PEERS.is_dir():
        if os.environ.get("QGMIL_REQUIRE_FIXTURES"):
            pytest.fail(f"{PEERS} not found")
        pytest.skip(f"{PEERS} not found")
    return PEERS


def _bags(folder: Path, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """qgmil bags as `qgmil extract wsi` writes them (root attributes; 1024 px level-0 tiles of 256 px at 10x)."""
    rng = np.random.default_rng(seed)
    bags = {}
    for name, n in SIZES.items():
        features = rng.normal(scale=3.0, size=(n, 16)).astype(np.float32)
        coords = (rng.choice(400, size=n, replace=False)[:, None] // [20, 1] % 20 * 1024).astype(np.int64)
        write_bag(folder / f"{name}.h5", features, coords, attrs={
            "encoder": ENCODER, "mpp": MPP, "magnification": 40.0, "target_mpp": MPP * 4, "patch_size_px": 256,
            "patch_size_um": 1024 * MPP, "patch_size_level0": 1024.0, "patch_level": 0, "read_size": 1024,
            "slide_width": 20480, "slide_height": 20500}, extras={"tissue_fraction": np.ones(n, np.float32)})
        bags[name] = features, coords
    return bags


def _table(path: Path) -> Path:
    """s0 and s1 are one patient's two slides."""
    pd.DataFrame({"bag_id": ["s0", "s1", "s2"], "label": ["tumor", "tumor", "normal"],
                  "patient_id": ["P1", "P1", "P2"]}).to_csv(path, index=False)
    return path


def _layout(path: Path) -> dict:
    """What a peer's reader relies on in an .h5: each dataset's dtype, rank and growability, and every attribute's
    place, name and stored type (h5py's dtype: int64, float64, or 'str' for text)."""
    def kind(obj, name):
        dtype = obj.attrs.get_id(name).dtype
        return "str" if h5py.check_string_dtype(dtype) else str(dtype)

    with h5py.File(path, "r") as f:
        datasets = {name: (str(ds.dtype), ds.ndim, ds.maxshape[0] is None) for name, ds in f.items()}
        attrs = {("/", k): kind(f, k) for k in f.attrs}
        for name, ds in f.items():
            attrs.update({(name, k): kind(ds, k) for k in ds.attrs})
    return {"datasets": datasets, "attrs": attrs}


# --- extraction: TRIDENT reads qgmil's files as they are ----------------------------------------------------------

def _region_sizes_as_trident_reads_them(path: Path) -> tuple[dict, np.ndarray, object]:
    """Read a feature file the way TRIDENT's heatmaps and slide encoders do: the attributes of `coords` only."""
    with h5py.File(path, "r") as f:
        coords = f["coords"][:]
        attrs = dict(f["coords"].attrs)
    return attrs, coords, attrs["patch_size_level0"]


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """The CMU slide through `qgmil extract wsi` (20x, 256 px tiles, the tiny random test encoder)."""
    if not SLIDE.is_file():
        if os.environ.get("QGMIL_REQUIRE_FIXTURES"):
            pytest.fail(f"{SLIDE} not found")
        pytest.skip(f"{SLIDE} not found")
    from qgmil.extract.wsi import TilingSettings, extract_slides

    out = tmp_path_factory.mktemp("extracted")
    summary = extract_slides([SLIDE], out, "timm:test_vit", weights="random", settings=TilingSettings(
        tile_px=256, magnification=20), num_workers=0, progress=False, batch_size=32, device="cpu")
    assert summary.count("done") == 1
    return out / "features" / "CMU-1-Small-Region.h5"


def test_extracted_files_carry_tridents_attributes_where_trident_reads_them(extracted, peers):
    layout = _layout(extracted)
    fixture = _layout(TRIDENT / "slide_00.h5")
    on_coords = {k: v for (where, k), v in layout["attrs"].items() if where == "coords"}
    assert on_coords == {k: v for (where, k), v in fixture["attrs"].items() if where == "coords"}  # names and types
    assert layout["datasets"]["coords"][0] == "int64"

    attrs, coords, patch = _region_sizes_as_trident_reads_them(extracted)
    assert isinstance(patch, np.integer) and patch == 256  # CMU is a 20x scan tiled at 20x
    assert (attrs["patch_size"], attrs["level0_magnification"], attrs["target_magnification"]) == (256, 20, 20)
    assert (attrs["level0_width"], attrs["level0_height"], attrs["overlap"]) == (2220, 2967, 0)
    assert attrs["name"] == "CMU-1-Small-Region"
    assert (coords // patch).dtype.kind == "i"  # slide encoders turn coords into a patch grid by integer division

    # a region of that size read from the slide (TRIDENT's top-patch crops): a float size was a TypeError
    openslide = pytest.importorskip("openslide")
    with openslide.OpenSlide(str(SLIDE)) as slide:
        x, y = (int(v) for v in coords[0])
        assert slide.read_region((x, y), 0, (patch, patch)).size == (256, 256)
        with pytest.raises(TypeError):
            slide.read_region((x, y), 0, (float(patch), float(patch)))

    # qgmil reads its own facts from the root as before: exact (float) sizes, qgmil's layout
    bag = read_bag(extracted)
    assert bag.layout == "qgmil" and bag.attrs["patch_size_level0"] == 256.0 and bag.coord_unit == "px"
    np.testing.assert_array_equal(bag.coords, coords)


def test_old_qgmil_files_still_read_and_are_what_trident_refused(tmp_path):
    """A file written before (patch size a float at the root, nothing on coords) reads in qgmil as ever; TRIDENT's
    way of reading it is the KeyError users met."""
    path = write_bag(tmp_path / "old.h5", np.ones((3, 4), np.float32), np.zeros((3, 2), np.int64),
                     attrs={"patch_size_level0": 512.0, "mpp": 0.25, "encoder": "uni"})
    bag = read_bag(path)
    assert bag.layout == "qgmil" and bag.attrs["patch_size_level0"] == 512.0 and bag.attrs["mpp"] == 0.25
    with pytest.raises(KeyError):
        _region_sizes_as_trident_reads_them(path)
    with pytest.raises(BagFileError, match="without coords"):
        write_bag(tmp_path / "bad.h5", np.ones((3, 4)), coords_attrs={"patch_size": 1})


# --- export: the files match the peers' own ----------------------------------------------------------------------

@pytest.mark.parametrize("to", ["trident", "clam", "stamp"])
def test_exported_files_have_the_peers_layout(tmp_path, peers, to):
    _bags(tmp_path / "bags")
    summary = export_features(tmp_path / "bags", to, tmp_path / "out", table=_table(tmp_path / "t.csv"), progress=False)
    theirs = {"trident": TRIDENT, "clam": CLAM / "h5_files", "stamp": STAMP}[to] / "slide_00.h5"
    ours = summary.folder / "s0.h5"
    assert summary.folder == tmp_path / "out" / {"trident": "features_timm_test_vit", "clam": "h5_files",
                                                   "stamp": "timm_test_vit"}[to]
    mine, peer = _layout(ours), _layout(theirs)
    assert mine["datasets"] == peer["datasets"]  # names, dtypes, rank, growable or not: no qgmil extras either
    if to == "stamp":  # STAMP's attributes, plus the slide's mpp that takes the micrometres back to pixels
        assert {k: v for k, v in mine["attrs"].items() if k in peer["attrs"]} == peer["attrs"]
        assert set(mine["attrs"]) - set(peer["attrs"]) == {("/", "mpp")}
    else:
        assert mine["attrs"] == peer["attrs"]  # TRIDENT: the same names and types in the same places; CLAM: none
    assert peer_layout_of(ours) == to

    if to == "trident":  # the patches TRIDENT's visualisation reads, beside the features, as TRIDENT leaves them
        patches = tmp_path / "out" / "patches" / "s0_patches.h5"
        assert _layout(patches) == _layout(TRIDENT.parent / "patches" / "slide_00_patches.h5")
        with h5py.File(patches) as f, h5py.File(ours) as g:
            np.testing.assert_array_equal(f["coords"][()], g["coords"][()])
            assert f["coords"].attrs["name"] == "s0" and f["coords"].attrs["patch_size_level0"] == \
                g["coords"].attrs["patch_size_level0"]
    if to == "clam":  # CLAM's default path: pt_files/<slide>.pt, a plain tensor, readable without unpickling
        tensor = torch.load(tmp_path / "out" / "pt_files" / "s0.pt", weights_only=True)
        reference = torch.load(CLAM / "pt_files" / "slide_00.pt", weights_only=True)
        assert type(tensor) is type(reference) and tensor.dtype == reference.dtype and tensor.ndim == 2
        table, peer_table = (pd.read_csv(p) for p in (tmp_path / "out" / "dataset.csv", CLAM / "dataset.csv"))
        assert list(table.columns) == list(peer_table.columns)
        assert table.values.tolist() == [["P1", "s0", "tumor"], ["P1", "s1", "tumor"], ["P2", "s2", "normal"]]
    if to == "stamp":  # STAMP's two tables: slide.csv per slide, clini.csv per patient
        slides, peer_slides = (pd.read_csv(p) for p in (tmp_path / "out" / "slide.csv", PEERS / "stamp" / "slide.csv"))
        assert list(slides.columns) == list(peer_slides.columns) == ["PATIENT", "FILENAME"]
        assert slides.values.tolist() == [["P1", "s0.h5"], ["P1", "s1.h5"], ["P2", "s2.h5"]]
        assert all((summary.folder / name).is_file() for name in slides["FILENAME"])
        clini = pd.read_csv(tmp_path / "out" / "clini.csv")
        assert list(clini.columns) == ["PATIENT", "label"]
        assert clini.values.tolist() == [["P1", "tumor"], ["P2", "normal"]]


def _as_stamp_reads_it(path: Path) -> tuple[np.ndarray, np.ndarray, float, float]:
    """STAMP's loader: `feats`, micrometre `coords` since the file says tile_size_um, and the tiles' resolution."""
    with h5py.File(path, "r") as f:
        assert f.attrs["feat_type"] == "tile" and f.attrs["unit"] == "um"
        tile_um = float(f.attrs["tile_size_um"])
        return f["feats"][:], f["coords"][:], tile_um, tile_um / int(f.attrs["tile_size_px"])


@pytest.mark.parametrize("to", ["trident", "clam", "stamp"])
def test_round_trip_gives_the_same_features_and_coords(tmp_path, to):
    bags = _bags(tmp_path / "bags")
    summary = export_features(tmp_path / "bags", to, tmp_path / "out", progress=False)
    assert summary.files["written"] == len(bags) * (1 if to == "stamp" else 2)  # CLAM's .pt, TRIDENT's patches
    for name, (features, coords) in bags.items():
        back = read_bag(summary.folder / f"{name}.h5")
        assert back.layout == to and len(back) == SIZES[name]
        if to == "stamp":
            # float16, as STAMP stores them: within its precision
            assert back.features.dtype == np.float16
            np.testing.assert_allclose(back.features.astype(np.float32), features, rtol=1e-3, atol=1e-3)
            # micrometres, and back to level-0 pixels through the recorded mpp: exactly
            assert back.coord_unit == "um" and back.attrs["mpp"] == MPP
            np.testing.assert_allclose(back.coords, coords * MPP, rtol=1e-6)
            np.testing.assert_array_equal(np.rint(back.coords / back.attrs["mpp"]).astype(np.int64), coords)
            feats, coords_um, tile_um, tile_mpp = _as_stamp_reads_it(summary.folder / f"{name}.h5")
            assert feats.shape == features.shape and tile_um == pytest.approx(1024 * MPP)
            np.testing.assert_array_equal(coords_um, back.coords)  # STAMP takes them as micrometres as they are
            assert tile_mpp == pytest.approx(MPP * 4)  # the resolution the encoder saw: 10x
        else:
            np.testing.assert_array_equal(back.features, features)
            assert back.coord_unit == "px"
            np.testing.assert_array_equal(back.coords, coords)
        if to == "trident":
            attrs = back.attrs
            assert attrs["encoder"] == ENCODER  # the full label: `qgmil predict` still matches the run's encoder
            assert (attrs["patch_size_level0"], attrs["patch_size"], attrs["level0_magnification"],
                    attrs["target_magnification"], attrs["level0_width"]) == (1024, 256, 40, 10, 20480)
        if to == "clam":
            pt = read_bag(tmp_path / "out" / "pt_files" / f"{name}.pt")
            assert pt.layout == "pt"
            np.testing.assert_array_equal(pt.features, features)


def test_peer_files_go_to_the_other_peers(tmp_path, peers):
    """TRIDENT's and STAMP's own files into the other layouts (with the slide's mpp where they lack it), and back."""
    mpp = 0.499
    to_stamp = export_features(TRIDENT, "stamp", tmp_path / "stamp", mpp=mpp, progress=False)
    trident = read_bag(TRIDENT / "slide_01.h5")
    stamp = read_bag(to_stamp.folder / "slide_01.h5")
    assert to_stamp.folder.name == "resnet50" and stamp.attrs["extractor"] == "resnet50"
    np.testing.assert_allclose(stamp.features.astype(np.float32), trident.features, rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(np.rint(stamp.coords / mpp), trident.coords)
    assert stamp.attrs["tile_size_um"] == pytest.approx(512 * mpp) and stamp.attrs["tile_size_px"] == 256

    to_trident = export_features(STAMP, "trident", tmp_path / "trident", mpp=mpp, progress=False)
    original, again = read_bag(STAMP / "slide_02.h5"), read_bag(to_trident.folder / "slide_02.h5")
    np.testing.assert_array_equal(again.features, original.features.astype(np.float32))
    np.testing.assert_allclose(again.coords * mpp, original.coords, atol=mpp / 2)  # whole level-0 px now
    assert again.attrs["patch_size_level0"] == round(256 / mpp) and again.attrs["patch_size"] == 224

    # CLAM's feature files record nothing but features and coords: enough for CLAM, not for TRIDENT
    to_clam = export_features(CLAM, "clam", tmp_path / "clam", progress=False)
    assert to_clam.files["linked"] + to_clam.files["copied"] == 4 and to_clam.files["written"] == 4  # the .pt files
    with pytest.raises(DataError, match="tile size in level-0 px") as refused:
        export_features(CLAM, "trident", tmp_path / "no", encoder="resnet50", progress=False)
    assert "slide_03.h5" in str(refused.value) and "--tile-size" in str(refused.value)
    assert not (tmp_path / "no").exists()
    # ... unless the user gives the tile side (and, for STAMP's micrometres, the resolution)
    to_trident = export_features(CLAM, "trident", tmp_path / "yes", encoder="resnet50", mpp=mpp, tile_size=256,
                                 progress=False)
    clam, again = read_bag(CLAM / "h5_files" / "slide_03.h5"), read_bag(to_trident.folder / "slide_03.h5")
    np.testing.assert_array_equal(again.features, clam.features)
    np.testing.assert_array_equal(again.coords, clam.coords)
    assert again.attrs["patch_size_level0"] == 256 and again.attrs["patch_size"] == 256
    to_stamp = export_features(CLAM, "stamp", tmp_path / "stamp2", encoder="resnet50", mpp=mpp, tile_size=256,
                               progress=False)
    stamp = read_bag(to_stamp.folder / "slide_03.h5")
    np.testing.assert_allclose(stamp.coords, clam.coords * mpp, rtol=1e-6)
    assert stamp.attrs["tile_size_um"] == pytest.approx(256 * mpp)


# --- export: links, resume, refusals -------------------------------------------------------------------------------

def test_files_already_in_the_layout_are_linked_else_copied(tmp_path, monkeypatch):
    _bags(tmp_path / "bags")
    first = export_features(tmp_path / "bags", "trident", tmp_path / "a", progress=False)
    again = export_features(first.folder, "trident", tmp_path / "b", progress=False)
    assert again.files["linked"] == 3 and again.files["written"] == 3  # the patches files
    assert os.path.samefile(first.folder / "s1.h5", again.folder / "s1.h5")

    copied = export_features(first.folder, "trident", tmp_path / "c", link=False, progress=False)
    assert copied.files["copied"] == 3 and not os.path.samefile(first.folder / "s1.h5", copied.folder / "s1.h5")

    def cross_device(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    fallback = export_features(first.folder, "trident", tmp_path / "d", progress=False)
    assert fallback.files["copied"] == 3
    assert (fallback.folder / "s2.h5").read_bytes() == (first.folder / "s2.h5").read_bytes()
    assert not [p for p in fallback.folder.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_rerun_resumes_and_another_export_is_refused(tmp_path):
    _bags(tmp_path / "bags")
    out = tmp_path / "out"
    first = export_features(tmp_path / "bags", "clam", out, progress=False)
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "h5_files").iterdir()}
    (out / "pt_files" / "s1.pt").unlink()
    again = export_features(tmp_path / "bags", "clam", out, progress=False)
    assert again.files["written"] == 1 and again.files["skipped"] == 5
    assert {p.name: p.stat().st_mtime_ns for p in (out / "h5_files").iterdir()} == stamps
    assert torch.load(out / "pt_files" / "s1.pt", weights_only=True).shape == (SIZES["s1"], 16)
    assert first.format().startswith("3 slides as clam (6 written")

    with pytest.raises(ExportError, match="another export.*to: was 'clam', now 'stamp'"):
        export_features(tmp_path / "bags", "stamp", out, progress=False)
    assert not (out / "timm_test_vit").exists()


def test_refused_exports_write_nothing(tmp_path, peers):
    # STAMP's micrometres need the slide's resolution: TRIDENT's files do not record it
    with pytest.raises(DataError, match="mpp.*--mpp gives the resolution"):
        export_features(TRIDENT, "stamp", tmp_path / "o1", progress=False)
    # features float16 cannot hold
    write_bag(tmp_path / "big" / "b.h5", np.full((2, 3), 1e6, np.float32), np.zeros((2, 2), np.int64),
              attrs={"encoder": "x", "mpp": 0.5, "patch_size_level0": 256.0, "patch_size_px": 256})
    with pytest.raises(BagFileError, match="b.h5: cannot be written for stamp.*beyond float16"):
        export_features(tmp_path / "big", "stamp", tmp_path / "o2", progress=False)
    assert not list((tmp_path / "o2").rglob("*.h5"))
    # no coords, no encoder, several encoders, an unknown target, a bad mpp
    write_bag(tmp_path / "nc" / "n.h5", np.ones((2, 3), np.float32))
    with pytest.raises(DataError, match="n.h5: no coords"):
        export_features(tmp_path / "nc", "clam", tmp_path / "o3", progress=False)
    _bags(tmp_path / "mixed")
    write_bag(tmp_path / "mixed" / "other.h5", np.ones((2, 16), np.float32), np.zeros((2, 2), np.int64),
              attrs={"encoder": "uni", "mpp": 0.5, "patch_size_level0": 512.0, "patch_size_px": 256})
    with pytest.raises(DataError, match="2 encoders"):
        export_features(tmp_path / "mixed", "trident", tmp_path / "o4", progress=False)
    with pytest.raises(ExportError, match="unknown target"):
        export_features(tmp_path / "mixed", "qupath", tmp_path / "o5", progress=False)
    with pytest.raises(ExportError, match="--mpp"):
        export_features(tmp_path / "mixed", "stamp", tmp_path / "o6", mpp=float("nan"), progress=False)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("o") and p.name != "o2"]


def test_tile_facts_from_each_layouts_attributes(peers):
    """The same facts under each peer's attribute names."""
    from qgmil.data import read_attrs

    trident = TileFacts.from_attrs(read_attrs(TRIDENT / "slide_00.h5"), "trident")
    assert (trident.patch_size_level0, trident.patch_px, trident.level0_magnification) == (512, 256, 20)
    assert trident.mpp is None
    assert trident.missing("trident") == [] and "mpp" in trident.missing("stamp")[0]
    assert TileFacts.from_attrs(read_attrs(TRIDENT / "slide_00.h5"), "trident", mpp=0.5).tile_um == 256
    stamp = TileFacts.from_attrs(read_attrs(STAMP / "slide_00.h5"), "stamp")
    assert (stamp.coord_unit, stamp.tile_um, stamp.patch_px, stamp.encoder) == ("um", 256, 224, "randconv64")
    assert stamp.missing("stamp") == [] and stamp.missing("clam")  # coords in um: pixels need the mpp
    clam = TileFacts.from_attrs({"patch_level": 0, "patch_size": 256}, "clam")
    assert clam.patch_size_level0 == 256 and clam.missing("clam") == []


# --- the command line ----------------------------------------------------------------------------------------------

def test_cli_export_features(tmp_path):
    _bags(tmp_path / "bags")
    table = _table(tmp_path / "t.csv")
    result = CliRunner().invoke(main, ["export", "features", str(tmp_path / "bags"), "--to", "stamp", "--out",
                                       str(tmp_path / "out"), "--table", str(table), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "3 slides as stamp (3 written; tables slide.csv, clini.csv)" in result.output
    assert (tmp_path / "out" / "timm_test_vit" / "s2.h5").is_file()

    result = CliRunner().invoke(main, ["export", "features", str(tmp_path / "bags"), "--to", "stamp", "--out",
                                       str(tmp_path / "none"), "--mpp", "0", "--quiet"])
    assert result.exit_code == 2 and not (tmp_path / "none").exists()


def test_cli_exports_a_training_runs_bags_with_its_table(tmp_path):
    from qgmil.rundir import RunConfig, RunDir

    _bags(tmp_path / "bags")
    pd.DataFrame({"slide": ["s0", "s1", "s2"], "dx": ["a", "b", "a"]}).to_csv(tmp_path / "t.csv", index=False)
    config = RunConfig(data={"table": tmp_path / "t.csv", "features": tmp_path / "bags",
                             "columns": {"bag_id": "slide", "label": "dx"}})
    RunDir(tmp_path / "run").write_config(config.absolute())
    result = CliRunner().invoke(main, ["export", "features", str(tmp_path / "run"), "--to", "clam", "--out",
                                       str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert pd.read_csv(tmp_path / "out" / "dataset.csv").values.tolist() == [["s0", "s0", "a"], ["s1", "s1", "b"],
                                                                             ["s2", "s2", "a"]]
