"""Running a model over a dataset: the one inference pass behind validation, testing and `qgmil predict`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..data import MILDataset, make_loader
from ..models import MILModel
from ..runtime import Dist, all_gather, autocast


@dataclass
class Inference:
    """A model's outputs on the bags of a dataset, in dataset order.

    outputs: (n, O) the decoded model outputs (`decode(logits)`: softmax probabilities for classification, see
    `tasks.Task.decode` for the others). attention: per bag (N_i,) pooling attention over its real
    instances; branches: per bag (K, N_i) branch attention, for models that return it; both None unless
    asked for. branch_names: the K display names (`MILModel.branch_names`), with branches.
    """

    outputs: np.ndarray
    attention: list[np.ndarray] | None = None
    branches: list[np.ndarray] | None = None
    branch_names: list[str] | None = None


def infer(model: MILModel, data: MILDataset, ctx: Dist | None = None, *, batch_size: int | None = 1,
          batch_instances: int | None = None, pack: bool = True, dtype: torch.dtype | None = None,
          attention: bool = False, num_workers: int = 0,
          classes: list[str] | None = None, progress: bool = False, desc: str | None = None,
          decode=None) -> Inference:
    """Score every bag of `data` with `model` (eval mode, no gradient, autocast to `dtype` if given).

    Batches: at most `batch_size` bags and `batch_instances` instances (see `make_loader`), packed (no padding)
    when `pack` and the model takes packed bags.
    Under torchrun every rank scores its share of each batch and the results are gathered on all ranks.
    `classes` name the branches of models whose branch k is class k's. `decode` maps logits (B, C) to outputs
    (default: softmax).
    """
    from tqdm.auto import tqdm

    ctx = ctx or Dist(device=next(model.parameters()).device)
    loader = make_loader(data, batch_size, batch_instances=batch_instances, train=False, pack=pack and model.packable,
                         num_replicas=ctx.world, rank=ctx.rank, num_workers=num_workers)
    plan = loader.batch_sampler.step_plan()
    results: dict[int, tuple] = {}
    model.eval()
    with torch.no_grad():
        for batch, (_, stand_in) in tqdm(zip(loader, plan), total=len(plan), desc=desc, leave=False,
                                         disable=not progress):
            if stand_in:
                continue
            batch = batch.to(ctx.device)
            args, packed = batch.inputs()
            with autocast(ctx.device, dtype):
                out = model(*args, **packed)
            logits = out.logits.float()
            probs = (decode(logits) if decode is not None else logits.softmax(-1)).cpu().numpy()
            att = out.attention.float().cpu().numpy() if attention else None
            branches = None
            if attention and out.branch_attention is not None:
                branches = out.branch_attention.float().cpu().numpy()
            mask = batch.mask.cpu().numpy()
            for row, index in enumerate(batch.index.tolist()):
                real = mask[row]
                results[index] = (probs[row], att[row][real] if attention else None,
                                  branches[row][:, real] if branches is not None else None)
    merged: dict[int, tuple] = {}
    for part in all_gather(results, ctx):
        merged.update(part)
    order = range(len(data))
    result = Inference(np.stack([merged[i][0] for i in order]))
    if attention:
        result.attention = [merged[i][1] for i in order]
        if len(data) and merged[0][2] is not None:
            result.branches = [merged[i][2] for i in order]
            result.branch_names = model.branch_names(list(classes or []), result.branches[0].shape[0])
    return result
