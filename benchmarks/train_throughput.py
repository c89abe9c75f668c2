"""Training throughput in bags/s: batch size 1 against padded, length-sorted batches, at two scales.

    python benchmarks/train_throughput.py [--models qgmil,abmil_gated] [--device cpu] [--quick] [--json OUT]

Scales: hematology (cell bags, N ~ 100-1000 around 500, dim 384) and WSI (patch bags, N ~ 5k-15k around 10k,
dim 1024). Each step is what `qgmil train` does: pad the batch (`pad_bags`, mask), forward, cross-entropy,
backward, AdamW step. Batches are formed from bags sorted by length (as the bucketing sampler does), so
padding stays small; the padding share is printed. Bags are random tensors in memory (loading is measured by
loader_throughput.py). One warm-up pass, then the median of `--repeats` timed passes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from qgmil import create_model
from qgmil.data.collate import pad_bags

SCALES = {  # name: (bags, N low, N high, dim, padded batch size)
    "hematology": (64, 100, 1000, 384, 16),
    "wsi": (8, 5000, 15000, 1024, 4),
}


def make_bags(count: int, low: int, high: int, dim: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(low, high + 1, (count,), generator=g).tolist()
    return [torch.randn(n, dim, generator=g) for n in sizes]


def one_pass(model, optimizer, bags, labels, batch_size: int, device) -> None:
    order = sorted(range(len(bags)), key=lambda i: bags[i].shape[0])
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        x, mask = pad_bags([bags[i] for i in idx])
        x, mask = x.to(device), mask.to(device)
        logits = model(x, mask).logits
        loss = torch.nn.functional.cross_entropy(logits, labels[idx].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def padding_share(bags, batch_size: int) -> float:
    sizes = sorted(b.shape[0] for b in bags)
    padded = sum(max(sizes[s:s + batch_size]) * len(sizes[s:s + batch_size]) for s in range(0, len(sizes), batch_size))
    return 1 - sum(sizes) / padded


def measure(model_name: str, scale: str, batch_size: int, repeats: int, device, quick: bool) -> dict:
    count, low, high, dim, _ = SCALES[scale]
    if quick:
        count = max(batch_size * 2, count // 4)
    bags = make_bags(count, low, high, dim)
    labels = torch.arange(count) % 2
    torch.manual_seed(0)
    model = create_model(model_name, in_dim=dim, num_classes=2).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    one_pass(model, optimizer, bags, labels, batch_size, device)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        one_pass(model, optimizer, bags, labels, batch_size, device)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"model": model_name, "scale": scale, "batch_size": batch_size, "bags": count,
            "bags_per_s": count / seconds, "padding": padding_share(bags, batch_size)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="qgmil,abmil_gated")
    parser.add_argument("--scales", default="hematology,wsi")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a quarter of the bags, one timed pass")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    repeats = 1 if args.quick else args.repeats

    rows = []
    for scale in args.scales.split(","):
        padded_batch = SCALES[scale][4]
        for model in args.models.split(","):
            for batch in (1, padded_batch):
                rows.append(measure(model, scale, batch, repeats, device, args.quick))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {args.threads} threads, torch {torch.__version__}, "
          f"device {device}\n")
    print("| scale | model | batch | bags/s | padding | speed-up vs batch 1 |\n|---|---|---|---|---|---|")
    base = {}
    for row in rows:
        key = (row["scale"], row["model"])
        base.setdefault(key, row["bags_per_s"])
        print(f"| {row['scale']} | {row['model']} | {row['batch_size']} | {row['bags_per_s']:.2f} | "
              f"{100 * row['padding']:.0f}% | {row['bags_per_s'] / base[key]:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
