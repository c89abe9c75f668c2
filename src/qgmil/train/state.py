"""Training state for exact resume: safetensors (weights, optimizer moments, RNG) + JSON header. No pickle."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..atomic import atomic_write

STATE_FORMAT = "qgmil-train-state"


def save_state(path: Path, model: torch.nn.Module, optimizer, scheduler, scaler, rng_states: list[torch.Tensor],
               info: dict) -> None:
    """Everything needed to continue after this epoch as if never stopped.

    rng_states: each rank's torch CPU RNG state (dropout, DataLoader seeds); info: epoch, early-stopping
    state, history (JSON-able).
    """
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    scalars: dict[str, dict] = {}
    for idx, param_state in opt["state"].items():
        for key, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    for rank, state in enumerate(rng_states):
        tensors[f"rng.torch.{rank}"] = state
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    metadata = {
        "format": STATE_FORMAT,
        "param_groups": json.dumps(opt["param_groups"]),
        "optim_scalars": json.dumps(scalars),
        "scheduler": json.dumps(scheduler.state_dict()),
        "scaler": json.dumps(scaler.state_dict() if scaler.is_enabled() else {}),
        "info": json.dumps(info),
    }
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_state(path: Path, model: torch.nn.Module, optimizer, scheduler, scaler, rank: int) -> dict:
    """Restore what `save_state` wrote (this rank's RNG included) and return its `info`."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != STATE_FORMAT:
            raise ValueError(f"{path}: not a qgmil training state file")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, values in json.loads(meta["optim_scalars"]).items():
        state.setdefault(int(idx), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    scheduler.load_state_dict(json.loads(meta["scheduler"]))
    scaler_state = json.loads(meta["scaler"])
    if scaler_state and scaler.is_enabled():
        scaler.load_state_dict(scaler_state)
    rng = tensors.get(f"rng.torch.{rank}")
    if rng is None:
        raise ValueError(f"{path}: saved with fewer processes (no RNG state for rank {rank}); resume with the same world size")
    torch.set_rng_state(rng)
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    return json.loads(meta["info"])
