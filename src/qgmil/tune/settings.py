"""The settings tuning chose, over the outer folds of a run: the most frequent choice and the spread.

RUN_DIR/tuning/settings.md and settings.csv: one row per searched key. A float range: the median of the
chosen values and their range; a choice or integer: the most frequent value and how many folds chose it.
"""

from __future__ import annotations

import statistics
from collections import Counter

import pandas as pd

from ..atomic import atomic_write_text
from ..models.search import Float, Space
from ..rundir import RunDir
from ..rundir.directory import write_csv


def _short(key: str) -> str:
    return key.removeprefix("model.overrides.").removeprefix("optim.")


def _value(v) -> str:
    return "null" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)


def summarize(chosen: dict[str, dict], space: Space | None = None) -> list[dict]:
    """One row per key chosen in any fold: key, kind, summary text, folds."""
    keys = list(dict.fromkeys(k for c in chosen.values() for k in c["params"]))
    rows = []
    for key in keys:
        values = [c["params"][key] for c in chosen.values() if key in c["params"]]
        is_float = isinstance((space or {}).get(key), Float) or all(isinstance(v, float) for v in values)
        if is_float:
            text = f"{_value(statistics.median(values))} [{_value(min(values))}, {_value(max(values))}]"
        else:
            value, count = Counter(map(_value, values)).most_common(1)[0]
            text = f"{value} ({count}/{len(values)})"
        rows.append({"key": key, "name": _short(key), "summary": text, "folds": len(values),
                     "values": ";".join(map(_value, values))})
    return rows


def compact(chosen: dict[str, dict]) -> str:
    """All keys in one line, for benchmark tables: 'lr 3.1e-04 [1e-4, 6e-4]; dim 512 (4/5)'."""
    return "; ".join(f"{r['name']} {r['summary']}" for r in summarize(chosen))


def write_settings(run: RunDir, space: Space) -> None:
    chosen = run.read_chosen()
    if not chosen:
        return
    rows = summarize(chosen, space)
    write_csv(run.tuning / "settings.csv", pd.DataFrame(rows))
    spent = [f"{sum(c[k] for c in chosen.values())} {k}" for k in ("complete", "pruned", "failed")]
    epochs = sum(c["trial_epochs"] for c in chosen.values())
    lines = [f"# Tuned settings ({len(chosen)} outer folds, {next(iter(chosen.values()))['trials']} trials each: "
             f"{', '.join(spent)}; {epochs} trial-epochs)", "",
             "| setting | chosen: median [range] or most frequent (folds) |", "|---|---|"]
    lines += [f"| {r['name']} | {r['summary']} |" for r in rows]
    atomic_write_text(run.tuning / "settings.md", "\n".join(lines) + "\n")
