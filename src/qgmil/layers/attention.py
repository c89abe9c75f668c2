"""Multi-head self-attention with QK normalisation and a sigmoid output gate.

The gate follows "Gated Attention for Large Language Models" (Qiu et al. 2025, used in Qwen3-Next):
the attention output of each head is multiplied by sigmoid(W_g x), one scalar per head ("headwise")
or one per channel ("elementwise"). Attention itself always goes through
`torch.nn.functional.scaled_dot_product_attention`, so no N x N matrix exists unless explicitly asked
for with `weights()` (per-layer attention maps of small bags).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .norm import make_norm
from .segments import Segments, segment_attention

GATES = ("headwise", "elementwise", "none")


class GatedSelfAttention(nn.Module):
    """Self-attention over the instances of a bag.

    Args:
        dim: width of the residual stream.
        heads: number of query heads; `kv_heads` (default `heads`) < `heads` gives grouped-query attention.
        head_dim: width of one head (default dim // heads); heads * head_dim need not equal dim.
        gate: "headwise" | "elementwise" | "none".
        qk_norm: normalise queries and keys per head (RMSNorm or LayerNorm over head_dim, kind `norm`).
    Shapes: x (B, N, dim), attn_mask (B, 1, 1, N) bool with True = may be attended, or None.
    """

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        head_dim: int | None = None,
        kv_heads: int | None = None,
        gate: str = "headwise",
        qk_norm: bool = True,
        norm: str = "rms",
        norm_eps: float = 1e-6,
        qkv_bias: bool = False,
        attn_dropout: float = 0.0,
    ):
        super().__init__()
        if gate not in GATES:
            raise ValueError(f"unknown gate {gate!r}; expected one of {GATES}")
        self.heads = heads
        self.head_dim = head_dim or dim // heads
        self.kv_heads = kv_heads or heads
        if heads % self.kv_heads:
            raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({self.kv_heads})")
        self.gate = gate
        self.attn_dropout = attn_dropout
        inner = heads * self.head_dim
        self.q_proj = nn.Linear(dim, inner, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, self.kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, self.kv_heads * self.head_dim, bias=qkv_bias)
        self.gate_proj = None
        if gate != "none":
            self.gate_proj = nn.Linear(dim, heads if gate == "headwise" else inner, bias=qkv_bias)
        self.q_norm = make_norm(norm, self.head_dim, norm_eps) if qk_norm else nn.Identity()
        self.k_norm = make_norm(norm, self.head_dim, norm_eps) if qk_norm else nn.Identity()
        self.o_proj = nn.Linear(inner, dim, bias=qkv_bias)

    # The forward pass is split into position-wise stages (project, output) around the one
    # global stage (attend), so that callers can run the position-wise ones in instance chunks.

    def project(self, x: torch.Tensor):
        """x (B, n, dim) -> q (B, n, H, hd), k and v (B, n, Hkv, hd), gate (B, n, H, 1 or hd) or None."""
        b, n, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, n, self.heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(b, n, self.kv_heads, self.head_dim))
        v = self.v_proj(x).view(b, n, self.kv_heads, self.head_dim)
        gate = None
        if self.gate_proj is not None:
            gate = torch.sigmoid(self.gate_proj(x)).view(b, n, self.heads, -1)
        return q, k, v, gate

    def attend(self, q, k, v, attn_mask: torch.Tensor | None = None, segments: Segments | None = None) -> torch.Tensor:
        """Scaled dot-product attention; inputs as from `project`, output (B, N, H, hd). With `segments` the
        input is packed bags (B = 1, N = T rows) and each bag attends only to itself (`segment_attention`)."""
        if segments is not None:
            out = segment_attention(q[0], k[0], v[0], segments, dropout_p=self.attn_dropout if self.training else 0.0,
                                    enable_gqa=self.kv_heads != self.heads)
            return out.unsqueeze(0)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=attn_mask,
            dropout_p=self.attn_dropout if self.training else 0.0,
            enable_gqa=self.kv_heads != self.heads,
        )
        return out.transpose(1, 2)

    def output(self, attended: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        """(B, n, H, hd) attended values and gate -> (B, n, dim)."""
        if gate is not None:
            attended = attended * gate
        return self.o_proj(attended.flatten(-2))

    def weights(self, q, k, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Explicit softmax attention (B, H, n_queries, N) for the given queries. O(n_queries * N) memory."""
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        if self.kv_heads != self.heads:
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
        scores = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        return scores.float().softmax(-1).to(q.dtype)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v, gate = self.project(x)
        return self.output(self.attend(q, k, v, attn_mask), gate)
