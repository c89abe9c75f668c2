"""Instance embedding: the position-wise Linear -> ReLU -> dropout that most baselines put before pooling."""

from __future__ import annotations

import torch
from torch import nn


class InstanceEmbed(nn.Module):
    """Linear -> ReLU -> dropout, position-wise: (B, N, in_dim) -> (B, N, dim).

    The instance embedding of ABMIL, CLAM and the mean/max-pooling baselines (CLAM's Linear(1024, 512)
    -> ReLU -> Dropout(0.25)) and, without bias or dropout, DTFD-MIL's DimReduction.
    Parameters: `proj` (weight (dim, in_dim), bias (dim,) unless bias=False). dropout 0 draws nothing.
    """

    def __init__(self, in_dim: int, dim: int, dropout: float = 0.0, *, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(in_dim, dim, bias=bias)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.act(self.proj(x)))
