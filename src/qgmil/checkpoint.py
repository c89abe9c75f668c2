"""Checkpoints: safetensors weights with the JSON config in the file header. Never a pickle.

One file holds everything needed to rebuild the model:
  header metadata  {"format": "qgmil", "format_version": "1", "arch": ..., "model_name": ...,
                    "config": <JSON>, "extra": <JSON>, "qgmil_version": ...}
  tensors          the model's state_dict
Read the config without qgmil: `safetensors.safe_open(path, "pt").metadata()`.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from . import __version__
from .atomic import atomic_write
from .models.base import MILModel
from .models.registry import architecture

FORMAT = "qgmil"
FORMAT_VERSION = "1"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read as a qgmil model."""


def save_model(model: MILModel, path: str | Path, extra: dict | None = None) -> Path:
    """Write `model` to `path` (a .safetensors file). `extra`: JSON-able facts (label map, provenance...)."""
    path = Path(path)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": model.arch,
        "model_name": model.name,
        "config": model.config.model_dump_json(),
        "extra": json.dumps(extra or {}),
        "qgmil_version": __version__,
    }
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return path


def read_metadata(path: str | Path) -> dict:
    """The decoded header of a qgmil checkpoint: arch, model_name, config (dict), extra (dict), ..."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory; expected a .safetensors checkpoint file")
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: safetensors file without qgmil metadata (a bare state_dict?). "
            "Official QG-MIL weights are converted with `qgmil convert-official`."
        )
    try:
        meta["config"] = json.loads(meta["config"])
        meta["extra"] = json.loads(meta.get("extra", "{}"))
    except (KeyError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: corrupt qgmil metadata ({err})") from err
    return meta


def load_model(path: str | Path, device: str = "cpu") -> MILModel:
    """Rebuild a model saved with `save_model`, in eval mode."""
    meta = read_metadata(path)
    try:
        cls = architecture(meta["arch"])
        model = cls(cls.Config(**meta["config"]))
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"{path}: cannot rebuild the model ({err})") from err
    model.name = meta.get("model_name", model.arch)
    state = load_file(str(path), device=device)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{path}: weights do not fit the stored config "
            f"(missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]})"
        )
    return model.to(device).eval()
