"""DSMIL: dual-stream MIL (Li, Li & Eliceiri 2021, CVPR), as in the official dsmil-wsi code (dsmil.py).

    instances (B, N, in_dim)                                           h = x, D = in_dim (official)
      [-> embed: Linear(in_dim, embed_dim) -> ReLU [-> dropout]         h (B, N, D), D = embed_dim]
      -> instance stream: c_i = instance_head(h_i)                     instance logits (B, N, C)
           per class k the critical instance m_k = argmax_i c_ik (real instances only)
           max-pooling prediction  m = (max_i c_ik)_k                  (B, C)
      -> bag stream: q_i = Q(h_i), v_i = V(h_i)
           Q: Linear(D, 128) -> ReLU -> Linear(128, 128) -> Tanh       (official nonlinear=True)
           V: identity                                                  (official passing_v=False)
           a_ki = softmax_i(<q_i, q_{m_k}> / sqrt(128))                branch_attention (B, C, N)
           b_k = sum_i a_ki v_i                                        class embeddings (B, C, D)
           bag logits = Conv1d(C, C, kernel_size=D)(b)                 (B, C): every class logit
                                                                       reads all C embeddings
Only N x C scores exist: the bag stream compares every instance with the C critical queries, never
instances with each other.

The instance embedding. The official aggregator reads its (512-d SimCLR) features directly, and so
does the preset (`embed_dim=None`). `embed_dim=512` adds Linear -> ReLU [-> dropout] first, as
benchmark re-implementations do (RRT-MIL's DSMIL: Linear(1024, 512) -> ReLU -> Dropout(0.25)) and as
every other model of this zoo has, so that the comparison does not hinge on the encoder's width. It
matters on small raw features: without it the instance stream is one linear classifier on the input,
and on the built-in digit-bags (64 pixel features, 15 epochs at lr 5e-4) the official form reached
0.47-0.68 test accuracy over three seeds where embed_dim=512 reached 0.85-0.98.

Training objective. The official train_tcga.py minimises 0.5 * BCE(bag logits) + 0.5 * BCE(m). Here
the trainer's cross-entropy is the bag term with weight 1, so the max-pooling term comes back as
`aux_losses["max_instance_ce"]` = `instance_loss_weight` * CE(m, label) with weight 1: the official
objective times 2, a rescaling that Adam-type optimisers all but ignore (their steps do not depend
on the loss scale, up to eps and L2 weight decay added to the gradient; with plain SGD it doubles the
learning rate). In training mode `logits` are the bag-stream
logits, the ones that objective trains.

Prediction. The official evaluation (train_tcga.py `test`, flag `--average`, default True) scores a
bag with 0.5 * sigmoid(m) + 0.5 * sigmoid(bag logits). With one softmax over classes this becomes
`eval_combine="mean_prob"` (default): in eval mode `logits` = log(0.5 softmax(bag) + 0.5 softmax(m)),
so softmax(logits) is the average of the two streams' probabilities (with num_classes = 1, the logit
of 0.5 sigmoid(bag) + 0.5 sigmoid(m), the official binary rule exactly). "bag" keeps the bag stream
alone (the official heat-map script testing_tcga.py and `--average False`); "mean_logit" averages the
logits, 0.5 * (bag + m), as torchmil's `DSMIL.predict`.

`attention` is the bag-stream attention of the predicted class (argmax of `logits`; the single branch
when num_classes = 1); `branch_attention` holds all C of them. `embedding` is the C class embeddings
flattened, (B, C * D), what the Conv1d classifier reads.

Differences from the official code, all deliberate:
  * softmax cross-entropy over C classes instead of the official multi-label BCE on one-hot targets.
    The official train_tcga.py also runs with one positive-class stream (--num_classes 1, BCE) and
    turns a label beyond the class count into an all-zero target (an implicit negative class); with
    the trainer's C-way softmax every class, the negative one included, has its own stream.
    num_classes = 1 keeps the single-stream form (BCE auxiliary term, sigmoid averaging);
  * batches of padded bags: padded instances get instance logit -inf before the max, so they can never
    be the critical instance nor the max-pooling prediction, and bag attention exactly 0;
  * PyTorch's default initialisation (the official script loads a fixed `init.pth`); no patch dropout
    (`--dropout_patch`, default 0: resampling bags is the data loader's job).
Official state-dict keys map one to one: i_classifier.fc.0.* -> instance_head.*,
b_classifier.q.* -> q.*, b_classifier.v.1.* -> v.1.* (passing_v), b_classifier.fcc.* -> fcc.*.

torchmil's DSMIL is the binary special case (num_classes = 1; an embedding would be its `feat_ext`) with
these differences: it chooses the critical instance among all positions, padding included (ours never
picks padding), its prediction averages logits (our eval_combine="mean_logit"), its default Q is one
Linear (official and ours: nonlinear), and its bag classifier is a Linear (the Conv1d with C = 1).
With the same weights on unpadded bags the two agree (tests/test_dsmil_dtfd.py).

At inference (no gradient) the embedding, instance logits, queries and values run in chunks of
`inference_chunk` instances, so 100k-instance bags stay lean.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import map_instances, masked_softmax
from .base import MILModel, MILOutput, ModelConfig, as_batch
from .fields import DropoutRate, LossWeight, PositiveInt
from .search import Choice, DROPOUT
from .registry import register_arch, register_presets


class DSMILConfig(ModelConfig):
    embed_dim: PositiveInt | None = None
    """Width of an instance embedding Linear -> ReLU before both streams; None: none (official)."""
    dropout: DropoutRate = 0.0
    """Dropout after the instance embedding (only with embed_dim)."""
    q_dim: PositiveInt = 128
    """Width of the queries (official 128)."""
    nonlinear_q: bool = True
    """Q = Linear -> ReLU -> Linear -> Tanh (official default, `--non_linearity 1`); False: one Linear."""
    passing_v: bool = False
    """V = Dropout -> Linear(in_dim, in_dim) -> ReLU instead of the identity (official default False)."""
    dropout_v: DropoutRate = 0.0
    """Dropout in V when `passing_v` (official `--dropout_node`, 0)."""
    instance_loss_weight: LossWeight = 1.0
    """Weight of the max-pooling CE relative to the bag CE (official 0.5 : 0.5, i.e. 1)."""
    eval_combine: Literal["mean_prob", "bag", "mean_logit"] = "mean_prob"
    """Eval-mode prediction: mean of the two streams' probabilities (official), bag stream, mean logit."""
    train_combine: Literal["bag", "mean_logit"] = "bag"
    """Training-mode `logits`: the bag stream (official: the max stream trains through its own CE), or the
    mean logit 0.5 (bag + m), so that a loss on `logits` alone trains both streams (tasks without class
    labels: `without_class_labels`)."""


def bag_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean classification loss of (B, C) logits: CE, or BCE on the single logit when C = 1."""
    if logits.shape[-1] == 1:
        return F.binary_cross_entropy_with_logits(logits[:, 0].float(), labels.float())
    return F.cross_entropy(logits.float(), labels)


def mean_probability_logits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Logits whose softmax (sigmoid when C = 1) is the mean of those of `a` and `b`, (B, C) each."""
    a, b = a.float(), b.float()
    if a.shape[-1] == 1:
        pos = torch.logaddexp(F.logsigmoid(a), F.logsigmoid(b))
        neg = torch.logaddexp(F.logsigmoid(-a), F.logsigmoid(-b))
        return pos - neg
    return torch.logaddexp(F.log_softmax(a, -1), F.log_softmax(b, -1)) - math.log(2.0)


@register_arch
class DSMIL(MILModel):
    """DSMIL aggregator. forward(x, mask, labels=None) -> MILOutput with one branch attention per class."""

    arch = "dsmil"
    Config = DSMILConfig
    class_label_losses = ("max_instance_ce",)  # need class labels: classification only
    # Without it the max stream (the instance classifier that picks the critical instances) gets no gradient,
    # yet the official prediction mixes it in: train and predict on the mean logit, which the task's loss trains.
    without_class_labels = {"train_combine": "mean_logit", "eval_combine": "mean_logit"}
    search_space = {"dropout": DROPOUT, "embed_dim": Choice((None, 128, 256))}
    tags = ("baseline", "multi_branch")
    branches_are_classes = True  # one critical-instance attention per class

    def __init__(self, config: DSMILConfig):
        super().__init__(config)
        cfg = config
        dim = cfg.embed_dim or cfg.in_dim
        self.embed = None
        if cfg.embed_dim is not None:
            drop = [nn.Dropout(cfg.dropout)] if cfg.dropout > 0 else []
            self.embed = nn.Sequential(nn.Linear(cfg.in_dim, dim), nn.ReLU(), *drop)
        self.instance_head = nn.Linear(dim, cfg.num_classes)
        if cfg.nonlinear_q:
            self.q = nn.Sequential(nn.Linear(dim, cfg.q_dim), nn.ReLU(), nn.Linear(cfg.q_dim, cfg.q_dim), nn.Tanh())
        else:
            self.q = nn.Linear(dim, cfg.q_dim)
        if cfg.passing_v:
            self.v = nn.Sequential(nn.Dropout(cfg.dropout_v), nn.Linear(dim, dim), nn.ReLU())
        else:
            self.v = nn.Identity()
        # The official bag classifier: one Conv1d whose kernel spans the whole embedding.
        self.fcc = nn.Conv1d(cfg.num_classes, cfg.num_classes, kernel_size=dim)

    def _instance_terms(self, x: torch.Tensor):
        """Position-wise part: instance logits (B, n, C), queries (B, n, q_dim), values (B, n, D) or
        None when the values are the model's input itself (no embedding, identity V)."""
        h = x if self.embed is None else self.embed(x)
        values = self.v(h) if not isinstance(self.v, nn.Identity) else (None if self.embed is None else h)
        return self.instance_head(h), self.q(h), values

    def streams(self, x: torch.Tensor, mask: torch.Tensor | None, chunk: int | None = None):
        """Both streams on a prepared batch (as from `as_batch`).

        Returns bag logits (B, C), max-pooling logits (B, C), critical instance per class (B, C),
        branch attention (B, C, N) and the class embeddings (B, C, D).
        """
        c, q, v = map_instances(self._instance_terms, x, chunk=chunk)
        v = x if v is None else v  # no copy of a 100k-instance input
        if mask is not None:
            c = c.masked_fill(~mask.unsqueeze(-1), float("-inf"))  # padding is never critical
        max_logits, critical = c.max(dim=1)  # (B, C) each
        q_crit = torch.gather(q, 1, critical.unsqueeze(-1).expand(-1, -1, q.shape[-1]))  # (B, C, q_dim)
        scores = torch.bmm(q_crit, q.transpose(1, 2)) / math.sqrt(q.shape[-1])  # (B, C, N)
        branch_attention = masked_softmax(scores, None if mask is None else mask.unsqueeze(1))
        class_embeddings = torch.bmm(branch_attention.to(v.dtype), v)  # (B, C, D)
        bag_logits = self.fcc(class_embeddings).squeeze(-1)  # (B, C)
        return bag_logits, max_logits, critical, branch_attention, class_embeddings

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, *, labels: torch.Tensor | None = None
    ) -> MILOutput:
        """x (B, N, in_dim), mask (B, N) bool, True = real instance; labels (B,) int64 bag labels add the
        max-pooling loss in training mode."""
        cfg = self.config
        x, mask = as_batch(x, mask, cfg.in_dim)
        chunk = None if torch.is_grad_enabled() else self.inference_chunk
        bag_logits, max_logits, _, branch_attention, class_embeddings = self.streams(x, mask, chunk)

        combine = cfg.train_combine if self.training else cfg.eval_combine
        if combine == "bag":
            logits = bag_logits
        elif combine == "mean_logit":
            logits = 0.5 * (bag_logits + max_logits)
        else:
            logits = mean_probability_logits(bag_logits, max_logits).to(bag_logits.dtype)

        if cfg.num_classes == 1:
            attention = branch_attention[:, 0]
        else:
            predicted = logits.argmax(-1)  # (B,)
            index = predicted[:, None, None].expand(-1, 1, branch_attention.shape[-1])
            attention = branch_attention.gather(1, index).squeeze(1)  # (B, N)

        aux: dict[str, torch.Tensor] = {}
        if self.training and labels is not None:
            aux["max_instance_ce"] = cfg.instance_loss_weight * bag_loss(max_logits, labels)
        return MILOutput(
            logits=logits, attention=attention, embedding=class_embeddings.flatten(1),
            branch_attention=branch_attention, aux_losses=aux,
        )


# ---------------------------------------------------------------------------------------------
# Presets.


register_presets(DSMIL, {"dsmil": {}}, {"dsmil": "DSMIL (Li et al. 2021): max-instance stream + critical-instance attention, official defaults"})
