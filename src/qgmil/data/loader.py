"""One call from a dataset to a DataLoader of padded batches."""

from __future__ import annotations

from torch.utils.data import DataLoader

from .collate import collate_bags, collate_packed
from .dataset import MILDataset
from .sampler import BucketBatchSampler


def make_loader(
    dataset: MILDataset,
    batch_size: int | None = 1,
    *,
    batch_instances: int | None = None,
    train: bool = True,
    class_balanced: bool = False,
    num_workers: int = 0,
    seed: int = 0,
    pin_memory: bool = False,
    num_replicas: int = 1,
    rank: int = 0,
    pack: bool = False,
) -> DataLoader:
    """DataLoader yielding `BagBatch`es, length-bucketed. train=False: every bag once, no shuffling.

    A batch holds at most `batch_size` bags (None: no limit) and at most `batch_instances` padded instances
    (None: no limit); a bag longer than the budget goes alone. pack=True yields `PackedBatch`es (bags
    concatenated, no padding; for models with `packable`), where the budget counts real instances.

    Call `set_epoch(loader, epoch)` at the start of each epoch (new shuffle and instance subsets).
    Workers open their own HDF5 handles; they are restarted each epoch so they see the new epoch.
    """
    sampler = BucketBatchSampler(
        dataset.lengths,
        batch_size,
        batch_instances=batch_instances,
        packed=pack,
        shuffle=train,
        class_balanced=class_balanced and train,
        labels=dataset.labels if class_balanced and train else None,
        seed=seed,
        num_replicas=num_replicas,
        rank=rank,
    )
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_packed if pack else collate_bags,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
    )


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """New shuffle (sampler) and new random instance subsets (dataset) for this epoch."""
    loader.batch_sampler.set_epoch(epoch)
    loader.dataset.set_epoch(epoch)
