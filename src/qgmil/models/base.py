"""What every aggregator shares: the output type, input checking and the config-driven base class."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from ..layers.segments import Segments

from .fields import PositiveInt


@dataclass
class MILOutput:
    """Output of every aggregator.

    logits: (B, C) class scores (C = 1 means one binary logit).
    attention: (B, N) pooling weights over instances; sum to 1 over real instances, exactly 0 on padding.
    embedding: (B, D) pooled bag embedding that the classifier head sees.
    layer_attention: per transformer layer (B, H, N, N), only when asked for (small bags).
    branch_attention: (B, K, N) for multi-branch models (one attention per class or branch), else None;
        `attention` is then the one the bag prediction uses (or their mean), documented per model.
    aux_losses: named auxiliary loss terms (scalars: means over the batch's bags, already weighted) that
        training adds to the cross-entropy. Models fill it only in training mode when given `labels`.
    """

    logits: torch.Tensor
    attention: torch.Tensor
    embedding: torch.Tensor
    layer_attention: list[torch.Tensor] | None = None
    branch_attention: torch.Tensor | None = None
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)


class ModelConfig(BaseModel):
    """Base of all model configs: unknown keys and wrong types are errors that name the key."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    in_dim: PositiveInt
    num_classes: PositiveInt


def as_batch(x: torch.Tensor, mask: torch.Tensor | None, in_dim: int):
    """Check inputs and bring them to (B, N, D) + (B, N) bool mask, or mask None when all are real.

    Padded positions are zeroed so that no value there (inf, NaN, anything) can leak through
    0 * value products; with the key mask this makes outputs independent of padding.
    """
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {type(x).__name__} {getattr(x, 'dtype', '')}")
    if x.dim() == 2:
        x = x.unsqueeze(0)
        if mask is not None and mask.dim() == 1:
            mask = mask.unsqueeze(0)
    if x.dim() != 3:
        raise ValueError(f"x must be (B, N, D) or (N, D), got shape {tuple(x.shape)}")
    if x.shape[-1] != in_dim:
        raise ValueError(f"x has feature dimension {x.shape[-1]} but the model expects in_dim={in_dim}")
    if x.shape[1] == 0:
        raise ValueError("x holds no instances (N = 0)")
    if mask is None:
        return x, None
    if mask.shape != x.shape[:2]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match x (B, N) = {tuple(x.shape[:2])}")
    mask = mask if mask.dtype == torch.bool else mask != 0
    empty = (~mask.any(1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"bag(s) {empty} of the batch have no real instance (mask all False)")
    if bool(mask.all()):
        return x, None
    return x.masked_fill(~mask.unsqueeze(-1), 0.0), mask


def as_packed(x: torch.Tensor, lengths: torch.Tensor, in_dim: int) -> tuple[torch.Tensor, Segments]:
    """Check packed bags: x (T, D) (or (1, T, D)) with lengths (B,) summing to T -> x (1, T, D), Segments."""
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {type(x).__name__} {getattr(x, 'dtype', '')}")
    if x.dim() == 3 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 2:
        raise ValueError(f"packed x must be (T, D), got shape {tuple(x.shape)}")
    if x.shape[-1] != in_dim:
        raise ValueError(f"x has feature dimension {x.shape[-1]} but the model expects in_dim={in_dim}")
    return x.unsqueeze(0), Segments.from_lengths(lengths.to(x.device), total=x.shape[0])


def unpack_output(out: MILOutput, segments: Segments) -> MILOutput:
    """A packed forward's per-row attention (T,) / branch attention (K, T) -> the padded (B, N) / (B, K, N) of
    the contract (zeros after each bag's end), so callers see one output shape."""
    out.attention = segments.pad(out.attention)
    if out.branch_attention is not None:
        out.branch_attention = segments.pad(out.branch_attention.transpose(0, 1)).permute(0, 2, 1)
    return out


class MILModel(nn.Module):
    """Base class: a model is built from one validated config and can be rebuilt from it.

    Subclasses set `arch` (the architecture name stored in checkpoints) and `Config`.
    `name` is the registry name the model was created under (a preset of the architecture).
    """

    arch: ClassVar[str]
    Config: ClassVar[type[ModelConfig]]

    # Traits: what the engine needs to know about a model, read from the class, never from its name.
    tags: ClassVar[tuple[str, ...]] = ("baseline",)
    """Registry tags every preset of the architecture carries (see registry.TAGS)."""

    permutation_invariant: ClassVar[bool] = True
    """False for models that depend on instance order by design (e.g. TransMIL's PPEG grid)."""

    branches_are_classes: ClassVar[bool] = False
    """True when branch k of `MILOutput.branch_attention` is class k's attention (CLAM-MB, DSMIL)."""

    packable: ClassVar[bool] = False
    """True when `forward(x, lengths=...)` takes packed bags (x (T, D), the bags concatenated; no padding, no
    FLOPs on it) and gives what the padded batch gives; the engine pads for models without it. A subclass
    may make it a property when it depends on the config."""

    has_unused_parameters: ClassVar[bool] = False
    """True when a training step may leave parameters without gradient (CLAM trains only the instance
    classifiers of the bag's class), so DDP must look for them (`find_unused_parameters`)."""

    class_label_losses: ClassVar[tuple[str, ...]] = ()
    """Names of the `aux_losses` that need bag class labels (CLAM's instance clustering, DSMIL's max-instance
    CE, ...): trained for classification only; the other tasks (survival, regression, multi-label) give the
    model no `labels`, train without them and say so in run.json's notes."""

    without_class_labels: ClassVar[dict] = {}
    """Config changes for training without class labels (the other tasks), where the model's output would
    otherwise rest on a part only a class-label loss trains (DSMIL's max-instance stream); a run's own
    `model.overrides` win (`registry.run_overrides`)."""

    search_space: ClassVar[dict] = {}
    """What `qgmil tune` may vary of this architecture besides the learning rate and weight decay: config field ->
    `search.Float | Int | Choice`. A preset's own fields are left out (they are what the preset is)."""

    inference_chunk: int | None = 8192
    """Instances per chunk for position-wise layers when no gradient is recorded (memory only, not numerics)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.name = self.arch

    def branch_names(self, classes: list[str], k: int) -> list[str]:
        """Display names of the K branches of `branch_attention`: the class names where branch k is class k's."""
        if self.branches_are_classes and k == len(classes):
            return [str(c) for c in classes]
        return [f"branch {i}" for i in range(k)]

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, *, labels: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
    ) -> MILOutput:  # pragma: no cover
        """x (B, N, in_dim) or (N, in_dim); mask (B, N) bool, True = real instance; labels (B,) int64 bag
        labels, only for models whose training objective needs them (auxiliary losses); others ignore them.
        Packable models also take packed bags: x (T, in_dim) and lengths (B,) (see `packable`)."""
        raise NotImplementedError
