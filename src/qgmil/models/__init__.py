"""Aggregators, one architecture per module. Importing this package registers every model."""

import importlib
import pkgutil

from .base import MILModel, MILOutput, ModelConfig
from .qgmil import ABLATION_SET, QGMIL, QGMILConfig
from .registry import (
    TAGS, check_model, create_model, is_qgmil, list_models, model_entry, register_model, run_overrides,
)

__all__ = [
    "ABLATION_SET",
    "TAGS",
    "MILModel",
    "MILOutput",
    "ModelConfig",
    "QGMIL",
    "QGMILConfig",
    "check_model",
    "create_model",
    "run_overrides",
    "is_qgmil",
    "list_models",
    "model_entry",
    "register_model",
]

# Every other module of this package is an architecture that registers its presets on import:
# a new model file needs no edit here.
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("base", "registry"):
        importlib.import_module(f"{__name__}.{_module.name}")
