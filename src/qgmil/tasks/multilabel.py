"""Several labels per bag (mutations, co-occurring findings): several 0/1 columns or one delimited column,
per-label binary cross-entropy (positive weights n_neg / n_pos from the training part with optim.class_weights)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..task_specs import HIGHER_IS_BETTER
from .base import Task, store_targets

HIGHER = HIGHER_IS_BETTER["multilabel"]


class MultiLabel(Task):
    kind = "multilabel"
    bootstrap_metrics = ("macro_auroc", "macro_f1")

    def __init__(self, config, names, state=None, *, class_weights: bool = True):
        super().__init__(config, names, state)
        self.use_weights = class_weights

    @staticmethod
    def columns(columns):
        return tuple(columns.targets or (columns.label,))

    @classmethod
    def parse(cls, table, columns, config, trained=None):
        source = table.attrs.get("source", "table")
        problems = []
        if columns.targets:  # one 0/1 column per label
            names = list(columns.targets)
            rows = []
            for row, cells in zip(table["row"], zip(*(table[f"raw:{n}"] for n in names))):
                values = []
                for name, cell in zip(names, cells):
                    value = {"0": 0.0, "1": 1.0, "0.0": 0.0, "1.0": 1.0}.get(cell) if cell is not None else None
                    if value is None:
                        problems.append(f"{source} row {row}: {name} {cell!r} is not 0 or 1" if cell is not None
                                        else f"{source} row {row}: missing {name}")
                    values.append(value)
                rows.append(None if None in values else tuple(values))
        else:  # one column of label names joined by label_sep ("TP53;KRAS")
            sep = columns.label_sep
            sets = []
            for cell in table[f"raw:{columns.label}"]:  # an empty cell: none of the labels
                sets.append(frozenset(part.strip() for part in (cell or "").split(sep) if part.strip()))
            names = sorted(set().union(*(s for s in sets if s is not None)))
            if trained is not None:  # a set names the labels present; the model's labels are the vocabulary
                for row, labels in zip(table["row"], sets):
                    unknown = sorted(labels - set(trained))
                    if unknown:
                        problems.append(f"{source} row {row}: label(s) {', '.join(unknown)} not among the model's "
                                        f"({', '.join(trained)})")
                names = list(trained)
            rows = [None if s is None else tuple(float(n in s) for n in names) for s in sets]
        known = np.array([r for r in rows if r is not None], dtype=np.float64).reshape(-1, len(names))
        for name, column in zip(names, known.T):
            if trained is None and len(column) and np.unique(column).size == 1:
                problems.append(f"{source}: label {name!r} is {'present in' if column[0] else 'absent from'} every "
                                "bag: nothing to learn (drop it)")
        if not names:
            problems.append(f"{source}: no labels found")
        strata = [None if r is None else tuple(int(v) for v in r) for r in rows]  # indicators: iterative stratification
        problems += store_targets(table, rows, strata, "labels", source)
        return names, problems

    def _fitted_state(self, data):
        if not self.use_weights:
            return {}
        positives = data.targets.sum(axis=0)
        return {"pos_weight": np.where(positives > 0, (len(data) - positives) / np.maximum(positives, 1), 1.0).tolist()}

    def loss(self, logits, batch):
        weight = self.state.get("pos_weight")
        weight = None if weight is None else torch.tensor(weight, dtype=torch.float32, device=logits.device)
        per = F.binary_cross_entropy_with_logits(logits.float(), batch.targets, pos_weight=weight, reduction="none")
        return per.mean(1).sum()

    def decode(self, logits):
        return logits.float().sigmoid()

    def metric_names(self):
        return tuple(HIGHER) + tuple(f"auroc_{n}" for n in self.names) + tuple(f"f1_{n}" for n in self.names)

    def higher_is_better(self, metric):
        return HIGHER.get(metric, True)

    def metrics(self, targets, outputs, only=None):
        from sklearn.metrics import f1_score, log_loss, roc_auc_score

        y = targets.astype(np.int64)
        pred = (outputs >= 0.5).astype(np.int64)
        aucs = [roc_auc_score(t, o) if 0 < t.sum() < len(t) else math.nan for t, o in zip(y.T, outputs.T)]
        f1s = [f1_score(t, p, zero_division=0) for t, p in zip(y.T, pred.T)]
        defined = [a for a in aucs if not math.isnan(a)]
        out = {"macro_auroc": float(np.mean(defined)) if defined else math.nan,
               "micro_auroc": float(roc_auc_score(y.ravel(), outputs.ravel())) if 0 < y.sum() < y.size else math.nan,
               "macro_f1": float(np.mean(f1s)),
               "micro_f1": float(f1_score(y.ravel(), pred.ravel(), zero_division=0)),
               "loss": float(np.mean([log_loss(t, np.clip(o, 1e-7, 1 - 1e-7), labels=[0, 1])
                                      for t, o in zip(y.T, outputs.T)]))}
        out.update({f"auroc_{n}": float(a) for n, a in zip(self.names, aucs)})
        out.update({f"f1_{n}": float(f) for n, f in zip(self.names, f1s)})
        return out

    def prediction_columns(self, targets, outputs):
        columns = {}
        for i, name in enumerate(self.names):
            if targets is not None:
                columns[f"label_{name}"] = targets[:, i].astype(np.int64)
            columns[f"prob_{name}"] = outputs[:, i]
        return columns

    def from_predictions(self, frame):
        return (frame[[f"label_{n}" for n in self.names]].to_numpy(np.float64),
                frame[[f"prob_{n}" for n in self.names]].to_numpy(np.float64))
