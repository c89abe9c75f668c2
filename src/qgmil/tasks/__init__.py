"""What a run predicts: bag classification (default), survival, regression or multi-label targets.

    make_task(config, names)       the run's task (config: RunConfig; names: classes or target names)
    task_from_description(desc)    a fitted task back from a checkpoint's extra["task"]
    parse_targets(table, config)   read and check a table's targets: (names, problems)
"""

from __future__ import annotations

from .base import Task, bootstrap_summary
from .classification import Classification
from .multilabel import MultiLabel
from .regression import Regression
from .survival import Survival

TASKS: dict[str, type[Task]] = {t.kind: t for t in (Classification, Survival, Regression, MultiLabel)}


def make_task(config, names: list[str], state: dict | None = None) -> Task:
    """The task of a run config (`task.kind`), for its classes or target names."""
    kind = config.task.kind
    if kind == "classification":
        return Classification(config.task, names, state, label_smoothing=config.optim.label_smoothing,
                              class_weights=config.optim.class_weights, ordinal=config.eval.ordinal)
    if kind == "multilabel":
        return MultiLabel(config.task, names, state, class_weights=config.optim.class_weights)
    return TASKS[kind](config.task, names, state)


def task_from_description(description: dict) -> Task:
    """`Task.describe()` of a checkpoint -> the fitted task, for decoding outputs and scoring predictions."""
    from ..rundir.config import TaskConfig

    config = TaskConfig.model_validate(description["config"])
    return TASKS[config.kind](config, description["names"], description.get("state"))


def target_columns(config) -> tuple[str, ...]:
    """The table columns a run's targets are read from (none for classification: the label column)."""
    return TASKS[config.task.kind].columns(config.data.columns) if config.task.kind != "classification" else ()


def parse_targets(table, config) -> tuple[list[str], list[str]]:
    """Adds `target` and `stratum` to a `read_table(keep=target_columns(config))` frame: (names, problems)."""
    return TASKS[config.task.kind].parse(table, config.data.columns, config.task)


__all__ = ["Task", "TASKS", "make_task", "task_from_description", "target_columns", "parse_targets",
           "bootstrap_summary", "Classification", "Survival", "Regression", "MultiLabel"]
