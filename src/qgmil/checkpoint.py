"""Checkpoints: safetensors weights with the JSON config in the file header. Never a pickle.

One file holds everything needed to rebuild the model:
  header metadata  {"format": "qgmil", "format_version": "1", "arch": ..., "model_name": ...,
                    "config": <JSON>, "extra": <JSON>, "qgmil_version": ...}
  tensors          the model's state_dict
Read the config without qgmil: `safetensors.safe_open(path, "pt").metadata()`.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.nn.modules.module import register_module_parameter_registration_hook

from . import __version__
from .atomic import atomic_write
from .models.base import MILModel, ModelConfig
from .models.registry import architecture

FORMAT = "qgmil"
FORMAT_VERSION = "1"
MAX_JSON_CHARS = 1 << 20  # a config or extra field is a few kB
MAX_NESTING = 16  # json.loads recurses once per level; ours nest 2-3 deep


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


def _json_object(path: Path, meta: dict, key: str) -> dict:
    """One JSON header field as a dict, its size and nesting bounded before it is parsed."""
    text = meta.get(key, "{}" if key == "extra" else None)
    if not isinstance(text, str):
        raise CheckpointError(f"{path}: corrupt qgmil metadata (no {key})")
    if len(text) > MAX_JSON_CHARS:
        raise CheckpointError(f"{path}: corrupt qgmil metadata ({key} of {len(text):,} characters)")
    if (depth := _nesting(text)) > MAX_NESTING:
        raise CheckpointError(f"{path}: corrupt qgmil metadata ({key} nested {depth} deep; at most {MAX_NESTING})")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: corrupt qgmil metadata ({key} is not valid JSON: {err})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: corrupt qgmil metadata ({key} is a {type(value).__name__}, not a JSON object)")
    return value


def _nesting(text: str) -> int:
    """How deep the brackets of JSON text nest (strings skipped)."""
    brackets = re.sub(r'"(?:[^"\\]|\\.)*"|[^\[\]{}]', "", text)
    depth = deepest = 0
    for ch in brackets:
        depth += 1 if ch in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def _problems(err: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in err.errors()[:3])


def _read(path: str | Path) -> tuple[dict, type[MILModel], ModelConfig]:
    """The decoded header, the architecture and its validated config; nothing is built."""
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
    meta["config"] = _json_object(path, meta, "config")
    meta["extra"] = _json_object(path, meta, "extra")
    try:
        cls = architecture(meta.get("arch", ""))
    except ValueError as err:
        raise CheckpointError(f"{path}: corrupt qgmil metadata ({err})") from None
    try:
        config = cls.Config(**meta["config"])
    except ValidationError as err:
        raise CheckpointError(f"{path}: the stored {cls.arch} config does not validate ({_problems(err)})") from None
    classes = meta["extra"].get("classes")
    if classes is not None and (not isinstance(classes, list) or not all(isinstance(c, str) for c in classes)
                                or len(classes) != config.num_classes):
        raise CheckpointError(f"{path}: extra.classes must list the model's {config.num_classes} class names "
                              f"(got {str(classes)[:80]})")
    return meta, cls, config


def read_metadata(path: str | Path) -> dict:
    """The decoded header of a qgmil checkpoint: arch, model_name, config (dict), extra (dict), ...; the
    config is checked against its architecture and extra.classes against the config's num_classes."""
    return _read(path)[0]


def _stored_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from the safetensors header (no tensor data read)."""
    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


@contextmanager
def _parameter_budget(limit: int, path: Path):
    """Stop building a model once it registers more than `limit` parameters: even on the meta device a
    tampered depth of 10^6 would make millions of modules. (The hook is process-wide while it lasts.)"""
    count = 0

    def hook(module, name, param):
        nonlocal count
        count += 1
        if count > limit:
            raise CheckpointError(f"{path}: the stored config makes more parameters than the file holds tensors")

    handle = register_module_parameter_registration_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _check_shapes(path: Path, cls: type[MILModel], config: ModelConfig) -> None:
    """The config's state_dict (built on the meta device: no memory) must be the file's, key for key and
    shape for shape, before the model is built for real: a tampered `dim` would otherwise allocate gigabytes."""
    stored = _stored_shapes(path)
    with _parameter_budget(2 * len(stored) + 64, path), torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in cls(config).state_dict().items()}
    missing = [k for k in expected if k not in stored]
    unexpected = [k for k in stored if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit the stored config "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    for key, shape in expected.items():
        if stored[key] != shape:
            raise CheckpointError(f"{path}: tensor {key!r} has shape {list(stored[key])}, but the stored config "
                                  f"makes {list(shape)}")


def first_nonfinite(state: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating tensor holding NaN or Inf, or None."""
    for key, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return key
    return None


def load_model(path: str | Path, device: str = "cpu") -> MILModel:
    """Rebuild a model saved with `save_model`, in eval mode. The header is checked against the tensors
    before anything is built, and weights holding NaN or Inf are refused."""
    path = Path(path)
    meta, cls, config = _read(path)
    _check_shapes(path, cls, config)
    model = cls(config)
    model.name = meta.get("model_name", model.arch)
    state = load_file(str(path), device=device)
    if (bad := first_nonfinite(state)) is not None:
        raise CheckpointError(f"{path}: tensor {bad!r} holds NaN or Inf values")
    model.load_state_dict(state)  # keys and shapes checked above
    return model.to(device).eval()
