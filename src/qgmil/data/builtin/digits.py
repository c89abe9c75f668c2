"""digit-bags: bags of scikit-learn's 8x8 handwritten digits, positive when the target digit is present.

Owns the bag stream, `digit_bags()` (the same bags in memory, for the quick-start demo), and the
registry entry `ENTRY` (build: one _Record per bag with instance labels; check: the option bounds).

`TASK_ENTRIES`: controlled versions for the other tasks, where the target depends on the witnesses (instances
of the target digit, 0-4 per bag, instance labels kept) so that a model must find them:
  digit-bags-survival    time = 30 exp(-0.6 k) x lognormal(0, 0.25) for k witnesses, censored by a uniform(0, 45)
                         time (event 0); columns time, event
  digit-bags-regression  label = k + normal(0, 0.1) noise: the number of witnesses
  digit-bags-multilabel  label = which of the digits 3, 5 and 9 the bag holds, joined by ";" (each present in
                         half the bags, 1-2 copies; instance labels: 1 where any of them)
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch

from .base import CLASSES, BagDataset, BuiltinDataset, _Entry, _Plan, _Record

def _digit_stream(
    n_bags: int, min_size: int, max_size: int, positive_digit: int, seed: int
) -> Iterator[tuple[np.ndarray, int, np.ndarray]]:
    """Yields (features (N, 64) float32 in [0, 1], label, instance_labels (N,) int64) per bag."""
    from sklearn.datasets import load_digits

    if n_bags < 1:
        raise ValueError(f"digit-bags: bags must be >= 1, got {n_bags}")
    # A positive bag holds 1-3 target digits, so it needs room for them.
    if not 3 <= min_size <= max_size:
        raise ValueError(f"digit-bags: need 3 <= min_instances <= max_instances, got {min_size} and {max_size}")
    if not 0 <= positive_digit <= 9:
        raise ValueError(f"digit-bags: positive_digit must be 0-9, got {positive_digit}")
    digits = load_digits()
    features = (digits.data / 16.0).astype(np.float32)
    is_pos = digits.target == positive_digit
    pos_idx, neg_idx = np.flatnonzero(is_pos), np.flatnonzero(~is_pos)
    rng = np.random.default_rng(seed)
    for i in range(n_bags):
        size = int(rng.integers(min_size, max_size + 1))
        label = i % 2
        n_pos = int(rng.integers(1, 4)) if label else 0
        idx = np.concatenate([rng.choice(pos_idx, n_pos), rng.choice(neg_idx, size - n_pos)])
        rng.shuffle(idx)
        yield features[idx], label, is_pos[idx].astype(np.int64)


def digit_bags(
    n_bags: int = 400, min_size: int = 8, max_size: int = 24, positive_digit: int = 9, seed: int = 0
) -> BagDataset:
    """Bags of 8x8 handwritten digits (scikit-learn's `load_digits`, 64 features scaled to [0, 1]).

    A bag is positive when it holds at least one `positive_digit` (the classic MIL assumption, as in
    Ilse et al. 2018). Half the bags are positive, each with 1-3 positive instances, so a good
    aggregator must find a few key instances among many. Instance labels (1 = positive digit) are
    kept for localisation. `prepare_dataset("digit-bags", ...)` writes exactly these bags.
    """
    bags, labels, inst = [], [], []
    for features, label, instance_labels in _digit_stream(n_bags, min_size, max_size, positive_digit, seed):
        bags.append(torch.from_numpy(features))
        labels.append(label)
        inst.append(instance_labels)
    return BagDataset("digit-bags", bags, np.array(labels), list(CLASSES), inst)


def _build_digits(opts: dict[str, Any], seed: int) -> _Plan:
    stream = _digit_stream(opts["bags"], opts["min_instances"], opts["max_instances"], opts["positive_digit"], seed)

    def records() -> Iterator[_Record]:
        for i, (features, label, instance_labels) in enumerate(stream):
            bag_id = f"digits_{i:04d}"
            attrs = {"source": "sklearn.datasets.load_digits", "positive_digit": opts["positive_digit"]}
            yield _Record(bag_id, CLASSES[label], bag_id, features, None, instance_labels.astype(np.int8), attrs)

    return _Plan(opts["bags"], records(), "sklearn.datasets.load_digits (UCI optical digits), Ilse et al. 2018 recipe")


def _check_digits(opts: dict[str, Any]) -> None:
    next(_digit_stream(opts["bags"], opts["min_instances"], opts["max_instances"], opts["positive_digit"], 0), None)


ENTRY = _Entry(
    BuiltinDataset(
        "digit-bags",
        "bags of real 8x8 handwritten digits, positive when the target digit is present (instance labels)",
        list(CLASSES),
        {"bags": 400, "min_instances": 8, "max_instances": 24, "positive_digit": 9},
    ),
    _build_digits,
    _check_digits,
)


def _task_stream(task: str, n_bags: int, min_size: int, max_size: int, seed: int
                 ) -> Iterator[tuple[np.ndarray, str, dict, np.ndarray]]:
    """Yields (features (N, 64), label column, more columns, instance_labels (N,)) per bag of a task variant."""
    from sklearn.datasets import load_digits

    if n_bags < 1:
        raise ValueError(f"digit-bags-{task}: bags must be >= 1, got {n_bags}")
    if not 6 <= min_size <= max_size:
        raise ValueError(f"digit-bags-{task}: need 6 <= min_instances <= max_instances, got {min_size} and {max_size}")
    digits = load_digits()
    features = (digits.data / 16.0).astype(np.float32)
    targets = (3, 5, 9) if task == "multilabel" else (9,)
    pools = {d: np.flatnonzero(digits.target == d) for d in targets}
    other = np.flatnonzero(~np.isin(digits.target, targets))
    rng = np.random.default_rng(seed)
    for _ in range(n_bags):
        size = int(rng.integers(min_size, max_size + 1))
        if task == "multilabel":
            present = [d for d in targets if rng.random() < 0.5]
            chosen = [rng.choice(pools[d], int(rng.integers(1, 3))) for d in present]
        else:
            present, chosen = [], [rng.choice(pools[9], int(rng.integers(0, 5)))]
        witnesses = np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)
        idx = np.concatenate([witnesses, rng.choice(other, size - len(witnesses))]).astype(np.int64)
        rng.shuffle(idx)
        k = len(witnesses)
        instance_labels = np.isin(digits.target[idx], targets).astype(np.int64)
        if task == "survival":
            time = 30.0 * np.exp(-0.6 * k + 0.25 * rng.standard_normal())
            censor = rng.uniform(0, 45)
            columns = {"time": round(float(min(time, censor)), 4), "event": int(time <= censor)}
            yield features[idx], CLASSES[int(k > 0)], columns, instance_labels
        elif task == "regression":
            yield features[idx], f"{k + 0.1 * rng.standard_normal():.4f}", {}, instance_labels
        else:
            yield features[idx], ";".join(f"digit_{d}" for d in present), {}, instance_labels


def _task_entry(task: str, description: str) -> _Entry:
    name = f"digit-bags-{task}"

    def build(opts: dict[str, Any], seed: int) -> _Plan:
        stream = _task_stream(task, opts["bags"], opts["min_instances"], opts["max_instances"], seed)

        def records() -> Iterator[_Record]:
            for i, (features, label, columns, instance_labels) in enumerate(stream):
                bag_id = f"digits_{i:04d}"
                yield _Record(bag_id, label, bag_id, features, None, instance_labels.astype(np.int8),
                              {"source": "sklearn.datasets.load_digits", "task": task}, columns)

        return _Plan(opts["bags"], records(), f"sklearn.datasets.load_digits (UCI optical digits), {task} targets "
                     "from the number of witnesses")

    def check(opts: dict[str, Any]) -> None:
        next(_task_stream(task, opts["bags"], opts["min_instances"], opts["max_instances"], 0), None)

    defaults = {"bags": 300, "min_instances": 8, "max_instances": 24}
    return _Entry(BuiltinDataset(name, description, None, defaults, task), build, check)


TASK_ENTRIES = [
    _task_entry("survival", "digit bags with survival times that shorten with the number of 9s (censored)"),
    _task_entry("regression", "digit bags whose target is the number of 9s they hold (0-4, with noise)"),
    _task_entry("multilabel", "digit bags labelled with which of the digits 3, 5 and 9 they hold"),
]
