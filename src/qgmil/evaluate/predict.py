"""Predictions on new bags with a trained run (its fold models averaged) or a single checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..atomic import atomic_write, atomic_write_text
from ..checkpoint import load_model, read_metadata
from ..data import DataError, MILDataset, read_attrs, read_table
from ..data.bagfile import FEATURE_SUFFIXES, inspect_bag
from ..data.table import Columns
from .metrics import classification_metrics


def find_checkpoints(source: str | Path) -> list[Path]:
    """A .safetensors checkpoint, or a run directory -> the best model of each finished fold."""
    source = Path(source)
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: no such run directory or checkpoint")
    found = [p.parent / "best.safetensors" for p in sorted((source / "folds").glob("*/metrics.json"))]
    found = [p for p in found if p.exists()]
    if not found:
        raise FileNotFoundError(f"{source}: no finished fold with a best.safetensors (is this a qgmil run directory?)")
    return found


def _table_for(data: Path, features: Path | None, columns: Columns | None) -> tuple[pd.DataFrame, Path]:
    """A table file (labels optional) or a folder of feature files (one bag per file, no labels)."""
    if data.is_dir():
        files = sorted(p for p in data.iterdir() if p.suffix.lower() in FEATURE_SUFFIXES and not p.name.startswith("."))
        if not files:
            raise DataError([f"{data}: no feature files ({', '.join(FEATURE_SUFFIXES)})"])
        ids = [p.stem for p in files]
        table = pd.DataFrame({"row": range(2, len(ids) + 2), "bag_id": pd.Series(ids, dtype=object),
                              "patient_id": pd.Series(ids, dtype=object),
                              "label": pd.Series([None] * len(ids), dtype=object)})
        table.attrs["source"] = str(data)
        return table, data
    return read_table(data, columns, require_labels=False), features or data.parent / "features"


def _check_compatible(dataset: MILDataset, meta: dict, source: Path) -> None:
    """Refuse bags the models were not trained for: another feature dim or another recorded encoder."""
    extra = meta["extra"]
    in_dim = meta["config"]["in_dim"]
    trained = extra.get("provenance", {})
    problems = []
    for unit in dataset.units:
        for file in unit.files:
            info = inspect_bag(file)
            if info.dim != in_dim:
                problems.append(f"{file}: feature dim {info.dim}, but {source} was trained on dim {in_dim}")
                continue
            attrs = read_attrs(file)
            for key in ("encoder", "extractor"):
                if key in trained and key in attrs and str(attrs[key]) != str(trained[key]):
                    problems.append(f"{file}: {key} {attrs[key]!r}, but {source} was trained on {key} {trained[key]!r}")
    if problems:
        raise DataError(problems, "the bags do not fit the model")


def predict_bags(
    source: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    features: str | Path | None = None,
    columns: Columns | None = None,
    batch_size: int = 1,
    device: str = "cpu",
    progress: bool = True,
) -> pd.DataFrame:
    """Average the probabilities (and attention) of the source's models over the bags of `data`.

    Writes OUT/predictions.csv (bag_id, patient_id, label if known, pred, prob_<class>),
    OUT/attention.h5 (one dataset per bag: the mean pooling attention over its real instances; for
    multi-branch models also the group `branch_attention`: per bag the mean (K, N) branch attentions,
    attrs["names"]) and, when every bag has a known label, OUT/metrics.json.
    """
    from ..data import make_loader
    from ..train.loop import branch_names, write_branch_attention

    checkpoints = find_checkpoints(source)
    metas = [read_metadata(p) for p in checkpoints]
    classes = metas[0]["extra"].get("classes")
    if classes is None:
        raise DataError([f"{checkpoints[0]}: checkpoint without a class list (extra.classes)"])
    for path, meta in zip(checkpoints, metas):
        if meta["extra"].get("classes") != classes or meta["config"]["in_dim"] != metas[0]["config"]["in_dim"]:
            raise DataError([f"{path}: classes or feature dim differ from {checkpoints[0]}"])
    table, features_dir = _table_for(Path(data), Path(features) if features else None, columns)
    bag_unit = metas[0]["extra"].get("bag_unit", "slide")
    dataset = MILDataset.from_table(table, features_dir, classes=classes, bag_unit=bag_unit, require_labels=False)
    _check_compatible(dataset, metas[0], Path(source))

    n = len(dataset)
    probs = np.zeros((n, len(classes)))
    attention: list[np.ndarray | None] = [None] * n
    branches: list[np.ndarray | None] = [None] * n  # (K, N) per bag, multi-branch models only
    names = None
    for path in tqdm(checkpoints, desc="models", disable=not progress or len(checkpoints) == 1):
        model = load_model(path, device=device)
        with torch.no_grad():
            for batch in tqdm(make_loader(dataset, batch_size, train=False), desc=path.parent.name, leave=False,
                              disable=not progress):
                output = model(batch.x.to(device), batch.mask.to(device))
                p = output.logits.float().softmax(-1).cpu().numpy()
                a = output.attention.float().cpu().numpy()
                b = None if output.branch_attention is None else output.branch_attention.float().cpu().numpy()
                for row, i in enumerate(batch.index.tolist()):
                    real = batch.mask[row].numpy()
                    probs[i] += p[row] / len(checkpoints)
                    share = a[row][real] / len(checkpoints)
                    attention[i] = share if attention[i] is None else attention[i] + share
                    if b is not None:
                        share = b[row][:, real] / len(checkpoints)
                        branches[i] = share if branches[i] is None else branches[i] + share
                if b is not None and names is None:
                    names = branch_names(model, classes, b.shape[1])

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    y = dataset.labels
    frame = pd.DataFrame({"bag_id": dataset.bag_ids, "patient_id": dataset.patient_ids})
    if (y >= 0).any():
        frame["label"] = [classes[i] if i >= 0 else None for i in y]
    frame["pred"] = [classes[i] for i in probs.argmax(1)]
    for i, c in enumerate(classes):
        frame[f"prob_{c}"] = probs[:, i]
    atomic_write(out / "predictions.csv", lambda tmp: frame.to_csv(tmp, index=False))

    def write_attention(tmp):
        with h5py.File(tmp, "w") as f:
            f.attrs["models"] = [str(p) for p in checkpoints]
            for bag_id, att in zip(dataset.bag_ids, attention):
                f.create_dataset(bag_id, data=att.astype(np.float32))
            if names is not None:
                write_branch_attention(f, dataset.bag_ids, branches, names)

    atomic_write(out / "attention.h5", write_attention)
    if len(y) and (y >= 0).all():
        metrics = classification_metrics(y, probs)
        atomic_write_text(out / "metrics.json", json.dumps(
            {"models": [str(p) for p in checkpoints], "n": int(len(y)), **metrics}, indent=1))
    return frame
