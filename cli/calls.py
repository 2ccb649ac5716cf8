"""What ``generate`` and ``sweep`` share about one pipeline call: its keyword arguments, built in
one place (the combiner in them comes from ``superdiff.make_combiner``, built before any model is
loaded), and the click type of its finite numbers."""

from __future__ import annotations

import math
from typing import Any, Sequence

import click

from superdiff.combine import Combiner
from superdiff.expressions import CompiledExpression
from superdiff.options import SamplerOptions

from .models import LoadedModel

__all__ = ["FiniteFloat", "pipeline_call_kwargs"]


class FiniteFloat(click.FloatRange):
    """click's ``FloatRange`` that also refuses nan and ±inf (which compare as inside any range)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


def pipeline_call_kwargs(
    loaded: LoadedModel,
    items: Sequence[str],
    combiner: Combiner,
    steps: int,
    guidance: float | None,
    seed: int,
    num_images: int,
    progress: bool,
    negative_prompt: str | None = None,
    height: int | None = None,
    width: int | None = None,
    options: SamplerOptions | None = None,
) -> tuple[dict[str, Any], float | None]:
    """The keyword arguments of ``loaded.pipeline(...)`` for one generation, and the guidance scale
    it uses (the model's default where ``guidance`` is None; None for unconditional models, which
    take none and compose their component models, not prompts). A compiled expression goes to a
    text pipeline as ``expression=`` (its leaves are the prompts, the empty one included), to an
    unconditional stack as its combiner over the models ``items`` names. ``options``: the sampling
    options, every field passed as the pipeline's keyword argument of that name."""
    import torch

    call: dict[str, Any] = dict(combiner=combiner, num_inference_steps=steps, output_type="pil", progress=progress,
                                generator=torch.Generator("cpu").manual_seed(seed))
    call |= (SamplerOptions() if options is None else options).kwargs()
    if loaded.items != "prompts":
        return call | dict(batch_size=num_images), None
    scale = loaded.default_guidance if guidance is None else guidance
    if isinstance(combiner, CompiledExpression):
        del call["combiner"]
        call |= dict(expression=combiner.expression, guidance_scale=scale, num_images_per_prompt=num_images)
    else:
        call |= dict(prompts=list(items), guidance_scale=scale, num_images_per_prompt=num_images)
    if negative_prompt is not None:
        call["negative_prompt"] = negative_prompt
    if height is not None:
        call["height"] = height
    if width is not None:
        call["width"] = width
    return call, scale
