"""Attention scores with one or several branches (ABMIL-style, as CLAM and ACMIL use them)."""

from __future__ import annotations

import torch
from torch import nn


class BranchAttention(nn.Module):
    """Unnormalised attention scores of `branches` branches sharing V (and U): (B, n, dim) -> (B, n, branches).

    gated: s_k(h) = w_k^T (drop(tanh(V h)) * drop(sigmoid(U h))) + c_k  (Ilse et al. 2018, eq. 9);
    plain: s_k(h) = w_k^T drop(tanh(V h)) + c_k.
    One branch per class is CLAM-MB's attention net, T shared-projection branches ACMIL's.
    """

    def __init__(self, dim: int, attn_dim: int, branches: int = 1, gated: bool = True, dropout: float = 0.0):
        super().__init__()
        self.attn_v = nn.Linear(dim, attn_dim)
        self.attn_u = nn.Linear(dim, attn_dim) if gated else None
        self.attn_w = nn.Linear(attn_dim, branches)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        inner = self.drop(torch.tanh(self.attn_v(h)))
        if self.attn_u is not None:
            inner = inner * self.drop(torch.sigmoid(self.attn_u(h)))
        return self.attn_w(inner)
