"""The quick-start job: train an aggregator on the built-in `digit-bags` data and report test metrics.

A deliberately small loop (the full training engine with cross-validation lives in `qgmil train`);
it exercises the model contract end to end: padded batches, masks, attention, checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
from sklearn.model_selection import train_test_split
from tqdm.auto import tqdm

from .checkpoint import load_model, save_model
from .data import digit_bags, pad_bags
from .models import create_model


def _predict(model, bags, batch_size):
    model.eval()
    probs, attention = [], []
    with torch.no_grad():
        for start in range(0, len(bags), batch_size):
            chunk = bags[start : start + batch_size]
            x, mask = pad_bags(chunk)
            out = model(x, mask)
            probs.append(out.logits.softmax(-1))
            attention += [a[: len(b)].numpy() for a, b in zip(out.attention, chunk)]
    return torch.cat(probs).numpy(), attention


def run_demo(
    model_name: str = "qgmil",
    epochs: int = 12,
    batch_size: int = 16,
    lr: float = 2e-4,
    seed: int = 0,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Train `model_name` on digit-bags (75/25 stratified split) and return test metrics."""
    torch.manual_seed(seed)
    data = digit_bags(seed=seed)
    train_idx, test_idx = train_test_split(
        np.arange(len(data.bags)), test_size=0.25, stratify=data.labels, random_state=seed
    )
    model = create_model(model_name, in_dim=data.in_dim, num_classes=len(data.classes))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    rng = np.random.default_rng(seed)
    for _ in tqdm(range(epochs), desc=f"training {model_name}", disable=not progress):
        model.train()
        order = rng.permutation(train_idx)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            x, mask = pad_bags([data.bags[i] for i in batch])
            out = model(x, mask)
            loss = F.cross_entropy(out.logits, torch.as_tensor(data.labels[batch]))
            loss = loss + sum(out.aux_losses.values(), torch.zeros(()))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    test_bags = [data.bags[i] for i in test_idx]
    probs, attention = _predict(model, test_bags, batch_size)
    y = data.labels[test_idx]
    pred = probs.argmax(1)
    # Share of attention that lands on the positive digits of positive bags, against the share
    # a uniform attention would give them.
    pos = [i for i, j in enumerate(test_idx) if y[i] == 1]
    hits = [attention[i][data.instance_labels[test_idx[i]] == 1].sum() for i in pos]
    uniform = [data.instance_labels[test_idx[i]].mean() for i in pos]
    metrics = {
        "model": model_name,
        "test_bags": len(test_idx),
        "accuracy": float(accuracy_score(y, pred)),
        "macro_f1": float(f1_score(y, pred, average="macro")),
        "auroc": float(roc_auc_score(y, probs[:, 1])),
        "attention_on_positive_instances": float(np.mean(hits)),
        "uniform_attention_on_positive_instances": float(np.mean(uniform)),
    }
    if out_dir is not None:
        path = save_model(model, Path(out_dir) / "model.safetensors", extra={"dataset": data.name, "classes": data.classes})
        reloaded_probs, _ = _predict(load_model(path), test_bags, batch_size)
        metrics["checkpoint"] = str(path)
        metrics["checkpoint_roundtrip_max_abs_diff"] = float(np.abs(reloaded_probs - probs).max())
    return metrics
