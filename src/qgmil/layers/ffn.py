"""Position-wise feed-forward layers: SwiGLU (Shazeer 2020) and a plain two-layer MLP."""

from __future__ import annotations

import torch
from torch import nn

ACTIVATIONS = {"silu": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU}


class SwiGLU(nn.Module):
    """down(act(gate(x)) * up(x)), bias-free as in LLaMA/Qwen. Shapes: (..., dim) -> (..., dim)."""

    def __init__(self, dim: int, hidden: int, act: str = "silu"):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.act = ACTIVATIONS[act]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class MLP(nn.Module):
    """fc2(act(fc1(x))) with biases: the standard transformer FFN. Shapes: (..., dim) -> (..., dim)."""

    def __init__(self, dim: int, hidden: int, act: str = "gelu"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = ACTIVATIONS[act]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def make_ffn(kind: str, dim: int, hidden: int, act: str) -> nn.Module:
    if kind == "swiglu":
        return SwiGLU(dim, hidden, act)
    if kind == "mlp":
        return MLP(dim, hidden, act)
    raise ValueError(f"unknown ffn {kind!r}; expected 'swiglu' or 'mlp'")
