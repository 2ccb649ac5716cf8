"""``superdiff generate``: compose prompts (or embedded models) and write images people can trace."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from superdiff.combine import MODES, make_combiner
from superdiff.expression_syntax import parse_expression
from superdiff.expressions import Node, compile_expression, describe
from superdiff.limits import check_guidance
from superdiff.plotting import require_matplotlib

from .calls import FiniteFloat, pipeline_call_kwargs
from .composition import check_items, expression_items
from .errors import BadInput, handle_errors, surface_warnings
from .limits import (
    MAX_NUM_IMAGES,
    SEED_MAX,
    SEED_MIN,
    caption_words_problem,
    control_character_problem,
    images_problem,
    model_folder_problem,
    network_rows_problem,
    output_folder,
    steps_problem,
)
from .models import (
    COMPILE_MODES,
    DEFAULT_ITEMS,
    EMBEDDED,
    PROMPTED_EMBEDDED,
    TRUE_CFG_PIPELINES,
    apply_speed_options,
    load_model,
    model_index,
    model_problem,
    pipeline_class_name,
    resolve_device,
    resolve_dtype,
    silence_library_logs,
)
from .options import options_from_params, sampler_click_options
from .output import check_fresh_dir, ensure_writable_dir, save_generation


def parse_log_weights(text: str | None, option: str = "--log-weights") -> list[float] | None:
    """``--log-weights`` text (the app's log-weights box: ``option``) as numbers; the combiner checks
    that they are finite, one per item."""
    if text is None:
        return None
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise BadInput(f"{option} {text!r} must be comma-separated numbers, one per prompt, e.g. 0,1.5") from None
    if not values:
        raise BadInput(f"{option} {text!r} must be numbers, one per prompt, e.g. 0,1.5")
    return values


def collect_prompts(
    prompts: tuple[str, ...], mode: str | None, and_: tuple[str, ...], or_: tuple[str, ...]
) -> tuple[list[str], str]:
    """Merge ``--prompt/--mode`` with the ``--and``/``--or`` shorthands, rejecting mixtures."""
    used = [name for name, v in (("--prompt", prompts), ("--and", and_), ("--or", or_)) if v]
    if len(used) > 1:
        raise BadInput(f"use one of --prompt (with --mode), --and or --or, not {' and '.join(used)}")
    if and_ or or_:
        if mode is not None:
            raise BadInput("--mode goes with --prompt; --and/--or already say the mode")
        return list(and_ or or_), "and" if and_ else "or"
    return list(prompts), mode or "and"


def collect_expression(
    expression: str | None, prompts: tuple[str, ...], mode: str | None, and_: tuple[str, ...], or_: tuple[str, ...],
    temperature: float, log_weights: str | None,
) -> Node | None:
    """``--expr`` parsed (a syntax error names its position), refusing the options it replaces."""
    if expression is None:
        return None
    given = [name for name, v in (("--prompt", prompts), ("--mode", mode), ("--and", and_), ("--or", or_),
                                  ("--log-weights", log_weights)) if v]
    if temperature != 1.0:
        given.append("--temperature")
    if given:
        raise BadInput(f"--expr names the prompts and how to compose them (temperature and weights as node options, "
                       f"e.g. or(\"a\", \"b\")[temperature=2]); drop {', '.join(given)}")
    return parse_expression(expression)


def check_unconditional_options(guidance: float | None, negative_prompt: str | None, height: int | None,
                                width: int | None) -> None:
    """embedded-digits composes unconditional models: options about prompts or sizes would be ignored."""
    given = [name for name, value in (("--guidance", guidance), ("--negative-prompt", negative_prompt),
                                      ("--height", height), ("--width", width)) if value is not None]
    if given:
        verb = "does" if len(given) == 1 else "do"
        raise BadInput(
            f"{', '.join(given)} {verb} not apply to embedded-digits (unconditional 8x8 models, no prompts); "
            f"drop {'it' if len(given) == 1 else 'them'}"
        )


def check_negative_prompt(negative_prompt: str | None, model: str) -> None:
    """The negative prompt gets the prompts' checks: plain text, and for embedded-shapes its words."""
    if negative_prompt is None:
        return
    problem = control_character_problem(negative_prompt, "--negative-prompt")
    if problem is None and model in PROMPTED_EMBEDDED:
        problem = caption_words_problem(negative_prompt, "--negative-prompt", model)
    if problem:
        raise BadInput(problem)


def check_true_cfg(true_cfg_scale: float | None, guidance: float | None, model: str) -> None:
    """``--true-cfg-scale`` only for a FLUX.1 or Qwen-Image folder, and no ``--guidance`` for Qwen-Image (its
    transformer takes no distilled guidance), read from its model_index.json before loading."""
    if true_cfg_scale is None and guidance is None:
        return
    if model in EMBEDDED:
        name = "SuperDiffUnconditionalPipeline" if model == "embedded-digits" else "SuperDiffPipeline"
    else:
        index = model_index(model)
        name = pipeline_class_name(index.get("_class_name") if index else None)
    if name == "SuperDiffQwenImagePipeline" and guidance is not None:
        raise BadInput(f"--guidance does not apply to {model}, a Qwen-Image model (its transformer takes no "
                       "distilled guidance); guide with --true-cfg-scale (e.g. 4) and --negative-prompt")
    if true_cfg_scale is not None and name not in TRUE_CFG_PIPELINES:
        hint = ("it composes unconditional models, which take no guidance" if model == "embedded-digits"
                else "--guidance is this model's classifier-free guidance")
        raise BadInput(f"--true-cfg-scale applies to FLUX.1 and Qwen-Image models (a FluxPipeline or "
                       f"QwenImagePipeline folder), and {model} runs on {name}; drop it ({hint})")


def check_limits(
    model: str, items: list[str], steps: int, num_images: int, height: int | None, width: int | None,
    particles: int = 1,
) -> None:
    """The ranges that depend on the model, read from its config files without loading it: steps up
    to the scheduler's training timesteps, and one batch of images (× particles) within the caps of
    cli/limits.py."""
    problem = steps_problem(steps, model, items or None) or images_problem(
        num_images, height, width, model, items or None, particles=particles
    )
    if problem:
        raise BadInput(problem)


def generation_settings(**kwargs: Any) -> dict:
    return {k: v for k, v in kwargs.items()}


@click.command()
@click.option("--model", default="embedded-shapes", show_default=True,
              help=f"A diffusers folder, a hub id, or one of {', '.join(EMBEDDED)}.")
@click.option(
    "--prompt",
    "prompts",
    multiple=True,
    help="A prompt to compose (repeat). For embedded-digits: model names a, b, all.",
)
@click.option("--mode", type=click.Choice(MODES), default=None, help="How to compose the prompts [default: and].")
@click.option("--and", "and_", multiple=True, metavar="PROMPT", help="Shorthand: --and P1 --and P2 means --mode and.")
@click.option("--or", "or_", multiple=True, metavar="PROMPT", help="Shorthand: --or P1 --or P2 means --mode or.")
@click.option("--expr", "expression", default=None, metavar="EXPRESSION",
              help='A composition expression instead of --prompt/--mode, e.g. \'("red" | "blue") & "circle"\' or '
                   '\'"red" * not("circle")\' (the syntax is in the README, "Expressions").')
@click.option("--negative-prompt", default=None, help="Replaces the empty unconditional prompt.")
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=50,
    show_default=True,
    help="Sampling steps (network calls), at most the scheduler's num_train_timesteps (1000 for the embedded models).",
)
@click.option(
    "--guidance",
    type=FiniteFloat(min=0),
    default=None,
    help="Classifier-free guidance scale [default: 7.5; 5 for embedded-shapes; embedded-digits takes none].",
)
@click.option(
    "--true-cfg-scale",
    type=FiniteFloat(min=0),
    default=None,
    help="FLUX.1 and Qwen-Image only: true classifier-free guidance from --negative-prompt, on above 1 (diffusers' "
         "FluxPipeline, QwenImagePipeline; Qwen-Image's default 4); FLUX.1's --guidance is then its distilled "
         "guidance embedding.",
)
@click.option(
    "--temperature", type=FiniteFloat(min=0, min_open=True), default=1.0, show_default=True, help="OR temperature T."
)
@click.option("--log-weights", default=None, help="Comma-separated ℓ per prompt: OR bias or AND offsets.")
@click.option("--seed", type=click.IntRange(SEED_MIN, SEED_MAX), default=0, show_default=True,
              help="Seed of the torch.Generator, 0 to 2**64-1.")
@click.option(
    "--num-images",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help=f"Images in the one batch, at most {MAX_NUM_IMAGES} and 2**26 pixels in all (num-images x height x width).",
)
@click.option("--height", type=click.IntRange(min=1), default=None)
@click.option("--width", type=click.IntRange(min=1), default=None)
@click.option(
    "--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto", show_default=True
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), callback=output_folder, default="superdiff-out",
              show_default=True)
@click.option("--plot", is_flag=True, help="Also write traces.png (κ and log-densities per step).")
@click.option("--overwrite", is_flag=True,
              help="Replace an earlier run's images, sidecars, grid.png, traces.png and eval.json in --out "
                   "(other files are kept); without it such a folder is refused.")
@click.option("--allow-pickle", is_flag=True, help="Also read non-safetensors weights (only for models you trust).")
@click.option("--compile", "compile_mode", type=click.Choice(COMPILE_MODES), default=None,
              help="torch.compile the network with this mode; the first step pays the compilation.")
@click.option("--channels-last", is_flag=True,
              help="Store the network in channels-last memory format (faster fp16/bf16 convolutions on CUDA).")
@click.option("--quiet", is_flag=True, help="No progress bar, no summary.")
@sampler_click_options()
@handle_errors
def generate(
    model: str,
    prompts: tuple[str, ...],
    mode: str | None,
    and_: tuple[str, ...],
    or_: tuple[str, ...],
    expression: str | None,
    negative_prompt: str | None,
    steps: int,
    guidance: float | None,
    true_cfg_scale: float | None,
    temperature: float,
    log_weights: str | None,
    seed: int,
    num_images: int,
    height: int | None,
    width: int | None,
    dtype: str,
    device: str,
    out_dir: Path,
    plot: bool,
    overwrite: bool,
    allow_pickle: bool,
    compile_mode: str | None,
    channels_last: bool,
    quiet: bool,
    **sampler_options: Any,
) -> None:
    """Generate images composing prompts with SuperDiff AND / OR (or the baselines).

    Writes one PNG per image (settings in its text metadata), a JSON sidecar per image (prompts,
    mode, settings, final log-densities, κ and log-density traces) and grid.png into --out. An --out
    that already holds an earlier run's images is refused unless --overwrite, which replaces that
    run's images, sidecars, grid.png, traces.png and eval.json (and nothing else) once the new set is
    written in full: a failed write leaves the earlier run's files as they were.

    \b
    Examples:
      superdiff generate --and "red" --and "circle" --num-images 8 --out out/
      superdiff generate --model ./my-sd-folder --prompt "a flamingo" --prompt "a candy cane" --mode and
      superdiff generate --model embedded-digits --or a --or b --num-images 16
    """
    if quiet:
        silence_library_logs()
    options = options_from_params(sampler_options)
    node = collect_expression(expression, prompts, mode, and_, or_, temperature, log_weights)
    items, mode = collect_prompts(prompts, mode, and_, or_)
    lw = parse_log_weights(log_weights)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    what = "model name" if model == "embedded-digits" else "prompt"
    # Everything about the prompts and the combiner is checked before a model is loaded.
    if node is not None:
        items, mode = expression_items(node, model), "expression"
        combiner = compile_expression(node, items)
    else:
        items = items or list(DEFAULT_ITEMS.get(model, ()))
        check_items(items, what)
        combiner = make_combiner(mode, len(items), temperature, lw, what=f"{what}s")
    options = options.for_combiner(combiner)  # particles by the composition where not given, else checked
    if model == "embedded-digits":
        check_unconditional_options(guidance, negative_prompt, height, width)
    check_negative_prompt(negative_prompt, model)
    problem = model_folder_problem(model) or model_problem(
        model, items, allow_pickle
    )  # no need to look into a non-model
    if problem:
        raise BadInput(problem)
    check_true_cfg(true_cfg_scale, guidance, model)
    check_limits(model, items, steps, num_images, height, width, options.particles)
    # The library's ranges (superdiff.limits), before loading: guidance times the composition's gain, and rows.
    check_guidance(guidance, combiner, "--guidance")
    check_guidance(true_cfg_scale, combiner, "--true-cfg-scale")
    problem = network_rows_problem(model, num_images, options.particles, len(items), guidance, true_cfg_scale,
                                   negative_prompt=negative_prompt)
    if problem:
        raise BadInput(problem)
    if plot:
        try:
            require_matplotlib()
        except ImportError as exc:
            raise BadInput(f"--plot: {exc}") from exc
    stale = check_fresh_dir(out_dir, overwrite)
    ensure_writable_dir(out_dir, "--out")
    loaded = load_model(model, torch_dtype, dev, allow_pickle, items)
    apply_speed_options(loaded.pipeline, channels_last, compile_mode)
    call, scale = pipeline_call_kwargs(loaded, items, combiner, steps, guidance, seed, num_images, progress=not quiet,
                                       negative_prompt=negative_prompt, height=height, width=width,
                                       options=options)
    if true_cfg_scale is not None:
        call["true_cfg_scale"] = true_cfg_scale
    with surface_warnings():
        result = loaded.pipeline(**call)
    settings = generation_settings(
        model=model,
        pipeline=type(loaded.pipeline).__name__,
        prompts=items,
        mode=mode,
        expression=None if node is None else describe(node),
        steps=steps,
        guidance=scale,
        temperature=temperature,
        log_weights=lw,
        seed=seed,
        dtype=str(torch_dtype).replace("torch.", ""),
        device=dev,
        negative_prompt=negative_prompt,
        height=height,
        width=width,
        compile=compile_mode,
        channels_last=channels_last,
        **({} if true_cfg_scale is None else {"true_cfg_scale": true_cfg_scale}),
        **options.record(),
    )
    files = save_generation(out_dir, result, settings, plot=plot, replacing=stale)
    if not quiet:
        click.echo(f"wrote {len(files)} files to {out_dir}")
        for i, ld in enumerate(result.log_densities.tolist()):
            click.echo(f"image {i}: log q per {what} = " + ", ".join(f"{v:.2f}" for v in ld)
                       + "; final κ = " + ", ".join(f"{v:.2f}" for v in result.kappa_trace[-1, i].tolist()))
