"""Evaluation metrics: equality with scikit-learn, exact ECE cases, bootstrap summaries, formatting and plots."""

import inspect
import math
import time

import numpy as np
import pytest
from sklearn import metrics as skm

from qgmil.evaluate import (
    HIGHER_IS_BETTER,
    METRICS,
    classification_metrics,
    confusion,
    format_summary,
    metric_bars,
    reliability_diagram,
    summarize_predictions,
)
from qgmil.evaluate.metrics import _FoldStats, _bootstrap_weights

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_LOG_LOSS_TAKES_Y_PROBA = "y_proba" in inspect.signature(skm.log_loss).parameters


def sk_log_loss(y, probs, labels):
    if _LOG_LOSS_TAKES_Y_PROBA:
        return skm.log_loss(y, y_proba=probs, labels=labels)
    return skm.log_loss(y, probs, labels=labels)


def random_case(rng, n, num_classes, *, ties=False, absent=False, skill=1.0):
    """(y (n,), probs (n, C)); ties: few distinct probability rows, so scores (and argmax) tie often;
    absent: the last class never occurs in y."""
    high = num_classes - 1 if absent else num_classes
    y = rng.integers(0, high, size=n)
    logits = rng.normal(size=(n, num_classes))
    logits[np.arange(n), y] += skill
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    if ties:  # every bag takes one of a few probability rows, one of them uniform (an argmax tie)
        pool = np.vstack([rng.dirichlet(np.ones(num_classes), size=4), np.full(num_classes, 1.0 / num_classes)])
        probs = pool[rng.integers(0, len(pool), size=n)]
    return y, probs


def sklearn_metrics(y, probs, ordinal=False):
    num_classes = probs.shape[1]
    labels = list(range(num_classes))
    pred = probs.argmax(axis=1)
    out = {
        "macro_f1": skm.f1_score(y, pred, average="macro", zero_division=0),
        "balanced_accuracy": skm.balanced_accuracy_score(y, pred),
        "accuracy": skm.accuracy_score(y, pred),
        "kappa": skm.cohen_kappa_score(y, pred, labels=labels),
        "nll": sk_log_loss(y, probs, labels),
    }
    if ordinal:
        out["kappa_quadratic"] = skm.cohen_kappa_score(y, pred, labels=labels, weights="quadratic")
    if num_classes == 2:
        out["brier"] = 2 * skm.brier_score_loss(y, probs[:, 1], pos_label=1)
        out["auroc"] = skm.roc_auc_score(y, probs[:, 1]) if len(np.unique(y)) == 2 else math.nan
    else:
        out["brier"] = np.mean(((probs - np.eye(num_classes)[y]) ** 2).sum(axis=1))
        if len(np.unique(y)) == num_classes:
            out["auroc"] = skm.roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=labels)
        else:  # ovr over the classes that have positives and negatives
            aucs = [skm.roc_auc_score(y == c, probs[:, c]) for c in range(num_classes) if 0 < np.sum(y == c) < len(y)]
            out["auroc"] = np.mean(aucs) if aucs else math.nan
    return out


def assert_metrics_close(ours, ref):
    for k, v in ref.items():
        assert ours[k] == pytest.approx(v, abs=1e-10, nan_ok=True), k


@pytest.mark.filterwarnings("ignore::UserWarning")  # sklearn's warnings for undefined kappa / absent classes
@pytest.mark.parametrize("num_classes", [2, 3, 5])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("absent", [False, True])
def test_metrics_match_sklearn(num_classes, ties, absent):
    rng = np.random.default_rng(100 * num_classes + 10 * ties + absent)
    for _ in range(25):
        n = int(rng.integers(2, 60))
        y, probs = random_case(rng, n, num_classes, ties=ties, absent=absent, skill=float(rng.uniform(-1, 3)))
        ours = classification_metrics(y, probs, ordinal=True)
        assert list(ours) == list(METRICS[:5]) + ["kappa_quadratic"] + list(METRICS[5:])
        assert_metrics_close(ours, sklearn_metrics(y, probs, ordinal=True))
        assert "kappa_quadratic" not in classification_metrics(y, probs)


def test_brier_matches_sklearn_multiclass_when_supported():
    rng = np.random.default_rng(1)
    y, probs = random_case(rng, 40, 4)
    try:
        ref = skm.brier_score_loss(y, probs, labels=[0, 1, 2, 3])
    except (ValueError, TypeError):
        pytest.skip("this scikit-learn has no multi-class Brier score")
    assert classification_metrics(y, probs)["brier"] == pytest.approx(ref, abs=1e-12)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_edge_cases():
    # one class in y and in predictions: AUROC and kappa undefined (NaN, as sklearn), the rest defined
    y = np.zeros(4, dtype=int)
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.7, 0.3]])
    m = classification_metrics(y, probs, ordinal=True)
    assert math.isnan(m["auroc"]) and math.isnan(m["kappa"]) and math.isnan(m["kappa_quadratic"])
    assert math.isnan(skm.cohen_kappa_score(y, probs.argmax(1)))
    assert m["accuracy"] == m["macro_f1"] == m["balanced_accuracy"] == 1.0
    # a single bag
    m = classification_metrics(np.array([1]), np.array([[0.3, 0.2, 0.5]]))
    assert m["accuracy"] == 0.0 and math.isnan(m["auroc"])
    assert m["nll"] == pytest.approx(-math.log(0.2))
    assert_metrics_close(m, {k: v for k, v in sklearn_metrics(np.array([1]), np.array([[0.3, 0.2, 0.5]])).items()})
    # probability 0 for the true class: NLL clipped at 1e-12
    m = classification_metrics(np.array([0, 1]), np.array([[0.0, 1.0], [0.0, 1.0]]))
    assert m["nll"] == pytest.approx(-math.log(1e-12) / 2)
    # argmax ties go to the lowest class index
    assert classification_metrics(np.array([0, 1]), np.array([[0.5, 0.5], [0.5, 0.5]]))["accuracy"] == 0.5


def test_input_validation():
    with pytest.raises(ValueError, match="sum to 1"):
        classification_metrics(np.array([0, 1]), np.array([[2.0, 1.0], [0.3, 0.1]]))
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        classification_metrics(np.array([0, 2]), np.array([[0.5, 0.5], [0.5, 0.5]]))
    with pytest.raises(ValueError, match="shape"):
        classification_metrics(np.array([0, 1, 1]), np.array([[0.5, 0.5], [0.5, 0.5]]))
    with pytest.raises(ValueError, match="C >= 2"):
        classification_metrics(np.array([0]), np.array([[1.0]]))


def test_confusion_matches_sklearn():
    rng = np.random.default_rng(2)
    y, pred = rng.integers(0, 4, 50), rng.integers(0, 3, 50)
    np.testing.assert_array_equal(confusion(y, pred, 4), skm.confusion_matrix(y, pred, labels=range(4)))


def test_ece_exact_cases():
    # two bins, each perfectly calibrated: 10 bags at 0.7 with 7 correct, 10 at 0.9 with 9 correct
    y = np.array([0] * 7 + [1] * 3 + [0] * 9 + [1])
    probs = np.array([[0.7, 0.3]] * 10 + [[0.9, 0.1]] * 10)
    assert classification_metrics(y, probs)["ece"] == pytest.approx(0.0, abs=1e-12)
    # always fully confident, half right
    y = np.array([0, 1, 0, 1])
    probs = np.array([[1.0, 0.0]] * 4)
    assert classification_metrics(y, probs)["ece"] == pytest.approx(0.5)
    # two bins [0, .5] and (.5, 1]: low bin conf .4 acc .5 (gap .1), high bin conf .8 acc 1 (gap .2) -> 0.15
    y = np.array([0, 1, 0, 2])
    probs = np.array([[0.4, 0.3, 0.3], [0.4, 0.3, 0.3], [0.8, 0.1, 0.1], [0.1, 0.1, 0.8]])
    assert classification_metrics(y, probs, n_bins=2)["ece"] == pytest.approx(0.15)
    # a confidence on a bin edge belongs to the lower bin: 0.5 (right) goes with 0.4 (wrong), not with 1.0
    y = np.array([0, 1, 0])
    probs = np.array([[0.5, 0.5], [1.0, 0.0], [0.6, 0.4]])
    # bins of width .5: [0, .5] holds conf .5 correct -> |1 - .5|; (.5, 1] holds 1.0 wrong and .6 right -> |1 - 1.6|
    assert classification_metrics(y, probs, n_bins=2)["ece"] == pytest.approx((0.5 + 0.6) / 3)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_bootstrap_weights_equal_resampled_metrics():
    """The weighted (vectorised) replicate equals the metrics of the explicitly resampled bags."""
    rng = np.random.default_rng(3)
    for num_classes in (2, 3, 5):
        y, probs = random_case(rng, 30, num_classes, ties=True)
        stats = _FoldStats(y, probs, ordinal=True, n_bins=15)
        w = _bootstrap_weights(np.random.default_rng(num_classes), 20, len(y))
        assert np.all(w.sum(axis=1) == len(y))
        values = stats.metrics(w)
        for b in range(len(w)):
            idx = np.repeat(np.arange(len(y)), w[b].astype(int))
            expected = classification_metrics(y[idx], probs[idx], ordinal=True)
            assert_metrics_close({k: float(v[b]) for k, v in values.items()}, expected)
            assert_metrics_close(expected, sklearn_metrics(y[idx], probs[idx], ordinal=True))


def make_folds(rng, n_folds, n_bags, num_classes=3):
    return [random_case(rng, n_bags, num_classes, skill=1.5) for _ in range(n_folds)]


def test_summary_mean_std_n():
    folds = make_folds(np.random.default_rng(4), 6, 40)
    summary = summarize_predictions(folds, n_boot=50, seed=1)
    per_fold = [classification_metrics(y, p) for y, p in folds]
    assert list(summary) == list(METRICS)
    for k in METRICS:
        vals = np.array([m[k] for m in per_fold])
        assert summary[k]["mean"] == pytest.approx(vals.mean(), abs=1e-12)
        assert summary[k]["std"] == pytest.approx(vals.std(ddof=1), abs=1e-12)
        assert summary[k]["n"] == 6
        assert set(summary[k]) == {"mean", "std", "ci_low", "ci_high", "n"}
        assert summary[k]["ci_low"] <= summary[k]["ci_high"]
    single = summarize_predictions(folds[:1], n_boot=20)
    assert all(s["std"] == 0.0 and s["n"] == 1 for s in single.values())
    assert "kappa_quadratic" in summarize_predictions(folds, n_boot=5, ordinal=True)


def test_summary_ci_contains_mean_and_shrinks():
    rng = np.random.default_rng(5)
    small = summarize_predictions(make_folds(rng, 5, 30), n_boot=400, seed=0)
    large = summarize_predictions(make_folds(rng, 5, 600), n_boot=400, seed=0)
    for k in METRICS:
        if k != "ece":  # ECE is biased upwards under resampling, so its percentile CI may sit above the point value
            assert small[k]["ci_low"] <= small[k]["mean"] <= small[k]["ci_high"], k
            assert large[k]["ci_low"] <= large[k]["mean"] <= large[k]["ci_high"], k
        assert large[k]["ci_high"] - large[k]["ci_low"] < small[k]["ci_high"] - small[k]["ci_low"], k


def test_summary_reproducible():
    folds = make_folds(np.random.default_rng(6), 3, 25)
    a = summarize_predictions(folds, n_boot=100, seed=7)
    assert a == summarize_predictions(folds, n_boot=100, seed=7)
    assert a != summarize_predictions(folds, n_boot=100, seed=8)


def test_summary_nan_auroc_fold():
    rng = np.random.default_rng(7)
    folds = make_folds(rng, 3, 30, num_classes=2)
    one_class = (np.zeros(5, dtype=int), np.array([[0.8, 0.2], [0.6, 0.4], [0.3, 0.7], [0.9, 0.1], [0.55, 0.45]]))
    summary = summarize_predictions(folds + [one_class], n_boot=100)
    aucs = [classification_metrics(y, p)["auroc"] for y, p in folds]
    assert summary["auroc"]["n"] == 3 and summary["accuracy"]["n"] == 4
    assert summary["auroc"]["mean"] == pytest.approx(np.mean(aucs))
    assert summary["auroc"]["std"] == pytest.approx(np.std(aucs, ddof=1))
    assert np.isfinite(summary["auroc"]["ci_low"]) and np.isfinite(summary["auroc"]["ci_high"])
    only_nan = summarize_predictions([one_class], n_boot=10)["auroc"]
    assert only_nan["n"] == 0 and all(math.isnan(only_nan[k]) for k in ("mean", "std", "ci_low", "ci_high"))


def test_summary_speed():
    folds = make_folds(np.random.default_rng(8), 10, 100)
    start = time.perf_counter()
    summarize_predictions(folds, n_boot=1000)
    assert time.perf_counter() - start < 3.0


def test_format_summary():
    summary = summarize_predictions(make_folds(np.random.default_rng(9), 3, 20), n_boot=20)
    table = format_summary(summary, digits=2)
    lines = table.splitlines()
    assert lines[0] == "| metric | mean ± std | 95% CI | n |"
    assert lines[1] == "|---|---|---|---|"
    assert len(lines) == 2 + len(METRICS)
    for name, line in zip(METRICS, lines[2:]):
        assert line.startswith(f"| {name} | ") and line.endswith("| 3 |")
    assert len(format_summary(summary, metrics=["auroc"]).splitlines()) == 3
    assert set(HIGHER_IS_BETTER) >= set(METRICS)
    assert not HIGHER_IS_BETTER["ece"] and HIGHER_IS_BETTER["auroc"]


def assert_png(path):
    data = path.read_bytes()
    assert len(data) > len(PNG_SIGNATURE) and data.startswith(PNG_SIGNATURE)


def test_plots_write_png(tmp_path):
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(10)
    y, probs = random_case(rng, 80, 3)
    out = reliability_diagram(y, probs, tmp_path / "figs" / "reliability.png", title="test")
    assert out == tmp_path / "figs" / "reliability.png"
    assert_png(out)
    summaries = {name: summarize_predictions(make_folds(rng, 3, 20), n_boot=10) for name in ("abmil", "qgmil")}
    out = metric_bars(summaries, tmp_path / "bars.png", metrics=("macro_f1", "auroc", "ece"))
    assert_png(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bars.png", "figs"]  # no temporary files left behind


def test_plots_without_matplotlib(monkeypatch, tmp_path):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(__import__("sys").modules, name, None)
    with pytest.raises(ImportError, match=r"pip install 'qgmil\[plots\]'"):
        reliability_diagram(np.array([0, 1]), np.array([[0.6, 0.4], [0.3, 0.7]]), tmp_path / "r.png")
    assert not list(tmp_path.iterdir())
