"""The run configuration: one validated YAML file (or plain flags), saved resolved into the run directory.

Owns the schema of RUN_DIR/config.yaml (`RunConfig`) and how it is read and overridden (`load_config`).

Unknown keys and wrong types are errors that name the key (`optim.lr: Input should be a valid number`).
`--set a.b=value` overrides any field; values are parsed as YAML (`--set optim.lr=3e-4`,
`--set model.overrides.dropout=0.1`, `--set eval.seeds=[0,1,2]`).

Every YAML the package reads (config files, benchmark specs, `--set` values) goes through `parse_yaml` /
`read_yaml`: safe_load without anchors and aliases (nested aliases expand exponentially: a 500-byte "billion
laughs" file becomes gigabytes) and files of at most MAX_YAML_BYTES.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from ..data.bagfile import BagLimits
from ..data.table import Columns
from ..task_specs import DEFAULT_MONITOR, KINDS, LOSSES, PER_LABEL, missing_libraries, monitor_names


MAX_YAML_BYTES = 1 << 20  # a run config or benchmark spec is a few kB


class ConfigError(ValueError):
    """A config that does not validate; the message lists each bad key."""


class _PlainLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors and aliases, so that what is read is as large as the text."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(None, None, "YAML anchors and aliases (&name, *name) are not allowed",
                                              event.start_mark)
        return super().compose_node(parent, index)


class _PlainDumper(yaml.SafeDumper):
    """Writes repeated values out in full (no &id001 anchors), so that `_PlainLoader` reads them back."""

    def ignore_aliases(self, data):
        return True


def parse_yaml(text: str, source: str) -> Any:
    """YAML text -> plain Python values; ConfigError on bad YAML or an anchor/alias, naming `source`."""
    try:
        return yaml.load(text, Loader=_PlainLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{source}: not valid YAML ({problem}{where})") from None


def read_yaml(path: str | Path, what: str = "config file") -> Any:
    """A YAML file (at most MAX_YAML_BYTES) -> plain Python values; ConfigError names the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found" + (" (a directory)" if path.is_dir() else ""))
    if path.stat().st_size > MAX_YAML_BYTES:
        raise ConfigError(f"{path}: {what} of {path.stat().st_size:,} bytes; at most {MAX_YAML_BYTES:,} are read")
    try:
        text = path.read_text()
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: {what} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    return parse_yaml(text, str(path))


def dump_yaml(tree: Any) -> str:
    """Plain YAML that `parse_yaml` reads back (keys in their order, no anchors)."""
    return yaml.dump(tree, Dumper=_PlainDumper, sort_keys=False)


class _Section(BaseModel):
    # inf and NaN are never meant (--lr inf would train on NaN weights); refused like any out-of-range value
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataConfig(_Section):
    """Where the bags are: a table + features folder, or a built-in dataset prepared on first use."""

    table: Path | None = None
    slide_table: Path | None = Field(None, description="STAMP's layout: data.table is the clinical table (patient + "
                                     "label, one row per patient) and this one lists the slides (patient + feature "
                                     "file, e.g. STAMP's PATIENT and FILENAME)")
    features: Path | None = None
    builtin: str | None = Field(None, description="built-in dataset name (qgmil datasets list), instead of table")
    builtin_options: dict[str, Any] = Field(default_factory=dict)
    builtin_dir: Path | None = Field(None, description="where to prepare it (default: RUN_DIR/data/NAME)")
    columns: Columns = Field(default_factory=Columns)
    bag_unit: Literal["slide", "patient"] = "slide"
    patient_label: Literal["refuse", "majority", "max"] = Field(
        "refuse", description="a patient's label from its slides' labels: the label of a patient bag (refuse: slides "
        "of different labels are an error; majority: the most frequent, ties to the first class; max: the last "
        "class, as CLAM's voting), and what slide bags' splits stratify on (refuse: the majority)")
    classes: list[str] | None = Field(None, description="class order; default: sorted labels")
    max_instances: int | None = Field(None, ge=1, description="random subset of larger bags while training")
    cache: Literal["auto", "fp16", "fp32"] | None = Field(
        "auto", description="keep the features in memory after their first read: fp32; fp16 (half the memory; "
        "values must fit float16); auto: fp32 when the dataset takes at most 4 GiB in float32 (and a quarter of "
        "the machine's memory), else none; null: read each bag from its file every time")
    num_workers: int = Field(0, ge=0)
    check: bool = Field(True, description="read every bag for NaN/Inf and dims before training")
    limits: BagLimits = Field(default_factory=BagLimits, description="what one feature file may declare")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.table is None) == (self.builtin is None):
            raise ValueError("give exactly one of data.table (with data.features) or data.builtin")
        if self.slide_table is not None and self.table is None:
            raise ValueError("data.slide_table goes with data.table (the clinical table), not data.builtin")
        return self

    def table_options(self) -> dict[str, Any]:
        """How the table is read (with `bag_unit`), as `MILDataset.from_table` and `check_dataset` take it."""
        return {"columns": self.columns, "slide_table": self.slide_table, "patient_label": self.patient_label}


class TaskConfig(_Section):
    """What the run predicts. `task: survival` is short for `task: {kind: survival}`. The targets' columns are
    named in data.columns (survival: time, event; regression: targets, default the label column; multi-label:
    targets as 0/1 columns, or the label column with names joined by label_sep)."""

    kind: Literal[KINDS] | None = Field(None, description="null: classification, or the task a built-in dataset "
                                        "is made for")
    loss: str | None = Field(None, description="classification: ce; survival: cox (default) or nll (discrete time); "
                             "regression: mse (default) or huber; multilabel: bce; null: the task's default")
    time_bins: int = Field(4, ge=2, le=64, description="survival with loss nll: intervals cut at event-time quantiles")
    huber_delta: float = Field(1.0, gt=0, description="regression with loss huber, in standard deviations")

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, value: Any) -> Any:
        return {"kind": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _loss_of_kind(self):
        if self.kind is None:  # resolved by the run config (RunConfig._task_fits), which validates again
            return self
        allowed = LOSSES[self.kind]
        if self.loss is None:
            self.__dict__["loss"] = allowed[0]  # set without re-validating
        elif self.loss not in allowed:
            raise ValueError(f"loss {self.loss!r} is not one of task {self.kind}'s: {', '.join(allowed)}")
        missing = missing_libraries(self.kind)
        if missing:
            raise ValueError(missing)
        return self


class ModelSection(_Section):
    """The registered model and its config overrides, checked against the architecture when the config is
    loaded, so a mistyped name or field fails before any data is read or any file is written."""

    name: str = Field("qgmil", description="registered model name (`qgmil models`)")
    overrides: dict[str, Any] = Field(default_factory=dict, description="config fields of the model, e.g. dropout")

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        from ..models import model_entry

        model_entry(name)  # ValueError listing the registered models
        return name

    @field_validator("overrides")
    @classmethod
    def _overrides_fit(cls, overrides: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        from ..models.registry import check_model

        if "name" in info.data:  # else the name itself was wrong, and says so
            check_model(info.data["name"], overrides)
        return overrides


class OptimConfig(_Section):
    epochs: int = Field(50, ge=1)
    batch_size: int | None = Field(32, ge=1, description="at most this many bags per optimizer micro-step (global "
                                   "under torchrun); null: as many as batch_instances allows")
    batch_instances: int | None = Field(16384, ge=1, description="at most this many instances per micro-step "
                                        "(padded: bags x longest bag); a longer bag goes alone; null: no budget")
    pack: bool = Field(True, description="packed batches (bags concatenated, no padding) for models that take them")
    grad_accum: int = Field(1, ge=1, description="micro-steps per optimizer step")
    lr: float = Field(1e-4, gt=0)
    min_lr_ratio: float = Field(0.01, ge=0, le=1, description="cosine schedule ends at lr * min_lr_ratio")
    warmup_epochs: float = Field(1.0, ge=0)
    weight_decay: float = Field(1e-2, ge=0, description="not applied to biases, norms and other 1-D tensors")
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = Field(1.0, gt=0)
    class_weights: bool = Field(True, description="cross-entropy weights n / (C n_c) from the training part")
    class_balanced_sampling: bool = False
    label_smoothing: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _some_batch_limit(self):
        if self.batch_size is None and self.batch_instances is None:
            raise ValueError("give optim.batch_size, optim.batch_instances or both")
        return self


class EvalConfig(_Section):
    folds: int = Field(5, ge=2)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    val_fraction: float = Field(0.2, ge=0, lt=1)
    splits: Path | None = Field(None, description="reuse this splits.json instead of making one")
    monitor: str | None = Field(None, description="validation metric early stopping (and tuning) follows; null: the "
                                "task's (classification macro_f1, survival c_index, regression r2, multilabel "
                                "macro_auroc); loss: the validation loss")
    patience: int | None = Field(10, ge=1, description="epochs without improvement before stopping; null = never")
    min_epochs: int = Field(0, ge=0)
    ordinal: bool = Field(False, description="labels are ordered: also report quadratic-weighted kappa")
    bootstrap: int = Field(1000, ge=0, description="bootstrap replicates for confidence intervals")
    save_attention: bool = True


class RuntimeConfig(_Section):
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, mps")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads")
    progress: bool = True
    tensorboard: bool = Field(True, description="also log to RUN_DIR/tensorboard when tensorboard is installed")

    @field_validator("device")
    @classmethod
    def _device_name(cls, name: str) -> str:
        """A device torch can name (whether it is present is checked where the run starts)."""
        import torch

        if name != "auto":
            try:
                torch.device(name)
            except (RuntimeError, ValueError):
                raise ValueError(f"{name!r} is not a device (auto, cpu, cuda, cuda:1, mps)") from None
        return name


TUNABLE = ("optim.", "model.overrides.", "data.max_instances", "eval.patience", "eval.min_epochs")


class TuneConfig(_Section):
    """`qgmil tune`: a hyperparameter search inside each outer (seed, fold), scored on eval.monitor of the
    validation part; `qgmil train` ignores this section."""

    trials: int = Field(20, ge=1, description="trials per outer (seed, fold); every model of a benchmark gets as many")
    inner_folds: int | None = Field(None, ge=2, description="null: trials train on the outer fold's training part and "
                                    "score its validation carve-out; k: inner k-fold over both (the mean is the score)")
    sampler: Literal["tpe", "random"] = "tpe"
    pruner: Literal["asha", "median", "hyperband", "none"] = Field(
        "asha", description="stops trials whose validation curve falls behind the others' (asha: successive "
        "halving, a trial goes on past epochs prune_after x 3^k only in the top third of those that got there)")
    startup_trials: int = Field(5, ge=0, description="trials sampled at random before TPE starts (and, for the "
                                "median pruner, never pruned)")
    prune_after: int = Field(3, ge=0, description="epochs every trial runs before the pruner may stop it")
    seed: int = Field(0, description="sampler seed (with the same seed and data, the same trials)")
    space: dict[str, Any] = Field(default_factory=dict, description="changes to the model's search space: a range "
                                  "{low, high, log, type}, a list of choices, a fixed value, or null to drop a key")
    storage: str | None = Field(None, description="Optuna storage: null = RUN_DIR/tuning/studies.journal; a *.journal "
                                "path (shared filesystem) or an RDB URL (sqlite:///x.db, postgresql://...)")

    @field_validator("space", mode="before")
    @classmethod
    def _flat(cls, space: Any) -> Any:
        """Nested keys (`--set tune.space.optim.lr=...` arrives as {optim: {lr: ...}}) as dotted ones."""
        if not isinstance(space, dict):
            return space
        flat: dict[str, Any] = {}
        for key, value in space.items():
            if isinstance(value, dict) and not {"low", "high"} & set(value):
                flat.update({f"{key}.{k}": v for k, v in cls._flat(value).items()})
            else:
                flat[key] = value
        return flat

    @field_validator("space")
    @classmethod
    def _space_keys(cls, space: dict[str, Any]) -> dict[str, Any]:
        from ..models.search import parse_param

        for key, value in space.items():
            if not key.startswith(TUNABLE):
                raise ValueError(f"tune.space.{key}: not tunable (keys start with {', '.join(TUNABLE)})")
            if value is not None:
                parse_param(key, value)
        return space


class RunConfig(_Section):
    task: TaskConfig = Field(default_factory=TaskConfig)
    data: DataConfig
    model: ModelSection = Field(default_factory=ModelSection)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)

    @model_validator(mode="after")
    def _task_fits(self):
        """A built-in dataset made for a task sets it (given another: an error); eval.monitor is the task's."""
        from ..data.builtin import dataset_info

        try:
            made_for = dataset_info(self.data.builtin).task if self.data.builtin else None
        except ValueError:  # an unknown name: reported where the dataset is prepared, with the known ones
            made_for = None
        if self.task.kind is None:
            self.__dict__["task"] = TaskConfig(**{**self.task.model_dump(), "kind": made_for or "classification"})
        elif made_for is not None and made_for != self.task.kind:
            raise ValueError(f"task.kind {self.task.kind}: built-in dataset {self.data.builtin} holds {made_for} "
                             f"targets (use --task {made_for}, or another dataset)")
        if self.task.kind != "classification" and self.optim.class_balanced_sampling:
            raise ValueError(f"optim.class_balanced_sampling: there are no classes to balance in task {self.task.kind}")
        if self.eval.monitor is None:
            self.eval.__dict__["monitor"] = DEFAULT_MONITOR[self.task.kind]
        known = monitor_names(self.task.kind)
        per_label = self.task.kind == "multilabel" and self.eval.monitor.startswith(PER_LABEL)
        if self.eval.monitor not in known and not per_label:
            raise ValueError(f"eval.monitor {self.eval.monitor!r} is not a metric of task {self.task.kind} "
                             f"({', '.join(known)})")
        return self

    def with_keys(self, values: dict[str, Any]) -> RunConfig:
        """This config with dotted keys set (a trial's parameters), validated; ConfigError names the key."""
        tree = self.model_dump(mode="json")
        for key, value in values.items():
            _set_path(tree, key, value)
        try:
            return RunConfig.model_validate(tree)
        except ValidationError as err:
            raise ConfigError(format_validation_error(err, "tuned settings")) from None

    def to_yaml(self) -> str:
        return dump_yaml(self.model_dump(mode="json"))

    def absolute(self) -> RunConfig:
        """Paths relative to the working directory made absolute, so the saved config works from anywhere."""
        data = self.data
        paths = {k: Path(v).resolve() for k in ("table", "slide_table", "features", "builtin_dir")
                 if (v := getattr(data, k)) is not None}
        update: dict[str, Any] = {"data": data.model_copy(update=paths)}
        if self.eval.splits is not None:
            update["eval"] = self.eval.model_copy(update={"splits": self.eval.splits.resolve()})
        return self.model_copy(update=update)


def format_validation_error(err: ValidationError, source: str) -> str:
    from ..models.registry import ModelConfigError

    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        cause = e.get("ctx", {}).get("error")
        if isinstance(cause, ModelConfigError):  # one line per model field: model.overrides.<field>
            lines += [f"  {key}.{field}: {msg}" for field, msg in cause.problems]
            continue
        if e["type"] == "value_error":  # our own validators' messages say what they got
            lines.append(f"  {key}: {e['msg'].removeprefix('Value error, ')}")
            continue
        shown = e["type"] != "missing" and not isinstance(e["input"], dict)
        lines.append(f"  {key}: {e['msg']}" + (f" (got {e['input']!r})" if shown else ""))
    return f"{source}: invalid config\n" + "\n".join(lines)


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {key} is not a section")
        node = child
    node[keys[-1]] = value


def parse_set(items: list[str]) -> list[tuple[str, Any]]:
    """["optim.lr=3e-4", ...] -> [("optim.lr", 0.0003), ...] (values parsed as YAML)."""
    pairs = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. optim.lr=3e-4")
        key, raw = item.split("=", 1)
        pairs.append((key.strip(), parse_yaml(raw, f"--set {key.strip()}") if raw.strip() else None))
    return pairs


def parse_seeds(text: str) -> list[int]:
    """"0,1,2" (the --seeds flag) -> [0, 1, 2]; ConfigError names the flag and its key."""
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise ConfigError(f"--seeds {text!r} (eval.seeds): expected comma-separated integers, e.g. 0,1,2") from None


def load_config(
    path: str | Path | None = None, overrides: list[tuple[str, Any]] = (), base: dict | None = None
) -> RunConfig:
    """YAML file (optional) <- `base` (plain CLI flags as dotted keys) <- `overrides` (--set), validated."""
    tree: dict = {}
    source = "command line"
    if path is not None:
        path = Path(path)
        source = str(path)
        loaded = read_yaml(path)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the config must be a mapping of sections (data, model, optim, eval, runtime)")
        tree = loaded or {}
    for key, value in list((base or {}).items()) + list(overrides):
        _set_path(tree, key, value)
    tree.setdefault("data", {})  # so that a missing data source gets the helpful message below
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None
