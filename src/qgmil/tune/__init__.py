"""Nested hyperparameter tuning (`qgmil tune`, `qgmil benchmark --tune N`), on Optuna.

  run.py       tune_run: per outer fold a study on its training part, then the chosen settings retrained
               and tested once on the outer test fold
  study.py     storage, sampler, pruner, the trial budget and dead workers' trials
  settings.py  the chosen settings over folds (most frequent choice, spread)
  plots.py     history.png and importances.png of each study
"""

from .study import TuneError
from .run import check_space, search_space, tune_run

__all__ = ["TuneError", "check_space", "search_space", "tune_run"]
