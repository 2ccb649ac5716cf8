"""``superdiff``: the command group. Each command lives in its own module; none holds any math."""

from __future__ import annotations

import click

from .toy import toy


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(package_name="superdiff")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Compose pretrained diffusion models at inference time (SuperDiff OR / AND).

    \b
    Examples:
      superdiff toy --out superdiff-toy
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


cli.add_command(toy)


if __name__ == "__main__":  # pragma: no cover
    cli()
