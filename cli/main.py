"""``superdiff``: the command group. Each command lives in its own module; none holds any math."""

from __future__ import annotations

import os
import warnings

import click

from .app import app
from .demo import demo
from .errors import INTERRUPTED_EXIT
from .evaluate import evaluate
from .generate import generate
from .sweep import sweep
from .toy import toy


def quiet_libraries() -> None:
    """Keep diffusers/transformers loading chatter and deprecation notices off the user's terminal."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        dlog.disable_progress_bar()
        dlog.set_verbosity_error()
        tlog.disable_progress_bar()
        tlog.set_verbosity_error()
    except Exception:  # noqa: BLE001 - cosmetics only
        pass


class SuperdiffGroup(click.Group):
    """The command group; Ctrl-C before a command starts (while the libraries load) exits 130 as
    within one (click alone would say "Aborted!" and exit 1)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("Interrupted (Ctrl-C).", err=True)
            ctx.exit(INTERRUPTED_EXIT)


@click.group(cls=SuperdiffGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(package_name="superdiff")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Compose pretrained diffusion models at inference time (SuperDiff OR / AND).

    \b
    Examples:
      superdiff demo
      superdiff generate --and red --and circle --out out/
      superdiff toy --out superdiff-toy
      superdiff eval out/
      superdiff app
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    quiet_libraries()


cli.add_command(app)
cli.add_command(demo)
cli.add_command(evaluate)
cli.add_command(generate)
cli.add_command(sweep)
cli.add_command(toy)


if __name__ == "__main__":  # pragma: no cover
    cli()
