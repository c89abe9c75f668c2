"""Bag data: feature files, dataset tables, patient-level splits, padded or packed batching, built-in datasets."""

from .bagfile import (
    Bag, BagFileError, BagInfo, BagLimits, inspect_bag, read_attrs, read_bag, read_coords, read_extra, read_features,
    write_bag,
)
from .builtin import BagDataset, dataset_info, digit_bags, list_datasets, prepare_dataset
from .collate import BagBatch, PackedBatch, collate_bags, collate_packed, pack_bags, pad_bags
from .dataset import BagItem, MILDataset, auto_cache_limit
from .loader import make_loader, set_epoch
from .sampler import BucketBatchSampler, padding_fraction
from .splits import Fold, Splits, load_or_make_splits, make_splits, splits_from_table
from .table import Columns, DataError, read_table
from .validate import DataReport, check_dataset

__all__ = [
    "Bag", "BagBatch", "BagDataset", "BagFileError", "BagInfo", "BagLimits", "BagItem", "BucketBatchSampler", "Columns",
    "DataError", "DataReport", "Fold", "MILDataset", "PackedBatch", "Splits", "check_dataset", "collate_bags",
    "collate_packed", "dataset_info", "pack_bags",
    "digit_bags", "list_datasets", "prepare_dataset",
    "inspect_bag", "load_or_make_splits", "make_loader", "make_splits", "pad_bags", "padding_fraction",
    "read_attrs", "read_bag", "read_coords", "read_extra", "read_features", "read_table", "set_epoch",
    "splits_from_table", "write_bag", "auto_cache_limit",
]
