"""Continuous targets (biomarker scores, expression levels): one or more numeric columns, MSE or Huber loss on
targets standardised with the training part's mean and std (outputs in the targets' own units)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..task_specs import HIGHER_IS_BETTER
from .base import Task, number_problems, quantile_bins, store_targets

HIGHER = HIGHER_IS_BETTER["regression"]


class Regression(Task):
    kind = "regression"
    bootstrap_metrics = ("mae", "rmse", "r2")

    @staticmethod
    def columns(columns):
        return tuple(columns.targets or (columns.label,))

    @classmethod
    def parse(cls, table, columns, config, trained=None):
        source = table.attrs.get("source", "table")
        names = list(cls.columns(columns))
        values, problems = [], []
        for name in names:
            column, found = number_problems(table, name, source=source)
            problems += found
            values.append(column)
        values = np.stack(values, axis=1)
        for row, cells in zip(table["row"], zip(*(table[f"raw:{n}"] for n in names))):
            missing = [n for n, cell in zip(names, cells) if cell is None]  # bad cells are reported above
            if missing:
                problems.append(f"{source} row {row}: missing {', '.join(missing)}")
        targets = [None if np.isnan(v).any() else tuple(map(float, v)) for v in values]
        for name, column in zip(names, values.T):
            known = column[~np.isnan(column)]
            if trained is None and len(known) and np.unique(known).size == 1:
                problems.append(f"{source}: every bag has {name} = {known[0]:g}: a regression needs different values")
        first = values[:, 0]
        strata = np.full(len(table), None, dtype=object)
        known = np.array([t is not None for t in targets], dtype=bool)
        strata[known] = [f"q{q}" for q in quantile_bins(first[known], 4)]  # quartiles of the first target
        problems += store_targets(table, targets, strata, "targets", source)
        return names, problems

    def _fitted_state(self, data):
        targets = data.targets
        std = targets.std(axis=0)
        return {"mean": targets.mean(axis=0).tolist(), "std": np.where(std > 0, std, 1.0).tolist()}

    def _scale(self, device):
        mean = torch.tensor(self.state.get("mean", [0.0] * self.out_dim), dtype=torch.float32, device=device)
        std = torch.tensor(self.state.get("std", [1.0] * self.out_dim), dtype=torch.float32, device=device)
        return mean, std

    def loss(self, logits, batch):
        mean, std = self._scale(logits.device)
        target = (batch.targets - mean) / std
        if self.config.loss == "huber":
            per = F.huber_loss(logits.float(), target, delta=self.config.huber_delta, reduction="none")
        else:
            per = F.mse_loss(logits.float(), target, reduction="none")
        return per.mean(1).sum()

    def decode(self, logits):
        mean, std = self._scale(logits.device)
        return logits.float() * std + mean

    def metrics(self, targets, outputs, only=None):
        from scipy.stats import pearsonr, spearmanr
        from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

        wanted = set(only or HIGHER)
        out = {}
        if "mae" in wanted:
            out["mae"] = float(mean_absolute_error(targets, outputs))
        if "rmse" in wanted:
            out["rmse"] = float(np.mean([math.sqrt(mean_squared_error(t, o)) for t, o in zip(targets.T, outputs.T)]))
        constant = [np.ptp(t) == 0 for t in targets.T]
        if "r2" in wanted or "loss" in wanted:
            r2 = np.mean([r2_score(t, o) if not c else math.nan for t, o, c in zip(targets.T, outputs.T, constant)])
            out["r2"] = float(r2)
            out["loss"] = float(1 - r2)  # mean squared error over the targets' variance
        for name, fn in (("pearson", pearsonr), ("spearman", spearmanr)):
            if name in wanted:
                values = [fn(t, o)[0] if not c and np.ptp(o) > 0 else math.nan
                          for t, o, c in zip(targets.T, outputs.T, constant)]
                out[name] = float(np.mean(values))
        return out

    def prediction_columns(self, targets, outputs):
        columns = {}
        for i, name in enumerate(self.names):
            if targets is not None:
                columns[f"target_{name}"] = targets[:, i]
            columns[f"pred_{name}"] = outputs[:, i]
        return columns

    def from_predictions(self, frame):
        return (frame[[f"target_{n}" for n in self.names]].to_numpy(np.float64),
                frame[[f"pred_{n}" for n in self.names]].to_numpy(np.float64))
