"""qgmil: multiple instance learning for medical imaging around the QG-MIL aggregator."""

__version__ = "0.1.0"

from . import data  # noqa: E402
from .checkpoint import load_model, save_model  # noqa: E402
from .models import MILOutput, create_model, list_models  # noqa: E402

__all__ = ["MILOutput", "__version__", "create_model", "data", "list_models", "load_model", "save_model"]
