"""Bag classification (the paper's task): softmax over classes, weighted cross-entropy, the classification
metrics of `evaluate.metrics` (bootstrap CIs of every metric, vectorised there)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ..evaluate.metrics import HIGHER_IS_BETTER, classification_metrics, metric_names, summarize_predictions
from .base import Task


class Classification(Task):
    kind = "classification"
    loss_metric = "nll"
    needs_class_labels = True

    def __init__(self, config, names, state=None, *, label_smoothing: float = 0.0, class_weights: bool = True,
                 ordinal: bool = False):
        super().__init__(config, names, state)
        self.label_smoothing, self.use_weights, self.ordinal = label_smoothing, class_weights, ordinal

    def _fitted_state(self, data) -> dict:
        if not self.use_weights:
            return {}
        # n / (C n_c): the mean weight over the training bags is 1 (absent classes get weight 0)
        counts = np.bincount(data.labels[data.labels >= 0], minlength=len(self.names)).astype(np.float64)
        weights = np.where(counts > 0, counts.sum() / (len(self.names) * np.maximum(counts, 1)), 0.0)
        return {"class_weights": weights.tolist()}

    def targets_of(self, data) -> np.ndarray:
        return data.labels

    def loss(self, logits, batch):
        weight = self.state.get("class_weights")
        weight = None if weight is None else torch.tensor(weight, dtype=torch.float32, device=logits.device)
        return F.cross_entropy(logits.float(), batch.labels, weight=weight, reduction="sum",
                               label_smoothing=self.label_smoothing)

    def decode(self, logits):
        return logits.float().softmax(-1)

    def metric_names(self):
        return metric_names(self.ordinal)

    def higher_is_better(self, metric):
        return HIGHER_IS_BETTER["nll" if metric == "loss" else metric]

    def metrics(self, targets, outputs, only=None):
        return classification_metrics(targets, outputs, ordinal=self.ordinal)

    def prediction_columns(self, targets, outputs):
        columns = {}
        if targets is not None:
            columns["label"] = [self.names[i] if i >= 0 else None for i in targets]
        columns["pred"] = [self.names[i] for i in outputs.argmax(1)]
        columns.update({f"prob_{c}": outputs[:, i] for i, c in enumerate(self.names)})
        return columns

    def from_predictions(self, frame: pd.DataFrame):
        index = {c: i for i, c in enumerate(self.names)}
        return (frame["label"].map(index).to_numpy(dtype=np.int64),
                frame[[f"prob_{c}" for c in self.names]].to_numpy(dtype=np.float64))

    def summarize(self, folds, n_boot, seed=0):
        return summarize_predictions(folds, ordinal=self.ordinal, n_boot=n_boot, seed=seed)

    def plot(self, folds, run, title):
        from ..evaluate.plots import reliability_diagram

        y = np.concatenate([f[0] for f in folds])
        probs = np.concatenate([f[1] for f in folds])
        reliability_diagram(y, probs, run.reliability, title=title)
