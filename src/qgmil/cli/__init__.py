"""The `qgmil` command line: one module per command group, each a thin layer over a library function.

  models.py   qgmil models, qgmil convert-official
  data.py     qgmil data check|split, qgmil datasets list|prepare
  extract.py  qgmil extract wsi|cells|encoders
  train.py    qgmil train, qgmil evaluate, qgmil predict
  explain.py  qgmil explain mass|heatmap|cells
  export.py   qgmil export features (to TRIDENT, CLAM, STAMP layouts)
  bench.py    qgmil benchmark, qgmil demo
  options.py  options several commands share

Library modules are imported inside the commands, so that `qgmil --help` does not pay for torch.
"""

from __future__ import annotations

import errno
import sys

import click

from .. import __version__
from . import bench, data, explain, export, extract, models, train


# errnos of a write the file system refused: the message says "cannot write PATH"
_WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG}


def _os_message(err: OSError) -> str:
    where = f" {err.filename}" if err.filename else ""
    what = err.strerror or str(err)
    if err.errno in _WRITE_ERRNOS:
        return f"cannot write{where}: {what}" if where else f"cannot write: {what}"
    return f"{err.filename}: {what}" if where else str(err)


class _Errors(click.Group):
    """Turn the library's validation errors into one clean line instead of a traceback (exit 2), and the
    file system's (no space left, read-only, no permission; also as h5py and safetensors report them) into one
    line naming the path (exit 1)."""

    def invoke(self, ctx):
        from pydantic import ValidationError

        from ..atomic import os_error

        try:
            return super().invoke(ctx)
        except (ValueError, ValidationError, FileNotFoundError, ImportError) as err:
            click.secho(f"error: {err}", fg="red", err=True)
            sys.exit(2)
        except Exception as err:
            found = os_error(err)
            if found is None:
                raise
            click.secho(f"error: {_os_message(found)}", fg="red", err=True)
            sys.exit(1)


@click.group(cls=_Errors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qgmil")
def main():
    """qgmil: multiple instance learning for medical imaging, built around the QG-MIL aggregator."""


# In the order of the pipeline; `qgmil --help` lists them alphabetically.
for command in (models.models, models.convert_official_cmd, data.datasets, data.data, extract.extract, train.train, train.tune,
                train.evaluate, train.predict, explain.explain, export.export, bench.benchmark, bench.demo):
    main.add_command(command)
