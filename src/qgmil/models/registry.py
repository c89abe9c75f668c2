"""Model registry, timm style: `create_model`, `list_models`, `register_model`."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable

from .base import MILModel


@dataclass(frozen=True)
class ModelEntry:
    name: str
    factory: Callable[..., MILModel]
    description: str


_MODELS: dict[str, ModelEntry] = {}
_ARCHITECTURES: dict[str, type[MILModel]] = {}


def register_arch(cls: type[MILModel]) -> type[MILModel]:
    """Class decorator: makes an architecture rebuildable from a checkpoint's config."""
    _ARCHITECTURES[cls.arch] = cls
    return cls


def register_model(name: str, description: str = ""):
    """Decorator for a factory `fn(in_dim, num_classes, **overrides) -> MILModel`."""

    def wrap(fn):
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        _MODELS[name] = ModelEntry(name, fn, description or (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return wrap


def register_presets(cls: type[MILModel], presets: dict[str, dict], descriptions: dict[str, str]) -> None:
    """Register each preset (name -> config fields) of architecture `cls` as a model."""
    for name, preset in presets.items():

        def factory(in_dim: int, num_classes: int, _preset=preset, **overrides) -> MILModel:
            return cls(cls.Config(**{**_preset, "in_dim": in_dim, "num_classes": num_classes, **overrides}))

        register_model(name, descriptions[name])(factory)


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern, e.g. "qgmil*"."""
    return sorted(n for n in _MODELS if fnmatch.fnmatchcase(n, pattern))


def model_entry(name: str) -> ModelEntry:
    if name not in _MODELS:
        close = fnmatch.filter(_MODELS, f"*{name}*") or list(_MODELS)
        raise ValueError(f"unknown model {name!r}; registered models include: {', '.join(sorted(close))}")
    return _MODELS[name]


def create_model(name: str, *, in_dim: int, num_classes: int, **overrides) -> MILModel:
    """Build a registered model. `overrides` are config fields of the architecture (validated)."""
    model = model_entry(name).factory(in_dim=in_dim, num_classes=num_classes, **overrides)
    model.name = name
    return model


def architecture(arch: str) -> type[MILModel]:
    if arch not in _ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(sorted(_ARCHITECTURES))}")
    return _ARCHITECTURES[arch]
