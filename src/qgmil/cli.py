"""The `qgmil` command line. Subcommands of later pipeline stages register here too."""

from __future__ import annotations

import json
import sys

import click

from . import __version__


class _Errors(click.Group):
    """Turn the library's validation errors into one clean line instead of a traceback."""

    def invoke(self, ctx):
        from pydantic import ValidationError

        try:
            return super().invoke(ctx)
        except (ValueError, ValidationError, FileNotFoundError) as err:
            click.secho(f"error: {err}", fg="red", err=True)
            sys.exit(2)


@click.group(cls=_Errors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qgmil")
def main():
    """qgmil: multiple instance learning for medical imaging, built around the QG-MIL aggregator."""


@main.command()
@click.argument("pattern", default="*")
@click.option("--params", is_flag=True, help="Also count parameters (at --in-dim, 2 classes).")
@click.option("--in-dim", default=1024, show_default=True, help="Feature dimension for --params.")
def models(pattern, params, in_dim):
    """List registered models matching PATTERN (shell-style, e.g. 'qgmil*')."""
    from .models import create_model, list_models, model_entry

    names = list_models(pattern)
    if not names:
        raise click.ClickException(f"no model matches {pattern!r}")
    width = max(map(len, names))
    for name in names:
        extra = ""
        if params:
            n = sum(p.numel() for p in create_model(name, in_dim=in_dim, num_classes=2).parameters())
            extra = f"{n / 1e6:7.2f}M  "
        click.echo(f"{name:<{width}}  {extra}{model_entry(name).description}")


@main.command("convert-official")
@click.argument("src", type=click.Path(dir_okay=False))
@click.argument("dst", type=click.Path(dir_okay=False))
@click.option("--variant", required=True, help="Official registry key, e.g. qgmil, qgmil_deep, qgmil_light.")
@click.option("--in-dim", type=int, required=True, help="Official in_dim (feature dimension).")
@click.option("--num-classes", type=int, required=True, help="Official num_classes (its default is 1).")
@click.option("--embed-dim", type=int, help="Official embed_dim (default 512; 256 for qgmil_light).")
@click.option("--dropout", type=float)
@click.option("--hidden-size", type=int, help="Official hidden_size: only sets the default head_dim (hidden_size // heads).")
@click.option("--intermediate-size", type=int, help="Official intermediate_size (default 2048).")
@click.option("--num-attention-heads", type=int)
@click.option("--num-key-value-heads", type=int)
@click.option("--head-dim", type=int)
@click.option("--num-layers", type=int)
@click.option("--hidden-act", type=click.Choice(["silu", "gelu", "relu"]))
@click.option("--pooling", type=click.Choice(["attention", "mean", "max", "cls"]))
@click.option("--use-cls-token/--no-use-cls-token", default=None)
@click.option("--qkv-bias/--no-qkv-bias", default=None)
@click.option("--rms-norm-eps", type=float)
@click.option("--attention-dropout", type=float)
def convert_official_cmd(src, dst, variant, in_dim, num_classes, **official):
    """Convert an official QG-MIL state_dict SRC (.pt/.pth, or .safetensors) into a qgmil checkpoint DST.

    Give the same constructor arguments the official model was built with; shapes are checked
    tensor by tensor. The result loads with `qgmil.load_model(DST)`.
    """
    from .checkpoint import save_model
    from .convert import convert_official

    official = {k: v for k, v in official.items() if v is not None}
    model = convert_official(src, variant, in_dim=in_dim, num_classes=num_classes, **official)
    extra = {"converted_from": str(src), "official_variant": variant, "official_args": official}
    save_model(model, dst, extra=extra)
    n = sum(p.numel() for p in model.parameters())
    click.echo(f"wrote {dst}: {model.name} ({n:,} parameters), config {model.config.model_dump_json()}")


@main.command()
@click.option("--model", "model_name", default="qgmil", show_default=True, help="Registered model name.")
@click.option("--epochs", default=12, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), help="Directory for the checkpoint.")
def demo(model_name, epochs, seed, out):
    """Train a model on the built-in digit-bags data and print test metrics (the quick start)."""
    from .demo import run_demo

    metrics = run_demo(model_name, epochs=epochs, seed=seed, out_dir=out)
    click.echo(json.dumps(metrics, indent=2))
