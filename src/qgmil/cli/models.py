"""`qgmil models` (the registry) and `qgmil convert-official` (official checkpoints)."""

from __future__ import annotations

import click


@click.command()
@click.argument("pattern", default="*")
@click.option("--params", is_flag=True, help="Also count parameters (at --in-dim, 2 classes).")
@click.option("--in-dim", default=1024, show_default=True, help="Feature dimension for --params.")
@click.option("--tag", "tags", multiple=True, help="Only models with this tag (repeatable): "
              "qgmil, official, ablation, baseline, multi_branch.")
@click.option("--space", is_flag=True, help="Also show what `qgmil tune` searches for each model.")
def models(pattern, params, in_dim, tags, space):
    """List registered models matching PATTERN (shell-style, e.g. 'qgmil*') with their tags."""
    from ..models import create_model, list_models, model_entry
    from ..models.search import describe

    names = list_models(pattern, tags=tags)
    if not names:
        raise click.ClickException(f"no model matches {pattern!r}" + (f" with tags {', '.join(tags)}" if tags else ""))
    width = max(map(len, names))
    for name in names:
        extra = ""
        if params:
            n = sum(p.numel() for p in create_model(name, in_dim=in_dim, num_classes=2).parameters())
            extra = f"{n / 1e6:7.2f}M  "
        entry = model_entry(name)
        click.echo(f"{name:<{width}}  {extra}{entry.description}  [{', '.join(sorted(entry.tags))}]")
        if space:
            for key, param in entry.search_space().items():
                click.echo(f"{'':<{width}}    {key}: {describe(param)}")


@click.command("convert-official")
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
    from ..checkpoint import save_model
    from ..convert import convert_official

    official = {k: v for k, v in official.items() if v is not None}
    model = convert_official(src, variant, in_dim=in_dim, num_classes=num_classes, **official)
    extra = {"converted_from": str(src), "official_variant": variant, "official_args": official}
    save_model(model, dst, extra=extra)
    n = sum(p.numel() for p in model.parameters())
    click.echo(f"wrote {dst}: {model.name} ({n:,} parameters), config {model.config.model_dump_json()}")
