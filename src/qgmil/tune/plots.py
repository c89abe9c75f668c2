"""PNG figures of one study: the optimisation history (each trial's validation score, pruned trials at their
last reported score, the best so far as a line) and the parameter importances (Optuna's fANOVA over the
complete trials). Drawn on bare matplotlib figures (no pyplot state); skipped without matplotlib."""

from __future__ import annotations

import warnings
from pathlib import Path


def plot_study(study, folder: Path, metric: str) -> list[Path]:
    """history.png and importances.png in `folder`; returns those written."""
    try:
        from ..plotting import new_figure, save_figure

        new_figure()
    except ImportError:  # plots are an extra
        return []
    import optuna

    state = optuna.trial.TrialState
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    written = []
    complete = [t for t in study.trials if t.state == state.COMPLETE]
    pruned = [t for t in study.trials if t.state == state.PRUNED and t.intermediate_values]
    if complete:
        fig = new_figure(figsize=(6, 3.5))
        ax = fig.add_subplot()
        ax.scatter([t.number for t in complete], [t.value for t in complete], label="complete", zorder=3)
        ax.scatter([t.number for t in pruned], [list(t.intermediate_values.values())[-1] for t in pruned],
                   marker="x", color="grey", label="pruned (last epoch scored)", zorder=2)
        best, line = None, []
        for t in sorted(complete, key=lambda t: t.number):
            best = t.value if best is None else (max if maximize else min)(best, t.value)
            line.append((t.number, best))
        ax.step(*zip(*line), where="post", color="tab:red", label="best so far")
        ax.set(xlabel="trial", ylabel=f"validation {metric}", title=f"{study.study_name}: optimisation history")
        ax.legend(fontsize=8)
        written.append(save_figure(fig, folder / "history.png"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importances = optuna.importance.get_param_importances(study)
    except (ValueError, RuntimeError):  # needs >= 2 complete trials whose settings differ
        importances = {}
    if importances:
        names = list(importances)[::-1]
        fig = new_figure(figsize=(6, 0.4 * len(names) + 1.2))
        ax = fig.add_subplot()
        ax.barh([n.removeprefix("model.overrides.") for n in names], [importances[n] for n in names])
        ax.set(xlabel="importance (fANOVA)", title=f"{study.study_name}: parameter importances")
        written.append(save_figure(fig, folder / "importances.png"))
    return written
