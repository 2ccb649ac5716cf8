"""The main job: compose the embedded models offline and write pictures, traces and metrics."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..plotting import LinePanel, LineSeries, image_grid, line_panels, tensor_to_pil
from .experiments import Sampled, calculus_methods, digits_or, shapes_and, shapes_calculus
from .scenes import HELD_OUT_PAIRS

__all__ = ["DemoConfig", "run_demo", "demo_traces", "format_demo_table"]


@dataclass(frozen=True)
class DemoConfig:
    digits_samples: int = 200
    shapes_samples: int = 32
    steps: int = 25
    guidance_scale: float = 5.0
    pair: tuple[str, str] = ("red", "circle")
    held_out_pair: tuple[str, str] = ("blue", "triangle")
    seed: int = 0
    device: str = "cpu"
    shown: int = 12
    calculus_samples: int = 16  # 0: no calculus experiment
    particles: int = 4
    scenes_samples: int = 12  # 0: no scenes experiment
    scenes_pair: tuple[tuple[str, str], tuple[str, str]] = HELD_OUT_PAIRS[0]  # never together in training


def _rows(results: list[Sampled], shown: int, label) -> list:
    return [(label(r), tensor_to_pil(r.images[:shown])) for r in results]


def demo_pairs(cfg: DemoConfig) -> tuple[tuple[str, str], ...]:
    """The AND pairs the demo runs: the chosen pair, then the held-out one (once if they are the same)."""
    return (cfg.pair,) if tuple(cfg.pair) == tuple(cfg.held_out_pair) else (cfg.pair, cfg.held_out_pair)


def demo_traces(digits: list[Sampled], shapes: list[Sampled], shown: int = 8) -> Image.Image:
    """traces.png: one row per experiment (OR digits, then each AND pair's superdiff run), κ on the
    left and the log-densities on the right, over the steps, for the first ``shown`` samples."""
    or_run = next(r for r in digits if r.method == "superdiff")
    n = min(shown, or_run.kappa_trace.shape[1])
    log_gap = or_run.log_density_trace[..., 0] - or_run.log_density_trace[..., 1]
    panels = [
        LinePanel(
            f"OR digits a/b: κ of model a ({n} samples)",
            [LineSeries("model a", or_run.kappa_trace[:, :shown, 0])],
            ylabel=r"$\kappa_a$  ($\kappa_b = 1 - \kappa_a$)",
        ),
        LinePanel(
            r"OR digits: $\log q_a - \log q_b$",
            [LineSeries("a − b", log_gap[:, :shown])],
            ylabel=r"$\log q_a - \log q_b$",
        ),
    ]
    for r in (r for r in shapes if r.method == "superdiff"):
        names = " AND ".join(r.metrics["prompts"])
        panels.append(LinePanel(f"{names}: κ per prompt", [LineSeries(p, r.kappa_trace[:, :shown, j])
                                                           for j, p in enumerate(r.prompts)], ylabel="κ"))
        panels.append(
            LinePanel(
                f"{names}: log-density per prompt",
                [LineSeries(p, r.log_density_trace[:, :shown, j]) for j, p in enumerate(r.prompts)],
                ylabel="tracked log q",
            )
        )
    return line_panels(panels, width=460, height=260, columns=2)


def run_demo(out_dir: str | Path, cfg: DemoConfig = DemoConfig(), progress: bool = False) -> dict:
    """Run OR on the digit models, AND on the shapes model, (``calculus_samples`` > 0) the
    composition calculus on the pair: the corrected product and NOT with ``particles`` per image
    beside their uncorrected forms, and an OR of ANDs, and (``scenes_samples`` > 0) AND of a
    held-out pair of objects on the latent scene model with every method, scored GenEval-style;
    write or.png, and.png, calculus.png, scenes.png, traces.png and metrics.json into ``out_dir``;
    return the metrics."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    digits = digits_or(cfg.digits_samples, cfg.steps, cfg.seed, cfg.device, progress)
    shapes = shapes_and(
        demo_pairs(cfg), cfg.shapes_samples, cfg.steps, cfg.guidance_scale, cfg.seed, cfg.device, progress
    )
    calculus = []
    if cfg.calculus_samples > 0:
        methods = calculus_methods((cfg.particles,), tuple(cfg.pair), tuple(cfg.held_out_pair), compact=True)
        calculus = shapes_calculus(methods, cfg.calculus_samples, cfg.steps, cfg.guidance_scale, cfg.seed, cfg.device,
                                   progress)
        image_grid(_rows(calculus, cfg.shown, lambda r: r.method), cell=40, label_width=260).save(out / "calculus.png")
    scenes = []
    if cfg.scenes_samples > 0:
        from .scene_experiments import scene_methods, scenes_composition

        scenes = scenes_composition([tuple(cfg.scenes_pair)], scene_methods(cfg.particles, ("and",)),
                                    cfg.scenes_samples, cfg.steps, cfg.guidance_scale, cfg.seed, cfg.device, progress)
        image_grid(_rows(scenes, cfg.shown, lambda r: r.method.split(": ", 1)[1]), cell=40,
                   label_width=200).save(out / "scenes.png")
    image_grid(_rows(digits, cfg.shown, lambda r: r.method), cell=40, label_width=110).save(out / "or.png")
    image_grid(
        _rows(shapes, cfg.shown, lambda r: f"{'+'.join(r.metrics['prompts'])}: {r.method}"), cell=40, label_width=170
    ).save(out / "and.png")
    demo_traces(digits, shapes).save(out / "traces.png")
    metrics = {
        "and": [r.metrics for r in shapes],
        "or": [r.metrics for r in digits],
        "calculus": [r.metrics for r in calculus],
        "scenes": [r.metrics for r in scenes],
        "config": {k: (json.loads(json.dumps(v)) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()},
        "seconds": round(time.perf_counter() - start, 1),
        "torch_threads": torch.get_num_threads(),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def format_demo_table(metrics: dict) -> str:
    lines = ["OR of digit models A (0-4) and B (5-9):",
             f"  {'method':<12} {'classes covered':>15} {'entropy':>8} {'Frechet':>8} {'conf.':>6}"]
    for m in metrics["or"]:
        covered = sum(f >= 0.02 for f in m["class_fractions"])
        lines.append(
            f"  {m['method']:<12} {covered:>15} {m['class_entropy']:>8.3f} {m['frechet']:>8.2f} "
            f"{m['confidence']:>6.3f}"
        )
    lines.append("AND of shapes prompts (attribute checker):")
    lines.append(f"  {'prompts':<16} {'method':<18} {'both':>6} {'neither':>8}")
    for m in metrics["and"]:
        lines.append(
            f"  {'+'.join(m['prompts']):<16} {m['method']:<18} {m['both_rate']:>6.3f} {m['neither_rate']:>8.3f}"
        )
    if metrics.get("calculus"):
        lines.append("Composition calculus on the pair (hit: both; for NOT the colour and not the shape; for the OR "
                     "either pair):")
        lines.append(f"  {'method':<36} {'hit rate':>8} {'s/image':>8}")
        for m in metrics["calculus"]:
            lines.append(f"  {m['method']:<36} {m['hit_rate']:>8.3f} {m['seconds_per_image']:>8.3f}")
    if metrics.get("scenes"):
        pair = " + ".join(metrics["scenes"][0]["pair"])
        lines.append(f"AND of two objects on embedded-scenes ({pair}, never together in training), GenEval-style "
                     "(two objects: both shapes; colour: both with their colours):")
        lines.append(f"  {'method':<28} {'two objects':>11} {'colour':>7} {'s/image':>8}")
        for m in metrics["scenes"]:
            lines.append(f"  {m['method'].split(': ', 1)[1]:<28} {m['two_objects']:>11.3f} "
                         f"{m['colour_attribution']:>7.3f} {m['seconds_per_image']:>8.3f}")
    lines.append(f"({metrics['seconds']} s)")
    return "\n".join(lines)
