"""Patient-level splits: no leakage, stratified, reproducible, reusable, the table's own split honoured."""

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from qgmil.cli import main
from qgmil.data import DataError, Splits, load_or_make_splits, make_splits, read_table, splits_from_table


def table_of(tmp_path, n_patients=40, slides_per_patient=(1, 3), pos_share=0.3, extra=None, seed=0):
    """Patients with 1-3 slides each; about `pos_share` of patients positive."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        label = "pos" if p < pos_share * n_patients else "neg"
        for s in range(int(rng.integers(slides_per_patient[0], slides_per_patient[1] + 1))):
            rows.append({"bag_id": f"P{p}_S{s}", "label": label, "patient_id": f"P{p}"})
    frame = pd.DataFrame(rows)
    for key, fn in (extra or {}).items():
        frame[key] = [fn(r) for r in rows]
    path = tmp_path / "t.csv"
    frame.to_csv(path, index=False)
    return read_table(path)


def patients_of(table, ids):
    patient = dict(zip(table["bag_id"], table["patient_id"]))
    return {patient[i] for i in ids}


@pytest.mark.parametrize("folds, val_fraction", [(5, 0.2), (3, 0.0), (4, 0.25)])
def test_kfold_is_patient_level_stratified_and_complete(tmp_path, folds, val_fraction):
    table = table_of(tmp_path)
    splits = make_splits(table, folds=folds, seeds=[0, 1], val_fraction=val_fraction)
    assert len(splits) == 2 * folds and not splits.check(table)
    label_of = dict(zip(table["bag_id"], table["label"]))
    for seed in (0, 1):
        folds_of_seed = [f for f in splits if f.seed == seed]
        tested = [b for f in folds_of_seed for b in f.test]
        assert sorted(tested) == sorted(table["bag_id"])  # every bag tested exactly once per seed
        for f in folds_of_seed:
            parts = [patients_of(table, getattr(f, p)) for p in ("train", "val", "test")]
            assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
            assert len(f.train) + len(f.val) + len(f.test) == len(table)
            n_pos = sum(int(p[1:]) < 12 for p in parts[2])  # patients P0-P11 are the positive ones
            assert abs(n_pos - 12 / folds) <= 1  # 12 positive patients spread evenly over the folds
            if val_fraction:
                assert abs(len(parts[1]) - val_fraction * (40 - len(parts[2]))) <= 1
                assert any(label_of[b] == "pos" for b in f.val) and any(label_of[b] == "neg" for b in f.val)
            else:
                assert f.val == []


def test_splits_are_reproducible_and_seed_dependent(tmp_path):
    table = table_of(tmp_path)
    a = make_splits(table, folds=5, seeds=[3])
    assert a.to_json() == make_splits(table, folds=5, seeds=[3]).to_json()
    assert a.folds[0].test != make_splits(table, folds=5, seeds=[4]).folds[0].test


def test_save_load_and_reuse(tmp_path):
    table = table_of(tmp_path)
    path = tmp_path / "run" / "splits.json"
    made = load_or_make_splits(table, path, folds=4, seeds=[0, 1])
    assert json.loads(path.read_text())["params"] == {"folds": 4, "seeds": [0, 1], "val_fraction": 0.2}
    # a later run reuses the file even when asked for other folds
    again = load_or_make_splits(table, path, folds=10, seeds=[7])
    assert again.to_json() == made.to_json() == Splits.load(path).to_json()


def test_leaky_or_foreign_splits_are_refused(tmp_path):
    table = table_of(tmp_path, slides_per_patient=(2, 2))
    splits = make_splits(table, folds=4)
    fold = splits.folds[0]
    moved = next(b for b in fold.train if b.endswith("_S0"))
    fold.train.remove(moved)
    fold.test.append(moved)  # its sibling slide stays in train: the patient leaks
    fold.val.append("nobody")
    path = splits.save(tmp_path / "splits.json")
    with pytest.raises(DataError) as err:
        load_or_make_splits(table, path)
    text = str(err.value)
    assert f"patient '{moved.split('_')[0]}' is in both train and test" in text
    assert "bag 'nobody' (val) is not in the table" in text
    (tmp_path / "bad.json").write_text('{"folds": []}')
    with pytest.raises(DataError, match="not a qgmil splits file"):
        Splits.load(tmp_path / "bad.json")


def test_table_split_column_is_honoured(tmp_path):
    part = {0: "train", 1: "train", 2: "train", 3: "test", 4: "val"}
    table = table_of(tmp_path, extra={"split": lambda r: part[int(r["patient_id"][1:]) % 5]})
    splits = splits_from_table(table)
    assert splits.method == "table-split" and len(splits) == 1
    fold = splits.folds[0]
    assert set(fold.test) == set(table.loc[table["split"] == "test", "bag_id"])
    assert set(fold.val) == set(table.loc[table["split"] == "val", "bag_id"])

    # no val rows: validation patients are carved from train
    table = table_of(tmp_path, extra={"split": lambda r: "test" if int(r["patient_id"][1:]) % 4 == 0 else "train"})
    fold = splits_from_table(table, val_fraction=0.25).folds[0]
    assert fold.val and not patients_of(table, fold.val) & patients_of(table, fold.train)

    # a patient whose slides sit in different parts is an error naming the patient
    table = table_of(tmp_path, slides_per_patient=(2, 2), extra={"split": lambda r: "test" if r["bag_id"] == "P3_S1" else "train"})
    with pytest.raises(DataError, match=r"rows 8, 9: patient 'P3' has slides in different splits \(test, train\)"):
        splits_from_table(table)


def test_table_fold_column_gives_one_fold_per_value(tmp_path):
    table = table_of(tmp_path, extra={"fold": lambda r: int(r["patient_id"][1:]) % 3})
    splits = splits_from_table(table, seeds=[0, 1])
    assert splits.method == "table-fold" and len(splits) == 6
    for fold in splits:
        assert {int(f) for f in table.set_index("bag_id").loc[fold.test, "fold"]} == {fold.fold}
    assert not splits.check(table)


def test_too_few_patients(tmp_path):
    table = table_of(tmp_path, n_patients=3)
    with pytest.raises(DataError, match="3 patients cannot make 5 folds"):
        make_splits(table, folds=5)


def test_cli_data_split(tmp_path):
    table_of(tmp_path)
    out = tmp_path / "splits.json"
    result = CliRunner().invoke(main, ["data", "split", "--table", str(tmp_path / "t.csv"), "--out", str(out),
                                       "--folds", "3", "--seeds", "0,1"])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "seed1-fold2" in result.output
    assert len(Splits.load(out)) == 6
