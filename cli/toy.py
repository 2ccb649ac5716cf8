"""``superdiff toy``: the paper's Figure 2 with exact Gaussian-mixture models."""

from __future__ import annotations

from pathlib import Path

import click

from .errors import BadInput, handle_errors
from .output import ensure_writable_dir


@click.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("superdiff-toy"),
              show_default=True, help="Folder for figure2.png and metrics.json.")
@click.option("--samples", type=int, default=2000, show_default=True, help="Samples per method.")
@click.option("--steps", type=int, default=1000, show_default=True, help="SDE steps.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--quiet", is_flag=True, help="Print nothing but errors.")
@handle_errors
def toy(out_dir: Path, samples: int, steps: int, seed: int, quiet: bool) -> None:
    """Reproduce Figure 2: two exact 2-D models, averaging, OR and AND, checked against true densities.

    \b
    Example:
      superdiff toy --out superdiff-toy --samples 2000 --steps 1000
    """
    from superdiff.toy import ToyConfig, format_table, run_toy

    if samples < 1:
        raise BadInput(f"--samples must be >= 1, got {samples}")
    if steps < 1:
        raise BadInput(f"--steps must be >= 1, got {steps}")
    ensure_writable_dir(out_dir, "--out")
    estimator_steps = tuple(sorted({100, 300, steps}))
    metrics = run_toy(out_dir, ToyConfig(num_samples=samples, steps=steps, seed=seed, estimator_steps=estimator_steps))
    if not quiet:
        click.echo(format_table(metrics))
        click.echo(f"wrote {out_dir / 'figure2.png'} and {out_dir / 'metrics.json'}")
