"""Figures without pyplot: a bare Agg `Figure`, written atomically. matplotlib is an optional extra
(`pip install "qgmil[plots]"`); `new_figure` raises an ImportError that says so.

  new_figure(**kwargs)                      -> matplotlib Figure on an Agg canvas
  save_figure(fig, path)                    -> PNG (or the suffix's format), tight bounding box, 120 dpi
  save_exact(fig, path, dpi)                -> the figure exactly as laid out (pixel-exact panels)
"""

from __future__ import annotations

from pathlib import Path

from .atomic import atomic_write

EXTRA = "pip install 'qgmil[plots]'"


def new_figure(**kwargs):
    """A matplotlib Figure on an Agg canvas (no pyplot state, safe in threads and workers)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"figures need matplotlib: {EXTRA}") from e
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _fmt(path: Path) -> str:
    return path.suffix.lstrip(".").lower() or "png"


def save_figure(fig, path, dpi: int = 120) -> Path:
    """Write the figure cropped to its contents (bbox_inches="tight"), atomically."""
    path = Path(path)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format=_fmt(path), dpi=dpi, bbox_inches="tight"))


def save_exact(fig, path, dpi: int) -> Path:
    """Write the figure at exactly its laid-out size (no tight crop) on white, atomically."""
    path = Path(path)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format=_fmt(path), dpi=dpi, facecolor="white"))
