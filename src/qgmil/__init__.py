"""qgmil: multiple instance learning for medical imaging around the QG-MIL aggregator."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Loaded on first use, so that `qgmil --help` does not pay for importing torch and scikit-learn.
_LAZY = {
    "create_model": "models", "list_models": "models", "MILOutput": "models",
    "load_model": "checkpoint", "save_model": "checkpoint",
}
_SUBMODULES = {"data", "extract", "models", "train", "evaluate", "explain", "convert", "checkpoint", "rundir", "runtime",
               "bench", "layers", "plotting", "tune", "slurm"}

__all__ = ["MILOutput", "__version__", "create_model", "data", "list_models", "load_model", "save_model"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'qgmil' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | _SUBMODULES)
