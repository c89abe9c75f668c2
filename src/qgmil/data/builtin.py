"""Built-in datasets that need no download."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class BagDataset:
    """Bags in memory. bags[i]: (N_i, D) float32; labels[i]: int; instance_labels[i]: (N_i,) or None."""

    name: str
    bags: list[torch.Tensor]
    labels: np.ndarray
    classes: list[str]
    instance_labels: list[np.ndarray] | None = None

    @property
    def in_dim(self) -> int:
        return int(self.bags[0].shape[1])


def digit_bags(
    n_bags: int = 400, min_size: int = 8, max_size: int = 24, positive_digit: int = 9, seed: int = 0
) -> BagDataset:
    """Bags of 8x8 handwritten digits (scikit-learn's `load_digits`, 64 features scaled to [0, 1]).

    A bag is positive when it holds at least one `positive_digit` (the classic MIL assumption).
    Half the bags are positive, each with 1-3 positive instances, so a good aggregator must find a
    few key instances among many. Instance labels (1 = positive digit) are kept for localisation.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    features = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    is_pos = digits.target == positive_digit
    pos_idx, neg_idx = np.flatnonzero(is_pos), np.flatnonzero(~is_pos)
    rng = np.random.default_rng(seed)
    bags, labels, inst = [], [], []
    for i in range(n_bags):
        size = int(rng.integers(min_size, max_size + 1))
        label = i % 2
        n_pos = int(rng.integers(1, 4)) if label else 0
        idx = np.concatenate([rng.choice(pos_idx, n_pos), rng.choice(neg_idx, size - n_pos)])
        rng.shuffle(idx)
        bags.append(features[idx])
        labels.append(label)
        inst.append(is_pos[idx].astype(np.int64))
    return BagDataset("digit-bags", bags, np.array(labels), ["negative", "positive"], inst)
