"""What a run leaves on disk, and the one place that reads and writes it.

  config.py     the run configuration (RUN_DIR/config.yaml): schema, loading, --set overrides
  directory.py  the run directory: paths, facts (run.json), finished folds, predictions, summary, checkpoints
  attention.py  the attention file (attention.h5): pooling and branch attention per bag
"""

from .attention import BRANCH_GROUP, AttentionFile, read_attention, write_attention
from .config import ConfigError, RunConfig, load_config, parse_set
from .directory import FoldDir, RunDir, RunDirError

__all__ = [
    "BRANCH_GROUP",
    "AttentionFile",
    "ConfigError",
    "FoldDir",
    "RunConfig",
    "RunDir",
    "RunDirError",
    "load_config",
    "parse_set",
    "read_attention",
    "write_attention",
]
