"""Batching bags of different sizes: pad to the longest and return a bool mask (`BagBatch`), or concatenate
them without padding (`PackedBatch`, for models that take packed bags)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Sequence

import torch

from .dataset import BagItem


def _empty(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """Uninitialised output; inside a DataLoader worker, straight in shared memory (as torch's default
    collate does), so sending the batch to the main process costs no second copy."""
    if torch.utils.data.get_worker_info() is not None:
        storage = like.untyped_storage()._new_shared(math.prod(shape) * like.element_size())
        return like.new_empty(0).set_(storage).view(shape)
    return like.new_empty(shape)


def pad_bags(bags: Sequence[torch.Tensor], pad_value: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """bags: list of (N_i, D) -> x (B, max N_i, D), mask (B, max N_i) bool with True = real instance.

    A single bag outside a worker is returned as a view (no copy): at batch size 1, the usual one for
    whole-slide bags, copying 100k x 1024 floats would cost more than reading them.
    """
    if not bags:
        raise ValueError("pad_bags needs at least one bag")
    dims = {tuple(b.shape[1:]) for b in bags}
    if len(dims) != 1:
        raise ValueError(f"bags have different feature dimensions {sorted(dims)}")
    lengths = torch.tensor([b.shape[0] for b in bags])
    longest = int(lengths.max())
    mask = torch.arange(longest).unsqueeze(0) < lengths.unsqueeze(1)
    if len(bags) == 1 and torch.utils.data.get_worker_info() is None:
        return bags[0].unsqueeze(0), mask
    x = _empty((len(bags), longest, *bags[0].shape[1:]), bags[0])
    for i, bag in enumerate(bags):
        x[i, : len(bag)] = bag
        x[i, len(bag) :] = pad_value  # only the padded tail is written twice
    return x, mask


class _Batch:
    """What both kinds of batch share: their length (bags) and moving all their tensors at once."""

    def __len__(self) -> int:
        return len(self.bag_ids)

    def _map(self, fn):
        return type(self)(**{
            f.name: fn(v) if isinstance(v := getattr(self, f.name), torch.Tensor) else v for f in fields(self)
        })

    def to(self, device, non_blocking: bool = False):
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self):
        """Called by DataLoader(pin_memory=True) for faster host-to-GPU copies."""
        return self._map(torch.Tensor.pin_memory)


@dataclass
class BagBatch(_Batch):
    """A padded batch. x (B, N, D) float32, mask (B, N) bool (True = real), labels (B,) int64
    (-1 = unlabelled), index (B,) dataset positions, bag_ids, coords (B, N, 2) or None, targets (B, T) float32
    (the other tasks' targets) or None."""

    x: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    bag_ids: list[str]
    coords: torch.Tensor | None = None
    targets: torch.Tensor | None = None

    def inputs(self) -> tuple[tuple, dict]:
        """(args, kwargs) of the model call: model(x, mask)."""
        return (self.x, self.mask), {}


@dataclass
class PackedBatch(_Batch):
    """Bags concatenated without padding. x (T, D) float32 with T = sum of lengths, the rows of bag i at
    offsets[i]:offsets[i + 1]; lengths (B,) int64; labels (B,) int64 (-1 = unlabelled), index (B,), bag_ids,
    targets (B, T) float32 or None (as `BagBatch`)."""

    x: torch.Tensor
    lengths: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    bag_ids: list[str]
    targets: torch.Tensor | None = None

    @property
    def mask(self) -> torch.Tensor:
        """(B, max length) bool: where the padded outputs of a packed model call (attention) are real."""
        return torch.arange(int(self.lengths.max()), device=self.lengths.device) < self.lengths.unsqueeze(1)

    def inputs(self) -> tuple[tuple, dict]:
        """(args, kwargs) of the model call: model(x, lengths=lengths)."""
        return (self.x,), {"lengths": self.lengths}


def pack_bags(bags: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """bags: list of (N_i, D) -> x (sum N_i, D) concatenated, lengths (B,) int64. One bag: a view, no copy."""
    if not bags:
        raise ValueError("pack_bags needs at least one bag")
    lengths = torch.tensor([b.shape[0] for b in bags], dtype=torch.long)
    if len(bags) == 1 and torch.utils.data.get_worker_info() is None:
        return bags[0], lengths
    x = _empty((int(lengths.sum()), *bags[0].shape[1:]), bags[0])
    torch.cat(list(bags), out=x)
    return x, lengths


def _bag_fields(items: Sequence[BagItem]) -> dict:
    """labels, index, bag_ids and targets of a batch, whichever way its features are laid out."""
    targets = None
    if all(item.target is not None for item in items):
        targets = torch.stack([item.target for item in items])
    return {"labels": torch.tensor([item.label for item in items], dtype=torch.long),
            "index": torch.tensor([item.index for item in items], dtype=torch.long),
            "bag_ids": [item.bag_id for item in items], "targets": targets}


def collate_bags(items: Sequence[BagItem]) -> BagBatch:
    """DataLoader collate_fn for MILDataset items."""
    x, mask = pad_bags([item.features for item in items])
    coords = None
    if all(item.coords is not None for item in items):
        coords, _ = pad_bags([item.coords for item in items])
    return BagBatch(x=x, mask=mask, coords=coords, **_bag_fields(items))


def collate_packed(items: Sequence[BagItem]) -> PackedBatch:
    """DataLoader collate_fn for models that take packed bags (no padding)."""
    x, lengths = pack_bags([item.features for item in items])
    return PackedBatch(x=x, lengths=lengths, **_bag_fields(items))
