"""What a benchmark is and where its outputs go: the spec (YAML or flags), its grid of cells, the presets.

A benchmark is a grid of cells (model, dataset), in a fixed order (datasets outer, models inner).
Each cell is one `train_run` (folds x seeds) into OUT/runs/<dataset>/<model>/; a built-in dataset is
prepared once in OUT/data/<dataset> (before any cell runs) and shared by all models, so every model
sees the same bags and, with the same seeds, the same splits. The presets are YAML files shipped in
qgmil/bench/presets/: `builtin` (`qgmil benchmark --builtin`) and `demo` (`qgmil demo`).

The datasets may be of different task kinds (classification, survival, regression, multilabel: each
dataset's task.kind, `Cell.kind`). Every table is then built per kind, with that kind's metrics
(task_specs.TABLE_METRICS); a kind's main metric, the first of them, is what the tables compare: macro-F1
(classification), Harrell's C-index (survival), R² (regression), macro AUROC (multilabel). "Main metric"
below means the cell's kind's. With several kinds, each Markdown table has a section per kind.

OUT/
  benchmark.yaml   the resolved benchmark spec (runner)
  data/<dataset>/  prepared built-in datasets (runner)
  runs/<dataset>/<model>/   one run directory per cell (see qgmil.rundir.RunDir; runner); with `tune`, a
                   nested-tuning run (qgmil.tune: the same layout plus tuning/), tuned on the kind's
                   eval.monitor (by default its main metric)
  results.csv      one row per model x dataset: its task, the table metrics of every kind present (mean,
                   std; NaN where a metric is not its kind's), folds, training seconds
  results.md/.tex  the main metric mean ± std, a row per model, a column per dataset (+ mean), best in bold
                   (the lowest for a lower-is-better metric); the Markdown one ends with the gains
  summary.md       one row per cell: its kind's table metrics (mean ± std, the best main metric per dataset
                   in bold) and the mean test attention on positive instances where the bags have instance
                   labels (the table `qgmil demo` prints)
  auroc.md, calibration.md   classification: the same grid for AUROC, and for ECE and Brier (lowest in bold)
  survival.md, regression.md, multilabel.md   the same grid for every table metric of that kind (written
                   when the benchmark has a dataset of the kind)
  gains.csv        best QG-MIL variant vs best baseline per dataset on the main metric, and their mean per
                   kind; the gain is signed so that positive = QG-MIL better
  ablation.md/.csv with full qgmil and at least one one-off variant: each variant's main metric and its change,
                   and each variant vs full qgmil paired per (seed, fold): Wilcoxon, t-test
  significance.md/.csv   best QG-MIL variant vs each baseline on the main metric, paired per (seed, fold):
                   Wilcoxon, t-test
  attention_mass.md/.csv  concentration (and localisation) of each cell's test attention
  results.png, ranks.png  main-metric bars per dataset (a panel per kind); average rank of each model over
                   all datasets, each ranked on its kind's main metric (matplotlib)
  tuning.md/.csv   with `tune`: per cell the trials spent (complete, pruned, failed, trial-epochs) and the
                   chosen settings over the outer folds (most frequent choice, median and range)
  failures.txt     the cells that failed in the last session and their tracebacks (absent when none did;
                   runner)

The tables and figures are the report's (qgmil.bench.report), built from whatever cells have finished.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..rundir.config import ConfigError, RunConfig, format_validation_error, load_config, parse_yaml, read_yaml
from ..rundir.directory import RunDir
from ..slurm import SlurmOptions
from ..task_specs import TABLE_METRICS

MODEL_GROUPS = ("ablation", "baselines")
PRESETS = ("builtin", "demo")  # qgmil/bench/presets/<name>.yaml


class BenchmarkError(ValueError):
    """A benchmark that cannot run as given (unknown model or dataset, bad spec); raised before training."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatasetSpec(_Strict):
    name: str = Field(description="built-in dataset name, or a directory holding labels.csv and features/")
    options: dict[str, Any] = Field(default_factory=dict, description="built-in dataset options, e.g. bags: 200")
    label: str | None = Field(None, description="name in tables and OUT/runs (default: name, or the directory name)")


class ModelSpec(_Strict):
    name: str = Field(description="registered model name, or a group: ablation, baselines")
    overrides: dict[str, Any] = Field(default_factory=dict, description="model config fields, e.g. dropout: 0.1")
    space: dict[str, Any] = Field(default_factory=dict, description="with tune: changes to this model's search "
                                  "space (as tune.space)")
    label: str | None = Field(None, description="name in tables and OUT/runs (default: name)")


def _named(value):
    return [{"name": v} if isinstance(v, str) else v for v in value] if isinstance(value, list) else value


class BenchSpec(_Strict):
    """The benchmark YAML file: datasets, models, folds, seeds and training keys shared by every cell."""

    datasets: list[DatasetSpec] = Field(default_factory=list)
    models: list[ModelSpec] = Field(default_factory=list)
    folds: int = Field(5, ge=2)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1,
                             description="one k-fold each: the paired tests get folds x seeds samples")
    tune: int | None = Field(None, ge=1, description="nested tuning with this many trials per outer (seed, fold), "
                             "the same for every model (tune.* keys in train); null: every model at the train keys")
    workers: int = Field(1, ge=1, description="cells run at once, each in its own process (executor local)")
    executor: Literal["local", "slurm"] = Field("local", description="local: this machine's processes; slurm: "
                                                "one job-array task per cell through submitit")
    tune_workers: int = Field(1, ge=1, description="with tune and executor slurm: array tasks per cell that share "
                              "its studies (the first also retrains and reports)")
    slurm: SlurmOptions = Field(default_factory=SlurmOptions)
    train: dict[str, Any] = Field(default_factory=dict, description="dotted run-config keys, e.g. optim.epochs: 20")

    @field_validator("datasets", "models", mode="before")
    @classmethod
    def _as_dicts(cls, value):
        return _named(value)


@dataclass(frozen=True)
class Cell:
    """One (model, dataset) run of the grid."""

    index: int
    dataset: str  # label
    model: str  # label
    model_name: str
    config: RunConfig
    run_dir: Path
    tuned: bool = False  # a nested-tuning run (qgmil.tune) instead of a plain training run

    @property
    def rundir(self) -> RunDir:
        return RunDir(self.run_dir)

    @property
    def kind(self) -> str:
        """The task kind of the cell's dataset: which of the report's per-task tables the cell goes to."""
        return self.config.task.kind

    @property
    def main_metric(self) -> str:
        """What the report compares for this kind (task_specs.TABLE_METRICS, first): gains, tests, ranks."""
        return TABLE_METRICS[self.kind][0]

    @property
    def finished(self) -> bool:
        return self.rundir.finished


# ------------------------------------------------------------------------------------------ the spec

def preset_text(name: str) -> str:
    """The YAML text of a packaged preset (qgmil/bench/presets/<name>.yaml)."""
    if name not in PRESETS:
        raise BenchmarkError(f"unknown benchmark preset {name!r}; presets: {', '.join(PRESETS)}")
    return resources.files(__package__).joinpath("presets", f"{name}.yaml").read_text()


def builtin_spec_text() -> str:
    """The YAML text of the built-in benchmark (qgmil/bench/presets/builtin.yaml)."""
    return preset_text("builtin")


def load_spec(
    path: str | Path | None = None,
    *,
    builtin: bool = False,
    preset: str | None = None,
    datasets: list[str] | None = None,
    models: list[str] | None = None,
    folds: int | None = None,
    seeds: list[int] | None = None,
    workers: int | None = None,
    tune: int | None = None,
    executor: str | None = None,
    slurm: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
) -> BenchSpec:
    """The YAML file (optional; `preset`: a packaged preset instead, `builtin`: the `builtin` one), with
    the given values (command-line flags) overriding it.

    `datasets` given by name keep the options of the file's entry of that name; `train` keys are
    added to (and override) the file's.
    """
    if builtin:
        if preset not in (None, "builtin"):
            raise BenchmarkError(f"give the built-in benchmark or the {preset} preset, not both")
        preset = "builtin"
    if preset is not None and path is not None:
        what = "the built-in benchmark" if preset == "builtin" else f"the {preset} preset"
        raise BenchmarkError(f"give a benchmark file ({path}) or {what}, not both")
    tree: dict = {}
    if preset == "builtin":
        source = f"built-in benchmark ({__package__}/presets/builtin.yaml)"
    elif preset is not None:
        source = f"{preset} preset ({__package__}/presets/{preset}.yaml)"
    else:
        source = str(path or "command line")
    if preset is not None or path is not None:
        try:
            tree = (parse_yaml(preset_text(preset), source) if preset is not None
                    else read_yaml(path, "benchmark file")) or {}
        except ConfigError as err:
            raise BenchmarkError(str(err)) from None
        if not isinstance(tree, dict):
            raise BenchmarkError(f"{source}: expected a mapping with datasets, models, folds, seeds, train")
    try:
        spec = BenchSpec.model_validate(tree)
        update: dict[str, Any] = {}
        if datasets is not None:
            known = {d.name: d for d in spec.datasets}
            update["datasets"] = [known.get(n, DatasetSpec(name=n)) for n in datasets]
        if models is not None:
            update["models"] = [ModelSpec(name=n) for n in models]
        if folds is not None:
            update["folds"] = folds
        if seeds is not None:
            update["seeds"] = seeds
        if workers is not None:
            update["workers"] = workers
        if tune is not None:
            update["tune"] = tune
        if executor is not None:
            update["executor"] = executor
        if slurm:
            update["slurm"] = {**spec.slurm.model_dump(), **slurm}
        if train:
            update["train"] = {**spec.train, **train}
        return BenchSpec.model_validate({**spec.model_dump(), **update}) if update else spec
    except ValidationError as err:
        message = format_validation_error(err, source).replace("invalid config", "invalid benchmark")
        raise BenchmarkError(message) from None


def expand_models(models: list[ModelSpec]) -> list[ModelSpec]:
    """Groups -> their models: `ablation` (qgmil and its one-off variants), `baselines` (every non-QG-MIL
    model), shell patterns such as `qgmil*`. Unknown names raise BenchmarkError."""
    from ..models import ABLATION_SET, list_models

    known = list_models()
    out: list[ModelSpec] = []
    for spec in models:
        if spec.name == "ablation":
            names = list(ABLATION_SET)
        elif spec.name == "baselines":
            names = list_models(tags="baseline")
        elif any(ch in spec.name for ch in "*?["):
            names = list_models(spec.name)
        else:
            names = [spec.name] if spec.name in known else []
        if not names:
            raise BenchmarkError(f"unknown model {spec.name!r}; models: {', '.join(known)} "
                                 f"(groups: {', '.join(MODEL_GROUPS)}; see `qgmil models`)")
        if len(names) > 1 and (spec.overrides or spec.label):
            raise BenchmarkError(f"model group {spec.name!r} cannot take overrides or a label; list its models")
        out += [ModelSpec(name=n, overrides=spec.overrides, space=spec.space, label=spec.label) for n in names]
    return out


def _dataset_source(spec: DatasetSpec, out: Path) -> tuple[str, dict[str, Any]]:
    """(label, data.* config keys) of one dataset; a built-in one is prepared in OUT/data/<label>."""
    from ..data.builtin import dataset_info, list_datasets

    builtins = list_datasets()
    if spec.name in builtins:
        defaults = dataset_info(spec.name).defaults
        unknown = sorted(set(spec.options) - set(defaults))
        if unknown:
            raise BenchmarkError(f"dataset {spec.name}: unknown option(s) {', '.join(unknown)} "
                                 f"(options: {', '.join(defaults) or 'none'})")
        label = spec.label or spec.name
        return label, {"data.builtin": spec.name, "data.builtin_options": dict(spec.options),
                       "data.builtin_dir": out / "data" / label}
    root = Path(spec.name).expanduser()
    if root.is_dir() and (root / "labels.csv").is_file() and (root / "features").is_dir():
        if spec.options:
            raise BenchmarkError(f"dataset {spec.name}: options are for built-in datasets only")
        return spec.label or root.resolve().name, {"data.table": root / "labels.csv", "data.features": root / "features"}
    raise BenchmarkError(f"unknown dataset {spec.name!r}: neither a built-in dataset ({', '.join(builtins)}) "
                         "nor a directory holding labels.csv and features/")


def plan_cells(spec: BenchSpec, out: str | Path, *, progress: bool = False) -> list[Cell]:
    """Every cell of the grid with its validated run config, datasets outer and models inner.

    All names, dataset options and training keys are checked here, before anything runs.
    """
    out = Path(out).resolve()
    if not spec.datasets:
        raise BenchmarkError("no datasets: give --datasets or `datasets:` in the benchmark file")
    if not spec.models:
        raise BenchmarkError("no models: give --models or `models:` in the benchmark file")
    models = expand_models(spec.models)
    sources = [_dataset_source(d, out) for d in spec.datasets]
    for kind, labels in (("dataset", [s[0] for s in sources]), ("model", [m.label or m.name for m in models])):
        repeated = sorted({x for x in labels if labels.count(x) > 1})
        if repeated:
            raise BenchmarkError(f"{kind} {', '.join(repeated)} appears twice; give each entry its own label")
    cells = []
    for dataset, data_keys in sources:
        for model in models:
            label = model.label or model.name
            base: dict[str, Any] = {"runtime.progress": progress, "runtime.tensorboard": False}
            base.update(spec.train)
            base.update(data_keys)
            base.update({"model.name": model.name, "eval.folds": spec.folds, "eval.seeds": list(spec.seeds)})
            base.update({f"model.overrides.{k}": v for k, v in model.overrides.items()})
            if spec.tune is not None:
                base["tune.trials"] = spec.tune
                base["tune.space"] = {**spec.train.get("tune.space", {}), **model.space}
            try:
                config = load_config(None, [], base)
                if spec.tune is not None:
                    from ..tune import check_space

                    check_space(config)
            except ConfigError as err:
                raise BenchmarkError(f"{label} on {dataset}: {err}".replace("command line: ", "")) from None
            cells.append(Cell(len(cells), dataset, label, model.name, config, out / "runs" / dataset / label,
                              tuned=spec.tune is not None))
    return cells


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """"i/n" -> (i, n), with 0 <= i < n (`runtime.parse_shard`, raising BenchmarkError)."""
    from ..runtime import parse_shard as runtime_parse_shard

    try:
        return runtime_parse_shard(text)
    except ValueError as err:
        raise BenchmarkError(str(err)) from None
