"""Training throughput in bags/s for every way of batching bags, at three scales, in one run.

    python benchmarks/train_throughput.py [--models qgmil,abmil_gated] [--device cpu] [--quick] [--json OUT]

Modes (each step is what `qgmil train` does: collate, forward, cross-entropy, backward, optimizer step):
  batch 1, old optimizer   one bag per step, AdamW's default single-tensor update (the package defaults before
                           optim.batch_instances, packing and the fused optimizer)
  batch 1                  one bag per step, fused AdamW
  padded B                 B bags per step padded to the longest (length-sorted pools, as the sampler does)
  budget                   the default sampler limits (optim.batch_size bags, optim.batch_instances padded instances)
  packed                   the same limits, bags concatenated without padding (models with `packable`); the default
Scales: small (200 bags of 4-14 instances, dim 64: the classic MIL benchmarks), hematology (cell bags, 100-1000
around 500, dim 384) and WSI (patch bags, 5k-15k, dim 1024). Bags are random tensors in memory (loading is
measured by loader_throughput.py). "padding" is the share of instance positions that are padding (the FLOPs
of the position-wise layers spent on it); "attention padding" the share of the attention's N^2 FLOPs. One
warm-up epoch per mode, then `--repeats` rounds that time one epoch of every mode in turn (so load changes
hit all modes alike) and the median per mode; ratios are against "batch 1, old optimizer" of the same model
and scale, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np
import torch

from qgmil import create_model
from qgmil.data.collate import pack_bags, pad_bags
from qgmil.data.sampler import BucketBatchSampler
from qgmil.rundir.config import OptimConfig
from qgmil.train.loop import adamw

SCALES = {  # name: (bags, N low, N high, dim, padded batch size)
    "small": (200, 4, 14, 64, 16),
    "hematology": (64, 100, 1000, 384, 16),
    "wsi": (8, 5000, 15000, 1024, 4),
}
DEFAULTS = OptimConfig()


def make_bags(count: int, low: int, high: int, dim: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(low, high + 1, (count,), generator=g).tolist()
    return [torch.randn(n, dim, generator=g) for n in sizes]


def batches_of(mode: str, lengths: np.ndarray, padded_batch: int) -> list[list[int]]:
    if mode.startswith("batch 1"):
        return [[i] for i in range(len(lengths))]
    if mode == "padded":
        return list(BucketBatchSampler(lengths, padded_batch, seed=0))
    return list(BucketBatchSampler(lengths, DEFAULTS.batch_size, batch_instances=DEFAULTS.batch_instances,
                                   packed=mode == "packed", seed=0))


def one_epoch(model, optimizer, bags, labels, batches, packed: bool, device) -> None:
    for idx in batches:
        if packed:
            x, lengths = pack_bags([bags[i] for i in idx])
            logits = model(x.to(device), lengths=lengths.to(device)).logits
        else:
            x, mask = pad_bags([bags[i] for i in idx])
            logits = model(x.to(device), mask.to(device)).logits
        loss = torch.nn.functional.cross_entropy(logits, labels[idx].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def waste(batches: list[list[int]], lengths: np.ndarray, packed: bool) -> tuple[float, float]:
    """(padding share of instance positions, padding share of attention FLOPs)."""
    if packed:
        return 0.0, 0.0
    real = sum(int(lengths[b].sum()) for b in batches)
    padded = sum(int(lengths[b].max()) * len(b) for b in batches)
    real_sq = sum(int((lengths[b] ** 2).sum()) for b in batches)
    padded_sq = sum(int(lengths[b].max()) ** 2 * len(b) for b in batches)
    return 1 - real / padded, 1 - real_sq / padded_sq


def measure_scale(model_name: str, scale: str, modes: list[str], repeats: int, device, quick: bool) -> list[dict]:
    """Every mode at one scale. The modes' timed epochs are interleaved (each repeat times every mode once),
    so a change in the machine's load affects them alike and the ratios stay fair."""
    count, low, high, dim, padded_batch = SCALES[scale]
    if quick:
        count = max(padded_batch * 2, count // 4)
    bags = make_bags(count, low, high, dim)
    lengths = np.array([b.shape[0] for b in bags])
    labels = torch.arange(count) % 2
    setups = {}
    for mode in modes:
        torch.manual_seed(0)
        model = create_model(model_name, in_dim=dim, num_classes=2).to(device).train()
        packed = mode == "packed"
        if packed and not model.packable:
            continue
        groups = [{"params": list(model.parameters())}]
        optimizer = (torch.optim.AdamW(groups, lr=1e-4, foreach=False) if mode == "batch 1, old optimizer"
                     else adamw(groups, lr=1e-4))
        setups[mode] = (model, optimizer, batches_of(mode, lengths, padded_batch), packed)
        one_epoch(model, optimizer, bags, labels, setups[mode][2], packed, device)  # warm-up
    times = {mode: [] for mode in setups}
    for _ in range(repeats):
        for mode, (model, optimizer, batches, packed) in setups.items():
            start = time.perf_counter()
            one_epoch(model, optimizer, bags, labels, batches, packed, device)
            times[mode].append(time.perf_counter() - start)
    rows = []
    for mode, (_, _, batches, packed) in setups.items():
        seconds = statistics.median(times[mode])
        padding, attention_padding = waste(batches, lengths, packed)
        rows.append({"model": model_name, "scale": scale, "mode": f"padded {padded_batch}" if mode == "padded" else mode,
                     "bags": count, "steps": len(batches), "epoch_s": seconds, "bags_per_s": count / seconds,
                     "padding": padding, "attention_padding": attention_padding})
        print(f"  {scale} {model_name} {rows[-1]['mode']}: {rows[-1]['bags_per_s']:.2f} bags/s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="qgmil,abmil_gated")
    parser.add_argument("--scales", default="small,hematology,wsi")
    parser.add_argument("--modes", default="batch 1, old optimizer;batch 1;padded;budget;packed",
                        help="semicolon-separated")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a quarter of the bags, two timed epochs")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    repeats = 2 if args.quick else args.repeats

    rows = []
    for scale in args.scales.split(","):
        for model in args.models.split(","):
            rows += measure_scale(model, scale, args.modes.split(";"), repeats, device, args.quick)
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, {args.threads} threads, torch {torch.__version__}, "
          f"device {device}{gpu}; defaults: batch_size {DEFAULTS.batch_size}, batch_instances "
          f"{DEFAULTS.batch_instances}, pack {DEFAULTS.pack}\n")
    print("| scale | model | mode | steps/epoch | epoch s | bags/s | padding | attention padding | vs batch 1, old |\n"
          "|---|---|---|---|---|---|---|---|---|")
    base = {}
    for row in rows:
        key = (row["scale"], row["model"])
        base.setdefault(key, row["bags_per_s"])
        print(f"| {row['scale']} | {row['model']} | {row['mode']} | {row['steps']} | {row['epoch_s']:.2f} | "
              f"{row['bags_per_s']:.1f} | {100 * row['padding']:.0f}% | {100 * row['attention_padding']:.0f}% | "
              f"{row['bags_per_s'] / base[key]:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
