"""Length-bucketing batch sampler: batches hold bags of similar size, so little compute goes to padding."""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


class BucketBatchSampler(Sampler[list[int]]):
    """Yields lists of dataset indices.

    Training (shuffle=True): each epoch shuffles the bags, cuts them into pools of
    `batch_size * pool_batches`, sorts each pool by length, cuts batches, and shuffles the batch order;
    randomness stays while padding shrinks. class_balanced=True draws len(lengths) bags with
    replacement, each class equally likely (for imbalanced data). Evaluation (shuffle=False): all bags
    sorted by length, every bag exactly once.
    Under torch.distributed, `batch_size` is the global batch: rank r of `num_replicas` takes
    batch[r::num_replicas] of every batch, so all ranks run the same steps and a step sees exactly
    the bags a single process would (with per-bag loss weights this gives the same gradient). A rank
    whose share is empty (a batch smaller than the number of ranks) gets the batch's first bag as a
    stand-in that must carry zero weight: `step_plan()` says which. Reproducible from (seed, epoch):
    call `set_epoch` each epoch.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        shuffle: bool = True,
        class_balanced: bool = False,
        labels: Sequence[int] | None = None,
        pool_batches: int = 32,
        drop_last: bool = False,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.class_balanced = class_balanced
        self.pool_batches = pool_batches
        self.drop_last = drop_last
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        if class_balanced:
            if labels is None:
                raise ValueError("class_balanced sampling needs labels")
            labels = np.asarray(labels)
            if (labels < 0).any():
                raise ValueError("class_balanced sampling needs every bag labelled")
            counts = np.bincount(labels)
            weights = 1.0 / counts[labels]
            self.weights = weights / weights.sum()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _all_batches(self) -> list[list[int]]:
        n = len(self.lengths)
        rng = np.random.default_rng([self.seed, self.epoch])
        if not self.shuffle:
            order = np.argsort(self.lengths, kind="stable")
            return [order[i : i + self.batch_size].tolist() for i in range(0, n, self.batch_size)]
        if self.class_balanced:
            order = rng.choice(n, size=n, replace=True, p=self.weights)
        else:
            order = rng.permutation(n)
        pool = self.batch_size * self.pool_batches
        batches = []
        for start in range(0, n, pool):
            chunk = order[start : start + pool]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            batches += [chunk[i : i + self.batch_size].tolist() for i in range(0, len(chunk), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        rng.shuffle(batches)
        return batches

    def _shares(self) -> list[tuple[list[int], int, bool]]:
        """This rank's (indices, global batch size, is_stand_in) for every step of the epoch."""
        shares = []
        for batch in self._all_batches():
            mine = batch[self.rank :: self.num_replicas]
            shares.append((mine, len(batch), False) if mine else ([batch[0]], len(batch), True))
        return shares

    def step_plan(self) -> list[tuple[int, bool]]:
        """(global batch size, is_stand_in) per step of the current epoch, in iteration order."""
        return [(size, stand_in) for _, size, stand_in in self._shares()]

    def __iter__(self) -> Iterator[list[int]]:
        return iter([indices for indices, _, _ in self._shares()])

    def __len__(self) -> int:
        n_batches = math.ceil(len(self.lengths) / self.batch_size)
        if self.shuffle and self.drop_last and len(self.lengths) % self.batch_size:
            n_batches -= 1
        return n_batches


def padding_fraction(batches: list[list[int]], lengths: Sequence[int]) -> float:
    """Share of padded positions in the given batches (0 = no compute spent on padding)."""
    lengths = np.asarray(lengths)
    real = sum(int(lengths[b].sum()) for b in batches)
    padded = sum(int(lengths[b].max()) * len(b) for b in batches)
    return 1.0 - real / padded if padded else 0.0
