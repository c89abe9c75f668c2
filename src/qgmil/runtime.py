"""The runtime every stage shares: the device, the autocast precision and torch.distributed.

Under `torchrun` (WORLD_SIZE > 1) `init_distributed` joins the process group (gloo on CPU, nccl on GPU);
one plain process is a world of size 1, for which every collective here is a no-op. Training, inference
and feature extraction all run through it.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


def available_cpus() -> int:
    """CPUs this process may use (the affinity mask where there is one: containers, taskset, SLURM)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def parse_shard(shard: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """"I/N" (or (I, N)) -> (I, N) with 0 <= I < N: a job's static share of a sorted list, every N-th item from
    the I-th (`--shard` of extraction and benchmarks). ValueError names the flag and the problem."""
    if shard is None:
        return None
    if isinstance(shard, str):
        try:
            i, n = (int(x) for x in shard.split("/"))
        except ValueError:
            raise ValueError(f"--shard {shard!r}: expected I/N, e.g. 0/4") from None
    else:
        i, n = shard
    if not 0 <= i < n:
        raise ValueError(f"--shard {shard!r}: need 0 <= I < N")
    return int(i), int(n)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"device {name!r}: not a device (auto, cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"runtime.device={name!r} but CUDA is not available here")
    return device


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """precision auto|fp32|bf16|fp16 -> the autocast dtype; None = full fp32.
    "auto": bf16 on GPUs that support it (else fp16), fp32 on CPU."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs a GPU; use bf16 or fp32 on the CPU")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to `dtype` on `device` (from `autocast_dtype`); a no-op for None (full fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


CLOSE_WAIT = datetime.timedelta(seconds=30)  # how long a rank leaving the process group waits for the others


def init_distributed(device_name: str = "auto") -> Dist:
    """Join the process group that `torchrun` describes in the environment (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world <= 1:
        return Dist(0, 1, device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(_close_process_group)
    return Dist(rank, world, device)


def is_main_process() -> bool:
    """Rank 0 of a `torchrun` launch, or a process on its own (read from the environment as init_distributed
    does, so it holds with or without a process group)."""
    return int(os.environ.get("WORLD_SIZE", "1")) <= 1 or int(os.environ.get("RANK", "0")) == 0


def _close_process_group() -> None:
    """Leave the process group at exit, once every rank got here. Without that wait a rank could reach the
    interpreter's end while a gloo worker thread still held its last collective (the final broadcast) and
    its Python tensors: the thread then needs the GIL that finalization has taken away and aborts the
    process after a finished run ("terminate called without an active exception"; about 1 in 7 runs of
    `torchrun --nproc_per_node 2 -m qgmil train` on 2 CPU cores, none in 40 with the wait). A rank that
    failed never arrives: after CLOSE_WAIT the others leave the group to the process's end."""
    if not dist.is_initialized():
        return
    try:
        dist.barrier(async_op=True).wait(timeout=CLOSE_WAIT)
    except RuntimeError:
        return
    dist.destroy_process_group()


def all_gather(obj, ctx: Dist) -> list:
    """Every rank's `obj` (any picklable value produced by this program), in rank order."""
    if not ctx.enabled:
        return [obj]
    out = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj, ctx: Dist):
    """Rank 0's `obj` on every rank."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: Dist) -> None:
    if ctx.enabled:
        dist.barrier()
