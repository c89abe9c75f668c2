"""TransMIL: Transformer based correlated MIL (Shao et al. 2021, NeurIPS).

As the official code (github.com/szc19990412/TransMIL, models/TransMIL.py):

    instances (n, in_dim)
      -> _fc1: Linear(in_dim, dim) -> ReLU                                       (n, dim)
      -> square: side = ceil(sqrt(n)); append copies of the first side^2 - n instances
      -> prepend the CLS token                                                   (1 + side^2, dim)
      -> layer1: x + NystromAttention(LayerNorm(x))
      -> pos_layer (PPEG): instance tokens as a side x side grid (row-major),
           grid + dwconv7(grid) + dwconv5(grid) + dwconv3(grid); the CLS token passes unchanged
      -> layer2: x + NystromAttention(LayerNorm(x))
      -> norm (LayerNorm), CLS token                                             embedding (dim,)
      -> _fc2: Linear(dim, num_classes)                                          logits

Module and parameter names are the official ones, so an official state dict loads as it is
(`model.load_state_dict(official)`, with in_dim = 1024 and dim = 512 there).

Nystrom attention (lucidrains' nystrom-attention, which the official code uses with dim_head 64, 8 heads,
256 landmarks, 6 pseudo-inverse iterations, residual value conv of kernel 33 and dropout 0.1), written
here in plain PyTorch, step for step as that package:
  * the sequence of n tokens is zero-padded *at the front* to a multiple of the landmark count m;
    there is no mask: the padding tokens (q = k = v = 0, as to_qkv has no bias) take part as keys,
    queries and values exactly as in the official model, which never passes a mask;
  * landmarks are means of l = ceil(n / m) consecutive (scaled) queries / keys;
  * attn1 = softmax(Q K~^T), attn2 = softmax(Q~ K~^T), attn3 = softmax(Q~ K^T);
    out = attn1 pinv(attn2) (attn3 V) + res_conv(V), with pinv by 6 iterations of the Moore-Penrose
    scheme initialised with attn2^T / (max row sum * max column sum), the maxima taken over all heads
    (and over the batch in lucidrains' code: we always call it with one bag, as the official code's
    batch size of 1);
  * res_conv is a depthwise Conv2d over the (padded) sequence axis, one 33 x 1 kernel per head;
  * the output drops the front padding (out[:, -n:]).
Deviations, none of which changes the float32 result beyond rounding:
  * the products are associated as attn1 (pinv(attn2) (attn3 V)) instead of (attn1 pinv(attn2)) (attn3 V):
    O(n m d) instead of O(n m^2), and no (heads, n, m) intermediate besides attn1 itself;
  * q, k, v are computed for the real tokens only and zero-padded afterwards (identical: no bias);
  * attn2 and its pseudo-inverse are computed in float32 even under autocast (the iteration is not
    stable in bfloat16);
  * without gradients, attn1 is formed `inference_chunk` queries at a time.
The official requirements pin nystrom-attention 0.0.9, which kept out[:, :n] -- the front padding's
outputs instead of the last tokens' (lucidrains/nystrom-attention#5, fixed in 0.0.11): whenever n is not a
multiple of m, token i of the layer gets the attention output of padded position i, so the CLS token gets a
padding token's. We follow the fixed package (0.0.11 to 0.0.14, and torchmil), i.e. the algorithm as
intended; `legacy_nystrom_slice=True` reproduces 0.0.9 exactly (for weights trained under it).

Batches. Every bag is processed alone, in a loop over the batch, on its real instances only: each bag is
squared to its own side (copying its own first instances, never padding) and gets its own landmarks and
pseudo-inverse. A bag in a padded batch therefore gets exactly the logits it gets alone, which a batched
Nystrom computation cannot give (the square padding, the landmark grouping, PPEG's grid and the
pseudo-inverse's initial scale all depend on the bag's length). The mask may select any positions; the
real instances are taken in their order in x.

Order matters. TransMIL is not permutation invariant: PPEG sees the instances on a grid in input order,
and the square padding copies the first instances (`permutation_invariant = False`).

`attention` (B, N). TransMIL has no pooling attention; we report the CLS token's attention over the
instance tokens in the last layer (layer2), computed *exactly* for the CLS query row:
softmax_j(q_cls . k_j / sqrt(dim_head)) over the side^2 instance tokens j (neither the CLS token itself nor
the Nystrom front padding), averaged over heads -- an O(n) by-product of layer2's q and k. The layer itself
mixes values with the Nystrom approximation of this row, not with these exact weights. The weight of each
square-padding copy is folded back onto the instance it copies (token n + t is a copy of instance t), so
the weights over the real instances sum to 1; padding positions of the batch get exactly 0.

Defaults are the official ones: dim 512, 8 heads of 64, 256 landmarks, 6 iterations, kernel 33,
dropout 0.1 (on the attention output only; the official code has no other dropout).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import field_validator
from torch import nn

from ..layers import map_instances
from .base import MILModel, MILOutput, ModelConfig, as_batch
from .fields import DropoutRate, NonNegativeInt, PositiveInt
from .search import Choice, DROPOUT
from .registry import register_arch, register_presets


class TransMILConfig(ModelConfig):
    dim: PositiveInt = 512
    """Token width after _fc1 (official 512)."""
    heads: PositiveInt = 8
    """Attention heads (official 8)."""
    dim_head: PositiveInt = 64
    """Width of one head (official dim // 8 = 64)."""
    num_landmarks: PositiveInt = 256
    """Nystrom landmarks m (official dim // 2 = 256)."""
    pinv_iterations: NonNegativeInt = 6
    """Moore-Penrose iterations for pinv(attn2) (official 6)."""
    residual_kernel: PositiveInt = 33
    """Length of the depthwise residual conv on the values along the sequence (lucidrains' default 33)."""
    dropout: DropoutRate = 0.1
    """Dropout on the attention output (official NystromAttention(dropout=0.1))."""
    legacy_nystrom_slice: bool = False
    """Reproduce nystrom-attention 0.0.9, which the official requirements pin: each attention keeps the outputs
    of the first n positions of the front-padded sequence (out[:, :n], the padding's outputs first) instead of
    the last n. Only for weights trained under that version; off, the algorithm is the fixed one (0.0.11+)."""

    @field_validator("residual_kernel")
    @classmethod
    def _odd_kernel(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError("must be odd (a same-length conv)")
        return value


def moore_penrose_iter_pinv(x: torch.Tensor, iters: int) -> torch.Tensor:
    """Iterative pseudo-inverse of (..., m, m) as lucidrains' nystrom-attention (Razavi et al. 2014 scheme).

    Initial z = x^T / (max_i sum_j |x_ij| * max_j sum_i |x_ij|), the two maxima over the *whole* tensor; then
    z <- 1/4 z (13 I - xz (15 I - xz (7 I - xz))) with xz = x z, `iters` times.
    """
    abs_x = x.abs()
    col = abs_x.sum(dim=-1)
    row = abs_x.sum(dim=-2)
    z = x.transpose(-1, -2) / (torch.max(col) * torch.max(row))
    for _ in range(iters):
        xz = x @ z
        z = 0.25 * z @ _eye_minus(13, xz @ _eye_minus(15, xz @ _eye_minus(7, xz)))
    return z


def _eye_minus(c: float, a: torch.Tensor) -> torch.Tensor:
    """c * I - a without materialising c * I (bitwise the same: 0 - a = -a and c - a_ii = -a_ii + c)."""
    out = -a
    out.diagonal(dim1=-2, dim2=-1).add_(c)
    return out


class NystromAttention(nn.Module):
    """Nystrom self-attention as lucidrains' `NystromAttention(residual=True)` without a mask; see the module
    docstring. Parameters: to_qkv (no bias), to_out.0 (Linear) + to_out.1 (Dropout), res_conv."""

    def __init__(self, dim: int, dim_head: int, heads: int, num_landmarks: int, pinv_iterations: int,
                 residual_kernel: int, dropout: float, legacy_slice: bool = False):
        super().__init__()
        self.legacy_slice = legacy_slice
        inner = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.num_landmarks, self.pinv_iterations = num_landmarks, pinv_iterations
        self.scale = dim_head**-0.5
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))
        self.res_conv = nn.Conv2d(heads, heads, (residual_kernel, 1), padding=(residual_kernel // 2, 0),
                                  groups=heads, bias=False)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.reshape(b, n, self.heads, self.dim_head).transpose(1, 2)  # (b, h, n, d)

    def forward(self, x: torch.Tensor, chunk: int | None = None, return_first_query_attention: bool = False):
        """x (b, n, dim) -> (b, n, dim). With `return_first_query_attention`, also the exact softmax attention
        (b, heads, n - 1) of token 0's query over tokens 1..n-1 (front padding excluded)."""
        b, n, _ = x.shape
        m = self.num_landmarks
        pad = (m - n % m) % m
        # q, k, v of the real tokens, then the front zero padding (to_qkv has no bias: padded rows are 0).
        q, k, v = (F.pad(self._split(t), (0, 0, pad, 0)) for t in self.to_qkv(x).chunk(3, dim=-1))
        q = q * self.scale

        l = math.ceil(n / m)  # noqa: E741 (lucidrains' name)
        q_land = q.reshape(b, self.heads, m, l, self.dim_head).sum(3) / l
        k_land = k.reshape(b, self.heads, m, l, self.dim_head).sum(3) / l

        attn3 = (q_land @ k.transpose(-1, -2)).softmax(dim=-1)  # (b, h, m, L)
        attn3_v = attn3 @ v  # (b, h, m, d)
        work = torch.promote_types(q.dtype, torch.float32)
        with torch.autocast(device_type=x.device.type, enabled=False):
            attn2 = (q_land.to(work) @ k_land.to(work).transpose(-1, -2)).softmax(dim=-1)  # (b, h, m, m)
            right = (moore_penrose_iter_pinv(attn2, self.pinv_iterations) @ attn3_v.to(work)).to(q.dtype)

        def rows(q_part: torch.Tensor) -> torch.Tensor:
            return (q_part @ k_land.transpose(-1, -2)).softmax(dim=-1) @ right  # attn1 (b, h, rows, m) @ right

        # Only the outputs kept are computed: the last n positions (out[:, -n:]), or the first n (0.0.9's out[:, :n]).
        keep = 0 if self.legacy_slice else pad
        q_kept = q[:, :, keep:keep + n]
        if chunk is None or n <= chunk:
            out = rows(q_kept)
        else:
            out = torch.cat([rows(q_kept[:, :, s:s + chunk]) for s in range(0, n, chunk)], dim=2)
        out = out + self.res_conv(v)[:, :, keep:keep + n].to(out.dtype)
        out = out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head)
        out = self.to_out(out)
        if not return_first_query_attention:
            return out
        with torch.autocast(device_type=x.device.type, enabled=False):
            q_first, k_rest = q[:, :, pad:pad + 1].to(work), k[:, :, pad + 1:].to(work)
            first = (q_first @ k_rest.transpose(-1, -2)).squeeze(2).softmax(dim=-1)  # (b, h, n - 1)
        return out, first


class TransLayer(nn.Module):
    """x + NystromAttention(LayerNorm(x)), as the official TransLayer."""

    def __init__(self, cfg: TransMILConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.dim)
        self.attn = NystromAttention(cfg.dim, cfg.dim_head, cfg.heads, cfg.num_landmarks, cfg.pinv_iterations,
                                     cfg.residual_kernel, cfg.dropout, cfg.legacy_nystrom_slice)

    def forward(self, x: torch.Tensor, chunk: int | None = None, return_first_query_attention: bool = False):
        out = self.attn(self.norm(x), chunk=chunk, return_first_query_attention=return_first_query_attention)
        if return_first_query_attention:
            return x + out[0], out[1]
        return x + out


class PPEG(nn.Module):
    """Pyramid position encoding generator: grid + dwconv7 + dwconv5 + dwconv3 on the side x side grid of
    instance tokens (row-major, token t at (t // side, t % side)); the CLS token (first) is passed on."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 7, 1, 7 // 2, groups=dim)
        self.proj1 = nn.Conv2d(dim, dim, 5, 1, 5 // 2, groups=dim)
        self.proj2 = nn.Conv2d(dim, dim, 3, 1, 3 // 2, groups=dim)

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        b, _, c = x.shape
        cls_token, feat = x[:, :1], x[:, 1:]
        grid = feat.transpose(1, 2).reshape(b, c, side, side)
        grid = self.proj(grid) + grid + self.proj1(grid) + self.proj2(grid)
        return torch.cat([cls_token, grid.flatten(2).transpose(1, 2)], dim=1)


def square_side(n: int) -> int:
    """ceil(sqrt(n)) in exact integer arithmetic."""
    side = math.isqrt(n)
    return side + (side * side < n)


@register_arch
class TransMIL(MILModel):
    """TransMIL aggregator. forward(x (B, N, in_dim) or (N, in_dim), mask (B, N) bool or None) -> MILOutput.

    Each bag of the batch runs alone on its real instances (a loop over the batch); see the module docstring.
    """

    arch = "transmil"
    Config = TransMILConfig
    search_space = {"dropout": DROPOUT, "dim": Choice((256, 512))}
    permutation_invariant: ClassVar[bool] = False

    def __init__(self, config: TransMILConfig):
        super().__init__(config)
        cfg = config
        self.pos_layer = PPEG(cfg.dim)
        self._fc1 = nn.Sequential(nn.Linear(cfg.in_dim, cfg.dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, cfg.dim))
        self.layer1 = TransLayer(cfg)
        self.layer2 = TransLayer(cfg)
        self.norm = nn.LayerNorm(cfg.dim)
        self._fc2 = nn.Linear(cfg.dim, cfg.num_classes)

    def forward_bag(self, x: torch.Tensor, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One bag of real instances (1, n, in_dim) -> embedding (1, dim), attention (n,)."""
        h = map_instances(self._fc1, x, chunk=chunk)  # (1, n, dim)
        n = h.shape[1]
        side = square_side(n)
        add = side * side - n  # <= n for every n >= 1
        h = torch.cat([h, h[:, :add]], dim=1)  # (1, side^2, dim): copies of the first `add` instances
        h = torch.cat([self.cls_token.to(h.dtype), h], dim=1)  # (1, 1 + side^2, dim)
        h = self.layer1(h, chunk=chunk)
        h = self.pos_layer(h, side)
        h, cls_attention = self.layer2(h, chunk=chunk, return_first_query_attention=True)
        embedding = self.norm(h[:, 0])  # LayerNorm is per token: norm(h)[:, 0]
        a = cls_attention[0].mean(0)  # (side^2,), sums to 1
        a = torch.cat([a[:add] + a[n:], a[add:n]])  # fold each copy's weight onto its instance
        return embedding, a

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, *, labels: torch.Tensor | None = None
    ) -> MILOutput:
        """x (B, N, in_dim), mask (B, N) bool, True = real instance; labels unused (no auxiliary loss)."""
        x, mask = as_batch(x, mask, self.config.in_dim)
        chunk = None if torch.is_grad_enabled() else self.inference_chunk
        embeddings, attentions = [], []
        for i in range(x.shape[0]):
            bag = x[i : i + 1] if mask is None else x[i : i + 1, mask[i]]
            embedding, a = self.forward_bag(bag, chunk=chunk)
            embeddings.append(embedding)
            if mask is None:
                attentions.append(a)
            else:
                attentions.append(a.new_zeros(x.shape[1]).masked_scatter(mask[i], a))
        embedding = torch.cat(embeddings)
        logits = self._fc2(embedding)
        return MILOutput(logits=logits, attention=torch.stack(attentions), embedding=embedding)


# ---------------------------------------------------------------------------------------------
# Presets.


register_presets(TransMIL, {"transmil": {}}, {"transmil": "TransMIL (Shao et al. 2021): Nystrom transformer with PPEG, CLS token (official sizes)"})
