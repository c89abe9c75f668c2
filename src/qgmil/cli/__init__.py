"""The `qgmil` command line: one module per command group, each a thin layer over a library function.

  models.py   qgmil models, qgmil convert-official
  data.py     qgmil data check|split, qgmil datasets list|prepare
  extract.py  qgmil extract wsi|cells|encoders
  train.py    qgmil train, qgmil evaluate, qgmil predict
  explain.py  qgmil explain mass|heatmap|cells
  bench.py    qgmil benchmark, qgmil demo
  options.py  options several commands share

Library modules are imported inside the commands, so that `qgmil --help` does not pay for torch.
"""

from __future__ import annotations

import sys

import click

from .. import __version__
from . import bench, data, explain, extract, models, train


class _Errors(click.Group):
    """Turn the library's validation errors into one clean line instead of a traceback."""

    def invoke(self, ctx):
        from pydantic import ValidationError

        try:
            return super().invoke(ctx)
        except (ValueError, ValidationError, FileNotFoundError, ImportError) as err:
            click.secho(f"error: {err}", fg="red", err=True)
            sys.exit(2)


@click.group(cls=_Errors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qgmil")
def main():
    """qgmil: multiple instance learning for medical imaging, built around the QG-MIL aggregator."""


# In the order of the pipeline; `qgmil --help` lists them alphabetically.
for command in (models.models, models.convert_official_cmd, data.datasets, data.data, extract.extract, train.train, train.tune,
                train.evaluate, train.predict, explain.explain, bench.benchmark, bench.demo):
    main.add_command(command)
