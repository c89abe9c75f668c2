"""Bag pooling: instance states (B, N, D) + mask (B, N) -> bag embedding (B, D) + attention (B, N).

Every pooling returns an attention over instances that sums to 1 over the real instances and is
exactly 0 on padding, so explanations work the same way for every model. `AttentionPool` with K
branches gives one of each per branch: (B, K, D) + (B, K, N).
"""

from __future__ import annotations

import torch
from torch import nn

from .chunking import map_instances
from .segments import Segments


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last dim with masked-out (False) entries exactly 0. scores (B, N), mask (B, N)."""
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.float().softmax(-1).to(scores.dtype)


def weighted_sum(attention: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """attention (B, N), x (B, N, D) -> (B, D)."""
    return torch.bmm(attention.unsqueeze(1).to(x.dtype), x).squeeze(1)


class AttentionPool(nn.Module):
    """Attention pooling with one or K branches (Ilse et al. 2018), the scorer of ABMIL, CLAM, ACMIL,
    DTFD-MIL and QG-MIL.

    Scores of instance i (h_i the row of x, after `norm` when given), one per branch k:
        gated (eq. 9): s_ik = w_k^T (drop(tanh(V h_i)) * drop(sigmoid(U h_i))) + c_k
        plain (eq. 8): s_ik = w_k^T drop(tanh(V h_i)) + c_k
    a_k = softmax_i(s_ik) over the real instances (exactly 0 on padding), z_k = sum_i a_ik h_i.
    The K branches share V (and U); `attn_w` maps attn_dim -> K.

    Args:
        dim: instance width D.
        attn_dim: hidden width of the attention network (rows of V and U).
        gated: add the sigmoid(U h) gate (U exists only then).
        branches: K, the number of attention branches (CLAM-MB: one per class; ACMIL: its tokens).
        dropout: dropout after tanh and after sigmoid (CLAM's attention net); 0 = none.
        norm: applied to the instances first; the pooled vector is then a weighted sum of the
            *normalised* instances (QG-MIL). Default Identity (not applied).

    Parameters (creation order): norm's, attn_v, attn_u (gated only), attn_w.

    Padded rows never reach the scores of real rows or the attention; the pooled vector reads every
    row with weight 0 on padding, so padded rows must be finite there (models zero them in `as_batch`).
    """

    def __init__(
        self,
        dim: int,
        attn_dim: int,
        *,
        gated: bool = True,
        branches: int = 1,
        dropout: float = 0.0,
        norm: nn.Module | None = None,
    ):
        super().__init__()
        self.gated = gated
        self.branches = branches
        self.norm = norm if norm is not None else nn.Identity()
        self.attn_v = nn.Linear(dim, attn_dim)
        self.attn_u = nn.Linear(dim, attn_dim) if gated else None
        self.attn_w = nn.Linear(attn_dim, branches)
        self.drop = nn.Dropout(dropout)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Unnormalised attention logits of already normalised instances, position-wise: (B, n, D) -> (B, n, K)."""
        inner = self.drop(torch.tanh(self.attn_v(x)))
        if self.attn_u is not None:
            inner = inner * self.drop(torch.sigmoid(self.attn_u(x)))
        return self.attn_w(inner)

    def scores(self, x: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """`score` over the bag, `chunk` instances at a time when set: (B, N, D) -> (B, K, N). No norm, no mask."""
        return map_instances(self.score, x, chunk=chunk).transpose(1, 2)

    def attend(self, x: torch.Tensor, mask: torch.Tensor | None = None, chunk: int | None = None):
        """Every branch: x (B, N, D), mask (B, N) bool (True = real) or None ->
        pooled (B, K, D), attention (B, K, N), scores (B, K, N) (the logits, padding not masked)."""
        if not isinstance(self.norm, nn.Identity):
            x = map_instances(self.norm, x, chunk=chunk)
        scores = self.scores(x, chunk)
        attention = masked_softmax(scores, None if mask is None else mask.unsqueeze(1))
        return torch.bmm(attention.to(x.dtype), x), attention, scores

    def attend_packed(self, x: torch.Tensor, segments: Segments, chunk: int | None = None):
        """Packed bags (see `layers.segments`): x (T, D) -> pooled (B, D), attention (T,) with one branch;
        (B, K, D), (K, T) with K > 1. The same numbers as `forward` on the padded batch."""
        x = x.unsqueeze(0)
        if not isinstance(self.norm, nn.Identity):
            x = map_instances(self.norm, x, chunk=chunk)
        scores, x = self.scores(x, chunk)[0], x[0]  # (K, T), (T, D)
        attention = torch.stack([segments.softmax(s) for s in scores])
        pooled = torch.stack([segments.weighted_sum(a, x) for a in attention], dim=1)
        if self.branches == 1:
            return pooled[:, 0], attention[0]
        return pooled, attention

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, chunk: int | None = None):
        """x (B, N, D), mask (B, N) or None -> pooled (B, D), attention (B, N) with one branch;
        (B, K, D), (B, K, N) with K > 1. `chunk`: score (and normalise) that many instances at a time."""
        pooled, attention, _ = self.attend(x, mask, chunk)
        if self.branches == 1:
            return pooled.squeeze(1), attention.squeeze(1)
        return pooled, attention


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
