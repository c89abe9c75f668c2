"""Time-to-event targets: a time and an event (1 = the event happened, 0 = censored) column.

Two losses (`task.loss`):
  cox  the negative Cox partial log-likelihood (Breslow ties) of the bags' risk scores, over the risk sets
       within a batch (so batches of several bags matter); one output, the log-risk.
  nll  the discrete-time negative log-likelihood (Zadeh & Schmid 2020, as PORPOISE and nnMIL use it) over
       `task.time_bins` intervals cut at the quantiles of the training part's event times; one hazard logit
       per interval; the risk is minus the sum of the survival probabilities at the intervals' ends (PORPOISE's).
Outputs: the risk, then the survival probability S(t) at the run's evaluation times (`for_run`: the 10th to
90th percentiles of all its bags' event times, a grid every fold shares; predictions.csv's survival_t<time>
columns). The discrete model gives S directly; the Cox model's S(t | x) = exp(-H0(t) exp(risk)) needs the
baseline cumulative hazard H0, Breslow's estimate on the validation bags of the weights kept (`calibrate`;
without a validation part there is no H0 and the outputs are the risk alone).
Metrics come from scikit-survival (Harrell's and Uno's C-index, time-dependent AUC, integrated Brier score over
the evaluation times inside the test bags' follow-up) and lifelines (log-rank p-value of the test fold's high-
against low-risk half): the `survival` extra.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..task_specs import HIGHER_IS_BETTER
from .base import Task, number_problems, quantile_bins, store_targets

HIGHER = HIGHER_IS_BETTER["survival"]


def cox_loss(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """Mean negative Cox partial log-likelihood (Breslow): risk (B,), time (B,), event (B,) in {0, 1}.
    Every bag whose time is >= an event's time is in that event's risk set. 0 (with a gradient graph) when
    the batch holds no event."""
    at_risk = time.unsqueeze(0) >= time.unsqueeze(1)  # (i, j): j is at risk at i's time
    log_denominator = torch.logsumexp(risk.unsqueeze(0).masked_fill(~at_risk, -math.inf), dim=1)
    events = event > 0
    if not bool(events.any()):
        return risk.sum() * 0.0
    return -(risk[events] - log_denominator[events]).mean()


def discrete_nll(logits: torch.Tensor, interval: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """Per-bag discrete-time negative log-likelihood: logits (B, K) hazard logits, interval (B,) int, event (B,).
    An event in interval y: -log S(y - 1) - log h(y); censored in y: -log S(y). Stable in log space."""
    log_survive = F.logsigmoid(-logits).cumsum(1)  # log S(k) = sum_{j <= k} log(1 - h_j)
    before = torch.cat([torch.zeros_like(log_survive[:, :1]), log_survive[:, :-1]], 1).gather(1, interval[:, None])[:, 0]
    log_hazard = F.logsigmoid(logits).gather(1, interval[:, None])[:, 0]
    through = log_survive.gather(1, interval[:, None])[:, 0]
    return -torch.where(event > 0, before + log_hazard, through)


class Survival(Task):
    kind = "survival"
    bootstrap_metrics = ("c_index",)

    @staticmethod
    def columns(columns):
        return (columns.time, columns.event)

    @classmethod
    def parse(cls, table, columns, config, trained=None):
        source = table.attrs.get("source", "table")
        time, problems = number_problems(table, columns.time, source=source,
                                         allow=lambda v: "is negative (times are >= 0)" if v < 0 else None)
        event, found = number_problems(table, columns.event, source=source,
                                       allow=lambda v: "is not 0 or 1 (1 = event, 0 = censored)" if v not in (0, 1) else None)
        problems += found
        for row, t, e, raw_t, raw_e in zip(table["row"], time, event, table[f"raw:{columns.time}"],
                                           table[f"raw:{columns.event}"]):
            missing = [name for name, raw in ((columns.time, raw_t), (columns.event, raw_e)) if raw is None]
            if missing:
                problems.append(f"{source} row {row}: missing {' and '.join(missing)}")
        known = ~(np.isnan(time) | np.isnan(event))
        targets = [tuple(map(float, (t, e))) if k else None for t, e, k in zip(time, event, known)]
        if trained is None and known.any() and not event[known].any():
            problems.append(f"{source}: no bag has {columns.event} = 1: every time is censored, nothing to learn")
        strata = np.full(len(table), None, dtype=object)
        bins = quantile_bins(time[known], 4)
        strata[known] = [f"event{int(e)}-q{q}" for e, q in zip(event[known], bins)]  # event x time quartile
        problems += store_targets(table, targets, strata, f"{columns.time}/{columns.event}", source)
        return [columns.time, columns.event], problems

    def for_run(self, data):
        time, event = data.targets[:, 0], data.targets[:, 1] > 0
        times = np.unique(np.quantile(time[event] if event.any() else time, np.linspace(0.1, 0.9, 9)))
        return self.with_state({**self.state, "times": times.tolist()})

    @property
    def times(self) -> np.ndarray:
        """The evaluation times of the survival outputs (empty for a task of a run made before they existed)."""
        return np.asarray(self.state.get("times", []), dtype=np.float64)

    @property
    def discrete(self) -> bool:
        return self.config.loss == "nll"

    @property
    def out_dim(self):
        return self.config.time_bins if self.discrete else 1

    def _fitted_state(self, data):
        if not self.discrete:
            return {}
        time, event = data.targets[:, 0], data.targets[:, 1]
        times = time[event > 0] if (event > 0).any() else time
        # inner cut points: the event-time quantiles (as PORPOISE cuts its bins), the last interval open-ended
        return {"cuts": np.quantile(times, np.linspace(0, 1, self.config.time_bins + 1)[1:-1]).tolist()}

    def calibrate(self, targets, outputs):
        if self.discrete or not len(self.times):
            return self
        event = targets[:, 1] > 0
        if not event.any():  # no event among the validation bags: no baseline hazard to estimate
            return self.with_state({k: v for k, v in self.state.items() if k != "baseline_hazard"})
        from sksurv.linear_model.coxph import BreslowEstimator

        hazard = BreslowEstimator().fit(outputs[:, 0], event, targets[:, 0]).cum_baseline_hazard_
        # H0 is 0 before the first validation time and stays at its last value after the last one
        at = hazard(np.clip(self.times, 0.0, hazard.domain[1]))
        return self.with_state({**self.state, "baseline_hazard": np.atleast_1d(at).tolist()})

    def interval(self, time: torch.Tensor) -> torch.Tensor:
        cuts = torch.tensor(self.state["cuts"], dtype=time.dtype, device=time.device)
        return torch.bucketize(time.contiguous(), cuts, right=True)

    def loss(self, logits, batch):
        time, event = batch.targets[:, 0], batch.targets[:, 1]
        if self.discrete:
            return discrete_nll(logits.float(), self.interval(time), event).sum()
        return cox_loss(logits.float()[:, 0], time, event) * len(time)

    def decode(self, logits):
        logits = logits.float()
        if not self.discrete:
            risk = logits[:, :1]
            if "baseline_hazard" not in self.state:
                return risk
            hazard = torch.tensor(self.state["baseline_hazard"], dtype=risk.dtype, device=risk.device)
            return torch.cat([risk, torch.exp(-hazard[None, :] * risk.exp())], 1)
        log_survive = F.logsigmoid(-logits).cumsum(1)  # log S at the end of each interval
        risk = -log_survive.exp().sum(1, keepdim=True)
        if not len(self.times):
            return risk
        # S(t): survival through every interval that has ended by t (1 before the first ends)
        ended = self.interval(torch.tensor(self.times, dtype=logits.dtype, device=logits.device))
        padded = torch.cat([torch.zeros_like(log_survive[:, :1]), log_survive], 1)
        return torch.cat([risk, padded[:, ended].exp()], 1)

    def metrics(self, targets, outputs, only=None):
        from sksurv.metrics import concordance_index_censored, concordance_index_ipcw, cumulative_dynamic_auc
        from sksurv.util import Surv

        wanted = set(only or HIGHER)
        time, event, risk = targets[:, 0], targets[:, 1] > 0, outputs[:, 0]
        out = {}
        try:
            out["c_index"] = float(concordance_index_censored(event, time, risk)[0])
        except ValueError:  # no comparable pair (e.g. no event)
            out["c_index"] = math.nan
        if wanted <= {"c_index"}:
            return out
        # Uno's C and the time-dependent AUC weight by the censoring distribution, estimated on these bags
        y = Surv.from_arrays(event, time)
        try:
            out["c_index_uno"] = float(concordance_index_ipcw(y, y, risk)[0])
        except ValueError:
            out["c_index_uno"] = math.nan
        times = np.quantile(time[event], [0.25, 0.5, 0.75]) if event.any() else np.array([])
        times = np.unique(times[(times >= time.min()) & (times < time.max())])
        try:
            out["td_auc"] = float(cumulative_dynamic_auc(y, y, risk, times)[1]) if len(times) else math.nan
        except ValueError:
            out["td_auc"] = math.nan
        out["ibs"] = self.integrated_brier(y, outputs)
        out["logrank_p"] = logrank_p(time, event, risk_groups(risk))
        out["loss"] = float(cox_loss(torch.from_numpy(risk), torch.from_numpy(time), torch.from_numpy(event.astype(float))))
        return out

    def prediction_columns(self, targets, outputs):
        columns = {}
        if targets is not None:
            columns.update({self.names[0]: targets[:, 0], self.names[1]: targets[:, 1].astype(np.int64)})
        columns["risk"] = outputs[:, 0]
        if outputs.shape[1] > 1:
            columns.update({f"survival_t{t:g}": outputs[:, k] for k, t in enumerate(self.times, start=1)})
        return columns

    def integrated_brier(self, y, outputs: np.ndarray) -> float:
        """scikit-survival's IBS of the survival outputs over the evaluation times inside these bags' follow-up
        (the censoring distribution estimated on the same bags, as for Uno's C); NaN without survival outputs
        or with fewer than two such times."""
        from sksurv.metrics import integrated_brier_score

        times = self.times
        if outputs.shape[1] != len(times) + 1 or len(times) < 2:
            return math.nan
        inside = (times >= y["time"].min()) & (times < y["time"].max())
        if inside.sum() < 2:
            return math.nan
        try:
            return float(integrated_brier_score(y, y, outputs[:, 1:][:, inside], times[inside]))
        except ValueError:
            return math.nan

    def plot(self, folds, run, title):
        from ..evaluate.plots import kaplan_meier_plot

        time = np.concatenate([y[:, 0] for y, _ in folds])
        event = np.concatenate([y[:, 1] for y, _ in folds])
        high = np.concatenate([risk_groups(out[:, 0]) for _, out in folds])  # each fold split at its own median
        p = logrank_p(time, event > 0, high)
        kaplan_meier_plot(time, event, high, run.kaplan_meier, p_value=p,
                          title=f"{title}\nhigh / low risk: above / below each fold's median")

    def from_predictions(self, frame):
        survival = [f"survival_t{t:g}" for t in self.times]
        survival = survival if survival and all(c in frame for c in survival) else []
        return (frame[self.names].to_numpy(np.float64), frame[["risk", *survival]].to_numpy(np.float64))


def risk_groups(risk: np.ndarray) -> np.ndarray:
    """True for the high-risk half (above the median risk of these bags)."""
    return risk > np.median(risk)


def logrank_p(time: np.ndarray, event: np.ndarray, high: np.ndarray) -> float:
    """lifelines' log-rank test of the high-risk group (`high`, bool) against the others; NaN when one is empty."""
    from lifelines.statistics import logrank_test

    if high.all() or not high.any():
        return math.nan
    result = logrank_test(time[high], time[~high], event_observed_A=event[high], event_observed_B=event[~high])
    return float(result.p_value)
