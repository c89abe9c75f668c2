"""The quick-start job: train an aggregator on the built-in `digit-bags` data and report test metrics.

A deliberately small loop (the full training engine with cross-validation lives in `qgmil train`);
it exercises the model contract end to end: padded batches, masks, attention, checkpoints.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
from tqdm.auto import tqdm

from .checkpoint import load_model, save_model
from .data import MILDataset, make_loader, make_splits, prepare_dataset, set_epoch
from .models import create_model


def _predict(model, dataset, batch_size):
    """-> probabilities (n, C) in dataset order, and each bag's attention over its real instances."""
    model.eval()
    probs, attention = [None] * len(dataset), [None] * len(dataset)
    with torch.no_grad():
        for batch in make_loader(dataset, batch_size, train=False):
            out = model(batch.x, batch.mask)
            for row, i in enumerate(batch.index.tolist()):
                probs[i] = out.logits[row].softmax(-1).numpy()
                attention[i] = out.attention[row][batch.mask[row]].numpy()
    return np.stack(probs), attention


def run_demo(
    model_name: str = "qgmil",
    epochs: int = 12,
    batch_size: int = 16,
    lr: float = 2e-4,
    seed: int = 0,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Train `model_name` on digit-bags (fold 0 of a 4-fold patient-level split: 75/25) and return
    test metrics. The dataset is prepared under `out_dir` (a temporary folder when None)."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(out_dir) if out_dir is not None else Path(tmp)
        return _run(model_name, epochs, batch_size, lr, seed, work, out_dir is not None, progress)


def _run(model_name, epochs, batch_size, lr, seed, work, keep_checkpoint, progress) -> dict:
    torch.manual_seed(seed)
    root = prepare_dataset("digit-bags", work / "digit-bags", seed=seed, progress=False)
    data = MILDataset.from_table(root / "labels.csv", root / "features", cache="fp32")
    fold = make_splits(data.table, folds=4, seeds=[seed], val_fraction=0).folds[0]
    train, test = data.subset(fold.train), data.subset(fold.test)

    model = create_model(model_name, in_dim=data.in_dim, num_classes=len(data.classes))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    loader = make_loader(train, batch_size, seed=seed)
    for epoch in tqdm(range(epochs), desc=f"training {model_name}", disable=not progress):
        set_epoch(loader, epoch)
        model.train()
        for batch in loader:
            out = model(batch.x, batch.mask)
            loss = F.cross_entropy(out.logits, batch.labels)
            loss = loss + sum(out.aux_losses.values(), torch.zeros(()))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    probs, attention = _predict(model, test, batch_size)
    y = test.labels
    pred = probs.argmax(1)
    # Share of attention that lands on the positive digits of positive bags, against the share
    # a uniform attention would give them.
    positives = [i for i in range(len(test)) if y[i] == 1]
    witnesses = {i: test.read_bag(i).extras["instance_labels"] == 1 for i in positives}
    metrics = {
        "model": model_name,
        "test_bags": len(test),
        "accuracy": float(accuracy_score(y, pred)),
        "macro_f1": float(f1_score(y, pred, average="macro")),
        "auroc": float(roc_auc_score(y, probs[:, 1])),
        "attention_on_positive_instances": float(np.mean([attention[i][witnesses[i]].sum() for i in positives])),
        "uniform_attention_on_positive_instances": float(np.mean([witnesses[i].mean() for i in positives])),
    }
    if keep_checkpoint:
        path = save_model(model, work / "model.safetensors", extra={"dataset": "digit-bags", "classes": data.classes})
        reloaded_probs, _ = _predict(load_model(path), test, batch_size)
        metrics["checkpoint"] = str(path)
        metrics["checkpoint_roundtrip_max_abs_diff"] = float(np.abs(reloaded_probs - probs).max())
    return metrics
