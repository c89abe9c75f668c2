"""Explaining trained models from their saved outputs (the test attention of a run).

  reader.py       reading a finished run: its test attention, bags and instance labels (`load_run`)
  mass.py         attention-mass metrics of one bag's attention, and their summary per model x dataset
  mass_report.py  `qgmil explain mass`: the per-bag and summary tables and the figures, written to a folder
  heatmap.py      attention heatmaps over slides (`qgmil explain heatmap`)
  gallery.py      cell galleries (`qgmil explain cells`)
  grid.py         the ranked image grid (most / least attended instances) that heatmap and gallery draw
  slide_views.py  a slide's tiles, the runs' attention layers over them and their predictions (export, viewer)
  qupath.py       QuPath-compatible GeoJSON of the tiles and their attention (`qgmil explain export`)
  deepzoom.py     Deep Zoom pyramids (.dzi + tiles) of slides: OpenSlide's DeepZoomGenerator, or Pillow
  viewer.py       the static slide viewer (`qgmil explain view`): OpenSeadragon pages, assets in viewer_assets/
"""

from .mass import bag_metrics, format_summary, localisation, lorenz_curve, summarize
from .mass_report import MassReport, write_mass_report
from .reader import ExplainError, MassError, RunAttention, load_run, run_metrics

__all__ = ["ExplainError", "MassError", "MassReport", "RunAttention", "bag_metrics", "format_summary", "load_run",
           "localisation", "lorenz_curve", "run_metrics", "summarize", "write_mass_report"]
