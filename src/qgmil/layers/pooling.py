"""Bag pooling: instance states (B, N, D) + mask (B, N) -> bag embedding (B, D) + attention (B, N).

Every pooling returns an attention over instances that sums to 1 over the real instances and is
exactly 0 on padding, so explanations work the same way for every model.
"""

from __future__ import annotations

import torch
from torch import nn

from .chunking import map_instances


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last dim with masked-out (False) entries exactly 0. scores (B, N), mask (B, N)."""
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.float().softmax(-1).to(scores.dtype)


def weighted_sum(attention: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """attention (B, N), x (B, N, D) -> (B, D)."""
    return torch.bmm(attention.unsqueeze(1).to(x.dtype), x).squeeze(1)


class GatedAttentionPool(nn.Module):
    """Gated attention pooling (Ilse et al. 2018): a_i = softmax_i(w^T (tanh(V h_i) * sigmoid(U h_i))).

    `norm` (optional) is applied to the instances first and the pooled vector is a weighted sum
    of the normalised instances, as in QG-MIL.
    """

    def __init__(self, dim: int, attn_dim: int, norm: nn.Module | None = None):
        super().__init__()
        self.norm = norm if norm is not None else nn.Identity()
        self.attn_v = nn.Linear(dim, attn_dim)
        self.attn_u = nn.Linear(dim, attn_dim)
        self.attn_w = nn.Linear(attn_dim, 1)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Unnormalised attention logits, (B, n, D) -> (B, n)."""
        return self.attn_w(torch.tanh(self.attn_v(x)) * torch.sigmoid(self.attn_u(x))).squeeze(-1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, chunk: int | None = None):
        x = map_instances(self.norm, x, chunk=chunk)
        attention = masked_softmax(map_instances(self.score, x, chunk=chunk), mask)
        return weighted_sum(attention, x), attention


def mean_pool(x: torch.Tensor, mask: torch.Tensor | None = None):
    """Mean over real instances; the attention is uniform over them."""
    if mask is None:
        attention = x.new_full(x.shape[:2], 1.0 / x.shape[1])
    else:
        attention = mask.to(x.dtype) / mask.sum(1, keepdim=True).to(x.dtype)
    return weighted_sum(attention, x), attention


def max_pool(x: torch.Tensor, mask: torch.Tensor | None = None):
    """Channel-wise max over real instances.

    The attention of an instance is the share of channels whose maximum it holds, the exact
    contribution of each instance to the pooled vector. A channel whose maximum several instances
    hold (common after a ReLU: all zero) is split equally between them, so the attention does not
    depend on the order of the instances; `amax` spreads the gradient over them the same way.
    """
    if mask is not None:
        x = x.masked_fill(~mask.unsqueeze(-1), float("-inf"))
    pooled = x.amax(dim=1)  # (B, D)
    holds = x == pooled.unsqueeze(1)  # (B, N, D); padding (-inf) never holds a maximum of real values
    share = 1.0 / (holds.sum(1).float() * x.shape[-1])  # (B, D): each channel's 1/D split over its holders
    attention = torch.bmm(holds.float(), share.unsqueeze(-1)).squeeze(-1)
    return pooled, attention.to(x.dtype)
