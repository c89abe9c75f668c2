"""Mean- and max-pooling MIL baselines (the instance-level embedding + symmetric pooling of
Wang et al. 2018, "Revisiting multiple instance neural networks", and Ilse et al. 2018's baselines).

    instances (B, N, in_dim)
      -> embed: Linear -> ReLU -> dropout                              h (B, N, dim)
      -> pooling over real instances                                   z (B, dim)
           mean: z = (1/n) sum_i h_i
           max:  z_d = max_i h_id   (channel-wise)
      -> head: Linear(dim, num_classes)                                (B, num_classes)

One architecture ("pooling_mil"); `pooling` selects the pooling, so the `mean_pool` and `max_pool`
presets differ in that one field. The embedding is the one of `abmil` (Linear(in_dim, 512) -> ReLU
-> dropout 0.25, CLAM's setup), so the three baselines differ only in how instances are pooled.

`attention` (B, N), as for every model a distribution over the real instances (0 on padding):
  mean: uniform, 1/n on each real instance (each contributes 1/n of the pooled vector);
  max:  the share of the `dim` channels whose maximum the instance holds (its exact contribution
        to the pooled vector; ties go to one instance).
Padded instances never change anything: they are excluded from the mean and set to -inf before
the max. At inference (no gradient) the embedding runs in chunks of `inference_chunk` instances.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ..layers import InstanceEmbed, map_instances, max_pool, mean_pool
from .base import MILModel, MILOutput, ModelConfig, as_batch, as_packed, unpack_output
from .fields import DropoutRate, PositiveInt
from .search import DROPOUT
from .registry import register_arch, register_presets


class PoolingMILConfig(ModelConfig):
    pooling: Literal["mean", "max"] = "mean"
    """Masked mean or channel-wise masked max over the real instances."""
    dim: PositiveInt = 512
    """Width of the instance embedding."""
    dropout: DropoutRate = 0.25
    """Dropout after the instance embedding."""


@register_arch
class PoolingMIL(MILModel):
    """Instance MLP + mean or max pooling. forward(x (B, N, in_dim) or (N, in_dim), mask (B, N)) -> MILOutput."""

    arch = "pooling_mil"
    Config = PoolingMILConfig
    search_space = {"dropout": DROPOUT}

    def __init__(self, config: PoolingMILConfig):
        super().__init__(config)
        cfg = config
        self.embed = InstanceEmbed(cfg.in_dim, cfg.dim, cfg.dropout)
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
            embedding, attention = segments.mean(h) if self.config.pooling == "mean" else segments.max(h)
            return unpack_output(MILOutput(self.head(embedding), attention, embedding), segments)
        x, mask = as_batch(x, mask, self.config.in_dim)
        h = map_instances(self.embed, x, chunk=chunk)  # (B, N, dim)
        pool = mean_pool if self.config.pooling == "mean" else max_pool
        embedding, attention = pool(h, mask)  # (B, dim), (B, N)
        return MILOutput(logits=self.head(embedding), attention=attention, embedding=embedding)


# ---------------------------------------------------------------------------------------------
# Presets.

PRESETS: dict[str, dict] = {
    "mean_pool": dict(pooling="mean"),
    "max_pool": dict(pooling="max"),
}

DESCRIPTIONS = {
    "mean_pool": "mean-pooling MIL baseline: instance MLP, masked mean over instances, linear head",
    "max_pool": "max-pooling MIL baseline: instance MLP, channel-wise masked max over instances, linear head",
}


register_presets(PoolingMIL, PRESETS, DESCRIPTIONS)
