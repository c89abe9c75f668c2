"""What the peers' tools write, read as their users have it: the genuine TRIDENT, CLAM and STAMP outputs in
../shared/fixtures/peer_files (see its README.md) checked, trained on (2 folds, 1 epoch), predicted and drawn.

  STAMP    two tables (clinical + slide, CSV or .xlsx), float16 `feats`, micrometre coords without an mpp: the
           heatmap takes the resolution from the slide (the real CMU-1 region, linked under STAMP's slide names)
  CLAM     dataset.csv (`case_id, slide_id, label`, a case with slides of two labels), h5 files without any
           attribute (tile size given with --tile-size), pt_files of plain tensors
  TRIDENT  h5 features read with their coords; its saveas='pt' output (a pickled NumPy array) refused, saying why
"""

import importlib.util
import json
import math
import os
import sys
import warnings
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from qgmil.cli import main
from qgmil.data import BagFileError, Columns, DataError, MILDataset, check_dataset, read_bag, read_table
from qgmil.explain.heatmap import HeatmapError, bag_geometry, default_scale
from qgmil.rundir.config import load_config

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
PEERS = SHARED / "fixtures" / "peer_files"
SLIDE = SHARED / "data" / "CMU-1-Small-Region.svs"
STAMP, CLAM, TRIDENT = PEERS / "stamp", PEERS / "clam", PEERS / "trident"
TRIDENT_FEATURES = TRIDENT / "10x_256px_0px_overlap" / "features_resnet50"
SLIDE_MPP = 0.499  # CMU-1-Small-Region: openslide.mpp-x
TINY = ["--model", "abmil", "--folds", "2", "--epochs", "1", "--quiet", "--set", "eval.bootstrap=10",
        "--set", "runtime.tensorboard=false"]
# CLAM's example has 3 cases: 2 folds leave one training case, too few to carve a validation part from
NO_VAL = ["--set", "eval.val_fraction=0"]
needs_wsi = pytest.mark.skipif(importlib.util.find_spec("openslide") is None and importlib.util.find_spec("tiffslide")
                               is None, reason="needs openslide or tiffslide (pip install '.[wsi]')")


def _require(path: Path) -> None:
    if not path.exists():
        if os.environ.get("QGMIL_REQUIRE_FIXTURES"):
            pytest.fail(f"{path} not found")
        pytest.skip(f"{path} not found")


@pytest.fixture(autouse=True, scope="module")
def _peer_files():
    _require(PEERS / "README.md")


def qgmil(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def stamp_run(tmp_path_factory):
    """STAMP's own two tables and features, the target named as STAMP's config names it."""
    out = tmp_path_factory.mktemp("stamp") / "run"
    result = qgmil("train", "--table", STAMP / "clini.csv", "--slide-table", STAMP / "slide.csv", "--label-col",
                   "isMSIH", "--features", STAMP / "randconv64", *TINY, "--out", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def clam_run(tmp_path_factory):
    """CLAM's dataset.csv and feature folder as CLAM leaves them, no column flags."""
    out = tmp_path_factory.mktemp("clam") / "run"
    result = qgmil("train", "--table", CLAM / "dataset.csv", "--features", CLAM, *TINY, *NO_VAL, "--out", out)
    assert result.exit_code == 0, result.output
    return out


# --- 1. STAMP heatmaps: the resolution from the slide ------------------------------------------------

@needs_wsi
def test_stamp_heatmap_lands_on_the_tiles_of_the_slide(stamp_run, tmp_path):
    from PIL import Image

    _require(SLIDE)
    slides = tmp_path / "slides"  # the slide under STAMP's slide names, as the fixture README says
    slides.mkdir()
    for i in range(4):
        (slides / f"slide_0{i}.svs").symlink_to(SLIDE)
    feature = STAMP / "randconv64" / "slide_00.h5"
    with h5py.File(feature) as f:
        assert "mpp" not in f.attrs and f.attrs["unit"] == "um"
        coords_um, tile_um = f["coords"][()].astype(np.float64), float(f.attrs["tile_size_um"])
    coords, side = bag_geometry(feature, slide=slides / "slide_00.svs")
    np.testing.assert_allclose(coords, coords_um / SLIDE_MPP)  # as STAMP's heatmaps place them: um / slide mpp
    assert side == pytest.approx(tile_um / SLIDE_MPP)  # 256 um = 513 level-0 px

    # The real figure twice, heat painted at alpha 0.5 and at 0: the pixels that differ are the painted ones.
    pictures = {}
    for alpha in ("0.5", "0"):
        result = qgmil("explain", "heatmap", stamp_run, "--slides", slides, "--bags", "slide_00", "--max-size", 256,
                       "--alpha", alpha, "--out", tmp_path / alpha)
        assert result.exit_code == 0, result.output
        with Image.open(tmp_path / alpha / "slide_00.png") as im:
            pictures[alpha] = np.asarray(im.convert("RGB"), dtype=np.int64)
    scale = default_scale((2220, 2967), 256)  # the CMU-1 region's level-0 size
    h, w = math.ceil(2967 / scale), math.ceil(2220 / scale)
    f = 512 // max(h, w)  # each heat pixel is f x f in the PNG, below a 40 px title, left of a 90 px colorbar
    assert pictures["0"].shape == (40 + h * f, w * f + 90, 3)
    diff = np.abs(pictures["0.5"] - pictures["0"]).max(axis=2)[40:, : w * f]
    painted = diff.reshape(h, f, w, f).mean(axis=(1, 3)) > 12

    def covered(x0, y0, size):
        """Heat pixels whose centre lies in a tile: (level-0 x, y) top-left corners, side in level-0 px."""
        cy, cx = (np.mgrid[0:h, 0:w] + 0.5) * scale
        return ((cx[..., None] >= x0) & (cx[..., None] < x0 + size) &
                (cy[..., None] >= y0) & (cy[..., None] < y0 + size)).any(-1)

    tiles = covered(coords_um[:, 0] / SLIDE_MPP, coords_um[:, 1] / SLIDE_MPP, tile_um / SLIDE_MPP)
    assert 0.5 < tiles.mean() < 0.8  # STAMP kept 18 tissue tiles of 513 px (of 20 in the 4 x 5 grid)
    assert (painted == tiles).mean() > 0.98
    # micrometres taken for pixels would land elsewhere: the check tells the two apart
    assert (painted == covered(coords_um[:, 0], coords_um[:, 1], tile_um)).mean() < 0.9


@needs_wsi
def test_stamp_tiles_exported_for_qupath_in_level0_pixels_of_the_slide(stamp_run, tmp_path):
    import json

    _require(SLIDE)
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "slide_00.svs").symlink_to(SLIDE)
    result = qgmil("explain", "export", stamp_run, "--format", "geojson", "--slides", slides, "--bags", "slide_00",
                   "--out", tmp_path / "qupath")
    assert result.exit_code == 0, result.output
    features = json.loads((tmp_path / "qupath" / "slide_00.geojson").read_text())["features"]
    corners = np.array([np.min(f["geometry"]["coordinates"][0], axis=0) for f in features
                        if f["properties"]["objectType"] == "detection"])
    with h5py.File(STAMP / "randconv64" / "slide_00.h5") as f:
        expected = f["coords"][()].astype(np.float64) / SLIDE_MPP  # micrometres through the slide's mpp
    np.testing.assert_allclose(np.sort(corners, axis=0), np.sort(expected, axis=0), atol=1)
    # without the slide nor --mpp the micrometres cannot be placed: said, nothing written
    result = qgmil("explain", "export", stamp_run, "--format", "geojson", "--bags", "slide_00", "--out", tmp_path / "q2")
    assert result.exit_code != 0 and "--mpp" in result.output and not (tmp_path / "q2").exists()
    result = qgmil("explain", "export", stamp_run, "--format", "geojson", "--bags", "slide_00", "--mpp", SLIDE_MPP,
                   "--out", tmp_path / "q3")
    assert result.exit_code == 0, result.output


def test_stamp_heatmap_without_a_slide_or_its_resolution(stamp_run, tmp_path):
    from PIL import Image

    result = qgmil("explain", "heatmap", stamp_run, "--bags", "slide_00", "--max-size", 128, "--out", tmp_path / "w")
    assert result.exit_code == 0, result.output  # on white, micrometres stand in for pixels
    with Image.open(tmp_path / "w" / "slide_00.png") as im:
        im.verify()
    feature = STAMP / "randconv64" / "slide_00.h5"
    with pytest.raises(HeatmapError, match=r"slide_00\.h5: coords are in micrometres .* no slide was found .*--mpp"):
        bag_geometry(feature)
    # a slide image without resolution metadata (a plain PNG): named, and --mpp gives the resolution
    png = tmp_path / "slide_00.png"
    Image.fromarray(np.full((64, 48, 3), 240, np.uint8)).save(png)
    with pytest.raises(HeatmapError, match=r"slide_00\.png \(no mpp in its metadata\).*--mpp"):
        bag_geometry(feature, slide=png)
    assert bag_geometry(feature, slide=png, mpp=SLIDE_MPP)[1] == pytest.approx(256 / SLIDE_MPP)


# --- 2. CLAM h5 files: the tile size from the user ---------------------------------------------------

def test_clam_tile_size_is_guessed_with_a_warning_or_given(clam_run, tmp_path):
    h5 = CLAM / "h5_files" / "slide_00.h5"
    with pytest.warns(UserWarning, match=r"slide_00\.h5: the file records no tile size \(CLAM's h5 files record "
                                         r"none\), so tiles are drawn 256 px wide, the step of the coords' grid.*"
                                         r"--tile-size PX"):
        assert bag_geometry(h5)[1] == 256
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        coords, side = bag_geometry(h5, tile_size=512)
    assert side == 512 and coords[:3].tolist() == [[0, 0], [256, 0], [512, 0]]

    guessed = qgmil("explain", "heatmap", clam_run, "--max-size", 128, "--out", tmp_path / "guessed")
    assert guessed.exit_code == 0, guessed.output
    assert guessed.output.count("records no tile size") == 1  # said once, with the number of other files
    assert "the same for 2 more feature file(s)" in guessed.output
    given = qgmil("explain", "heatmap", clam_run, "--max-size", 128, "--tile-size", 512, "--out", tmp_path / "given")
    assert given.exit_code == 0, given.output
    assert "tile size" not in given.output and len(list((tmp_path / "given").glob("*.png"))) == 3
    assert qgmil("explain", "heatmap", clam_run, "--tile-size", 0, "--out", tmp_path / "x").exit_code == 2


# --- 3. CLAM's dataset.csv: slides of one case with different labels ---------------------------------

def test_clam_dataset_csv_trains_on_slide_bags_grouped_by_case(clam_run):
    dataset = pd.read_csv(CLAM / "dataset.csv", dtype=str)
    predictions = pd.read_csv(clam_run / "predictions.csv", dtype=str)
    # CLAM's header found without flags: slide_id is the bag, case_id the patient; each slide keeps its label
    assert sorted(zip(predictions["bag_id"], predictions["patient_id"], predictions["label"])) == \
        sorted(zip(dataset["slide_id"], dataset["case_id"], dataset["label"]))
    for fold in json.loads((clam_run / "splits.json").read_text())["folds"]:
        part = {bag: name for name in ("train", "val", "test") for bag in fold[name]}
        assert part["slide_00"] == part["slide_01"]  # case_0's normal and tumour slides never split up
    report = check_dataset(CLAM / "dataset.csv", CLAM, progress=False)
    assert report.ok, report.problems
    assert "bag_id = slide_id (CLAM's header), patient_id = case_id (CLAM's header)" in report.notes[0]
    assert "case_0 (normal, tumor): each slide keeps its own label" in report.notes[1]
    split = qgmil("data", "split", "--table", CLAM / "dataset.csv", "--folds", 2, "--out", clam_run.parent / "s.json")
    assert split.exit_code == 0, split.output


def test_clam_patient_bags_refuse_mixed_labels_unless_a_rule_is_chosen():
    with pytest.raises(DataError, match=r"dataset\.csv rows 2, 3: patient 'case_0' has slides with different labels "
                                        r"\(normal, tumor\); .*data\.patient_label majority or max"):
        MILDataset.from_table(CLAM / "dataset.csv", CLAM, bag_unit="patient")

    def label(rule, classes=None, case="case_0"):
        data = MILDataset.from_table(CLAM / "dataset.csv", CLAM, bag_unit="patient", patient_label=rule,
                                     classes=classes)
        unit = next(u for u in data.units if u.bag_id == case)
        return unit.label, unit.slide_ids

    assert label("max") == ("tumor", ("slide_00", "slide_01"))  # CLAM's default voting: the last class
    assert label("majority")[0] == "normal"  # one slide each: a tie, to the first class (CLAM's maj: stats.mode)
    assert label("majority", ["tumor", "normal"])[0] == "tumor" and label("max", ["tumor", "normal"])[0] == "normal"
    assert label("max", case="case_1") == ("normal", ("slide_02",))
    check = ["data", "check", "--table", CLAM / "dataset.csv", "--features", CLAM, "--bag-unit", "patient"]
    assert qgmil(*check).exit_code == 1 and qgmil(*check, "--patient-label", "majority").exit_code == 0


def test_clam_patient_bags_train_and_predict_with_max_voting(tmp_path):
    refused = qgmil("train", "--table", CLAM / "dataset.csv", "--features", CLAM, "--bag-unit", "patient", *TINY,
                    *NO_VAL, "--out", tmp_path / "refused")
    assert refused.exit_code == 2 and "--patient-label" in refused.output and not (tmp_path / "refused").exists()
    run = tmp_path / "run"
    result = qgmil("train", "--table", CLAM / "dataset.csv", "--features", CLAM, "--bag-unit", "patient",
                   "--patient-label", "max", *TINY, *NO_VAL, "--out", run)
    assert result.exit_code == 0, result.output
    assert load_config(run / "config.yaml").data.patient_label == "max"
    labels = dict(pd.read_csv(run / "predictions.csv", dtype=str)[["bag_id", "label"]].values)
    assert labels == {"case_0": "tumor", "case_1": "normal", "case_2": "tumor"}
    # predict takes the rule from the run's checkpoints
    predicted = qgmil("predict", run, CLAM / "dataset.csv", "--features", CLAM, "--out", tmp_path / "pred")
    assert predicted.exit_code == 0, predicted.output
    assert dict(pd.read_csv(tmp_path / "pred" / "predictions.csv", dtype=str)[["bag_id", "label"]].values) == labels


def test_data_split_makes_the_splits_training_makes_under_the_same_patient_label_rule(tmp_path):
    import json

    run = tmp_path / "run"
    result = qgmil("train", "--table", CLAM / "dataset.csv", "--features", CLAM, "--patient-label", "max", *TINY,
                   *NO_VAL, "--out", run)
    assert result.exit_code == 0, result.output
    out = tmp_path / "splits.json"
    result = qgmil("data", "split", "--table", CLAM / "dataset.csv", "--folds", "2", "--val-fraction", "0",
                   "--patient-label", "max", "--out", out)
    assert result.exit_code == 0, result.output
    ours, trained = (json.loads(p.read_text())["folds"] for p in (out, run / "splits.json"))
    assert ours == trained  # the same patient labels to stratify on: the same folds, each case in one part


# --- 4. STAMP's two tables, CSV or Excel --------------------------------------------------------------

def test_stamp_tables_train_as_stamp_users_have_them(stamp_run):
    config = load_config(stamp_run / "config.yaml")
    assert config.data.slide_table == (STAMP / "slide.csv").resolve() and config.data.columns.label == "isMSIH"
    clini = pd.read_csv(STAMP / "clini.csv", dtype=str).set_index("PATIENT")["isMSIH"]
    slides = pd.read_csv(STAMP / "slide.csv", dtype=str)
    expected = {Path(name).stem: (patient, clini[patient])
                for patient, name in zip(slides["PATIENT"], slides["FILENAME"])}
    predictions = pd.read_csv(stamp_run / "predictions.csv", dtype=str)
    assert {b: (p, lab) for b, p, lab in predictions[["bag_id", "patient_id", "label"]].values} == expected
    assert json.loads((stamp_run / "run.json").read_text())["provenance"]["extractor"] == "randconv64"


def test_stamp_tables_as_excel(tmp_path):
    pytest.importorskip("openpyxl", reason="Excel tables need pip install 'qgmil[excel]'")
    for name in ("clini", "slide"):
        pd.read_csv(STAMP / f"{name}.csv", dtype=str).to_excel(tmp_path / f"{name}.xlsx", index=False)
    columns = Columns(label="isMSIH")
    shown = ["row", "bag_id", "patient_id", "label", "path"]
    excel = read_table(tmp_path / "clini.xlsx", columns, slide_table=tmp_path / "slide.xlsx")
    pd.testing.assert_frame_equal(excel[shown], read_table(STAMP / "clini.csv", columns,
                                                           slide_table=STAMP / "slide.csv")[shown])
    result = qgmil("data", "check", "--table", tmp_path / "clini.xlsx", "--slide-table", tmp_path / "slide.xlsx",
                   "--label-col", "isMSIH", "--features", STAMP / "randconv64")
    assert result.exit_code == 0, result.output
    assert "classes    MSIH: 2, nonMSIH: 2" in result.output and "layout     stamp (4)" in result.output


def test_excel_without_openpyxl_names_the_extra(tmp_path, monkeypatch):
    table = tmp_path / "clini.xlsx"
    table.write_bytes(b"")  # never opened: the missing reader is said first
    monkeypatch.setitem(sys.modules, "openpyxl", None)
    with pytest.raises(DataError, match=r"clini\.xlsx: reading Excel tables needs openpyxl: "
                                        r"pip install 'qgmil\[excel\]'"):
        read_table(table)


def test_stamp_table_problems_name_the_table_and_row(tmp_path):
    clini = pd.read_csv(STAMP / "clini.csv", dtype=str)
    clini = pd.concat([clini[clini["PATIENT"] != "P03"], clini[clini["PATIENT"] == "P00"]])  # P03 gone, P00 twice
    clini.to_csv(tmp_path / "clini.csv", index=False)
    report = check_dataset(tmp_path / "clini.csv", STAMP / "randconv64", columns=Columns(label="isMSIH"),
                           slide_table=STAMP / "slide.csv", progress=False)
    assert report.problems == [
        f"{tmp_path / 'clini.csv'} rows 2, 5: patient 'P00' has several rows (a clinical table has one row per "
        "patient; the first is used)",
        f"{STAMP / 'slide.csv'} row 5: missing label: patient 'P03' has no row in {tmp_path / 'clini.csv'}",
    ]
    with pytest.raises(DataError, match=r"clini\.csv: no label column 'MSI' \(columns: PATIENT, isMSIH\); "
                                        r"name it with --label-col"):
        read_table(STAMP / "clini.csv", Columns(label="MSI"), slide_table=STAMP / "slide.csv")


# --- 5. the column flags of train (and tune); 6. CLAM's pt_files -------------------------------------

def test_train_takes_the_column_flags_on_clam_pt_files(tmp_path):
    run = tmp_path / "run"
    result = qgmil("train", "--table", CLAM / "dataset.csv", "--features", CLAM / "pt_files", "--bag-id-col",
                   "slide_id", "--patient-col", "case_id", "--label-col", "label", *TINY, *NO_VAL, "--out", run)
    assert result.exit_code == 0, result.output
    columns = load_config(run / "config.yaml").data.columns
    assert (columns.bag_id, columns.patient_id, columns.label) == ("slide_id", "case_id", "label")
    assert len(pd.read_csv(run / "predictions.csv")) == 4
    wrong = qgmil("train", "--table", CLAM / "dataset.csv", "--features", CLAM, "--label-col", "diagnosis", *TINY,
                  "--out", tmp_path / "wrong")
    assert wrong.exit_code == 2 and "no label column 'diagnosis'" in wrong.output and "--label-col" in wrong.output
    tune_help = qgmil("tune", "--help").output
    for flag in ("--bag-id-col", "--label-col", "--patient-col", "--path-col", "--slide-table", "--patient-label"):
        assert flag in tune_help


def test_clam_pt_files_are_plain_tensors_read_without_pickle():
    files = sorted((CLAM / "pt_files").glob("*.pt"))
    assert len(files) == 4
    for pt in files:
        assert isinstance(torch.load(pt, weights_only=True), torch.Tensor)
        bag = read_bag(pt)
        assert bag.layout == "pt" and bag.coords is None and bag.features.shape == (88, 64)
        np.testing.assert_array_equal(bag.features, read_bag(CLAM / "h5_files" / f"{pt.stem}.h5").features)


# --- 6. TRIDENT's .pt: refused, saying why and what to use ------------------------------------------

def test_trident_pt_is_refused_saying_how_to_get_the_h5(tmp_path):
    h5 = TRIDENT_FEATURES / "slide_00.h5"
    assert read_bag(h5).layout == "trident" and bag_geometry(h5)[1] == 512  # its h5: coords and patch_size_level0
    features = tmp_path / "features_resnet50"
    features.mkdir()
    for i in range(1, 4):
        (features / f"slide_0{i}.h5").symlink_to(TRIDENT_FEATURES / f"slide_0{i}.h5")
    pt = features / "slide_00.pt"
    with h5py.File(h5) as f:  # TRIDENT's saveas='pt' (trident/wsi_objects/WSI.py): torch.save of the NumPy features
        torch.save(f["features"][()], pt)
    with pytest.raises(BagFileError) as err:
        read_bag(pt)
    message = str(err.value)
    assert message.startswith(f"{pt}: holds pickled NumPy objects (numpy.")
    for said in ("TRIDENT writes with saveas='pt'", "unpickling, which can run any code", "saveas='h5', the default",
                 "run_batch_of_slides.py --task feat", "features_<encoder>/<slide>.h5"):
        assert said in message
    report = check_dataset(TRIDENT / "labels.csv", features, progress=False)
    assert len(report.problems) == 1 and report.problems[0].startswith(f"{pt}: holds pickled NumPy objects")
    assert report.problems[0].endswith("(row 2, bag 'slide_00')")
