"""DTFD-MIL: double-tier feature distillation MIL (Zhang et al. 2022, CVPR), as in the official code
(Main_DTFD_MIL.py, Model/Attention.py, Model/network.py).

    instances (B, N, in_dim)
      -> embed (official DimReduction): Linear (no bias) -> ReLU [-> residual blocks]   h (B, N, dim)
      -> tier-1 gated attention logits s_i = w^T (tanh(V h_i) * sigmoid(U h_i)) + c      (B, N)
      -> split the real instances of each bag into M pseudo-bags (M = num_groups, at most n)
      -> tier 1, per pseudo-bag g:  a_i = softmax_{i in g}(s_i),  z_g = sum_{i in g} a_i h_i
           tier-1 classifier on z_g                                 pseudo-bag logits (B, M, C)
      -> feature distillation, one or more vectors per pseudo-bag:
           "afs"     z_g itself                                     (official default)
           "maxs"    h of the distill_k instances of g with the highest CAM probability
           "maxmins" those and the distill_k with the lowest
           CAM of instance i: W (a_i h_i), W the tier-1 classifier weight (no bias), softmax over
           classes; instances ranked by the last class's probability (official `get_cam_1d`)
      -> tier 2: gated attention over the distilled vectors (weights beta) -> classifier   logits (B, C)

Official defaults: numGroup = 4, total_instance = 4 (distill_k = 4 // 4 = 1), distill_type = "AFS"
(the argparse default of Main_DTFD_MIL.py; the paper reports AFS and MaxMinS), mDim = 512, attention
D = 128, numLayer_Res = 0, droprate = droprate_2 = 0 (classifier-input dropout of tier 1 and 2).

Pseudo-bags. Only real instances are split; a bag of n < M instances gets n pseudo-bags of one.
  * training: a random partition, as the official `random.shuffle` + `np.array_split`: the real
    instances in a random order (torch's generator, so `torch.manual_seed` reproduces it), cut into
    M contiguous chunks whose sizes differ by at most one;
  * eval: deterministic. The official evaluation shuffles too (its outputs vary from run to run); we
    rank the real instances by their tier-1 attention logit (stable sort) and deal them round-robin,
    rank r to pseudo-bag r mod M. Every pseudo-bag so gets a like share of high- and low-attention
    instances (a stratified member of the random partitions seen in training), and the split depends
    only on the set of real instances: eval outputs are reproducible, independent of padding and of
    the order of the instances;
  * `forward(..., pseudo_bags=ids)` (B, N) int takes any split instead (ids >= 0 on real instances,
    ignored on padding), in training and eval: spatial pseudo-bags, or the official code's split.

Training objective. The official loop minimises loss0 = mean over pseudo-bags of CE(tier-1 logits,
bag label) for tier 1 and loss1 = CE(tier-2 logits) for tier 2, with two Adam optimisers; the
gradients loss1 leaves on tier 1 are zeroed (optimizer0.zero_grad) before tier 1's next step, so the
tier-2 loss never updates tier 1. Here the trainer's
cross-entropy is loss1 and `aux_losses["tier1_ce"]` = `tier1_loss_weight` * loss0 (weight 1; mean
over each bag's pseudo-bags, then over bags); `detach_tiers=True` (default) cuts the tier-2 input off
tier 1's graph, which reproduces that split exactly with one optimiser. `detach_tiers=False` trains
end to end (as torchmil). Differences that remain: one optimiser and one gradient clipping for both
tiers (the official clips each module at norm 5), PyTorch's default initialisation, CE over C
classes (num_classes = 1: BCE on one logit).

`attention` (B, N): the product of the instance's tier-1 attention within its pseudo-bag and the
tier-2 attention mass of that pseudo-bag (the sum of beta over its distilled vectors); it sums to 1
over real instances and is 0 on padding. With "afs" these are exactly the weights of h in the bag
embedding (z = sum_g beta_g z_g = sum_i beta_g(i) a_i h_i). With "maxs"/"maxmins" the embedding
itself only mixes the selected instances; the product keeps the full tier-1 map. (The official
instance scores are the CAM probabilities above, Grad-CAM style; they are not returned.)
`embedding` is the tier-2 pooled vector.

CAM ranking: instances are ranked by a monotone function of the official probability, the same
order without the float32 saturation of the probability (binary: the logit margin a_i (w_1 - w_0)^T
h_i; C = 1: the CAM logit, i.e. sigmoid ranking; C > 2: the last class's log-softmax). With C > 2 the
"last class" follows the official binary code literally (it ranks by its class 1, the positive one).

torchmil's DTFDMIL differs: no embedding layer (it is its `feat_ext`), non-gated attention,
n_groups = 8 by default, a random split at inference too, both tiers trained end to end, CAMs of
the unweighted instances (one logit: binary only), and its "maxmin" keeps every
instance of each pseudo-bag (k = pseudo-bag size) instead of the official one each. With the same
weights, gated attention and the same split, its "afs" equals ours, and its "maxmin" equals ours
with distill_k >= the pseudo-bag size (tests/test_dsmil_dtfd.py).

Official state-dict keys: dimReduction.fc1 -> embed.proj, dimReduction.resBlocks.i.block.{0,2} ->
embed.res.i.block.{0,2}, attention.attention_V.0 / attention_U.0 / attention_weights -> tier1.attn_v
/ attn_u / attn_w, classifier.fc -> tier1_head.fc, attCls.attention.* -> pool.*, attCls.classifier.fc
-> head.fc. At inference (no gradient) the embedding and the tier-1 scores run in chunks of
`inference_chunk` instances.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import AttentionPool, InstanceEmbed, map_instances
from .base import MILModel, MILOutput, ModelConfig, as_batch
from .fields import DropoutRate, LossWeight, NonNegativeInt, PositiveInt
from .search import Choice, DROPOUT
from .registry import register_arch, register_presets


class DTFDConfig(ModelConfig):
    dim: PositiveInt = 512
    """Width of the instance embedding (official mDim)."""
    attn_dim: PositiveInt = 128
    """Hidden width of both gated attention networks (official D = 128)."""
    num_groups: PositiveInt = 4
    """Pseudo-bags per bag (official numGroup); a bag of n < num_groups instances gets n."""
    distill: Literal["afs", "maxs", "maxmins"] = "afs"
    """Feature distillation (official distill_type; its default is AFS)."""
    distill_k: PositiveInt = 1
    """Instances per pseudo-bag for maxs/maxmins (official total_instance // numGroup = 1)."""
    res_layers: NonNegativeInt = 0
    """Residual blocks after the embedding (official numLayer_Res)."""
    dropout: DropoutRate = 0.0
    """Dropout before the tier-1 classifier (official droprate)."""
    dropout_tier2: DropoutRate = 0.0
    """Dropout before the tier-2 classifier (official droprate_2)."""
    tier1_loss_weight: LossWeight = 1.0
    """Weight of the tier-1 pseudo-bag CE relative to the bag CE (official: separate losses, 1)."""
    detach_tiers: bool = True
    """The tier-2 loss does not train tier 1 (official); False trains both tiers end to end."""


class ResidualBlock(nn.Module):
    """x + ReLU(Linear(ReLU(Linear(x)))), both Linears without bias (official residual_block)."""

    def __init__(self, dim: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.Linear(dim, dim, bias=False), nn.ReLU(), nn.Linear(dim, dim, bias=False), nn.ReLU()
        )

    def forward(self, x):
        return x + self.block(x)


class DTFDEmbed(InstanceEmbed):
    """Official DimReduction: Linear(in_dim, dim, bias=False) -> ReLU -> residual blocks. (B, N, in) -> (B, N, dim)."""

    def __init__(self, in_dim: int, dim: int, res_layers: int):
        super().__init__(in_dim, dim, bias=False)  # no dropout
        self.res = nn.Sequential(*(ResidualBlock(dim) for _ in range(res_layers)))

    def forward(self, x):
        return self.res(super().forward(x))


class DropoutLinear(nn.Module):
    """Official Classifier_1fc: optional dropout, then Linear(dim, num_classes)."""

    def __init__(self, dim: int, num_classes: int, dropout: float):
        super().__init__()
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x):
        return self.fc(self.drop(x))


def group_softmax(scores: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """Softmax of scores (B, N) within each pseudo-bag: member (B, M, N) bool -> (B, M, N) float32.

    Row g holds the attention of pseudo-bag g over its members (0 elsewhere); empty pseudo-bags get
    all-zero rows, without NaN in the forward or the backward pass.
    """
    nonempty = member.any(-1, keepdim=True)  # (B, M, 1)
    s = scores.float().unsqueeze(1).masked_fill(~member, float("-inf"))
    s = s.masked_fill(~nonempty, 0.0)  # a finite row for empty pseudo-bags, zeroed below
    return s.softmax(-1) * nonempty


@register_arch
class DTFDMIL(MILModel):
    """DTFD-MIL aggregator. forward(x, mask, labels=None, pseudo_bags=None) -> MILOutput."""

    arch = "dtfd_mil"
    Config = DTFDConfig
    class_label_losses = ("tier1_ce",)  # need class labels: classification only
    search_space = {"dropout": DROPOUT, "num_groups": Choice((2, 4, 8))}

    def __init__(self, config: DTFDConfig):
        super().__init__(config)
        cfg = config
        self.embed = DTFDEmbed(cfg.in_dim, cfg.dim, cfg.res_layers)
        self.tier1 = AttentionPool(cfg.dim, cfg.attn_dim)  # its scores, softmaxed per pseudo-bag
        self.tier1_head = DropoutLinear(cfg.dim, cfg.num_classes, cfg.dropout)
        self.pool = AttentionPool(cfg.dim, cfg.attn_dim)  # tier 2 over the distilled vectors
        self.head = DropoutLinear(cfg.dim, cfg.num_classes, cfg.dropout_tier2)

    # ------------------------------------------------------------------------------- pseudo-bags

    def split(
        self, scores: torch.Tensor, mask: torch.Tensor | None, pseudo_bags: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Pseudo-bag index of every instance, (B, N) int64, -1 on padding.

        scores (B, N): tier-1 attention logits (the eval ranking); mask (B, N) bool or None.
        Training: random balanced partition of the real instances; eval: rank by score, round-robin;
        `pseudo_bags` (B, N) or (N,) integers: taken as given.
        """
        b, n = scores.shape
        device = scores.device
        real = mask if mask is not None else torch.ones(b, n, dtype=torch.bool, device=device)
        if pseudo_bags is not None:
            if pseudo_bags.dim() == 1:
                pseudo_bags = pseudo_bags.unsqueeze(0)
            if pseudo_bags.shape != (b, n) or pseudo_bags.is_floating_point() or pseudo_bags.dtype == torch.bool:
                raise ValueError(f"pseudo_bags must be (B, N) = {(b, n)} integers, got {tuple(pseudo_bags.shape)} "
                                 f"{pseudo_bags.dtype}")
            groups = pseudo_bags.to(device=device, dtype=torch.long).masked_fill(~real, -1)
            if bool((groups[real] < 0).any()):
                raise ValueError("pseudo_bags must be >= 0 on real instances")
            return groups
        n_real = real.sum(1, keepdim=True)  # (B, 1)
        m = n_real.clamp(max=self.config.num_groups)  # pseudo-bags per bag
        if self.training:
            keys = torch.rand(b, n, device=device).masked_fill(~real, 2.0)  # padding sorts last
            order = keys.argsort(dim=1)
        else:
            keys = (-scores.detach().float()).masked_fill(~real, float("inf"))
            order = keys.argsort(dim=1, stable=True)  # by attention, highest first
        positions = torch.arange(n, device=device).expand(b, n)
        rank = torch.empty_like(order).scatter_(1, order, positions)  # rank of each instance
        groups = rank * m // n_real if self.training else rank % m  # contiguous chunks / round-robin
        return groups.masked_fill(~real, -1)

    # ----------------------------------------------------------------------------------- distillation

    def cam_rank(self, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Official CAM instance score, as a monotone non-saturating key: h (B, N, dim), a (B, N) -> (B, N)."""
        weight = self.tier1_head.fc.weight.float()  # (C, dim)
        cam = a.float().unsqueeze(-1) * (h.float() @ weight.T)  # (B, N, C) = W (a_i h_i)
        c = cam.shape[-1]
        if c == 1:
            return cam[..., 0]  # sigmoid is monotone
        if c == 2:
            return cam[..., 1] - cam[..., 0]  # softmax(.)[1] = sigmoid of the margin
        return cam.log_softmax(-1)[..., -1]

    def distill_instances(self, h, a, member):
        """maxs/maxmins: the selected instance features (B, M * per, dim) and their validity (B, M * per)."""
        cfg = self.config
        key = self.cam_rank(h, a)  # (B, N)
        k = min(cfg.distill_k, h.shape[1])
        high = key.unsqueeze(1).masked_fill(~member, float("-inf"))  # (B, M, N)
        top = high.topk(k, dim=-1)
        picks, valid = [top.indices], [top.values > float("-inf")]
        if cfg.distill == "maxmins":
            low = (-key).unsqueeze(1).masked_fill(~member, float("-inf"))
            bottom = low.topk(k, dim=-1)
            picks.append(bottom.indices)
            valid.append(bottom.values > float("-inf"))
        index = torch.cat(picks, -1).flatten(1)  # (B, M * per): per pseudo-bag its max then min picks
        feats = torch.gather(h, 1, index.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
        return feats, torch.cat(valid, -1).flatten(1)

    # ----------------------------------------------------------------------------------------- forward

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        labels: torch.Tensor | None = None,
        pseudo_bags: torch.Tensor | None = None,
    ) -> MILOutput:
        """x (B, N, in_dim), mask (B, N) bool, True = real instance; labels (B,) int64 bag labels add the
        tier-1 loss in training mode; pseudo_bags (B, N) int: a given split (see `split`)."""
        cfg = self.config
        x, mask = as_batch(x, mask, cfg.in_dim)
        b = x.shape[0]
        chunk = None if torch.is_grad_enabled() else self.inference_chunk
        h = map_instances(self.embed, x, chunk=chunk)  # (B, N, dim)
        scores = self.tier1.scores(h, chunk=chunk)[:, 0]  # (B, N) tier-1 attention logits

        groups = self.split(scores, mask, pseudo_bags)  # (B, N), -1 on padding
        m = cfg.num_groups if pseudo_bags is None else max(int(groups.max()) + 1, 1)
        member = groups.unsqueeze(1) == torch.arange(m, device=x.device)[None, :, None]  # (B, M, N)
        nonempty = member.any(-1)  # (B, M)
        a = group_softmax(scores, member)  # (B, M, N) tier-1 attention within each pseudo-bag
        z = torch.bmm(a.to(h.dtype), h)  # (B, M, dim) pseudo-bag features
        tier1_logits = self.tier1_head(z)  # (B, M, C)

        if cfg.distill == "afs":
            feats, valid = z, nonempty
        else:
            feats, valid = self.distill_instances(h, a.sum(1), member)
        if cfg.detach_tiers:
            feats = feats.detach()
        embedding, beta = self.pool(feats, valid)  # (B, dim), (B, J)
        logits = self.head(embedding)

        mass = beta.float().view(b, m, -1).sum(-1)  # tier-2 attention of each pseudo-bag, (B, M)
        attention = (a * mass.unsqueeze(-1)).sum(1).to(scores.dtype)  # (B, N)

        aux: dict[str, torch.Tensor] = {}
        if self.training and labels is not None:
            t1 = tier1_logits.float()
            if cfg.num_classes == 1:
                target = labels.float()[:, None].expand(-1, m)
                per = F.binary_cross_entropy_with_logits(t1[..., 0], target, reduction="none")
            else:
                per = F.cross_entropy(t1.flatten(0, 1), labels.repeat_interleave(m), reduction="none").view(b, m)
            per = (per * nonempty).sum(1) / nonempty.sum(1)  # mean over each bag's pseudo-bags
            aux["tier1_ce"] = cfg.tier1_loss_weight * per.mean()
        return MILOutput(logits=logits, attention=attention, embedding=embedding, aux_losses=aux)


# ---------------------------------------------------------------------------------------------
# Presets.


register_presets(DTFDMIL, {"dtfd_mil": {}}, {"dtfd_mil": "DTFD-MIL (Zhang et al. 2022): 4 pseudo-bags, tier-1 gated attention, AFS, tier 2"})
