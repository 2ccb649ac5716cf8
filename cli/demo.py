"""``superdiff demo``: the main job, composing the embedded models offline."""

from __future__ import annotations

from pathlib import Path

import click

from superdiff.options import option_spec

from .errors import BadInput, handle_errors, surface_warnings
from .models import resolve_device
from .options import click_type, flag
from .output import ensure_writable_dir


@click.command()
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("superdiff-demo"),
    show_default=True,
)
@click.option(
    "--steps", type=int, default=25, show_default=True, help="Sampling steps per method (the benchmark uses 40)."
)
@click.option("--digits-samples", type=int, default=200, show_default=True, help="Samples per digit method.")
@click.option("--shapes-samples", type=int, default=32, show_default=True, help="Samples per shapes method and pair.")
@click.option("--calculus-samples", type=int, default=16, show_default=True,
              help="Samples per method of the composition-calculus experiment (0 skips it).")
@click.option("--scenes-samples", type=int, default=12, show_default=True,
              help="Samples per method of the two-object scenes experiment (0 skips it).")
@click.option(flag("particles"), type=click_type(option_spec("particles")), default=4, show_default=True,
              help=f"{option_spec('particles').help} Here: for the calculus' corrected methods.")
@click.option("--guidance", type=float, default=5.0, show_default=True, help="Guidance scale for the shapes model.")
@click.option(
    "--pair", nargs=2, default=("red", "circle"), show_default=True, help="Colour and shape prompts for AND."
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--quiet", is_flag=True)
@handle_errors
def demo(out_dir: Path, steps: int, digits_samples: int, shapes_samples: int, calculus_samples: int,
         scenes_samples: int, particles: int, guidance: float, pair: tuple[str, str], seed: int, device: str,
         quiet: bool) -> None:
    """Compose the embedded models: OR of digit models trained on disjoint halves (Table 1) and AND
    of shapes prompts, including the never-seen "blue triangle" (Table 2), then expressions of the
    pair: the Feynman–Kac-corrected product and NOT on weighted particles beside their uncorrected
    forms, and an OR of ANDs; then AND of two objects never seen together on the latent scene model
    (embedded-scenes), every method scored GenEval-style. Writes or.png, and.png, calculus.png,
    scenes.png, traces.png and metrics.json.

    \b
    Example:
      superdiff demo --out superdiff-demo
    """
    from superdiff.zoo.demo import DemoConfig, format_demo_table, run_demo
    from superdiff.zoo.shapes import COLOURS, SHAPES

    for name, value, least in (
        ("--steps", steps, 1),
        ("--digits-samples", digits_samples, 2),
        ("--shapes-samples", shapes_samples, 1),
        ("--calculus-samples", calculus_samples, 0),
        ("--scenes-samples", scenes_samples, 0),
    ):
        if value < least:
            why = " (the Fréchet distance fits a covariance to the samples)" if name == "--digits-samples" else ""
            raise BadInput(f"{name} must be >= {least}{why}, got {value}")
    if guidance < 0:
        raise BadInput(f"--guidance must be >= 0, got {guidance}")
    if pair[0] not in COLOURS or pair[1] not in SHAPES:
        raise BadInput(
            f"--pair takes a colour ({', '.join(COLOURS)}) and a shape ({', '.join(SHAPES)}), got {' '.join(pair)}"
        )
    ensure_writable_dir(out_dir, "--out")
    cfg = DemoConfig(
        digits_samples=digits_samples,
        shapes_samples=shapes_samples,
        steps=steps,
        guidance_scale=guidance,
        pair=tuple(pair),
        seed=seed,
        device=resolve_device(device),
        calculus_samples=calculus_samples,
        scenes_samples=scenes_samples,
        particles=particles,
    )
    with surface_warnings():  # a particle collapse is said once, as generate and sweep say it
        metrics = run_demo(out_dir, cfg, progress=not quiet)
    if not quiet:
        click.echo(format_demo_table(metrics))
        written = ("or.png, and.png, " + ("calculus.png, " if calculus_samples else "")
                   + ("scenes.png, " if scenes_samples else "") + "traces.png and metrics.json")
        click.echo(f"wrote {written} to {out_dir}")
