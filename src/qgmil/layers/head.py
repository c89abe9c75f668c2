"""Bag classifier head: a two-layer MLP on the pooled bag embedding."""

from __future__ import annotations

import torch
from torch import nn


class ClassifierHead(nn.Module):
    """Linear -> ReLU -> dropout -> Linear: (B, dim) -> (B, num_classes). QG-MIL's head (hidden = dim / 2).

    Parameters (creation order): `fc1` (hidden, dim), `fc2` (num_classes, hidden), both with bias.
    """

    def __init__(self, dim: int, hidden: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))
