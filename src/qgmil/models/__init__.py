"""Aggregators. Importing this package registers every model."""

from . import qgmil  # noqa: F401  (registers the QG-MIL presets)
from . import abmil  # noqa: F401  (registers the ABMIL presets)
from .base import MILModel, MILOutput, ModelConfig
from .qgmil import ABLATION_SET, QGMIL, QGMILConfig
from .registry import create_model, list_models, model_entry, register_model

__all__ = [
    "ABLATION_SET",
    "MILModel",
    "MILOutput",
    "ModelConfig",
    "QGMIL",
    "QGMILConfig",
    "create_model",
    "list_models",
    "model_entry",
    "register_model",
]
