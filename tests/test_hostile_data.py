"""Hostile and broken data inputs (issue 15): feature files that declare absurd sizes, wrong dtypes or coords,
NaN bags at prediction, labels spelled several ways, tables that cannot train, fp16 overflow, bag ids with "/".
Each builds the bad input and asserts the refusal names the file (or key) and the problem. The memory bombs
run in a subprocess under an address-space cap (tests/capped.py), so a regression fails instead of
exhausting the machine."""

import os
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from qgmil.cli import main
from qgmil.data import BagFileError, BagLimits, DataError, MILDataset, check_dataset, inspect_bag, read_bag, read_features, read_table, write_bag
from qgmil.rundir import read_attention, write_attention

sys.path.insert(0, str(Path(__file__).parent))
from capped import run_capped  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"
ENV = {**os.environ, "PYTHONPATH": str(SRC)}  # the subprocess imports this checkout's qgmil


def _dataset(root: Path, n_bags: int = 4, dim: int = 4, labels=None) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    labels = labels or ["neg", "pos"] * (n_bags // 2)
    for i in range(n_bags):
        write_bag(root / "features" / f"b{i}.h5", rng.normal(size=(5 + i, dim)).astype(np.float32))
    pd.DataFrame({"bag_id": [f"b{i}" for i in range(n_bags)], "label": labels}).to_csv(root / "labels.csv", index=False)
    return root / "labels.csv", root / "features"


def _empty_chunked(path: Path, shape, name="features", dtype="f4", extra_shape=None) -> Path:
    """A few-KB h5 whose `name` declares `shape` but stores nothing (every read would return fill values)."""
    with h5py.File(path, "w") as f:
        f.create_dataset(name, shape=shape, dtype=dtype, chunks=True)
        if name != "features":
            f.create_dataset("features", data=np.ones((3, 4), np.float32))
    return path


# --- 1. memory bombs ------------------------------------------------------------------------------

# Under a loaded CI machine importing torch alone can take a minute; the cap, not the clock, is the guard.
TIMEOUT = 600
BOMBS = {  # bag -> (declared shape, dataset, what the refusal says)
    "b0": ((10**8, 64), "features", "features declare 100,000,000 instances, over the limit data.limits.instances = 1,000,000"),
    "b1": ((10**9, 1024), "features", "features declare 1,000,000,000 instances"),
    "b2": ((20, 10**9), "features", "features declare dim 1,000,000,000, over the limit data.limits.dim = 16,384"),
    "b3": ((10**12,), "cells", "the file (largest: dataset 'cells' of shape (1000000000000,)) declares 3,725.3 GiB, "
                               "over the limit data.limits.gib = 8.0"),
    "b4": ((500_000, 1024), "features", "dataset 'features' of shape (500000, 1024) declares 1,953 MiB but stores "
                                        "0.000 MiB (unwritten fill values"),   # inside the limits: 2 GB of fill values
}


def test_bomb_headers_are_refused_by_data_check_under_a_memory_cap(tmp_path):
    table, features = _dataset(tmp_path, 6)
    for bag, (shape, name, _) in BOMBS.items():
        assert _empty_chunked(features / f"{bag}.h5", shape, name).stat().st_size < 50_000
    result = run_capped(["data", "check", "--table", str(table), "--features", str(features)], env=ENV, timeout=TIMEOUT)
    assert result.returncode == 1, result.stdout + result.stderr
    for bag, (_, _, message) in BOMBS.items():
        assert f"{features / bag}.h5: {message}" in result.stdout
    assert "5 problem(s)" in result.stdout and "MemoryError" not in result.stderr


def test_every_reader_refuses_bombs_and_a_raised_limit_still_never_reads_fill_values(tmp_path):
    for bag, (shape, name, _) in BOMBS.items():
        _empty_chunked(tmp_path / f"{bag}.h5", shape, name)
    npy = tmp_path / "lying.npy"   # header says (10^8, 64), the file holds 12 floats
    with open(npy, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": "<f4", "fortran_order": False, "shape": (10**8, 64)})
        fh.write(np.ones(12, np.float32).tobytes())
    wide = tmp_path / "wide.npy"
    np.save(wide, np.zeros((3, 20_000), np.float32))
    code = f"""
from pathlib import Path
from qgmil.data import BagFileError, BagLimits, read_bag, read_features, read_coords, read_extra, inspect_bag
files = sorted(Path({str(tmp_path)!r}).glob("b*.h5")) + [Path({str(npy)!r}), Path({str(wide)!r})]
for read in (read_bag, read_features, read_coords, inspect_bag, lambda p: read_extra(p, "cells")):
    for path in files:
        try:
            read(path)
        except BagFileError as err:
            print("REFUSED", err)
        else:
            print("ACCEPTED", path)
try:
    read_features({str(tmp_path / 'b0.h5')!r}, limits=BagLimits(instances=10**9, gib=1000))
except BagFileError as err:
    print("raised-limit", err)
"""
    result = run_capped(["-c", code], env=ENV, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert "ACCEPTED" not in result.stdout and result.stdout.count("REFUSED") == 5 * 7, result.stdout
    assert f"{npy}: features declare 100,000,000 instances" in result.stdout
    assert f"{wide}: features declare dim 20,000, over the limit data.limits.dim = 16,384" in result.stdout
    assert "raised-limit" in result.stdout and "b0.h5: dataset 'features' of shape (100000000, 64) declares" in result.stdout


def test_train_refuses_a_bomb_before_allocating_even_without_the_data_check(tmp_path):
    table, features = _dataset(tmp_path, 4)
    bomb = _empty_chunked(features / "b1.h5", (10**8, 64))
    result = run_capped(["train", "--table", str(table), "--features", str(features), "--model", "mean_pool",
                         "--folds", "2", "--epochs", "1", "--out", str(tmp_path / "run"), "--quiet", "--set", "data.check=false"], env=ENV, timeout=TIMEOUT)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"error: {bomb}: features declare 100,000,000 instances" in result.stderr
    assert "MemoryError" not in result.stderr and not (tmp_path / "run").exists()


def test_limits_are_config_keys_and_data_check_options(tmp_path):
    from qgmil.rundir.config import load_config, parse_set

    config = load_config(None, parse_set(["data.limits.instances=2000000"]), {"data.table": "t.csv", "data.features": "f"})
    assert config.data.limits == BagLimits(instances=2_000_000)
    table, features = _dataset(tmp_path, 2)
    result = CliRunner().invoke(main, ["data", "check", "--table", str(table), "--features", str(features), "--limit", "dim=3"])
    assert result.exit_code == 1 and "feature dim 4" not in result.output and "features declare dim 4" in result.output
    result = CliRunner().invoke(main, ["data", "check", "--table", str(table), "--limit", "dims=3"])
    assert result.exit_code == 2 and "dims" in result.output


# --- 2. dtypes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("values, kind", [
    (np.ones((3, 4), np.complex64), "complex64"),
    (np.ones((3, 4), bool), "bool"),
    (np.array([["a"] * 4] * 3, dtype="S1"), "|S1"),
])
def test_non_real_feature_dtypes_are_refused_by_name(tmp_path, values, kind):
    table, features = _dataset(tmp_path, 2)
    with h5py.File(features / "b0.h5", "w") as f:
        f["features"] = values
    report = check_dataset(table, features, progress=False)
    assert f"{features / 'b0.h5'}: features 'features' have dtype {kind}, not real numbers" in "\n".join(report.problems)
    np.save(tmp_path / "c.npy", values)
    with pytest.raises(BagFileError, match=r"c\.npy: features have dtype"):
        read_features(tmp_path / "c.npy")


def test_pt_features_must_be_a_real_tensor(tmp_path):
    torch.save({"features": [[1.0, 2.0]]}, tmp_path / "list.pt")
    torch.save(torch.ones(3, 4, dtype=torch.complex64), tmp_path / "complex.pt")
    torch.save(torch.ones(3, 4, dtype=torch.bool), tmp_path / "bool.pt")
    with pytest.raises(BagFileError, match=r"list\.pt: 'features' is a list, not a tensor"):
        inspect_bag(tmp_path / "list.pt")
    for name in ("complex", "bool"):
        with pytest.raises(BagFileError, match=rf"{name}\.pt: features have dtype torch\.{name}"):
            read_bag(tmp_path / f"{name}.pt")


# --- 3. coordinates -------------------------------------------------------------------------------

@pytest.mark.parametrize("coords", [np.zeros((4, 2)), np.zeros((5, 3)), np.zeros(5)])
def test_coords_must_be_one_xy_per_instance(tmp_path, coords):
    table, features = _dataset(tmp_path, 2)
    with h5py.File(features / "b0.h5", "a") as f:
        f["coords"] = coords
    message = rf"b0\.h5: coords have shape \({', '.join(map(str, coords.shape))},?\), expected \(5, 2\)"
    for read in (inspect_bag, read_bag):
        with pytest.raises(BagFileError, match=message):
            read(features / "b0.h5")
    assert not check_dataset(table, features, progress=False).ok
    torch.save({"features": torch.ones(5, 4), "coords": torch.from_numpy(coords)}, tmp_path / "c.pt")
    with pytest.raises(BagFileError, match=r"c\.pt: coords have shape"):
        read_bag(tmp_path / "c.pt")


# --- 4. predict -----------------------------------------------------------------------------------

def _checkpoint(path: Path, dim: int = 4) -> Path:
    from qgmil import create_model, save_model

    return save_model(create_model("mean_pool", in_dim=dim, num_classes=2), path, extra={"classes": ["neg", "pos"]})


def test_predict_refuses_nan_and_empty_bags_by_name_and_writes_nothing(tmp_path):
    from qgmil.evaluate.predict import predict_bags

    table, features = _dataset(tmp_path, 4)
    checkpoint = _checkpoint(tmp_path / "model.safetensors")
    bad = np.ones((6, 4), np.float32)
    bad[2, 1] = np.nan
    write_bag(features / "b2.h5", bad)
    with pytest.raises(BagFileError, match=r"b2\.h5 \(bag 'b2'\): 1 instance\(s\) have NaN/Inf features"):
        predict_bags(checkpoint, table, tmp_path / "out", features=features, progress=False)
    assert not (tmp_path / "out" / "predictions.csv").exists()
    write_bag(features / "b2.h5", np.zeros((0, 4), np.float32))
    with pytest.raises(DataError, match=r"b2\.h5: empty bag \(0 instances\)"):
        predict_bags(checkpoint, table, tmp_path / "out", features=features, progress=False)
    assert not (tmp_path / "out" / "predictions.csv").exists()


def test_unchecked_dim_mismatch_names_the_bag(tmp_path):
    table, features = _dataset(tmp_path, 4)
    write_bag(features / "b3.h5", np.ones((5, 3), np.float32))
    data = MILDataset.from_table(table, features)
    data[0]
    with pytest.raises(BagFileError, match=r"b3\.h5 \(bag 'b3'\): feature dim 3, but the first bag has 4"):
        data[3]


# --- 5. labels ------------------------------------------------------------------------------------

def test_numeric_labels_compare_as_numbers_and_missing_spellings_are_missing(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("bag_id,label\na,1\nb,1.0\nc,1.00\nd,0\ne,0.50\nf,NA\ng,nan\nh,\ni, N/A \n")
    frame = read_table(path, require_labels=False)
    assert frame["label"].tolist() == ["1", "1", "1", "0", "0.5", None, None, None, None]
    with pytest.raises(DataError) as err:
        read_table(path)
    text = str(err.value)
    assert f"{path} row 7: missing label ('NA')" in text and f"{path} row 8: missing label ('nan')" in text
    assert f"{path} row 9: missing label\n" in text + "\n"


def test_labels_differing_only_in_case_are_a_problem_naming_them(tmp_path):
    table, features = _dataset(tmp_path, 4, labels=["Positive", "positive", "neg", "positive"])
    report = check_dataset(table, features, progress=False)
    assert ("labels that differ only in case would be separate classes: 'Positive' (rows 2); "
            "'positive' (rows 3, 5)") in "\n".join(report.problems)


def test_classes_given_as_other_spellings_of_the_labels_match(tmp_path):
    table, features = _dataset(tmp_path, 4, labels=["0", "1.0", "0.0", "1"])
    assert MILDataset.from_table(table, features, classes=["0.0", "1.00"]).labels.tolist() == [0, 1, 0, 1]
    assert check_dataset(table, features, classes=["0.0", "1"], progress=False).ok


# --- 6. tables that cannot train ------------------------------------------------------------------

def test_data_check_fails_on_a_header_only_or_single_class_table(tmp_path):
    table, features = _dataset(tmp_path, 2, labels=["pos", "pos"])
    result = CliRunner().invoke(main, ["data", "check", "--table", str(table), "--features", str(features)])
    assert result.exit_code == 1 and "every labelled bag has class 'pos': training needs at least two classes" in result.output
    table.write_text("bag_id,label\n")
    result = CliRunner().invoke(main, ["data", "check", "--table", str(table), "--features", str(features)])
    assert result.exit_code == 1 and f"{table}: no bags (the table has a header but no rows)" in result.output


@pytest.mark.parametrize("column, values, missing", [("split", ["train"] * 4, "test"), ("split", ["test"] * 4, "train"),
                                                     ("fold", ["0"] * 4, "train")])
def test_data_split_refuses_a_table_split_without_test_or_train_bags(tmp_path, column, values, missing):
    table = tmp_path / "labels.csv"
    pd.DataFrame({"bag_id": list("abcd"), "label": ["x", "y"] * 2, column: values}).to_csv(table, index=False)
    out = tmp_path / "splits.json"
    result = CliRunner().invoke(main, ["data", "split", "--table", str(table), "--out", str(out)])
    assert result.exit_code == 2 and f"no {missing} bags" in result.output and f"{column} column" in result.output
    assert not out.exists()


# --- 7. fp16 cache overflow -----------------------------------------------------------------------

def test_fp16_cache_overflow_is_refused_naming_the_bag(tmp_path):
    table, features = _dataset(tmp_path, 4)
    write_bag(features / "b1.h5", np.full((6, 4), 70000.0, np.float32))
    report = check_dataset(table, features, cache="fp16", progress=False)
    assert f"{features / 'b1.h5'} (row 3, bag 'b1'): features reach 70000, beyond float16's 65504" in "\n".join(report.problems)
    assert check_dataset(table, features, cache="fp32", progress=False).ok
    data = MILDataset.from_table(table, features, cache="fp16")
    with pytest.raises(BagFileError, match=r"b1\.h5 \(bag 'b1'\): .*use data.cache=fp32 or none"):
        data.preload(progress=False)
    assert torch.isfinite(MILDataset.from_table(table, features, cache="fp32")[1].features).all()


# --- 8. bag ids with "/" in attention.h5 ----------------------------------------------------------

def test_attention_of_bag_ids_with_slashes_round_trips(tmp_path):
    ids = ["dir/slide 1", "50%2Fx", ".", "plain"]
    values = [np.full(n, 1 / n, np.float32) for n in (2, 3, 4, 5)]
    write_attention(tmp_path / "attention.h5", ids, values, branches=[v[None] for v in values], branch_names=["a"],
                    attrs={"fold": 0})
    back = read_attention(tmp_path / "attention.h5", branches=True)
    assert sorted(back.pooled) == sorted(ids) and sorted(back.branches) == sorted(ids)
    assert back.attrs == {"fold": 0}
    assert np.array_equal(back.pooled["dir/slide 1"], values[0])
    assert list(read_attention(tmp_path / "attention.h5", bags=["50%2Fx"]).pooled) == ["50%2Fx"]
    with h5py.File(tmp_path / "old.h5", "w") as f:   # written before the escaping: "/" made nested groups
        f["dir/slide"] = np.ones(2, np.float32)
        f["a%2Fb"] = np.ones(3, np.float32)
    assert sorted(read_attention(tmp_path / "old.h5").pooled) == ["a%2Fb", "dir/slide"]
