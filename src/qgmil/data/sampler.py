"""Length-bucketing batch sampler: batches hold bags of similar size, so little compute goes to padding."""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


class BucketBatchSampler(Sampler[list[int]]):
    """Yields lists of dataset indices.

    A batch holds at most `batch_size` bags (None: no limit) and, with `batch_instances`, at most that
    many padded instances (bags x longest bag, as fairseq's max-tokens; with `packed`, the sum of their
    lengths, since packed batches hold no padding), so many small bags share a step while a bag longer
    than the budget goes alone. Training (shuffle=True): each epoch shuffles
    the bags, cuts them into pools of about `pool_batches` batches, sorts each pool by length, cuts
    batches, and shuffles the batch order; randomness stays while padding shrinks. class_balanced=True draws len(lengths) bags with
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
        batch_size: int | None,
        *,
        batch_instances: int | None = None,
        packed: bool = False,
        shuffle: bool = True,
        class_balanced: bool = False,
        labels: Sequence[int] | None = None,
        pool_batches: int = 32,
        drop_last: bool = False,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        if batch_size is None and batch_instances is None:
            raise ValueError("give batch_size, batch_instances or both")
        for name, value in (("batch_size", batch_size), ("batch_instances", batch_instances)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size = batch_size
        self.batch_instances = batch_instances
        self.packed = packed
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

    def _cut(self, order: np.ndarray) -> list[list[int]]:
        """Consecutive batches of `order` (sorted by length), each within both limits."""
        if self.batch_instances is None:
            return [order[i : i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size)]
        batches, start, total = [], 0, 0
        most = self.batch_size or len(order)
        for i in range(len(order) + 1):
            if i > start:  # close order[start:i] before adding bag i if that would break a limit
                n = int(self.lengths[order[i]]) if i < len(order) else 0
                # sorted ascending, so bag i would be the longest of the batch
                size = total + n if self.packed else (i + 1 - start) * n
                if i == len(order) or i - start >= most or size > self.batch_instances:
                    batches.append(order[start:i].tolist())
                    start, total = i, 0
            if i < len(order):
                total += int(self.lengths[order[i]])
        return batches

    def _pool_size(self) -> int:
        """Bags per sorting pool: `pool_batches` batches of the typical size."""
        if self.batch_instances is None:
            return self.batch_size * self.pool_batches
        typical = max(1, self.batch_instances // max(1, int(np.median(self.lengths)) if len(self.lengths) else 1))
        return min(self.batch_size or typical, typical) * self.pool_batches

    def _all_batches(self) -> list[list[int]]:
        n = len(self.lengths)
        rng = np.random.default_rng([self.seed, self.epoch])
        if not self.shuffle:
            return self._cut(np.argsort(self.lengths, kind="stable"))
        if self.class_balanced:
            order = rng.choice(n, size=n, replace=True, p=self.weights)
        else:
            order = rng.permutation(n)
        pool = self._pool_size()
        batches = []
        for start in range(0, n, pool):
            chunk = order[start : start + pool]
            batches += self._cut(chunk[np.argsort(self.lengths[chunk], kind="stable")])
        if self.drop_last and batches and self.batch_instances is None and len(batches[-1]) < self.batch_size:
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
        if self.batch_instances is not None:  # depends on the epoch's shuffle
            return len(self._all_batches())
        n_batches = math.ceil(len(self.lengths) / self.batch_size)
        if self.shuffle and self.drop_last and len(self.lengths) % self.batch_size:
            n_batches -= 1
        return n_batches

    def steps_per_epoch(self, epochs: range) -> list[int]:
        """Batches in each of `epochs` (they vary with the shuffle under an instance budget)."""
        current = self.epoch
        try:
            counts = []
            for epoch in epochs:
                self.set_epoch(epoch)
                counts.append(len(self))
            return counts
        finally:
            self.set_epoch(current)


def padding_fraction(batches: list[list[int]], lengths: Sequence[int]) -> float:
    """Share of padded positions in the given batches (0 = no compute spent on padding)."""
    lengths = np.asarray(lengths)
    real = sum(int(lengths[b].sum()) for b in batches)
    padded = sum(int(lengths[b].max()) * len(b) for b in batches)
    return 1.0 - real / padded if padded else 0.0
