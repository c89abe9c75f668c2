"""Model registry, timm style: `create_model`, `list_models(pattern, tags=...)`, `register_presets`.

A registered model is a preset of an architecture: the architecture class, the config fields the preset
fixes, a one-line description and tags. Tags say what a model is, so that the engine and the benchmark
never test names (`TAGS` lists them). `check_model` validates a name and config overrides without
building anything, so a run can refuse a bad model before it touches data or disk.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from .search import TRAINING_SPACE, Space
from .base import MILModel, ModelConfig

#: tag -> what it means
TAGS: dict[str, str] = {
    "qgmil": "a QG-MIL variant (the paper's aggregator, a preset or an ablation of it)",
    "official": "a preset of the official QG-MIL code, numerically identical to it",
    "ablation": "the clean one-component-off ablation set (full qgmil and each qgmil_wo_* variant)",
    "baseline": "a comparison model, not a QG-MIL variant",
    "multi_branch": "returns branch_attention: one attention per class or branch",
}


@dataclass(frozen=True)
class ModelEntry:
    name: str
    arch: type[MILModel]
    preset: Mapping[str, Any]
    description: str
    tags: frozenset[str] = field(default_factory=frozenset)

    def config(self, in_dim: int, num_classes: int, **overrides) -> ModelConfig:
        """The validated config of this preset with `overrides` (pydantic ValidationError if invalid)."""
        return self.arch.Config(**{**self.preset, "in_dim": in_dim, "num_classes": num_classes, **overrides})

    def search_space(self) -> Space:
        """What `qgmil tune` varies for this preset (run-config keys): the learning rate and weight decay, and
        the architecture's `search_space` less the fields this preset sets to a non-default value (a deep or
        light variant keeps its depth or width: that is what it is)."""
        defaults = self.arch.Config.model_fields
        own = {k: v for k, v in self.arch.search_space.items()
               if k not in self.preset or self.preset[k] == defaults[k].default}
        return {**TRAINING_SPACE, **{f"model.overrides.{k}": v for k, v in own.items()}}


_MODELS: dict[str, ModelEntry] = {}
_ARCHITECTURES: dict[str, type[MILModel]] = {}


def register_arch(cls: type[MILModel]) -> type[MILModel]:
    """Class decorator: makes an architecture rebuildable from a checkpoint's config."""
    _ARCHITECTURES[cls.arch] = cls
    return cls


def register_model(name: str, arch: type[MILModel], preset: Mapping[str, Any] | None = None, description: str = "",
                   tags: Iterable[str] = ()) -> ModelEntry:
    """Register `name` as architecture `arch` with the config fields of `preset`; tags add to `arch.tags`."""
    if name in _MODELS:
        raise ValueError(f"model {name!r} is registered twice")
    all_tags = frozenset(arch.tags) | frozenset(tags)
    unknown = sorted(all_tags - set(TAGS))
    if unknown:
        raise ValueError(f"model {name!r}: unknown tag(s) {', '.join(unknown)}; known: {', '.join(TAGS)}")
    entry = ModelEntry(name, arch, dict(preset or {}), description or (arch.__doc__ or "").strip().split("\n")[0],
                       all_tags)
    _MODELS[name] = entry
    return entry


def register_presets(cls: type[MILModel], presets: dict[str, dict], descriptions: dict[str, str],
                     tags: Mapping[str, Iterable[str]] | None = None) -> None:
    """Register each preset (name -> config fields) of architecture `cls`; `tags`: name -> extra tags."""
    for name, preset in presets.items():
        register_model(name, cls, preset, descriptions[name], (tags or {}).get(name, ()))


def list_models(pattern: str = "*", tags: Iterable[str] | str | None = None) -> list[str]:
    """Registered model names matching a shell-style pattern (e.g. "qgmil*") that carry every tag in `tags`."""
    wanted = {tags} if isinstance(tags, str) else set(tags or ())
    unknown = sorted(wanted - set(TAGS))
    if unknown:
        raise ValueError(f"unknown tag(s) {', '.join(unknown)}; known: {', '.join(TAGS)}")
    return sorted(n for n, e in _MODELS.items() if fnmatch.fnmatchcase(n, pattern) and wanted <= e.tags)


def model_entry(name: str) -> ModelEntry:
    if name not in _MODELS:
        close = fnmatch.filter(_MODELS, f"*{name}*") or list(_MODELS)
        raise ValueError(f"unknown model {name!r}; registered models include: {', '.join(sorted(close))}")
    return _MODELS[name]


def is_qgmil(name: str) -> bool:
    """Is the registered model `name` a QG-MIL variant (tag `qgmil`)? Everything else is a baseline."""
    return "qgmil" in model_entry(name).tags


class ModelConfigError(ValueError):
    """Config overrides that do not fit a model; `problems` lists (field, what is wrong)."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{key}: {msg}" for key, msg in problems))


def check_model(name: str, overrides: Mapping[str, Any] | None = None) -> None:
    """Raise ValueError naming the problem if `create_model(name, ..., **overrides)` could not build:
    an unknown name lists the registered models, bad overrides raise ModelConfigError (one entry per
    field, unknown fields with the model's fields). `in_dim` and `num_classes` come from the data, so
    they are not overrides. Nothing is built.
    """
    entry = model_entry(name)
    overrides = dict(overrides or {})
    fixed = sorted({"in_dim", "num_classes"} & set(overrides))
    if fixed:
        raise ModelConfigError([(key, "set from the data, not a model override") for key in fixed])
    try:
        entry.config(in_dim=1, num_classes=2, **overrides)
    except ValidationError as err:
        fields = sorted(set(entry.arch.Config.model_fields) - {"in_dim", "num_classes"})
        problems = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"]) or "(model config)"
            if e["type"] == "extra_forbidden":
                problems.append((key, f"not a field of {name} (fields: {', '.join(fields)})"))
            else:
                problems.append((key, e["msg"].removeprefix("Value error, ")
                                 + (f" (got {e['input']!r})" if e["loc"] else "")))
        raise ModelConfigError(problems) from None


def create_model(name: str, *, in_dim: int, num_classes: int, **overrides) -> MILModel:
    """Build a registered model. `overrides` are config fields of the architecture (validated)."""
    entry = model_entry(name)
    model = entry.arch(entry.config(in_dim, num_classes, **overrides))
    model.name = name
    return model


def run_overrides(name: str, overrides: dict, *, class_labels: bool) -> dict:
    """The config overrides a run builds model `name` with: without class labels (tasks other than
    classification) the architecture's `without_class_labels` changes first, the run's `overrides` winning."""
    return dict(overrides) if class_labels else {**model_entry(name).arch.without_class_labels, **overrides}


def architecture(arch: str) -> type[MILModel]:
    if arch not in _ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(sorted(_ARCHITECTURES))}")
    return _ARCHITECTURES[arch]
