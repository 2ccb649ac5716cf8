"""The paper's two image experiments at the embedded models' scale.

* :func:`digits_or` is Table 1: models trained on disjoint halves (digits 0–4, 5–9) composed with
  OR, against each model alone, averaging, and a model trained on all digits; scored by the class
  fractions and a Fréchet distance in the digit classifier's feature space against held-out real
  test digits.
* :func:`shapes_and` is Table 2: prompts composed with AND on the Stable-Diffusion-shaped shapes
  model, against single prompts, a joint prompt, averaging and the sum of guidance (Composable
  Diffusion); scored by the attribute checker (the fraction showing both attributes).

Both run through the same pipelines users call (``SuperDiffUnconditionalPipeline`` and
``SuperDiffPipeline``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from .digits import frechet_distance, load_digits_split
from .shapes import read_attributes

__all__ = ["Sampled", "digits_or", "shapes_and", "and_methods", "calculus_methods", "shapes_calculus", "class_entropy",
           "experiment_bar", "step_ticker"]


@dataclass
class Sampled:
    """One method's samples and the metrics the experiments report."""

    method: str
    images: torch.Tensor  # (N, C, H, W) in [-1, 1]
    metrics: dict
    kappa_trace: torch.Tensor | None = None
    log_density_trace: torch.Tensor | None = None
    prompts: list[str] = field(default_factory=list)


def class_entropy(fractions: list[float]) -> float:
    """Entropy (nats) of a class distribution; log(10) ≈ 2.30 for ten equal classes."""
    return -sum(p * math.log(p) for p in fractions if p > 0)


def _pixels(output) -> torch.Tensor:
    images = output.images  # output_type="pt": (N, C, H, W) in [0, 1]
    return images.float() * 2 - 1


@dataclass
class _Chunked:
    """Outputs of several pipeline calls joined along the batch (traces along their batch axis)."""

    images: torch.Tensor
    kappa_trace: torch.Tensor
    log_density_trace: torch.Tensor


def experiment_bar(name: str, methods: int, num_samples: int, chunk_size: int, steps: int, progress: bool) -> tqdm:
    """One progress bar for a whole experiment: ``methods`` runs of ``num_samples`` in chunks of
    ``chunk_size``, each chunk ``steps`` sampling steps. The pipelines' own per-call bars are off
    (``progress=False``); :func:`step_ticker` advances this one at every step instead."""
    chunks = -(-num_samples // chunk_size)
    return tqdm(total=methods * chunks * steps, desc=name, unit="step", disable=not progress, dynamic_ncols=True)


def step_ticker(bar: tqdm) -> Callable[..., None] | None:
    """A diffusers-style ``callback_on_step_end`` that advances ``bar`` by one step (None when the
    bar is disabled, so a quiet run adds no per-step call)."""
    if bar.disable:
        return None

    def on_step_end(pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> None:
        bar.update()

    return on_step_end


def _sample_in_chunks(call, num_samples: int, chunk_size: int, seed: int) -> _Chunked:
    """Call ``call(n, generator)`` for chunks of at most ``chunk_size`` samples, one generator
    seeded once, so the result depends on ``seed`` and ``chunk_size`` only; bounds peak memory."""
    generator = torch.Generator().manual_seed(seed)
    outs = []
    for start in range(0, num_samples, chunk_size):
        outs.append(call(min(chunk_size, num_samples - start), generator))
    return _Chunked(
        torch.cat([o.images for o in outs]),
        torch.cat([o.kappa_trace for o in outs], dim=1),
        torch.cat([o.log_density_trace for o in outs], dim=1),
    )


def _guided_samples(pipe, compose: dict, guidance_scale: float | None, steps: int, num_samples: int, chunk_size: int,
                    seed: int, on_step) -> _Chunked:
    """``num_samples`` images (as tensors) of a text-to-image pipeline composing ``compose`` (its prompts
    and mode, or expression and particles), in chunks from one seeded generator (:func:`_sample_in_chunks`)."""
    return _sample_in_chunks(
        lambda n, g: pipe(**compose, guidance_scale=guidance_scale, num_inference_steps=steps, num_images_per_prompt=n,
                          output_type="pt", generator=g, progress=False, callback_on_step_end=on_step),
        num_samples, chunk_size, seed,
    )


def digits_or(
    num_samples: int = 200,
    steps: int = 50,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = False,
    chunk_size: int = 250,
) -> list[Sampled]:
    """Table 1 in miniature. Methods: model_a, model_b, joint_model (all digits), average, superdiff (OR)."""
    from .registry import load_digit_classifier, load_digit_pipeline

    classifier = load_digit_classifier(device)
    split = load_digits_split()
    with torch.no_grad():
        real_features = classifier.features(split.test_images.to(device)).cpu()
        real_conf = torch.softmax(classifier(split.test_images.to(device)), -1).max(-1).values.mean().item()
    runs = {
        "model_a": (("a",), "average"),
        "model_b": (("b",), "average"),
        "joint_model": (("all",), "average"),
        "average": (("a", "b"), "average"),
        "superdiff": (("a", "b"), "or"),
    }
    results = []
    with experiment_bar("OR digits", len(runs), num_samples, chunk_size, steps, progress) as bar:
        on_step = step_ticker(bar)
        for method, (names, mode) in runs.items():
            bar.set_description(f"OR digits: {method}")
            pipe = load_digit_pipeline(names).to(device)
            out = _sample_in_chunks(
                lambda n, g: pipe(batch_size=n, mode=mode, num_inference_steps=steps, output_type="pt", generator=g,
                                  progress=False, callback_on_step_end=on_step),
                num_samples, chunk_size, seed,
            )
            images = _pixels(out)
            with torch.no_grad():
                logits = classifier(images.to(device)).cpu()
                feats = classifier.features(images.to(device)).cpu()
            probs = torch.softmax(logits, -1)
            fractions = torch.bincount(logits.argmax(-1), minlength=10).double() / num_samples
            results.append(Sampled(
                method,
                images,
                {
                    "method": method,
                    "class_fractions": [round(float(f), 4) for f in fractions],
                    "class_entropy": round(class_entropy(fractions.tolist()), 4),
                    "frechet": round(frechet_distance(feats, real_features), 3),
                    "confidence": round(float(probs.max(-1).values.mean()), 4),
                    "real_confidence": round(real_conf, 4),
                    "n": num_samples,
                },
                out.kappa_trace,
                out.log_density_trace,
                list(names),
            ))
        bar.set_description("OR digits")
    return results


def and_methods(colour: str, shape: str) -> dict[str, tuple[list[str], str]]:
    """The AND experiment's methods for one pair: method name -> (prompts, mode)."""
    return {
        f"single:{colour}": ([colour], "average"),
        f"single:{shape}": ([shape], "average"),
        "joint": ([f"{colour} {shape}"], "average"),
        "average": ([colour, shape], "average"),
        "sum": ([colour, shape], "sum"),
        "superdiff": ([colour, shape], "and"),
    }


def shapes_and(
    pairs: tuple[tuple[str, str], ...] = (("red", "circle"), ("blue", "triangle")),
    num_samples: int = 64,
    steps: int = 50,
    guidance_scale: float = 5.0,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = False,
    chunk_size: int = 125,
) -> list[Sampled]:
    """Table 2 in miniature for each (colour, shape) pair. Methods: single:<p>, joint, average,
    sum (Composable Diffusion) and superdiff (AND)."""
    from ..pipelines import SuperDiffPipeline
    from .registry import embedded_path

    pipe = SuperDiffPipeline.from_pretrained(embedded_path("shapes"), dtype=torch.float32).to(device)
    results = []
    runs = [(colour, shape, method, prompts, mode) for colour, shape in pairs
            for method, (prompts, mode) in and_methods(colour, shape).items()]
    with experiment_bar("AND shapes", len(runs), num_samples, chunk_size, steps, progress) as bar:
        on_step = step_ticker(bar)
        for colour, shape, method, prompts, mode in runs:
            bar.set_description(f"AND shapes {colour}+{shape}: {method}")
            out = _guided_samples(pipe, dict(prompts=prompts, mode=mode), guidance_scale, steps, num_samples,
                                  chunk_size, seed, on_step)
            images = _pixels(out)
            colours, shapes = read_attributes(images)
            has_colour = [c == colour for c in colours]
            has_shape = [s == shape for s in shapes]
            both = sum(a and b for a, b in zip(has_colour, has_shape)) / num_samples
            neither = sum((not a) and (not b) for a, b in zip(has_colour, has_shape)) / num_samples
            results.append(Sampled(
                method,
                images,
                {
                    "prompts": [colour, shape],
                    "method": method,
                    "both_rate": round(both, 4),
                    "neither_rate": round(neither, 4),
                    "colour_rate": round(sum(has_colour) / num_samples, 4),
                    "shape_rate": round(sum(has_shape) / num_samples, 4),
                    "n": num_samples,
                },
                out.kappa_trace,
                out.log_density_trace,
                prompts,
            ))
        bar.set_description("AND shapes")
    return results


@dataclass(frozen=True)
class CalculusMethod:
    """One method of :func:`shapes_calculus`: an expression (or prompts and a mode) and the particles
    per image; ``target`` says what a sample must show to count (see :func:`_calculus_hit`)."""

    target: str
    expression: str | None = None
    prompts: tuple[str, ...] = ()
    mode: str | None = None
    particles: int = 1


def calculus_methods(
    particle_counts: tuple[int, ...] = (4, 8), pair: tuple[str, str] = ("red", "circle"),
    other: tuple[str, str] = ("blue", "triangle"), compact: bool = False,
) -> dict[str, CalculusMethod]:
    """The calculus issue's methods on the shapes model, against today's: AND-type compositions of
    the colour and shape of ``pair`` (target: both), NOT (the colour and not the shape), and an OR
    of the pair's AND and ``other``'s (either pair). Corrected methods run with each particle
    count. ``compact`` (the demo) keeps one of each kind: AND, the score sum and the corrected
    product, NOT uncorrected and corrected, and the OR of ANDs."""
    (c, sh), (c2, sh2) = pair, other
    both, negated, either = f"{c}+{sh}", f"{c}-{sh}", f"{c}+{sh}|{c2}+{sh2}"
    q = lambda text: '"' + text + '"'  # noqa: E731 - the colour and shape words need no escapes
    a, b = q(c), q(sh)
    methods = {
        "joint prompt": CalculusMethod(both, prompts=(f"{c} {sh}",), mode="average"),
        "average": CalculusMethod(both, prompts=(c, sh), mode="average"),
        "superdiff AND": CalculusMethod(both, expression=f"{a} & {b}"),
        "score sum (product, uncorrected)": CalculusMethod(both, expression=f"product({a}, {b})[correct=false]"),
        "Dombi AND, uncorrected": CalculusMethod(both, expression=f"softmin({a}, {b})[sharpness=4, correct=false]"),
        "NOT, negative weight (uncorrected)": CalculusMethod(negated, expression=f"{a} * not({b})[correct=false]"),
        "OR of ANDs": CalculusMethod(either, expression=f"({a} & {b}) | ({q(c2)} & {q(sh2)})"),
    }
    for k in particle_counts:
        methods[f"product, corrected, K={k}"] = CalculusMethod(both, expression=f"{a} * {b}", particles=k)
        methods[f"Dombi AND, corrected, K={k}"] = CalculusMethod(
            both, expression=f"softmin({a}, {b})[sharpness=4]", particles=k)
        methods[f"NOT, corrected, K={k}"] = CalculusMethod(negated, expression=f"{a} * not({b})", particles=k)
    if compact:
        keep = ("superdiff AND", "score sum (product, uncorrected)", "NOT, negative weight (uncorrected)",
                "OR of ANDs", *(f"{kind}, corrected, K={k}" for k in particle_counts for kind in ("product", "NOT")))
        methods = {name: m for name, m in methods.items() if name in keep}
    return methods


def _calculus_hit(target: str, colour: str | None, shape: str | None) -> bool:
    """Whether one checked sample shows ``target``: "c+s" both, "c-s" colour c and a shape other than s,
    "a|b" either."""
    if "|" in target:
        return any(_calculus_hit(t, colour, shape) for t in target.split("|"))
    if "-" in target:
        c, s = target.split("-")
        return colour == c and shape is not None and shape != s
    c, s = target.split("+")
    return colour == c and shape == s


def shapes_calculus(
    methods: dict[str, CalculusMethod] | None = None,
    num_samples: int = 64,
    steps: int = 25,
    guidance_scale: float | None = 5.0,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = False,
    chunk_size: int = 64,
) -> list[Sampled]:
    """The composition calculus on the shapes model: each method's hit rate (the fraction of samples
    showing its target, read by the attribute checker) and its time per image, through
    ``SuperDiffPipeline(expression=..., particles=K)`` as users call it."""
    import time

    from ..pipelines import SuperDiffPipeline
    from .registry import embedded_path

    methods = calculus_methods() if methods is None else methods
    pipe = SuperDiffPipeline.from_pretrained(embedded_path("shapes"), dtype=torch.float32).to(device)
    results = []
    with experiment_bar("calculus shapes", len(methods), num_samples, chunk_size, steps, progress) as bar:
        on_step = step_ticker(bar)
        for name, method in methods.items():
            bar.set_description(f"calculus shapes: {name}")
            compose = (dict(expression=method.expression) if method.expression is not None
                       else dict(prompts=list(method.prompts), mode=method.mode))
            compose["particles"] = method.particles  # K = 1 too: an expression that corrects would otherwise get 4
            start = time.perf_counter()
            out = _guided_samples(pipe, compose, guidance_scale, steps, num_samples, chunk_size, seed, on_step)
            seconds = time.perf_counter() - start
            colours, shapes = read_attributes(_pixels(out))
            hits = sum(_calculus_hit(method.target, c, s) for c, s in zip(colours, shapes))
            results.append(Sampled(
                name,
                _pixels(out),
                {
                    "method": name,
                    "expression": method.expression,
                    "particles": method.particles,
                    "target": method.target,
                    "hit_rate": round(hits / num_samples, 4),
                    "seconds_per_image": round(seconds / num_samples, 4),
                    "n": num_samples,
                },
                out.kappa_trace,
                out.log_density_trace,
            ))
        bar.set_description("calculus shapes")
    return results
