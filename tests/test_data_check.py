"""Dataset tables and `qgmil data check`: one clear message per problem, naming the file and row."""

import json

import h5py
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from qgmil.cli import main
from qgmil.data import Columns, DataError, MILDataset, check_dataset, read_table, write_bag


def make_dataset(root, n_bags=6, dim=4, labels=None, patients=None, lengths=None):
    """A small valid dataset: root/labels.csv + root/features/<bag_id>.h5."""
    rng = np.random.default_rng(1)
    labels = labels or ["neg", "pos"] * (n_bags // 2)
    patients = patients or [f"P{i}" for i in range(n_bags)]
    lengths = lengths or [5 + 3 * i for i in range(n_bags)]
    for i in range(n_bags):
        write_bag(root / "features" / f"b{i}.h5", rng.normal(size=(lengths[i], dim)).astype(np.float32))
    table = pd.DataFrame({"bag_id": [f"b{i}" for i in range(n_bags)], "label": labels, "patient_id": patients})
    table.to_csv(root / "labels.csv", index=False)
    return root / "labels.csv", root / "features"


def test_valid_dataset_summary(tmp_path):
    table, features = make_dataset(tmp_path, patients=["P0", "P0", "P1", "P2", "P3", "P4"], labels=["neg", "neg", "pos", "neg", "pos", "pos"])
    report = check_dataset(table, features, progress=False)
    assert report.ok, report.problems
    s = report.summary
    assert (s["bags"], s["patients"], s["feature_dim"]) == (6, 5, 4)
    assert s["classes"] == {"neg": 3, "pos": 3}
    assert s["instances"] == {"min": 5, "median": 12.5, "max": 20, "total": 75}
    assert s["layouts"] == {"qgmil": 6}


def test_every_problem_is_reported_with_file_and_row(tmp_path):
    table, features = make_dataset(tmp_path, n_bags=8, labels=["neg", "pos"] * 4)
    frame = pd.read_csv(table)
    frame.loc[1, "label"] = None                      # row 3: missing label
    frame.loc[2, "label"] = "maybe"                   # row 4: unknown label (classes given)
    frame.loc[3, "bag_id"] = "ghost"                  # row 5: no feature file
    frame.loc[7, "bag_id"] = "b0"                     # rows 2, 9: duplicate id
    frame.loc[5, "patient_id"] = "P4"                 # rows 6, 7: patient P4 with neg and pos
    frame.to_csv(table, index=False)
    write_bag(features / "b4.h5", np.zeros((0, 4), np.float32))                    # row 6: empty bag
    bad = np.ones((9, 4), np.float32)
    bad[[2, 5], 1] = np.nan
    write_bag(features / "b5.h5", bad)                                             # row 7: NaN
    write_bag(features / "b6.h5", np.ones((9, 3), np.float32))                     # row 8: other dim

    report = check_dataset(table, features, classes=["neg", "pos"], bag_unit="patient", progress=False)
    text = "\n".join(report.problems)
    assert not report.ok
    assert f"{table} row 3: missing label" in text
    assert f"{table} row 4: unknown label 'maybe'" in text
    assert f"{table} row 5: feature file for bag 'ghost' not found" in text
    assert f"{table} rows 2, 9: duplicate bag id 'b0'" in text
    assert "patient 'P4' has slides with different labels (neg, pos)" in text
    assert f"{features / 'b4.h5'} (row 6, bag 'b4'): empty bag" in text
    assert f"{features / 'b5.h5'} (row 7, bag 'b5'): 2 instance(s) have NaN/Inf features (first: instance 2)" in text
    assert f"{features / 'b6.h5'} (row 8, bag 'b6'): feature dim 3, but most bags have 4" in text
    assert len(report.problems) == 8
    # slide bags keep each slide's label: the patient is a note, not a problem
    slides = check_dataset(table, features, classes=["neg", "pos"], progress=False)
    assert len(slides.problems) == 7 and "different labels" not in "\n".join(slides.problems)
    assert any("1 patient(s) with slides of different labels: P4 (neg, pos)" in n for n in slides.notes)


def test_model_dim_and_unreadable_files(tmp_path):
    table, features = make_dataset(tmp_path, n_bags=2)
    (features / "b1.h5").write_bytes(b"garbage")
    report = check_dataset(table, features, in_dim=8, progress=False)
    assert any("b1.h5: not a readable HDF5 file" in p and "(row 3, bag 'b1')" in p for p in report.problems)
    assert any("feature dim 4, but the model's in_dim have 8" in p for p in report.problems)


def test_table_errors(tmp_path):
    path = tmp_path / "t.csv"
    with pytest.raises(DataError, match="table not found"):
        read_table(path)
    path.write_text("slide,y\na,1\n")
    with pytest.raises(DataError, match=r"no bag id column 'bag_id' \(columns: slide, y\)"):
        read_table(path)
    table = read_table(path, Columns(bag_id="slide", label="y"))
    assert table["bag_id"].tolist() == ["a"] and table["patient_id"].tolist() == ["a"]
    path.write_text("bag_id,label,split\na,1,train\nb,0,holdout\nc,1,\n")
    with pytest.raises(DataError, match="row 3: unknown split 'holdout'"):
        read_table(path)


def test_ids_stay_strings_and_classes_sort_numerically(tmp_path):
    (tmp_path / "features").mkdir()
    for name in ("007", "010"):
        write_bag(tmp_path / "features" / f"{name}.h5", np.ones((2, 3), np.float32))
    (tmp_path / "t.csv").write_text("bag_id,label\n007,10\n010,2\n")
    ds = MILDataset.from_table(tmp_path / "t.csv", tmp_path / "features")
    assert ds.bag_ids == ["007", "010"]
    assert ds.classes == ["2", "10"] and ds.labels.tolist() == [1, 0]


def test_path_column_and_clam_subfolders(tmp_path):
    write_bag(tmp_path / "elsewhere" / "x.h5", np.ones((3, 2), np.float32))
    write_bag(tmp_path / "feats" / "h5_files" / "y.h5", np.ones((4, 2), np.float32))
    (tmp_path / "t.csv").write_text("bag_id,label,path\na,0,../elsewhere/x.h5\ny,1,\n")
    ds = MILDataset.from_table(tmp_path / "t.csv", tmp_path / "feats")
    assert ds.lengths.tolist() == [3, 4]


def test_parquet_tables(tmp_path):
    pytest.importorskip("pyarrow")
    table, features = make_dataset(tmp_path, n_bags=2)
    pd.read_csv(table).to_parquet(tmp_path / "t.parquet")
    assert read_table(tmp_path / "t.parquet")["bag_id"].tolist() == ["b0", "b1"]


def test_from_table_refuses_bad_data_listing_all_problems(tmp_path):
    table, features = make_dataset(tmp_path, n_bags=4)
    (features / "b1.h5").unlink()
    (features / "b2.h5").unlink()
    with pytest.raises(DataError) as err:
        MILDataset.from_table(table, features)
    assert len(err.value.problems) == 2 and "'b1'" in str(err.value) and "'b2'" in str(err.value)


def test_cli_data_check(tmp_path):
    table, features = make_dataset(tmp_path)
    runner = CliRunner()
    ok = runner.invoke(main, ["data", "check", "--table", str(table), "--features", str(features)])
    assert ok.exit_code == 0, ok.output
    assert "bags       6  (patients 6)" in ok.output and "OK: no problems found" in ok.output
    assert "min 5  median 12.5  max 20" in ok.output and "layout     qgmil (6)" in ok.output

    with h5py.File(features / "b3.h5", "a") as f:
        f["features"][0, 0] = np.inf
    bad = runner.invoke(main, ["data", "check", "--table", str(table), "--features", str(features), "--json"])
    assert bad.exit_code == 1
    report = json.loads(bad.stdout)
    assert report["ok"] is False and "NaN/Inf" in report["problems"][0]

    renamed = tmp_path / "renamed.csv"
    pd.read_csv(table).rename(columns={"bag_id": "slide_id", "label": "diagnosis"}).to_csv(renamed, index=False)
    args = ["data", "check", "--table", str(renamed), "--features", str(features)]
    assert runner.invoke(main, args).exit_code == 1  # bag_id column missing
    cols = runner.invoke(main, args + ["--bag-id-col", "slide_id", "--label-col", "diagnosis", "--no-scan"])
    assert cols.exit_code == 0, cols.output
