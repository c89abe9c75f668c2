"""Apply position-wise layers over instance chunks, so inference on huge bags stays lean."""

from __future__ import annotations

from typing import Callable

import torch


def map_instances(fn: Callable, *xs: torch.Tensor | None, chunk: int | None = None):
    """Return `fn(*xs)`, evaluated `chunk` instances (dim 1) at a time when `chunk` is set.

    `fn` must be position-wise (row i of the output depends only on row i of the inputs) and
    return a tensor or a tuple of tensors/None, each shaped (B, n, ...). Outputs are written into
    preallocated tensors, so the peak is one full output plus one chunk of intermediates (e.g. the
    2048-wide SwiGLU hidden layer of 8k instances instead of 100k). Inputs may be None (passed through).
    """
    n = xs[0].shape[1]
    if chunk is None or n <= chunk:
        return fn(*xs)
    outs: list[torch.Tensor | None] | None = None
    single = False
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        part = fn(*(None if x is None else x[:, start:stop] for x in xs))
        single = isinstance(part, torch.Tensor)
        parts = (part,) if single else part
        if outs is None:
            outs = [None if p is None else p.new_empty(p.shape[0], n, *p.shape[2:]) for p in parts]
        for out, p in zip(outs, parts):
            if out is not None:
                out[:, start:stop] = p
    return outs[0] if single else tuple(outs)
