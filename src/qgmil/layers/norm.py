"""Normalisation layers: RMSNorm and a factory that picks RMSNorm or LayerNorm by name."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Library defaults per norm kind. The official QG-MIL code uses them for the input, final and pooling
# norms, and its configured `rms_norm_eps` only inside transformer blocks; we keep that split.
DEFAULT_EPS = {"rms": 1e-6, "layer": 1e-5}


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), computed in float32 like Qwen3.

    Shapes: (..., dim) -> (..., dim).
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Upcast so that bf16/fp16 activations do not lose the normaliser's precision.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def make_norm(kind: str, dim: int, eps: float | None = None) -> nn.Module:
    """`kind` is "rms" or "layer"; `eps=None` takes the library default of that kind."""
    if kind not in DEFAULT_EPS:
        raise ValueError(f"unknown norm {kind!r}; expected 'rms' or 'layer'")
    if eps is None:
        eps = DEFAULT_EPS[kind]
    if kind == "rms":
        return RMSNorm(dim, eps=eps)
    return nn.LayerNorm(dim, eps=eps)
