"""Training one fold: a short loop with early stopping, best checkpoint and exact resume.

Per epoch: train on the training part, score the validation part, keep the best weights
(`best.safetensors`), write `epochs.csv`, and save the full state (`state.safetensors`: weights,
optimizer, schedule, RNG). Resuming from that state continues bit for bit. At the end the best
weights predict the test part: `predictions.csv`, `attention.h5`, `metrics.json` (written last: its
presence marks the fold as done). Where those files live is `rundir.FoldDir`'s business.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..checkpoint import load_model, read_metadata, save_model
from ..data import MILDataset, make_loader, set_epoch
from ..data.splits import Fold
from ..evaluate.inference import infer
from ..models import MILModel, create_model, run_overrides
from ..rundir import FoldDir, RunConfig, write_attention
from ..rundir.directory import write_csv
from ..runtime import Dist, all_gather, autocast, autocast_dtype, barrier
from ..tasks import Task
from .state import load_state, save_state


@dataclass
class FoldParts:
    train: MILDataset
    val: MILDataset | None
    test: MILDataset | None  # None while tuning: a trial never sees a test part


def _epoch_end_hook(fold: str, epoch: int) -> None:
    """Called after each epoch's state is saved. Tests replace it to simulate an interruption."""


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: biases, norm scales and other 1-D tensors are not decayed."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(groups: list[dict], **kwargs) -> torch.optim.AdamW:
    """AdamW on its fastest implementation for the parameters' device: fused (one kernel for all tensors; CPU
    and CUDA) where torch has it, else foreach (one op per step over all tensors). The default single-tensor
    path updates each tensor in its own ops: on a CPU it was 41% of a small-bag training step."""
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, ValueError):  # no fused kernel for this device or dtype
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float):
    """LR factor per optimizer step: linear warmup to 1, then cosine down to `min_ratio`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def monitored(task: Task, monitor: str) -> str:
    """The metric name eval.monitor stands for ("loss": the task's validation loss)."""
    return task.loss_metric if monitor == "loss" else monitor


def _score(metrics: dict, task: Task, monitor: str) -> tuple[float, float]:
    """Comparable score, higher is better; ties on the monitored metric go to the lower validation loss."""
    name = monitored(task, monitor)
    value = metrics[name] if task.higher_is_better(name) else -metrics[name]
    value = -math.inf if value is None or math.isnan(value) else value
    loss = metrics.get(task.loss_metric, math.nan)
    return (value, -math.inf if math.isnan(loss) else -loss)


class FoldTrainer:
    """Trains and evaluates one fold of a run. All ranks call `run`; rank 0 writes the files.

    `task` says what the model predicts (its output width, loss, outputs and metrics); it is fitted on each
    fold's training part (class weights, target standardisation, time bins) and saved with the checkpoint."""

    def __init__(self, config: RunConfig, ctx: Dist, task: Task, in_dim: int, checkpoint_extra: dict):
        self.config = config
        self.ctx = ctx
        self.task = task
        self.in_dim = in_dim
        self.checkpoint_extra = checkpoint_extra
        self.dtype = autocast_dtype(ctx.device, config.runtime.precision)

    def _model(self, seed: int) -> MILModel:
        torch.manual_seed(seed)
        name = self.config.model.name
        overrides = run_overrides(name, self.config.model.overrides, class_labels=self.task.needs_class_labels)
        model = create_model(name, in_dim=self.in_dim, num_classes=self.task.out_dim, **overrides)
        return model.to(self.ctx.device)

    def _infer(self, model: MILModel, data: MILDataset, task: Task, **kwargs):
        cfg = self.config
        return infer(model, data, self.ctx, batch_size=cfg.optim.batch_size, batch_instances=cfg.optim.batch_instances,
                     pack=cfg.optim.pack, dtype=self.dtype, num_workers=cfg.data.num_workers, decode=task.decode,
                     **kwargs)

    def run(self, fold: Fold, parts: FoldParts, fold_dir: FoldDir, progress: bool = True) -> dict:
        """Train (or resume) the fold in `fold_dir`, then test its best weights; returns metrics.json's dict."""
        started = time.time()
        info = self.fit(fold, parts, fold_dir, progress)
        return self._test(fold, parts, fold_dir, info, time.time() - started)

    def fit(self, fold: Fold, parts: FoldParts, fold_dir: FoldDir | None, progress: bool = True,
            on_epoch: Callable[[int, dict], None] | None = None) -> dict:
        """The epoch loop; returns its state (history: one row per epoch, best_epoch, ...).

        With `fold_dir` None (a tuning trial) nothing is written: no checkpoint, no state, no epochs.csv.
        `on_epoch(epoch, row)` sees each epoch's row (val_* metrics included) once it is recorded; what it
        raises (a pruned trial) ends the loop.
        """
        cfg, ctx = self.config, self.ctx
        if fold_dir is not None:
            fold_dir.path.mkdir(parents=True, exist_ok=True)
        model = self._model(seed=fold.seed * 1000 + fold.fold)
        wrapped = model
        if ctx.enabled:
            wrapped = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                find_unused_parameters=model.has_unused_parameters)
        optimizer = adamw(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr, betas=cfg.optim.betas)
        train = parts.train
        loader = make_loader(train, cfg.optim.batch_size, batch_instances=cfg.optim.batch_instances, train=True,
                             pack=cfg.optim.pack and model.packable, seed=fold.seed * 1000 + fold.fold,
                             class_balanced=cfg.optim.class_balanced_sampling, num_workers=cfg.data.num_workers,
                             num_replicas=ctx.world, rank=ctx.rank, pin_memory=ctx.device.type == "cuda")
        # Optimizer steps of every epoch (under an instance budget the batch count varies with the shuffle),
        # so the schedule counts the real steps.
        batches = loader.batch_sampler.steps_per_epoch(range(cfg.optim.epochs))
        steps = [math.ceil(n / cfg.optim.grad_accum) for n in batches]
        schedule = warmup_cosine(round(cfg.optim.warmup_epochs * steps[0]), sum(steps), cfg.optim.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        scaler = torch.amp.GradScaler(ctx.device.type, enabled=self.dtype == torch.float16)
        task = self.task.fit(train)

        info = {"epoch": -1, "best_score": None, "best_epoch": -1, "bad_epochs": 0, "history": []}
        if fold_dir is not None and fold_dir.state.exists():
            info = load_state(fold_dir.state, model, optimizer, scheduler, scaler, ctx.rank)
        writer = self._tensorboard(fold_dir, info["epoch"] + 1) if fold_dir is not None else None

        # A fold that stopped early and was interrupted while testing must not train on.
        start = cfg.optim.epochs if info.get("stopped_early") else info["epoch"] + 1
        epochs = tqdm(range(start, cfg.optim.epochs), desc=fold.name, leave=False, unit="epoch",
                      disable=not (progress and ctx.is_main), initial=start, total=cfg.optim.epochs)
        shown = "val_" + monitored(task, cfg.eval.monitor)
        for epoch in epochs:
            set_epoch(loader, epoch)
            lr = optimizer.param_groups[0]["lr"]
            train_loss = self._train_epoch(wrapped, model, loader, optimizer, scheduler, scaler, task)
            row = {"epoch": epoch, "lr": lr, "train_loss": train_loss}
            kept = task
            if parts.val is not None and len(parts.val):
                outputs = self._infer(model, parts.val, task).outputs
                val = task.metrics(task.targets_of(parts.val), outputs)
                kept = task.calibrate(task.targets_of(parts.val), outputs)
                row.update({f"val_{k}": v for k, v in val.items()})
                score = list(_score(val, task, cfg.eval.monitor))
            else:  # no validation part: the last epoch is the one kept
                score = [float(epoch), 0.0]
            improved = info["best_score"] is None or score > info["best_score"]
            if improved:
                info.update(best_score=score, best_epoch=epoch, bad_epochs=0)
                if ctx.is_main and fold_dir is not None:
                    save_model(model, fold_dir.best, extra={**self.checkpoint_extra, "fold": fold.name,
                                                            "epoch": epoch, "task": kept.describe()})
            else:
                info["bad_epochs"] += 1
            row["best"] = improved
            info["epoch"] = epoch
            info["history"].append(row)
            stop = (cfg.eval.patience is not None and info["bad_epochs"] >= cfg.eval.patience
                    and epoch + 1 >= cfg.eval.min_epochs)
            info["stopped_early"] = stop
            rng = all_gather(torch.get_rng_state(), ctx)
            if ctx.is_main and fold_dir is not None:
                write_csv(fold_dir.epochs, pd.DataFrame(info["history"]))
                save_state(fold_dir.state, model, optimizer, scheduler, scaler, rng, info)
                if writer is not None:
                    for key, value in row.items():
                        if isinstance(value, (int, float)) and key != "epoch":
                            writer.add_scalar(key, value, epoch)
            barrier(ctx)
            epochs.set_postfix({"loss": f"{train_loss:.3f}", **({shown: f"{row[shown]:.3f}"} if shown in row else {})})
            _epoch_end_hook(fold.name, epoch)
            if on_epoch is not None:
                on_epoch(epoch, row)
            if stop:
                break
        if writer is not None:
            writer.close()
        return info

    def _train_epoch(self, wrapped, model, loader, optimizer, scheduler, scaler, task: Task) -> float:
        """One pass; returns the mean task loss over the training bags (all ranks)."""
        cfg, ctx = self.config, self.ctx
        accum, clip = cfg.optim.grad_accum, cfg.optim.grad_clip
        plan = loader.batch_sampler.step_plan()
        model.train()
        total, count = 0.0, 0
        for step, (batch, (global_size, stand_in)) in enumerate(zip(loader, plan)):
            group_start = step - step % accum
            group_len = min(accum, len(plan) - group_start)
            last_in_group = step == group_start + group_len - 1
            batch = batch.to(ctx.device, non_blocking=True)
            sync = wrapped.no_sync() if ctx.enabled and not last_in_group else contextlib.nullcontext()
            with sync:
                with autocast(ctx.device, self.dtype):
                    args, packed = batch.inputs()
                    # class labels only for classification: models' class-specific auxiliary losses need them
                    labels = batch.labels if task.needs_class_labels else None
                    out = wrapped(*args, labels=labels, **packed)
                bag_loss = task.loss(out.logits.float(), batch)  # summed over the batch's bags
                keep = 0.0 if stand_in else 1.0
                # Sum over this rank's bags / global batch size, times world size (DDP averages over
                # ranks): the gradient of the mean loss over the global batch, as in one process.
                scale = keep * ctx.world / (global_size * group_len)
                loss = bag_loss * scale
                for aux in out.aux_losses.values():
                    loss = loss + aux.float() * len(batch) * scale
                scaler.scale(loss).backward()
            if last_in_group:
                if clip is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
            if not stand_in:
                total += float(bag_loss.detach())
                count += len(batch)
        sums = all_gather((total, count), ctx)
        return sum(t for t, _ in sums) / max(1, sum(c for _, c in sums))

    def _tensorboard(self, fold_dir: FoldDir, start_epoch: int):
        if not (self.config.runtime.tensorboard and self.ctx.is_main):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return None
        return SummaryWriter(str(fold_dir.tensorboard), purge_step=start_epoch)

    def _test(self, fold: Fold, parts: FoldParts, fold_dir: FoldDir, info: dict, seconds: float) -> dict:
        cfg, ctx = self.config, self.ctx
        barrier(ctx)
        model = load_model(fold_dir.best, device=str(ctx.device))
        # the fitted (and calibrated) state the kept weights were saved with
        task = self.task.with_state(read_metadata(fold_dir.best)["extra"]["task"]["state"])
        classes = self.task.names if task.kind == "classification" else []
        result = self._infer(model, parts.test, task, attention=cfg.eval.save_attention, classes=classes)
        outputs, y = result.outputs, task.targets_of(parts.test)
        test = task.metrics(y, outputs)
        best_row = info["history"][info["best_epoch"]]  # history holds every epoch from 0, across resumes
        metrics = {
            "fold": fold.fold, "seed": fold.seed, "name": fold.name,
            "best_epoch": info["best_epoch"], "epochs_run": info["epoch"] + 1,
            "stopped_early": bool(info.get("stopped_early")),
            "n_train": len(parts.train), "n_val": len(parts.val) if parts.val is not None else 0, "n_test": len(y),
            "val": {k[4:]: v for k, v in best_row.items() if k.startswith("val_")},
            "test": test,
            "seconds": round(seconds, 3),
        }
        if ctx.is_main:
            frame = pd.DataFrame({
                "bag_id": parts.test.bag_ids, "patient_id": parts.test.patient_ids,
                "fold": fold.fold, "seed": fold.seed, **task.prediction_columns(y, outputs),
            })
            if result.attention is not None:
                write_attention(fold_dir.attention, parts.test.bag_ids, result.attention, branches=result.branches,
                                branch_names=result.branch_names,
                                attrs={"fold": fold.fold, "seed": fold.seed, "fold_name": fold.name})
            fold_dir.finish(frame, metrics)
        barrier(ctx)
        return metrics
