"""The run directory: every path of a training run, and the reading and writing of its files.

RUN_DIR/
  run.lock             while a process writes the run (train, tune, evaluate): its host and pid (qgmil.locks)
  config.yaml          the resolved configuration (paths absolute): rerun or resume from it
  run.json             command line, versions, classes, feature provenance, start/resume times
  splits.json          the folds (reused on resume and by later runs)
  folds/<seed>-<fold>/ best.safetensors, epochs.csv, predictions.csv, attention.h5, metrics.json
                       (state.safetensors while the fold is unfinished; metrics.json, written last, marks
                       it finished)
  predictions.csv      all test predictions; summary.json / .md / .csv; reliability.png (classification) or
                       kaplan_meier.png (survival) (summary.json,
                       written by the report at the end, marks the run finished); a report written again
                       keeps the previous one's files that changed as *.prev.* (predictions.prev.csv, ...)
  tuning/              tuned runs only (`qgmil tune`): studies.journal (the Optuna storage, one study per
                       outer fold, unless tune.storage points elsewhere), and per outer fold <name>/
                       chosen.json (the best trial's settings, written before the fold retrains with them),
                       trials.csv, history.png, importances.png; settings.md / .csv (the choices over
                       folds); slurm/ (jobs.json and task logs, when tuned on SLURM)

Training writes through `RunDir` and `FoldDir`; evaluation, prediction, explanation and the benchmark
read through them, so the layout is written down once, here.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic import atomic_write, atomic_write_text
from ..locks import FileLocks, LockBusy
from .config import ConfigError, RunConfig, load_config

LOCK_NAME = "run"  # RUN_DIR/run.lock


def _result_settings(config: RunConfig) -> dict:
    """What a resumed run must share with its config.yaml: all but the runtime section, with the caches that
    keep the values as they are in the files (none, auto, fp32) counted as one, so a run stored before
    data.cache's default became auto resumes with the default."""
    settings = config.model_dump(exclude={"runtime"})
    if settings["data"]["cache"] in (None, "auto", "fp32"):
        settings["data"]["cache"] = "as stored"
    return settings


class RunDirError(ValueError):
    """A directory that is not (or not yet) what the caller needs; the message names it."""


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, default=str))


def write_csv(path: Path, frame) -> None:
    atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))


def read_csv(path: Path):
    """A predictions table with its id and label columns kept as text; RunDirError naming the file when it is
    empty or not a table."""
    import pandas as pd

    try:
        return pd.read_csv(path, dtype={"bag_id": str, "patient_id": str, "label": str})
    except pd.errors.EmptyDataError:
        raise RunDirError(f"{path}: empty file (no header, no rows)") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise RunDirError(f"{path}: not a readable CSV table ({err})") from None


def write_keeping_previous(path: Path, text: str) -> None:
    """Write `path`; when it held something else, that is kept first as <stem>.prev<suffix> (one generation),
    so that recomputing a report never loses the one before."""
    if path.is_file() and path.read_text() != text:
        previous = path.with_name(f"{path.stem}.prev{path.suffix}")
        atomic_write(previous, lambda tmp: shutil.copyfile(path, tmp))
    atomic_write_text(path, text)


@dataclass(frozen=True)
class FoldDir:
    """One (seed, fold) of a run: RUN_DIR/folds/<name>/."""

    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    best = property(lambda self: self.path / "best.safetensors")
    state = property(lambda self: self.path / "state.safetensors")
    epochs = property(lambda self: self.path / "epochs.csv")
    predictions = property(lambda self: self.path / "predictions.csv")
    attention = property(lambda self: self.path / "attention.h5")
    metrics = property(lambda self: self.path / "metrics.json")
    tensorboard = property(lambda self: self.path / "tensorboard")

    @property
    def finished(self) -> bool:
        return self.metrics.exists()

    def read_metrics(self) -> dict:
        return json.loads(self.metrics.read_text())

    def read_predictions(self):
        """The fold's test predictions; RunDirError naming the file when it is missing, empty or incomplete."""
        if not self.predictions.is_file():
            raise RunDirError(f"{self.predictions}: missing (the fold has a metrics.json but no test predictions)")
        frame = read_csv(self.predictions)
        missing = [c for c in ("bag_id", "fold", "seed") if c not in frame.columns]
        if missing:
            raise RunDirError(f"{self.predictions}: no column {', '.join(missing)}")
        if frame.empty:
            raise RunDirError(f"{self.predictions}: no predictions (header only)")
        return frame

    def finish(self, predictions, metrics: dict) -> None:
        """Write the test predictions, then metrics.json (which marks the fold finished), and drop the
        training state."""
        write_csv(self.predictions, predictions)
        write_json(self.metrics, metrics)
        self.state.unlink(missing_ok=True)


class RunDir:
    """A training run's directory (see the module docstring). Cheap to make: nothing is read until asked."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    config = property(lambda self: self.root / "config.yaml")
    run_json = property(lambda self: self.root / "run.json")
    splits = property(lambda self: self.root / "splits.json")
    folds_dir = property(lambda self: self.root / "folds")
    predictions = property(lambda self: self.root / "predictions.csv")
    summary_json = property(lambda self: self.root / "summary.json")
    summary_md = property(lambda self: self.root / "summary.md")
    summary_csv = property(lambda self: self.root / "summary.csv")
    reliability = property(lambda self: self.root / "reliability.png")
    kaplan_meier = property(lambda self: self.root / "kaplan_meier.png")

    tuning = property(lambda self: self.root / "tuning")
    study_journal = property(lambda self: self.root / "tuning" / "studies.journal")

    def fold(self, name: str) -> FoldDir:
        return FoldDir(self.folds_dir / name)

    def tuning_dir(self, fold_name: str) -> Path:
        return self.tuning / fold_name

    def chosen(self, fold_name: str) -> Path:
        """The outer fold's chosen.json: the settings its tuning chose (present once its study is done)."""
        return self.tuning_dir(fold_name) / "chosen.json"

    def read_chosen(self) -> dict[str, dict]:
        """Outer fold name -> its chosen.json ({params, value, trials, ...}); empty for an untuned run."""
        return {p.parent.name: json.loads(p.read_text()) for p in sorted(self.tuning.glob("*/chosen.json"))}

    # --- state ---------------------------------------------------------------------------------

    @property
    def holds_run(self) -> bool:
        """A run was started here (its config.yaml is written once the config and data passed their checks)."""
        return self.config.exists()

    @property
    def finished(self) -> bool:
        """The run's report was written (summary.json)."""
        return self.summary_json.exists()

    def finished_folds(self) -> list[FoldDir]:
        """Folds with a metrics.json, in name order."""
        return [FoldDir(p.parent) for p in sorted(self.folds_dir.glob("*/metrics.json"))]

    def require_resumable(self) -> None:
        if not self.holds_run:
            raise ConfigError(f"{self.root}: holds no run to resume (no config.yaml); start the run without --resume")

    def fold_names(self) -> list[str]:
        """Every (seed, fold) of the run, as splits.json lists them."""
        from ..data import Splits

        return [f.name for f in Splits.load(self.splits).folds]

    def missing_folds(self) -> list[str]:
        """Folds of splits.json without a finished fold folder (metrics.json), in the splits' order."""
        return [name for name in self.fold_names() if not self.fold(name).finished]

    def _require_folds(self, allow_missing: bool, what: str) -> None:
        """Refuse to go on with a subset of the folds unless told to: the result would not be the run's."""
        missing = self.missing_folds()
        if missing and not allow_missing:
            names = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise RunDirError(f"{self.root}: {len(missing)} of the run's {len(self.fold_names())} folds are not finished "
                              f"({names}: no folds/<fold>/metrics.json); {what} needs them all, or pass "
                              "--allow-missing-folds to use the finished ones only")

    def owns(self, path: str | Path) -> bool:
        """Whether `path` is where this run keeps its own files: the run directory itself, or folds/, tuning/
        or anything under them (writing there could replace the run's results)."""
        path, root = Path(path).resolve(), self.root.resolve()
        if path == root:
            return True
        try:
            first = path.relative_to(root).parts[0]
        except ValueError:
            return False
        return first in (self.folds_dir.name, self.tuning.name)

    @staticmethod
    def containing(path: str | Path) -> RunDir | None:
        """The run directory `path` is in or is (the nearest with a run.json and config.yaml), if any."""
        path = Path(path).resolve()
        for folder in (path, *path.parents):
            run = RunDir(folder)
            if run.run_json.is_file() and run.config.is_file():
                return run
        return None

    @contextmanager
    def lock(self, note: Callable[[str], None] | None = None) -> Iterator[None]:
        """Hold RUN_DIR/run.lock (host, pid; renewed by a heartbeat) while writing the run, so that a second
        train/tune/evaluate on it is refused instead of writing the same files. A lock left by a killed process
        of this host (or silent for 10 minutes) is taken over, saying so through `note` (default: stderr)."""
        locks = FileLocks(self.root)
        try:
            recovered = locks.claim(LOCK_NAME)
        except LockBusy as busy:
            raise RunDirError(f"{self.root}: in use by {busy.by} (lock file {busy.path}); wait for it to end, or "
                              "remove the lock file if that process is gone") from None
        if recovered:
            (note or (lambda m: print(m, file=sys.stderr)))(
                f"{self.root}: took over the stale lock {locks.path(LOCK_NAME)} ({recovered})")
        with locks:  # heartbeat while held, released at exit
            yield

    def require_run(self) -> None:
        if not self.run_json.is_file() or not self.config.is_file():
            raise RunDirError(f"{self.root}: not a qgmil run directory (no run.json / config.yaml)")

    # --- config and facts ----------------------------------------------------------------------

    def read_config(self) -> RunConfig:
        return load_config(self.config)

    def write_config(self, config: RunConfig) -> None:
        atomic_write_text(self.config, config.to_yaml())

    def read_facts(self) -> dict:
        """run.json: command, versions, classes, in_dim, provenance, bag_unit, n_bags, resumes."""
        if not self.run_json.exists():
            raise RunDirError(f"{self.root}: not a qgmil run directory (no run.json)")
        try:
            facts = json.loads(self.run_json.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RunDirError(f"{self.run_json}: not valid JSON ({err})") from None
        if not isinstance(facts, dict) or not isinstance(facts.get("classes"), list):
            raise RunDirError(f"{self.run_json}: not a run's facts (expected a JSON object with a classes list)")
        return facts

    def write_facts(self, facts: dict) -> None:
        write_json(self.run_json, facts)

    @property
    def classes(self) -> list[str]:
        return self.read_facts()["classes"]

    def resolve_config(self, config: RunConfig | None, resume: bool) -> RunConfig:
        """The config to run: a new one (paths made absolute), or on resume the one saved here, whose
        runtime section the given config may change (device, threads, progress)."""
        if resume:
            self.require_resumable()
            stored = self.read_config()
            if config is not None and _result_settings(config.absolute()) != _result_settings(stored):
                raise ConfigError(f"{self.root}: the given config differs from the run's config.yaml; "
                                  "resume with `--resume --out RUN_DIR` alone, or start a new run")
            return stored if config is None else stored.model_copy(update={"runtime": config.runtime})
        if self.holds_run:
            raise ConfigError(f"{self.root} already holds a run; pass --resume to continue it, or choose another --out")
        if config is None:
            raise ConfigError("no config: give a CONFIG.yaml or --table/--features (or --dataset)")
        return config.absolute()

    def dataset_source(self, config: RunConfig | None = None) -> tuple[str, Path, Path | None]:
        """(dataset name, table, features folder) the run trained on; a built-in dataset by its name."""
        data = (config or self.read_config()).data
        if data.builtin is not None:
            root = Path(data.builtin_dir) if data.builtin_dir else self.root / "data" / data.builtin
            return data.builtin, root / "labels.csv", root / "features"
        return Path(data.table).parent.name, Path(data.table), Path(data.features) if data.features else None

    # --- results -------------------------------------------------------------------------------

    def checkpoints(self, allow_missing: bool = False) -> list[Path]:
        """The best model of each fold: all folds of splits.json, or with `allow_missing` those finished."""
        if self.splits.is_file():
            self._require_folds(allow_missing, "predicting with the run")
        finished = self.finished_folds()
        lost = [f.best for f in finished if not f.best.is_file()]
        if lost and not allow_missing:
            raise RunDirError(f"{lost[0]}: missing, though its fold finished; pass --allow-missing-folds to predict "
                              "with the other folds' models")
        found = [f.best for f in finished if f.best.is_file()]
        if not found:
            raise RunDirError(f"{self.root}: no finished fold with a best.safetensors (is this a qgmil run directory?)")
        return found

    def collect_predictions(self, allow_missing: bool = False):
        """Test predictions of every fold of splits.json (or with `allow_missing` of the finished ones),
        ordered by seed and fold."""
        import pandas as pd

        self._require_folds(allow_missing, "the report")
        frames = [f.read_predictions() for f in self.finished_folds()]
        if not frames:
            raise RunDirError(f"{self.root}: no finished fold yet (no folds/*/metrics.json)")
        return pd.concat(frames, ignore_index=True).sort_values(["seed", "fold"], kind="stable").reset_index(drop=True)

    def read_predictions(self):
        """RUN_DIR/predictions.csv, the run's test predictions (written by the report)."""
        if not self.predictions.is_file():
            raise RunDirError(f"{self.root}: no predictions.csv (the run has not finished)")
        return read_csv(self.predictions)

    def read_summary(self) -> dict:
        """metric -> {mean, std, ci_low, ci_high, n}."""
        if not self.finished:
            raise RunDirError(f"{self.root}: no summary.json (the run has not finished)")
        return json.loads(self.summary_json.read_text())

    def fold_scores(self, metric: str = "macro_f1") -> dict[tuple[int, int], float]:
        """(seed, fold) -> the test `metric` of each finished fold."""
        scores = {}
        for fold in self.finished_folds():
            record = fold.read_metrics()
            try:
                scores[(int(record["seed"]), int(record["fold"]))] = float(record["test"][metric])
            except (KeyError, TypeError, ValueError):
                raise RunDirError(f"{fold.metrics}: no seed, fold and test.{metric}") from None
        return scores

    def training_seconds(self) -> float:
        """Training time summed over the finished folds."""
        return sum(f.read_metrics().get("seconds", 0.0) for f in self.finished_folds())

    def attention_files(self) -> list[Path]:
        """folds/*/attention.h5 of the run, in fold-name order."""
        return sorted(self.folds_dir.glob("*/attention.h5")) if self.folds_dir.is_dir() else []
