"""QG-MIL: a gated transformer aggregator (Zedda et al. 2026).

    instances (B, N, in_dim)
      -> embed: Linear -> norm -> dropout                              (B, N, dim)
      -> depth x pre-norm block:
           h = h + drop(GatedSelfAttention(norm(h)))    QK-norm, sigmoid output gate, SDPA
           h = h + drop(FFN(norm(h)))                   SwiGLU
      -> final norm -> pooling (gated attention by default)            (B, dim)
      -> head: Linear(dim, dim/2) -> ReLU -> dropout -> Linear         (B, num_classes)

Each of the paper's four components is one config field, so an ablation is one flag:
`norm` ("rms" | "layer"), `qk_norm` (bool), `gate` ("headwise" | "elementwise" | "none"),
`ffn` ("swiglu" | "mlp").

The registered presets reproduce the official code numerically (see `qgmil.convert`), including its
quirks: head_dim is 512 // heads whatever `dim` is, the FFN is 2048 wide whatever `dim` is, the
input/final/pooling norms use the library-default eps while block and QK norms use `norm_eps`, and
`qgmil_layernorm` also switches QK-norm off. Differences from the official code, all deliberate:
padding is masked everywhere (official max pooling ignores the mask, and padded values could leak
NaN into its pooled vector), "cls" pooling really uses a CLS token, and at inference the
position-wise layers run in instance chunks so that 100k-instance bags fit in a few GiB.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import model_validator
from torch import nn

from ..layers import (
    AttentionPool,
    ClassifierHead,
    GatedSelfAttention,
    Segments,
    make_ffn,
    make_norm,
    map_instances,
    max_pool,
    mean_pool,
)
from .base import MILModel, MILOutput, ModelConfig, as_batch, as_packed, unpack_output
from .fields import DropoutRate, PositiveInt
from .search import Choice, DROPOUT
from .registry import register_arch, register_presets


class QGMILConfig(ModelConfig):
    dim: PositiveInt = 512
    """Width of the residual stream (official: embed_dim / hidden_size)."""
    depth: PositiveInt = 1
    heads: PositiveInt = 8
    kv_heads: PositiveInt | None = None
    """Key/value heads; fewer than `heads` gives grouped-query attention. Default: heads."""
    head_dim: PositiveInt | None = None
    """Width of one head. Default dim // heads (the official presets fix it at 512 // heads)."""
    ffn_dim: int | None = None
    """Hidden width of the feed-forward layer. Default 4 * dim (the official presets fix it at 2048)."""
    norm: Literal["rms", "layer"] = "rms"
    qk_norm: bool = True
    gate: Literal["headwise", "elementwise", "none"] = "headwise"
    ffn: Literal["swiglu", "mlp"] = "swiglu"
    act: Literal["silu", "gelu", "relu"] = "silu"
    """Activation of the FFN (the SiLU in SwiGLU)."""
    pooling: Literal["gated_attention", "mean", "max", "cls"] = "gated_attention"
    dropout: DropoutRate = 0.25
    attn_dropout: DropoutRate = 0.0
    qkv_bias: bool = False
    """Biases on the q, k, v, gate and output projections."""
    norm_eps: float = 1e-6
    """Epsilon of the block and QK norms (the other norms use their library default)."""

    @model_validator(mode="after")
    def _check(self):
        if self.head_dim is None and self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) is not divisible by heads ({self.heads}); set head_dim")
        if self.kv_heads is not None and self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        return self


class QGMILBlock(nn.Module):
    """Pre-norm transformer block. h (B, N, dim) -> (B, N, dim)."""

    def __init__(self, cfg: QGMILConfig):
        super().__init__()
        self.attn_norm = make_norm(cfg.norm, cfg.dim, cfg.norm_eps)
        self.attn = GatedSelfAttention(
            cfg.dim,
            heads=cfg.heads,
            head_dim=cfg.head_dim,
            kv_heads=cfg.kv_heads,
            gate=cfg.gate,
            qk_norm=cfg.qk_norm,
            norm=cfg.norm,
            norm_eps=cfg.norm_eps,
            qkv_bias=cfg.qkv_bias,
            attn_dropout=cfg.attn_dropout,
        )
        self.ffn_norm = make_norm(cfg.norm, cfg.dim, cfg.norm_eps)
        self.ffn = make_ffn(cfg.ffn, cfg.dim, cfg.ffn_dim or 4 * cfg.dim, cfg.act)
        self.drop = nn.Dropout(cfg.dropout)

    def _project(self, h):
        return self.attn.project(self.attn_norm(h))

    def _ffn(self, h):
        return self.ffn(self.ffn_norm(h))

    def forward(self, h, attn_mask=None, chunk: int | None = None, weights_of: slice | None = None,
                segments: Segments | None = None):
        """Returns (h, attention weights of the queries `weights_of` (B, H, q, N) or None). With `segments`,
        h (1, T, dim) holds packed bags and each attends only to itself."""
        q, k, v, gate = map_instances(self._project, h, chunk=chunk)
        attended = self.attn.attend(q, k, v, attn_mask, segments=segments)
        weights = None if weights_of is None else self.attn.weights(q[:, weights_of], k, attn_mask)
        del q, k, v
        h = h + self.drop(map_instances(self.attn.output, attended, gate, chunk=chunk))
        del attended, gate
        h = h + self.drop(map_instances(self._ffn, h, chunk=chunk))
        return h, weights


class NormEmbed(nn.Module):
    """Linear -> norm -> dropout, (B, N, in_dim) -> (B, N, dim) (the baselines' `layers.InstanceEmbed` has a ReLU there)."""

    def __init__(self, in_dim: int, dim: int, norm: str, dropout: float):
        super().__init__()
        self.proj = nn.Linear(in_dim, dim)
        self.norm = make_norm(norm, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.norm(self.proj(x)))


@register_arch
class QGMIL(MILModel):
    """QG-MIL aggregator. forward(x (B, N, in_dim) or (N, in_dim), mask (B, N) bool or None) -> MILOutput."""

    arch = "qgmil"
    Config = QGMILConfig
    search_space = {"dropout": DROPOUT, "dim": Choice((256, 512)), "depth": Choice((1, 2))}
    tags = ()  # per preset: QG-MIL variants, or the plain-transformer baseline

    def __init__(self, config: QGMILConfig):
        super().__init__(config)
        cfg = config
        self.embed = NormEmbed(cfg.in_dim, cfg.dim, cfg.norm, cfg.dropout)
        self.cls_token = nn.Parameter(torch.randn(1, 1, cfg.dim) * 0.02) if cfg.pooling == "cls" else None
        self.blocks = nn.ModuleList(QGMILBlock(cfg) for _ in range(cfg.depth))
        self.final_norm = make_norm(cfg.norm, cfg.dim)
        self.pool = None
        if cfg.pooling == "gated_attention":
            self.pool = AttentionPool(cfg.dim, cfg.dim // 2, gated=True, norm=make_norm(cfg.norm, cfg.dim))
        self.head = ClassifierHead(cfg.dim, cfg.dim // 2, cfg.num_classes, cfg.dropout)
        self.apply(_init_weights)

    @property
    def packable(self) -> bool:
        """Packed bags work for every pooling but "cls" (which would need a CLS row per bag)."""
        return self.cls_token is None

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, return_layer_attention: bool = False,
        *, labels: torch.Tensor | None = None, lengths: torch.Tensor | None = None,
    ) -> MILOutput:
        """x (B, N, in_dim), mask (B, N) bool, True = real instance; or packed x (T, in_dim) with lengths (B,).
        `return_layer_attention` adds the (B, H, N, N) softmax of every layer (with "cls" pooling N + 1, the
        CLS token first): small, padded bags only."""
        chunk = None if torch.is_grad_enabled() else self.inference_chunk
        if lengths is not None:
            return self._forward_packed(x, lengths, chunk)
        x, mask = as_batch(x, mask, self.config.in_dim)
        h = map_instances(self.embed, x, chunk=chunk)
        if self.cls_token is not None:
            h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1).to(h.dtype), h], dim=1)
            if mask is not None:
                mask = torch.cat([mask.new_ones(mask.shape[0], 1), mask], dim=1)
        attn_mask = None if mask is None else mask[:, None, None, :]

        layer_attention = []
        for i, block in enumerate(self.blocks):
            weights_of = None
            if return_layer_attention:
                weights_of = slice(None)
            elif self.cls_token is not None and i == len(self.blocks) - 1:
                weights_of = slice(0, 1)  # the CLS query row gives the pooling attention
            h, weights = block(h, attn_mask, chunk=chunk, weights_of=weights_of)
            if return_layer_attention:
                layer_attention.append(weights)
        h = map_instances(self.final_norm, h, chunk=chunk)

        if self.cls_token is not None:
            embedding = h[:, 0]
            # CLS attention to the instances, averaged over heads, renormalised without its self-weight.
            attention = weights[:, :, 0, 1:].mean(1)
            attention = attention / attention.sum(-1, keepdim=True)
        elif self.pool is not None:
            embedding, attention = self.pool(h, mask, chunk=chunk)
        elif self.config.pooling == "mean":
            embedding, attention = mean_pool(h, mask)
        else:
            embedding, attention = max_pool(h, mask)
        logits = self.head(embedding)
        return MILOutput(
            logits=logits,
            attention=attention,
            embedding=embedding,
            layer_attention=layer_attention if return_layer_attention else None,
        )

    def _forward_packed(self, x: torch.Tensor, lengths: torch.Tensor, chunk: int | None) -> MILOutput:
        """Packed bags: position-wise layers on the (1, T, dim) sequence, attention within each bag."""
        if not self.packable:
            raise ValueError(f"{self.name}: pooling={self.config.pooling!r} takes padded batches, not packed bags")
        x, segments = as_packed(x, lengths, self.config.in_dim)
        h = map_instances(self.embed, x, chunk=chunk)  # (1, T, dim)
        for block in self.blocks:
            h, _ = block(h, chunk=chunk, segments=segments)
        h = map_instances(self.final_norm, h, chunk=chunk)[0]  # (T, dim)
        if self.pool is not None:
            embedding, attention = self.pool.attend_packed(h, segments, chunk=chunk)
        else:
            embedding, attention = segments.mean(h) if self.config.pooling == "mean" else segments.max(h)
        return unpack_output(MILOutput(self.head(embedding), attention, embedding), segments)


def _init_weights(module: nn.Module) -> None:
    """As the official code: truncated-normal(0.02) linear weights, zero biases, unit norms."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


# ---------------------------------------------------------------------------------------------
# Presets. Official ones carry the official numerics: 2048-wide FFN and head_dim = 512 // heads.

OFFICIAL = dict(dim=512, heads=8, head_dim=64, ffn_dim=2048, depth=1, dropout=0.25)

PRESETS: dict[str, dict] = {
    "qgmil": dict(OFFICIAL),
    "qgmil_elementwise": dict(OFFICIAL, gate="elementwise"),
    "qgmil_no_gate": dict(OFFICIAL, gate="none"),
    "qgmil_layernorm": dict(OFFICIAL, norm="layer", qk_norm=False),
    "qgmil_no_qknorm": dict(OFFICIAL, qk_norm=False),
    "qgmil_minimal": dict(OFFICIAL, norm="layer", qk_norm=False, gate="none"),
    "qgmil_deep": dict(OFFICIAL, depth=4),
    "qgmil_light": dict(OFFICIAL, dim=256, heads=4, head_dim=128),
    # Clean ablations: exactly one paper component off, everything else as `qgmil`.
    "qgmil_wo_rmsnorm": dict(OFFICIAL, norm="layer"),
    "qgmil_wo_qknorm": dict(OFFICIAL, qk_norm=False),
    "qgmil_wo_gate": dict(OFFICIAL, gate="none"),
    "qgmil_wo_swiglu": dict(OFFICIAL, ffn="mlp", act="gelu"),
    # The "without QG-MIL parts" reference: a plain pre-LayerNorm transformer (no QK-norm, no gate,
    # GELU MLP) with the same gated attention pooling and head.
    "transformer_mil": dict(OFFICIAL, norm="layer", qk_norm=False, gate="none", ffn="mlp", act="gelu"),
}

DESCRIPTIONS = {
    "qgmil": "QG-MIL base: RMSNorm, QK-norm, head-wise gate, SwiGLU (official preset)",
    "qgmil_elementwise": "element-wise output gate (official preset)",
    "qgmil_no_gate": "no output gate (official preset)",
    "qgmil_layernorm": "LayerNorm and no QK-norm (official preset: two components off)",
    "qgmil_no_qknorm": "no QK-norm (official preset)",
    "qgmil_minimal": "LayerNorm, no QK-norm, no gate, still SwiGLU (official preset)",
    "qgmil_deep": "4 blocks (official preset)",
    "qgmil_light": "dim 256, 4 heads of width 128 (official preset)",
    "qgmil_wo_rmsnorm": "ablation: LayerNorm instead of RMSNorm, all else as qgmil",
    "qgmil_wo_qknorm": "ablation: no QK-norm, all else as qgmil",
    "qgmil_wo_gate": "ablation: no output gate, all else as qgmil",
    "qgmil_wo_swiglu": "ablation: GELU MLP instead of SwiGLU, all else as qgmil",
    "transformer_mil": "baseline: plain pre-LayerNorm transformer + gated attention pooling (all four parts off)",
}

#: The clean one-component-off ablation set, with the full model first.
ABLATION_SET = ["qgmil", "qgmil_wo_rmsnorm", "qgmil_wo_qknorm", "qgmil_wo_gate", "qgmil_wo_swiglu"]

OFFICIAL_PRESETS = ["qgmil", "qgmil_elementwise", "qgmil_no_gate", "qgmil_layernorm", "qgmil_no_qknorm",
                    "qgmil_minimal", "qgmil_deep", "qgmil_light"]


def _tags(name: str) -> list[str]:
    if name == "transformer_mil":
        return ["baseline"]
    return ["qgmil", *(["official"] if name in OFFICIAL_PRESETS else []), *(["ablation"] if name in ABLATION_SET else [])]


register_presets(QGMIL, PRESETS, DESCRIPTIONS, tags={name: _tags(name) for name in PRESETS})
