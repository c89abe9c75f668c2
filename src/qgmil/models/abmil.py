"""ABMIL: attention-based deep MIL (Ilse, Tomczak & Welling 2018, ICML).

    instances (B, N, in_dim)
      -> embed: Linear -> ReLU -> dropout                              h (B, N, dim)
      -> attention pooling                                             a (B, N), z (B, dim)
           plain (eq. 8):  a_i = softmax_i(w^T tanh(V h_i))
           gated (eq. 9):  a_i = softmax_i(w^T (tanh(V h_i) * sigmoid(U h_i)))
           z = sum_i a_i h_i
      -> head: Linear(dim, num_classes)                                (B, num_classes)

One architecture ("abmil"); `gated` selects the attention of eq. 9 instead of eq. 8, so the
`abmil` and `abmil_gated` presets differ in that one flag (and the gate parameters U exist only
when gated).

Defaults and where they come from:
  dim = 512       CLAM's ABMIL-style setup on precomputed WSI features (Lu et al. 2021, Nat. Biomed.
                  Eng.; CLAM "small" size [1024, 512, 256]: Linear(1024, 512) -> ReLU -> Dropout).
  attn_dim = 128  the paper's D = 128 for an embedding of L = 500 (official AttentionDeepMIL code),
                  i.e. the same ratio at dim 512. CLAM uses 256 here; pass attn_dim=256 to match it.
  dropout = 0.25  CLAM's dropout after the instance embedding (p = 0.25). CLAM also puts dropout in
                  its attention branches; the paper's equations have none, and neither do we.
  Linear layers keep biases and PyTorch's default initialisation, as the official AttentionDeepMIL
  code (the paper writes V, U, w without biases; a bias on w is a no-op under the softmax).

Padding is masked: padded instances get attention exactly 0, and since `as_batch` zeroes them, no
padding value reaches the logits. At inference (no gradient) the instance embedding and the
attention scores run in chunks of `inference_chunk` instances, so 100k-instance bags stay lean.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers import AttentionPool, InstanceEmbed, map_instances
from .base import MILModel, MILOutput, ModelConfig, as_batch, as_packed, unpack_output
from .fields import DropoutRate, PositiveInt
from .search import Choice, DROPOUT
from .registry import register_arch, register_presets


class ABMILConfig(ModelConfig):
    dim: PositiveInt = 512
    """Width of the instance embedding h (the paper's L; 512 as in CLAM's ABMIL-style setup)."""
    attn_dim: PositiveInt = 128
    """Hidden width of the attention network (the paper's D = 128)."""
    gated: bool = False
    """Gated attention (eq. 9, with sigmoid(U h) gate) instead of plain tanh attention (eq. 8)."""
    dropout: DropoutRate = 0.25
    """Dropout after the instance embedding (CLAM's p = 0.25)."""


@register_arch
class ABMIL(MILModel):
    """ABMIL aggregator. forward(x (B, N, in_dim) or (N, in_dim), mask (B, N) bool or None) -> MILOutput."""

    arch = "abmil"
    Config = ABMILConfig
    search_space = {"dropout": DROPOUT, "attn_dim": Choice((64, 128, 256))}

    def __init__(self, config: ABMILConfig):
        super().__init__(config)
        cfg = config
        self.embed = InstanceEmbed(cfg.in_dim, cfg.dim, cfg.dropout)
        # One branch, no norm, no dropout: exactly eq. 8 / eq. 9 (z = sum a_i h_i).
        self.pool = AttentionPool(cfg.dim, cfg.attn_dim, gated=cfg.gated)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)

    packable = True

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, *, labels: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
    ) -> MILOutput:
        """x (B, N, in_dim), mask (B, N) bool, True = real instance; or packed x (T, in_dim) with lengths (B,).
        labels unused (no auxiliary loss)."""
        chunk = None if torch.is_grad_enabled() else self.inference_chunk
        if lengths is not None:
            x, segments = as_packed(x, lengths, self.config.in_dim)
            h = map_instances(self.embed, x, chunk=chunk)[0]  # (T, dim)
            embedding, attention = self.pool.attend_packed(h, segments, chunk=chunk)  # (B, dim), (T,)
            return unpack_output(MILOutput(self.head(embedding), attention, embedding), segments)
        x, mask = as_batch(x, mask, self.config.in_dim)
        h = map_instances(self.embed, x, chunk=chunk)  # (B, N, dim)
        embedding, attention = self.pool(h, mask, chunk=chunk)  # (B, dim), (B, N)
        logits = self.head(embedding)  # (B, num_classes)
        return MILOutput(logits=logits, attention=attention, embedding=embedding)


# ---------------------------------------------------------------------------------------------
# Presets.

PRESETS: dict[str, dict] = {
    "abmil": dict(gated=False),
    "abmil_gated": dict(gated=True),
}

DESCRIPTIONS = {
    "abmil": "ABMIL (Ilse et al. 2018): attention pooling a_i = softmax(w^T tanh(V h_i))",
    "abmil_gated": "gated ABMIL (Ilse et al. 2018): a_i = softmax(w^T (tanh(V h_i) * sigmoid(U h_i)))",
}


register_presets(ABMIL, PRESETS, DESCRIPTIONS)
