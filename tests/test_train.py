"""The training engine: config validation, run directory, exact resume, evaluate, predict, torchrun."""

import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

import qgmil.train.loop as loop
from qgmil.cli import main
from qgmil.data import BagFileError, prepare_dataset, write_bag
from qgmil.rundir.config import ConfigError, load_config, parse_set
from qgmil.train.run import train_run

# Small and quick, deterministic on CPU (no dropout so that 1 and 2 processes compute the same math).
SMALL = [("optim.epochs", 3), ("optim.batch_size", 8), ("optim.lr", 1e-3), ("eval.folds", 2), ("eval.bootstrap", 50),
         ("runtime.progress", False), ("runtime.tensorboard", False), ("model.name", "qgmil_light"),
         ("model.overrides", {"dropout": 0.0, "attn_dropout": 0.0}), ("eval.patience", None)]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    return prepare_dataset("digit-bags", root, bags=48, progress=False)


def small_config(digits, **extra):
    base = dict(SMALL, **{"data.table": digits / "labels.csv", "data.features": digits / "features"})
    base.update(extra)
    return load_config(None, [], base)


def test_config_errors_name_the_key(tmp_path):
    (tmp_path / "c.yaml").write_text("data:\n  builtin: musk1\noptim:\n  lrr: 0.1\n  epochs: many\n")
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "c.yaml")
    assert "optim.lrr: Extra inputs are not permitted" in str(err.value)
    assert "optim.epochs: Input should be a valid integer" in str(err.value) and str(tmp_path / "c.yaml") in str(err.value)
    with pytest.raises(ConfigError, match="exactly one of data.table"):
        load_config(None, [], {"model.name": "qgmil"})
    (tmp_path / "ok.yaml").write_text("data:\n  builtin: musk1\noptim:\n  lr: 0.1\n")
    config = load_config(tmp_path / "ok.yaml", parse_set(["optim.lr=3e-4", "eval.seeds=[0, 1]"]), {"optim.epochs": 7})
    assert config.optim.lr == 3e-4 and config.eval.seeds == [0, 1] and config.optim.epochs == 7
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_set(["optim.lr"])


def test_a_mistyped_model_fails_fast_and_leaves_nothing(digits, tmp_path):
    """A wrong --model or override exits non-zero naming the key and the choices, before any data work, and
    leaves no run directory; the corrected command then runs in the same --out."""
    out = tmp_path / "run"
    common = ["train", "--table", str(digits / "labels.csv"), "--features", str(digits / "features"), "--folds", "2",
              "--epochs", "1", "--quiet", "--out", str(out), "--set", "runtime.tensorboard=false"]
    result = CliRunner().invoke(main, [*common, "--model", "qgmil_lite"])
    assert result.exit_code == 2
    assert "model.name: unknown model 'qgmil_lite'" in result.output and "qgmil_light" in result.output
    assert not out.exists()
    result = CliRunner().invoke(main, [*common, "--model", "qgmil_light", "--set", "model.overrides.dropuot=0.1"])
    assert result.exit_code == 2
    assert "model.overrides.dropuot: not a field of qgmil_light (fields: " in result.output
    assert "dropout" in result.output and not out.exists()
    result = CliRunner().invoke(main, [*common, "--model", "qgmil_light", "--set", "model.overrides.dropout=0.1"])
    assert result.exit_code == 0, result.output
    assert (out / "summary.json").is_file()


def test_a_fresh_run_that_fails_its_data_checks_leaves_no_directory(tmp_path):
    table = tmp_path / "labels.csv"
    table.write_text("bag_id,label\na,x\nb,y\n")  # no feature files
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="a"):
        train_run(load_config(None, [], dict(SMALL, **{"data.table": table, "data.features": tmp_path / "none"})), out)
    assert not out.exists()
    (out / "keep").mkdir(parents=True)  # a directory that existed before is left as it was
    with pytest.raises(ValueError):
        train_run(load_config(None, [], dict(SMALL, **{"data.table": table, "data.features": tmp_path / "none"})), out)
    assert (out / "keep").is_dir()


def test_run_directory_holds_everything(digits, tmp_path):
    out = tmp_path / "run"
    summary = train_run(small_config(digits), out, command=["test"])
    for name in ("config.yaml", "run.json", "splits.json", "predictions.csv", "summary.json", "summary.md",
                 "summary.csv", "reliability.png"):
        assert (out / name).is_file(), name
    assert set(summary["macro_f1"]) == {"mean", "std", "ci_low", "ci_high", "n"} and summary["macro_f1"]["n"] == 2
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    run = json.loads((out / "run.json").read_text())
    assert run["classes"] == ["negative", "positive"] and run["versions"]["torch"] and run["command"] == ["test"]
    predictions = pd.read_csv(out / "predictions.csv")
    assert list(predictions.columns[:5]) == ["bag_id", "patient_id", "fold", "seed", "label"]
    assert {"prob_negative", "prob_positive"} <= set(predictions.columns)
    assert sorted(predictions["bag_id"]) == sorted(pd.read_csv(digits / "labels.csv")["bag_id"])  # each tested once
    for fold in ("seed0-fold0", "seed0-fold1"):
        fold_dir = out / "folds" / fold
        assert not (fold_dir / "state.safetensors").exists()  # removed once the fold is done
        epochs = pd.read_csv(fold_dir / "epochs.csv")
        assert epochs["epoch"].tolist() == [0, 1, 2] and "val_macro_f1" in epochs
        with h5py.File(fold_dir / "attention.h5") as f:
            for bag_id in f:
                assert abs(f[bag_id][()].sum() - 1) < 1e-4
    assert load_config(out / "config.yaml").data.table.is_absolute()

    with pytest.raises(ConfigError, match="already holds a run"):
        train_run(small_config(digits), out)
    with pytest.raises(ConfigError, match="holds no run to resume"):
        train_run(None, tmp_path / "empty", resume=True)

    result = CliRunner().invoke(main, ["evaluate", str(out)])
    assert result.exit_code == 0 and "macro_f1" in result.output
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))


class Interrupted(Exception):
    pass


def train_interrupted(config, out, monkeypatch, fold: str, epoch: int) -> None:
    """Train `config` into `out` until the end of `epoch` of `fold`, stopped there as by a kill; later runs
    in the test go on undisturbed."""
    def stop(at_fold, at_epoch):
        if (at_fold, at_epoch) == (fold, epoch):
            raise Interrupted

    monkeypatch.setattr(loop, "_epoch_end_hook", stop)
    with pytest.raises(Interrupted):
        train_run(config, out)
    monkeypatch.setattr(loop, "_epoch_end_hook", lambda at_fold, at_epoch: None)


def test_resume_equals_uninterrupted(digits, tmp_path, monkeypatch):
    config = small_config(digits, **{"model.overrides": {"dropout": 0.3}, "optim.epochs": 4})  # dropout: RNG matters
    train_run(config, tmp_path / "straight")

    train_interrupted(config, tmp_path / "resumed", monkeypatch, "seed0-fold1", 1)
    fold1 = tmp_path / "resumed" / "folds" / "seed0-fold1"
    assert (fold1 / "state.safetensors").exists() and not (fold1 / "metrics.json").exists()
    done = (tmp_path / "resumed" / "folds" / "seed0-fold0" / "metrics.json").stat().st_mtime_ns
    train_run(None, tmp_path / "resumed", resume=True)
    assert (tmp_path / "resumed" / "folds" / "seed0-fold0" / "metrics.json").stat().st_mtime_ns == done  # skipped
    for name in ("predictions.csv", "summary.json"):
        assert (tmp_path / "straight" / name).read_text() == (tmp_path / "resumed" / name).read_text()
    for fold in ("seed0-fold0", "seed0-fold1"):
        a, b = (pd.read_csv(tmp_path / r / "folds" / fold / "epochs.csv") for r in ("straight", "resumed"))
        pd.testing.assert_frame_equal(a, b)


def test_auto_cache_reads_each_bag_once_and_trains_as_reading_the_files(digits, tmp_path, monkeypatch):
    """data.cache: auto (the default) keeps the digits in memory: each file is read once in the whole run, and
    the run ends as one that reads every bag from its file each time, byte for byte. A run whose config.yaml
    says cache: null (as before auto was the default) resumes under the default; fp16 (it changes the values) is
    refused."""
    import qgmil.data.dataset as dataset_module

    reads = []
    real_read = dataset_module.read_features
    monkeypatch.setattr(dataset_module, "read_features", lambda *a, **k: reads.append(a[0]) or real_read(*a, **k))
    uncached = small_config(digits, **{"data.cache": None})
    train_run(uncached, tmp_path / "files")
    assert len(reads) > 2 * len(set(reads))
    reads.clear()
    assert small_config(digits).data.cache == "auto"
    train_run(small_config(digits), tmp_path / "cached")
    assert sorted(reads) == sorted(set(reads)) and len(reads) == 48
    for name in ("predictions.csv", "summary.json"):
        assert (tmp_path / "files" / name).read_text() == (tmp_path / "cached" / name).read_text()

    train_interrupted(uncached, tmp_path / "resumed", monkeypatch, "seed0-fold1", 0)
    with pytest.raises(ConfigError, match="differs from the run's config.yaml"):
        train_run(small_config(digits, **{"data.cache": "fp16"}), tmp_path / "resumed", resume=True)
    train_run(small_config(digits), tmp_path / "resumed", resume=True)
    assert (tmp_path / "files" / "predictions.csv").read_text() == (tmp_path / "resumed" / "predictions.csv").read_text()


def test_with_loader_workers_the_auto_cache_is_filled_first_and_the_workers_use_it(digits, tmp_path, monkeypatch):
    """With data.num_workers the cache is filled before training, so the workers (forked afresh each epoch)
    never open a file: moved away after the first epoch, the features are not needed for the rest of the run.
    The same run reading its files (data.cache null) fails there."""
    copy = tmp_path / "digits"
    shutil.copytree(digits, copy)
    moved = tmp_path / "moved"

    def move_features(fold, epoch):
        if not moved.exists():
            (copy / "features").rename(moved)

    monkeypatch.setattr(loop, "_epoch_end_hook", move_features)
    summary = train_run(small_config(copy, **{"data.num_workers": 1}), tmp_path / "cached")
    assert moved.exists() and summary["macro_f1"]["n"] == 2
    moved.rename(copy / "features")
    with pytest.raises(BagFileError, match="DataLoader worker"):
        train_run(small_config(copy, **{"data.num_workers": 1, "data.cache": None}), tmp_path / "files")


def test_predict_with_a_run(digits, tmp_path):
    out = tmp_path / "run"
    train_run(small_config(digits, **{"eval.save_attention": False}), out)
    runner = CliRunner()
    result = runner.invoke(main, ["predict", str(out), str(digits / "labels.csv"), "--out", str(tmp_path / "p1")])
    assert result.exit_code == 0, result.output
    predictions = pd.read_csv(tmp_path / "p1" / "predictions.csv")
    assert len(predictions) == 48 and {"label", "pred", "prob_positive"} <= set(predictions.columns)
    assert np.allclose(predictions[["prob_negative", "prob_positive"]].sum(axis=1), 1)
    metrics = json.loads((tmp_path / "p1" / "metrics.json").read_text())
    assert len(metrics["models"]) == 2 and metrics["n"] == 48 and 0 <= metrics["macro_f1"] <= 1

    # a folder of feature files, no labels: predictions and attention, no metrics
    new = tmp_path / "new"
    rng = np.random.default_rng(0)
    write_bag(new / "a.h5", rng.random((10, 64), dtype=np.float32))
    write_bag(new / "b.h5", rng.random((7, 64), dtype=np.float32))
    result = runner.invoke(main, ["predict", str(out), str(new), "--out", str(tmp_path / "p2")])
    assert result.exit_code == 0, result.output
    assert pd.read_csv(tmp_path / "p2" / "predictions.csv")["bag_id"].tolist() == ["a", "b"]
    assert not (tmp_path / "p2" / "metrics.json").exists()
    with h5py.File(tmp_path / "p2" / "attention.h5") as f:
        assert f["b"].shape == (7,) and abs(f["b"][()].sum() - 1) < 1e-5

    # bags of another encoder or another dimension are refused, naming the file
    write_bag(new / "c.h5", rng.random((5, 32), dtype=np.float32))
    result = runner.invoke(main, ["predict", str(out), str(new), "--out", str(tmp_path / "p3")])
    assert result.exit_code != 0 and "c.h5: feature dim 32, but" in result.output
    (new / "c.h5").unlink()
    checkpoint = out / "folds" / "seed0-fold0" / "best.safetensors"
    write_bag(new / "d.h5", rng.random((5, 64), dtype=np.float32), attrs={"encoder": "uni_v1"})
    import qgmil.evaluate.predict as predict_module

    meta = predict_module.read_metadata(checkpoint)
    meta["extra"]["provenance"] = {"encoder": "resnet50_trunc"}
    with pytest.raises(ValueError, match="d.h5: encoder 'uni_v1', but .* trained on encoder 'resnet50_trunc'"):
        predict_module._check_compatible(
            predict_module.MILDataset.from_table(predict_module._table_for(new, None, None)[0], new), meta, checkpoint)


@pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo")
def test_torchrun_two_processes_match_one(digits, tmp_path):
    args = ["train", "--table", str(digits / "labels.csv"), "--features", str(digits / "features"),
            "--set", "model.overrides={dropout: 0.0, attn_dropout: 0.0}", "--quiet"]
    args += [a for key, value in SMALL if key not in ("runtime.progress", "model.overrides")
             for a in ("--set", f"{key}={json.dumps(value) if value is not None else 'null'}")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "qgmil", *args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "qgmil", *args, "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("run directory:") == 1  # rank 0 alone prints the summary
    assert json.loads((tmp_path / "two" / "run.json").read_text())["world_size"] == 2
    a, b = (pd.read_csv(tmp_path / r / "predictions.csv") for r in ("one", "two"))
    assert a["bag_id"].tolist() == b["bag_id"].tolist()
    # Same bags in every step and the same gradient; only float summation order differs.
    np.testing.assert_allclose(a["prob_positive"], b["prob_positive"], atol=1e-3)
    s1, s2 = (json.loads((tmp_path / r / "summary.json").read_text()) for r in ("one", "two"))
    assert abs(s1["auroc"]["mean"] - s2["auroc"]["mean"]) < 0.01


LONE_FAILURE = """
import datetime, torch, torch.distributed as dist
import qgmil.runtime as runtime
runtime.CLOSE_WAIT = datetime.timedelta(seconds=2)
ctx = runtime.init_distributed("cpu")
if ctx.rank == 1:
    raise SystemExit("rank 1 fails alone")
dist.all_reduce(torch.ones(1))  # rank 0 waits for a rank that never comes
"""


@pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo")
def test_a_rank_failing_alone_ends_the_launch_instead_of_hanging(tmp_path):
    # At exit each rank waits for the others before leaving the process group (no worker thread outlives the
    # interpreter); a rank that failed never arrives, so that wait is bounded by CLOSE_WAIT.
    script = tmp_path / "lone_failure.py"
    script.write_text(LONE_FAILURE)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script)], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode != 0 and "rank 1 fails alone" in run.stderr, run.stderr[-2000:]


def test_multiclass_ordinal_bf16_and_early_stopping(tmp_path):
    """Three ordered classes, bf16 autocast on CPU, and early stopping that keeps the best epoch."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(36):
        grade = i % 3
        n = int(rng.integers(5, 15))
        x = rng.normal(size=(n, 16)).astype(np.float32)
        x[: grade + 1, 0] += 3.0  # more witnesses for a higher grade
        write_bag(tmp_path / "features" / f"b{i}.h5", x)
        rows.append({"bag_id": f"b{i}", "label": ["low", "mid", "high"][grade]})
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    config = load_config(None, [], dict(SMALL, **{
        "data.table": tmp_path / "labels.csv", "data.features": tmp_path / "features",
        "data.classes": ["low", "mid", "high"], "eval.ordinal": True, "eval.patience": 2, "optim.epochs": 30,
        "runtime.precision": "bf16", "eval.folds": 3}))
    summary = train_run(config, tmp_path / "run")
    assert "kappa_quadratic" in summary and summary["auroc"]["n"] == 3
    predictions = pd.read_csv(tmp_path / "run" / "predictions.csv")
    assert [c for c in predictions.columns if c.startswith("prob_")] == ["prob_low", "prob_mid", "prob_high"]
    for fold in range(3):
        metrics = json.loads((tmp_path / "run" / "folds" / f"seed0-fold{fold}" / "metrics.json").read_text())
        epochs = pd.read_csv(tmp_path / "run" / "folds" / f"seed0-fold{fold}" / "epochs.csv")
        assert len(epochs) == metrics["epochs_run"]
        assert epochs.loc[epochs["best"], "epoch"].max() == metrics["best_epoch"]
        if metrics["stopped_early"]:
            assert metrics["epochs_run"] - 1 - metrics["best_epoch"] == 2  # patience 2
        best = epochs.loc[metrics["best_epoch"]]
        assert metrics["val"]["macro_f1"] == pytest.approx(best["val_macro_f1"])
        assert (epochs["val_macro_f1"] <= best["val_macro_f1"] + 1e-12).all()  # the kept epoch is the best


def test_tensorboard_log_when_installed(digits, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_run(small_config(digits, **{"runtime.tensorboard": True, "eval.folds": 2, "optim.epochs": 2}), tmp_path / "r")
    events = EventAccumulator(str(tmp_path / "r" / "folds" / "seed0-fold0" / "tensorboard"))
    events.Reload()
    assert {"train_loss", "val_macro_f1", "lr"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train_loss")] == [0, 1]
