"""Bag data: built-in datasets and batching."""

from .builtin import BagDataset, digit_bags
from .collate import pad_bags

__all__ = ["BagDataset", "digit_bags", "pad_bags"]
