"""Nested tuning: search spaces of every model, test folds that never inform a choice, resume, storages."""

import json

import pandas as pd
import pytest
from click.testing import CliRunner

import qgmil.train.loop as loop
from qgmil import create_model, list_models
from qgmil.cli import main
from qgmil.data import prepare_dataset
from qgmil.models import model_entry
from qgmil.models.search import Choice, Float, Int, merge_space, parse_param
from qgmil.rundir import RunDir
from qgmil.rundir.config import ConfigError, load_config

optuna = pytest.importorskip("optuna", reason="tuning needs optuna (pip install 'qgmil[tune]')")

from qgmil.tune import check_space, tune_run  # noqa: E402  (after the optuna check)

# abmil_gated: quick, and it has a model knob (attn_dim) besides the training ones.
TINY = {"model.name": "abmil_gated", "eval.folds": 2, "optim.epochs": 3, "optim.batch_size": 8, "eval.bootstrap": 20,
        "eval.patience": None, "runtime.progress": False, "runtime.tensorboard": False, "tune.trials": 4,
        "tune.startup_trials": 2, "tune.prune_after": 1}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return prepare_dataset("digit-bags", tmp_path_factory.mktemp("digits"), bags=40, progress=False)


def tiny_config(table, features, **extra):
    return load_config(None, [], {**TINY, "data.table": table, "data.features": features, **extra})


def trials_of(run_dir, fold):
    frame = pd.read_csv(RunDir(run_dir).tuning_dir(fold) / "trials.csv")
    return frame[["number", "state", "value"] + [c for c in frame if c.startswith("params_")]]


@pytest.mark.parametrize("name", list_models())
def test_every_model_space_builds_at_its_extremes(name):
    """Each registered model declares a search space, and every extreme of it builds a working model."""
    import torch

    space = model_entry(name).search_space()
    assert {"optim.lr", "optim.weight_decay"} <= set(space)
    knobs = {k.removeprefix("model.overrides."): p.extremes() for k, p in space.items() if k.startswith("model.")}
    for i in range(max(map(len, knobs.values()), default=0)):  # every value of every knob, several at once
        overrides = {k: values[min(i, len(values) - 1)] for k, values in knobs.items()}
        model = create_model(name, in_dim=8, num_classes=3, **overrides)
        assert model(torch.randn(1, 5, 8)).logits.shape == (1, 3), overrides
    config = load_config(None, [], {"data.builtin": "musk1", "model.name": name})
    check_space(config)


def test_space_yaml_forms_and_errors():
    assert parse_param("optim.lr", {"low": 1e-5, "high": 1e-3, "log": True}) == Float(1e-5, 1e-3, log=True)
    assert parse_param("model.overrides.depth", {"low": 1, "high": 3, "type": "int"}) == Int(1, 3)
    assert parse_param("model.overrides.dim", [256, None]) == Choice((256, None))
    space, fixed = merge_space(model_entry("abmil").search_space(),
                               {"optim.weight_decay": None, "optim.epochs": 7, "model.overrides.attn_dim": [64]})
    assert "optim.weight_decay" not in space and fixed == {"optim.epochs": 7}
    assert space["model.overrides.attn_dim"] == Choice((64,))
    nested = load_config(None, [("tune.space.optim.lr", {"low": 1e-4, "high": 1e-3}),
                                ("tune.space.model.overrides.dim", [256])], {"data.builtin": "musk1"})
    assert nested.tune.space == {"optim.lr": {"low": 1e-4, "high": 1e-3}, "model.overrides.dim": [256]}
    with pytest.raises(ConfigError, match=r"tune.space.data.table: not tunable"):
        load_config(None, [], {"data.builtin": "musk1", "tune.space": {"data.table": [1]}})
    with pytest.raises(ConfigError, match=r"tune.space.optim.lr: need 0 < low <= high"):
        load_config(None, [], {"data.builtin": "musk1", "tune.space": {"optim.lr": {"low": 0, "high": 1, "log": True}}})
    with pytest.raises(ConfigError, match=r"tune.space.optim.lr: expected \{low, high\}.*unknown: hi"):
        load_config(None, [], {"data.builtin": "musk1", "tune.space": {"optim.lr": {"low": 0, "hi": 1}}})
    # a range the model rejects fails at the start, naming the field
    bad = load_config(None, [], {"data.builtin": "musk1", "model.name": "abmil",
                                 "tune.space": {"model.overrides.dropout": {"low": 0.0, "high": 1.5}}})
    with pytest.raises(ConfigError, match="model.overrides.dropout"):
        check_space(bad)


def test_test_labels_never_inform_tuning(digits, tmp_path):
    """Flipping the labels of an outer fold's test bags changes none of that fold's trials (settings, scores,
    pruning) and not its chosen settings; only its test metrics see the flip."""
    table, features = digits / "labels.csv", digits / "features"
    first = tmp_path / "a"
    tune_run(tiny_config(table, features), first)
    splits = json.loads((first / "splits.json").read_text())
    test_ids = set(next(f for f in splits["folds"] if f["name"] == "seed0-fold0")["test"])
    frame = pd.read_csv(table, dtype=str)
    frame.loc[frame["bag_id"].isin(test_ids), "label"] = frame.loc[frame["bag_id"].isin(test_ids), "label"].map(
        {"negative": "positive", "positive": "negative"})
    flipped = tmp_path / "flipped.csv"
    frame.to_csv(flipped, index=False)
    second = tmp_path / "b"
    tune_run(tiny_config(flipped, features, **{"eval.splits": first / "splits.json"}), second)

    pd.testing.assert_frame_equal(trials_of(first, "seed0-fold0"), trials_of(second, "seed0-fold0"))
    chosen = [RunDir(d).read_chosen()["seed0-fold0"] for d in (first, second)]
    assert chosen[0] == chosen[1]
    metrics = [json.loads((d / "folds" / "seed0-fold0" / "metrics.json").read_text()) for d in (first, second)]
    assert metrics[0]["val"] == metrics[1]["val"]  # the same model was retrained ...
    preds = [RunDir(d).fold("seed0-fold0").read_predictions() for d in (first, second)]
    pd.testing.assert_frame_equal(preds[0].filter(like="prob_"), preds[1].filter(like="prob_"))
    assert (preds[0]["label"] != preds[1]["label"]).all()  # ... and scored against the flipped labels


def test_the_chosen_settings_are_retrained_and_recorded(digits, tmp_path):
    out = tmp_path / "run"
    summary = tune_run(tiny_config(digits / "labels.csv", digits / "features"), out)
    assert summary["macro_f1"]["n"] == 2
    run = RunDir(out)
    for fold, chosen in run.read_chosen().items():
        assert chosen["trials"] == 4 and chosen["complete"] + chosen["pruned"] + chosen["failed"] == 4
        assert set(chosen["params"]) == set(model_entry("abmil_gated").search_space())
        from qgmil.checkpoint import load_model

        model = load_model(run.fold(fold).best)
        assert model.config.attn_dim == chosen["params"]["model.overrides.attn_dim"]
        assert model.config.dropout == pytest.approx(chosen["params"]["model.overrides.dropout"])
        assert (run.tuning_dir(fold) / "history.png").stat().st_size > 0
    settings = (run.tuning / "settings.md").read_text()
    assert "attn_dim" in settings and "2 outer folds, 4 trials each" in settings


def test_resume_after_an_interruption_equals_an_uninterrupted_study(digits, tmp_path, monkeypatch):
    """Killed in the middle of a trial: the rerun marks that trial failed, runs it again, and ends with the
    trials an uninterrupted study ran (same settings, same scores) and the same chosen settings."""
    config = tiny_config(digits / "labels.csv", digits / "features", **{"eval.folds": 2})
    whole = tmp_path / "whole"
    tune_run(config, whole)

    calls = {"n": 0}

    def interrupt(fold, epoch):
        calls["n"] += 1
        if calls["n"] == 2 * 3 + 2:  # the eighth epoch of the studies: in the middle of a trial
            raise KeyboardInterrupt

    cut = tmp_path / "cut"
    monkeypatch.setattr(loop, "_epoch_end_hook", interrupt)
    with pytest.raises(KeyboardInterrupt):
        tune_run(config, cut)
    monkeypatch.setattr(loop, "_epoch_end_hook", lambda fold, epoch: None)
    tune_run(None, cut, resume=True)

    failed = 0
    for fold in ("seed0-fold0", "seed0-fold1"):
        resumed = trials_of(cut, fold)
        failed += (resumed["state"] == "FAIL").sum()
        kept = resumed[resumed["state"] != "FAIL"].drop(columns="number").reset_index(drop=True)
        pd.testing.assert_frame_equal(kept, trials_of(whole, fold).drop(columns="number"))
    assert failed == 1  # the interrupted trial, run again
    assert RunDir(cut).read_chosen() == RunDir(whole).read_chosen()


def test_an_rdb_storage_and_the_cli(digits, tmp_path):
    """`qgmil tune --storage sqlite:///...` keeps the studies in that database; `qgmil models --space` shows
    what is searched."""
    db = tmp_path / "studies.db"
    out = tmp_path / "run"
    result = CliRunner().invoke(main, [
        "tune", "--table", str(digits / "labels.csv"), "--features", str(digits / "features"), "--model", "mean_pool",
        "--folds", "2", "--epochs", "2", "--trials", "2", "--storage", f"sqlite:///{db}", "--quiet", "--out", str(out),
        "--set", "runtime.tensorboard=false", "--set", "eval.bootstrap=20"])
    assert result.exit_code == 0, result.output
    assert "macro_f1" in result.output and not RunDir(out).study_journal.exists()
    names = optuna.get_all_study_names(storage=f"sqlite:///{db}")
    assert sorted(names) == ["seed0-fold0", "seed0-fold1"]
    assert len(optuna.load_study(study_name="seed0-fold0", storage=f"sqlite:///{db}").trials) == 2

    listing = CliRunner().invoke(main, ["models", "acmil", "--space"])
    assert "model.overrides.diversity_weight: 0 .. 2" in listing.output
    assert "optim.lr: 1e-05 .. 0.001, log" in listing.output


def test_benchmark_tune_gives_every_model_the_same_budget(digits, tmp_path):
    """`qgmil benchmark --tune N`: each cell is a nested-tuning run with N trials per outer (seed, fold) and the
    same epoch budget; tuning.md reports what each model spent and chose; the paired tests get folds x seeds."""
    spec = tmp_path / "bench.yaml"
    spec.write_text(f"datasets: [{digits}]\nmodels: [mean_pool, {{name: qgmil_light, space: "
                    "{model.overrides.depth: [1]}}]\n"
                    "train: {optim.epochs: 2, optim.batch_size: 8, eval.bootstrap: 20, runtime.threads: 1, "
                    "tune.startup_trials: 1}\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["benchmark", str(spec), "--folds", "2", "--seeds", "0,1", "--tune", "2",
                                       "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    tuning = pd.read_csv(out / "tuning.csv")
    assert list(tuning["model"]) == ["mean_pool", "qgmil_light"]
    assert (tuning["outer_folds"] == 4).all() and (tuning["trials"] == 2).all()
    assert "depth 1 (4/4)" in tuning.loc[1, "settings"] and "lr " in tuning.loc[0, "settings"]
    assert "| mean_pool | 4 | 2 |" in (out / "tuning.md").read_text()
    for model in ("mean_pool", "qgmil_light"):
        run = RunDir(out / "runs" / tuning.loc[0, "dataset"] / model)
        assert run.read_config().tune.trials == 2 and run.read_config().optim.epochs == 2
        assert sorted(run.read_chosen()) == ["seed0-fold0", "seed0-fold1", "seed1-fold0", "seed1-fold1"]
    tests = pd.read_csv(out / "significance.csv")
    assert list(tests["baseline"]) == ["mean_pool"] and (tests["pairs"] == 4).all()
    assert "over the 4 (seed, fold) test parts of each cell" in (out / "results.md").read_text()


def counted(run_dir, fold):
    """The fold's trials that count against the budget (complete or pruned) and the pids that ran them."""
    study = optuna.load_study(study_name=fold, storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(RunDir(run_dir).study_journal))))
    done = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    return done, {t.user_attrs["pid"] for t in done}


def test_parallel_workers_share_each_study_within_its_budget(digits, tmp_path):
    """`--parallel 2`: two processes run the trials of each study between them, never more than tune.trials."""
    out = tmp_path / "run"
    summary = tune_run(tiny_config(digits / "labels.csv", digits / "features", **{"tune.trials": 6}), out, workers=2)
    assert summary["macro_f1"]["n"] == 2
    pids = set()
    for fold in ("seed0-fold0", "seed0-fold1"):
        done, by = counted(out, fold)
        assert len(done) == 6 and RunDir(out).read_chosen()[fold]["trials"] == 6
        pids |= by
    assert len(pids) == 2  # both processes ran trials
