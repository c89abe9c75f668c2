"""CLAM: clustering-constrained attention MIL (Lu et al. 2021, "Data-efficient and weakly supervised
computational pathology on whole-slide images", Nat. Biomed. Eng.; official code mahmoodlab/CLAM,
models/model_clam.py). Written from the paper and the official code's behaviour, not copied from it.

    instances (B, N, in_dim)
      -> embed: Linear(in_dim, 512) -> ReLU -> dropout                           h (B, N, 512)
      -> gated attention net, K branches (K = 1 for CLAM-SB, K = C for CLAM-MB)
           s_ik = w_k^T (drop(tanh(V h_i)) * drop(sigmoid(U h_i))) + c_k           scores (B, K, N)
           a_k = softmax_i(s_ik) over the real instances,  M_k = sum_i a_ik h_i    (B, K, N), (B, K, 512)
      -> bag classifier(s)
           SB: logits = Linear(512, C)(M_0)
           MB: logit_c = Linear_c(512, 1)(M_c), one classifier per class on its own branch
      -> instance classifiers: one Linear(512, 2) per class (training signal only, see below)

One architecture ("clam"); `multi_branch` selects CLAM-MB (presets `clam_sb` and `clam_mb`). Parameter
names follow ABMIL's (`embed.proj`, `pool.attn_v/attn_u/attn_w`) and the official `classifiers` /
`instance_classifiers`; `pool.attn_w` maps 256 -> K (one attention logit per branch).

Outputs (`MILOutput`):
  SB: `attention` is the single branch's attention, `embedding` M_0, `branch_attention` None.
  MB: `branch_attention` (B, C, N) holds every class's attention (each sums to 1 over the real
      instances); `attention` and `embedding` are those of the predicted class's branch
      (argmax of the logits), as the official heatmap code does (`A = A[Y_hat]` for CLAM-MB).

Instance-level clustering loss (training mode with `labels` only; `aux_losses["instance"]`). Per bag with
label y and attention ordering of branch y (SB: the single branch):
  in-the-class: the k most attended real instances are positives (target 1) and the k least attended
      real instances negatives (target 0) for instance classifier y; loss = mean CE over the 2k.
  out-of-the-class (only when `subtyping`, the official flag for mutually exclusive subtypes): for each
      class j != y, the k most attended real instances of branch j (SB: the single branch) are negatives
      for instance classifier j; loss_j = mean CE over the k.
  bag loss = in + sum_j loss_j, divided by C when `subtyping` (as the official code); the batch's loss is
  the mean over its bags that have at least 2 real instances, times `inst_weight`.
Instance classifiers and the embedding get gradients from this loss; the selection (top-k), hence the
attention net, does not. A classifier that no bag of the batch uses gets no gradient at all (None, not
zeros, as in the official one-bag-per-step code, so optimisers skip it).

Deviations from the official code, on purpose:
  * Instance loss: cross-entropy, the official `--inst_loss ce` option, which is also what the official
    training script falls back to when `--inst_loss` is not given (its CLI default is None -> CE). The
    paper and the official README commands use the smooth top-1 SVM of the `topk` package
    (`--inst_loss svm`); that loss is not implemented here.
  * Loss weighting: the official objective is 0.7 * bag CE + 0.3 * instance loss (`--bag_weight 0.7`).
    Here the bag CE keeps weight 1 (the training loop's convention) and the instance loss is weighted
    `inst_weight = 0.3 / 0.7` (~0.4286): the same objective up to the overall factor 1/0.7 (to which
    Adam is nearly invariant; with SGD it is a learning-rate factor).
  * Small bags: the official code takes exactly k_sample = 8 instances from each end and crashes on bags
    with fewer than 8 instances (and takes instances twice, as positive and negative, below 16). Here each
    bag uses k = min(k_sample, n_real // 2), so the top and bottom sets never overlap, and bags with fewer
    than 2 real instances add no instance loss. Top-k and bottom-k only ever pick real (unmasked)
    instances, whatever values the padding holds.
  * Batches: the official code trains one bag at a time; here bags are padded and masked, the attention
    is exactly 0 on padding, and the instance loss is averaged over the batch's bags.
  * Attention dropout: the official attention net hard-codes p = 0.25 after tanh and sigmoid whenever
    dropout > 0; here it uses `dropout` (the same at the default 0.25).

Defaults are the official ones: dim 512 and attn_dim 256 (`size_arg="small"`; "big" is attn_dim=384),
gated attention, dropout 0.25 (`--drop_out`), k_sample 8 (`--B`), subtyping off, PyTorch's default
initialisation (the current official model code calls no custom init).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import AttentionPool, InstanceEmbed, map_instances
from .base import MILModel, MILOutput, ModelConfig, as_batch
from .fields import DropoutRate, LossWeight, PositiveInt
from .search import Choice, DROPOUT, Float
from .registry import register_arch, register_presets

OFFICIAL_BAG_WEIGHT = 0.7


class CLAMConfig(ModelConfig):
    multi_branch: bool = False
    """CLAM-MB (one attention branch and one bag classifier per class) instead of CLAM-SB."""
    dim: PositiveInt = 512
    """Width of the instance embedding h (official size "small"/"big": 512)."""
    attn_dim: PositiveInt = 256
    """Hidden width of the attention net (official "small": 256, "big": 384)."""
    gated: bool = True
    """Gated attention net (official default, `gate=True`) instead of plain tanh attention."""
    dropout: DropoutRate = 0.25
    """Dropout after the instance embedding and inside the attention net (official `--drop_out 0.25`)."""
    k_sample: PositiveInt = 8
    """Instances taken from each end of the attention ranking for the instance loss (official `--B 8`);
    capped per bag at n_real // 2."""
    subtyping: bool = False
    """Also train the other classes' instance classifiers with the top-k as negatives (official flag,
    meant for mutually exclusive subtypes)."""
    inst_weight: LossWeight = (1 - OFFICIAL_BAG_WEIGHT) / OFFICIAL_BAG_WEIGHT
    """Weight of the instance loss relative to the bag loss 1 (official bag_weight 0.7 -> 0.3 / 0.7);
    0 turns the instance loss off (the official `--no_inst_cluster`)."""


def top_bottom_instances(scores: torch.Tensor, mask: torch.Tensor | None, k_sample: int):
    """Pick the k most and k least attended real instances of each bag and branch.

    scores (B, K, N) attention scores (any monotone transform of the attention), mask (B, N) bool or None.
    Returns top (B, K, k_max), bottom (B, K, k_max) instance indices, k (B,) the number each bag uses,
    k_b = min(k_sample, n_real_b // 2), and valid (B, k_max) = position < k_b. Positions < k_b of `top`
    and `bottom` are always real instances, disjoint, ordered most/least attended first; later positions
    are filler to be ignored.
    """
    batch, _, n = scores.shape
    n_real = mask.sum(1) if mask is not None else torch.full((batch,), n, device=scores.device)
    k = torch.clamp(n_real // 2, max=k_sample)
    k_max = max(int(k.max()), 1)
    scores = scores.detach().float()
    if mask is not None:
        pad = ~mask.unsqueeze(1)
        high, low = scores.masked_fill(pad, float("-inf")), scores.masked_fill(pad, float("inf"))
    else:
        high = low = scores
    top = high.topk(k_max, dim=-1).indices
    bottom = low.topk(k_max, dim=-1, largest=False).indices
    valid = torch.arange(k_max, device=scores.device) < k.unsqueeze(1)
    return top, bottom, k, valid


@register_arch
class CLAM(MILModel):
    """CLAM-SB / CLAM-MB. forward(x (B, N, in_dim) or (N, in_dim), mask (B, N) bool or None, labels=...)."""

    arch = "clam"
    Config = CLAMConfig
    class_label_losses = ("instance",)  # need class labels: classification only
    search_space = {"dropout": DROPOUT, "k_sample": Choice((4, 8, 16)), "inst_weight": Float(0.1, 1.0)}
    branches_are_classes = True  # CLAM-MB: one attention branch per class
    has_unused_parameters = True  # only the instance classifiers of the bag's class train in a step

    def __init__(self, config: CLAMConfig):
        super().__init__(config)
        cfg = config
        self.branches = cfg.num_classes if cfg.multi_branch else 1
        self.embed = InstanceEmbed(cfg.in_dim, cfg.dim, cfg.dropout)
        self.pool = AttentionPool(  # official Attn_Net(_Gated)
            cfg.dim, cfg.attn_dim, gated=cfg.gated, branches=self.branches, dropout=cfg.dropout
        )
        if cfg.multi_branch:
            self.classifiers = nn.ModuleList(nn.Linear(cfg.dim, 1) for _ in range(cfg.num_classes))
        else:
            self.classifiers = nn.Linear(cfg.dim, cfg.num_classes)
        self.instance_classifiers = nn.ModuleList(nn.Linear(cfg.dim, 2) for _ in range(cfg.num_classes))

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, *, labels: torch.Tensor | None = None
    ) -> MILOutput:
        """x (B, N, in_dim), mask (B, N) bool, True = real instance; labels (B,) int64 bag labels, used only
        in training mode, for the instance-level clustering loss (`aux_losses["instance"]`)."""
        x, mask = as_batch(x, mask, self.config.in_dim)
        chunk = None if torch.is_grad_enabled() else self.inference_chunk
        h = map_instances(self.embed, x, chunk=chunk)  # (B, N, dim)
        pooled, attention, scores = self.pool.attend(h, mask, chunk=chunk)  # (B, K, dim), (B, K, N), (B, K, N)
        if self.config.multi_branch:
            weight = torch.cat([c.weight for c in self.classifiers])  # (C, dim)
            bias = torch.cat([c.bias for c in self.classifiers])  # (C,)
            logits = (pooled * weight.to(pooled.dtype)).sum(-1) + bias  # logit c from branch c
        else:
            logits = self.classifiers(pooled[:, 0])
        rows = torch.arange(x.shape[0], device=x.device)
        shown = logits.detach().argmax(1) if self.config.multi_branch else torch.zeros_like(rows)
        aux = {}
        # one output (a survival risk, one regression target) has no classes to cluster instances into
        if self.training and labels is not None and self.config.inst_weight > 0 and self.config.num_classes > 1:
            aux["instance"] = self.config.inst_weight * self.instance_loss(h, scores, mask, labels)
        return MILOutput(
            logits=logits,
            attention=attention[rows, shown],
            embedding=pooled[rows, shown],
            branch_attention=attention if self.config.multi_branch else None,
            aux_losses=aux,
        )

    def instance_loss(
        self, h: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor | None, labels: torch.Tensor
    ) -> torch.Tensor:
        """The unweighted instance-level clustering loss, averaged over the bags with >= 2 real instances.

        h (B, N, dim) instance embeddings, scores (B, K, N) attention scores, mask (B, N) or None, labels (B,).
        """
        cfg = self.config
        batch = h.shape[0]
        labels = torch.as_tensor(labels, device=h.device).long().reshape(-1)
        if labels.shape[0] != batch:
            raise ValueError(f"labels has {labels.shape[0]} entries for a batch of {batch} bags")
        if bool(((labels < 0) | (labels >= cfg.num_classes)).any()):
            raise ValueError(f"labels must be class indices in [0, {cfg.num_classes}), got {labels.tolist()}")
        top, bottom, k, valid = top_bottom_instances(scores, mask, cfg.k_sample)
        used = k > 0
        bags_per_class = torch.bincount(labels[used], minlength=cfg.num_classes).tolist()  # one host sync
        n_used = sum(bags_per_class)
        if n_used == 0:
            return h.new_zeros((), dtype=torch.float32)
        rows = torch.arange(batch, device=h.device)[:, None]
        k_max = top.shape[-1]
        valid_f, k_f = valid.float(), k.clamp(min=1).float()
        negatives = torch.zeros(batch * k_max, dtype=torch.long, device=h.device)
        per_bag = torch.zeros(batch, device=h.device)
        for c, classifier in enumerate(self.instance_classifiers):
            own = bags_per_class[c] > 0  # some bag of class c: in-the-class term
            other = cfg.subtyping and n_used - bags_per_class[c] > 0  # out-of-the-class term
            if not (own or other):
                continue  # classifier c is not used (no gradient, as in the official code)
            is_c = labels == c
            branch = c if cfg.multi_branch else 0
            # Classifier c on the k most attended instances of its branch: positives for bags of class c,
            # negatives (subtyping) for the others.
            logits_top = classifier(h[rows, top[:, branch]]).float()  # (B, k_max, 2)
            ce_top = F.cross_entropy(logits_top.flatten(0, 1), is_c.long().repeat_interleave(k_max),
                                     reduction="none").view(batch, k_max)
            top_sum = (ce_top * valid_f).sum(1)
            if own:  # and on the k least attended: negatives for bags of class c
                logits_bottom = classifier(h[rows, bottom[:, branch]]).float()
                ce_bottom = F.cross_entropy(logits_bottom.flatten(0, 1), negatives, reduction="none")
                in_class = (top_sum + (ce_bottom.view(batch, k_max) * valid_f).sum(1)) / (2 * k_f)
                per_bag = per_bag + torch.where(is_c, in_class, 0.0)
            if other:
                per_bag = per_bag + torch.where(is_c, 0.0, top_sum / k_f)
        if cfg.subtyping:
            per_bag = per_bag / cfg.num_classes
        return per_bag[used].mean()


# ---------------------------------------------------------------------------------------------
# Presets.

PRESETS: dict[str, dict] = {
    "clam_sb": dict(multi_branch=False),
    "clam_mb": dict(multi_branch=True),
}

DESCRIPTIONS = {
    "clam_sb": "CLAM-SB (Lu et al. 2021): gated attention, one branch, instance clustering loss (CE)",
    "clam_mb": "CLAM-MB (Lu et al. 2021): one gated attention branch and bag classifier per class",
}


register_presets(CLAM, PRESETS, DESCRIPTIONS, tags={"clam_mb": ["multi_branch"]})
