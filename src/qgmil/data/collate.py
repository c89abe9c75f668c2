"""Batching bags of different sizes: pad to the longest and return a bool mask."""

from __future__ import annotations

from typing import Sequence

import torch


def pad_bags(bags: Sequence[torch.Tensor], pad_value: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """bags: list of (N_i, D) -> x (B, max N_i, D), mask (B, max N_i) bool with True = real instance."""
    if not bags:
        raise ValueError("pad_bags needs at least one bag")
    dims = {b.shape[-1] for b in bags}
    if len(dims) != 1:
        raise ValueError(f"bags have different feature dimensions {sorted(dims)}")
    lengths = torch.tensor([b.shape[0] for b in bags])
    x = torch.nn.utils.rnn.pad_sequence(list(bags), batch_first=True, padding_value=pad_value)
    mask = torch.arange(x.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
    return x, mask
