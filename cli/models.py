"""Turning ``--model`` into a loaded pipeline, with answers that say what to pass instead."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import BadInput

EMBEDDED = ("embedded-shapes", "embedded-scenes", "embedded-digits")
#: The embedded models composed by prompts (SuperDiffPipeline folders); their words are their captions'.
PROMPTED_EMBEDDED = ("embedded-shapes", "embedded-scenes")
#: What an embedded model composes when no prompts (model names) are given: known before loading it.
DEFAULT_ITEMS = {"embedded-shapes": ("red", "circle"), "embedded-scenes": ("a red circle", "a yellow square"),
                 "embedded-digits": ("a", "b")}


def caption_words(spec: str) -> tuple[str, ...]:
    """The words an embedded prompted model's captions use (others its tokenizer would spell letter by letter)."""
    if spec == "embedded-scenes":
        from superdiff.zoo.scenes import CAPTION_WORDS
    else:
        from superdiff.zoo.tokenizer import CAPTION_WORDS
    return CAPTION_WORDS
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    """A pipeline and how its composed items are named: prompts, or component models (digits)."""

    name: str
    pipeline: Any
    items: str  # "prompts" or "models"
    default_items: tuple[str, ...] = ()
    default_guidance: float | None = 7.5

#: The guidance a pipeline class samples with when --guidance is not given, where it is not 7.5: FLUX.1's
#: ``guidance_scale`` is its distilled guidance embedding, 3.5 in diffusers' FluxPipeline; FLUX.2's is 4 (dev's
#: distilled embedding, klein's classifier-free guidance), as in diffusers' Flux2Pipeline / Flux2KleinPipeline;
#: Qwen-Image takes none (its guidance is --true-cfg-scale); Z-Image's is ZImagePipeline's 5.0 (0 for Turbo).
DEFAULT_GUIDANCE = {"SuperDiffFluxPipeline": 3.5, "SuperDiffFlux2Pipeline": 4.0, "SuperDiffFlux2KleinPipeline": 4.0,
                    "SuperDiffQwenImagePipeline": None, "SuperDiffZImagePipeline": 5.0}
#: The pipelines whose classifier-free guidance is ``true_cfg_scale`` with a negative prompt (--true-cfg-scale).
TRUE_CFG_PIPELINES = ("SuperDiffFluxPipeline", "SuperDiffQwenImagePipeline")


DEVICE_HINT = "use auto, cpu, cuda or cuda:N"


def resolve_device(device: str) -> str:
    """``--device`` as a torch device string, checked here: exit 2 for a string torch does not
    read, a kind of device the CLI does not run on, or an accelerator this machine lacks."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise BadInput(f"--device {device!r} is not a device; {DEVICE_HINT}") from None
    if parsed.type == "cpu":
        return "cpu"
    if parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise BadInput(f"--device {device!r} was asked for but MPS is not available here; use --device cpu")
        return str(parsed)
    if parsed.type != "cuda":
        raise BadInput(f"--device {device!r} is not supported by the command line; {DEVICE_HINT}")
    if not torch.cuda.is_available():
        raise BadInput(f"--device {device!r} was asked for but CUDA is not available here; use --device cpu")
    count = torch.cuda.device_count()
    if parsed.index is not None and parsed.index >= count:
        raise BadInput(f"--device {device!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}; "
                       f"pick one of those")
    return str(parsed)


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    if device == "cpu" and dtype == "float16":
        raise BadInput("--dtype float16 is not supported on the CPU; use float32 (or bfloat16)")
    return DTYPES[dtype]


DIGIT_MODELS = ("a", "b", "all")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SUPPORTED_CLASSES = (
    "StableDiffusionPipeline (1.x/2.x) or its Img2Img variant, StableDiffusionXLPipeline (or Img2Img), "
    "StableDiffusion3Pipeline (SD3 / SD3.5, or Img2Img), FluxPipeline (FLUX.1, or Img2Img), Flux2Pipeline / "
    "Flux2KleinPipeline (FLUX.2 dev / klein), QwenImagePipeline (Qwen-Image, or Img2Img) or ZImagePipeline "
    "(Z-Image, or Img2Img)"
)


def looks_local(spec: str) -> bool:
    """Whether ``spec`` names a path on this machine rather than a hub id (``org/name``)."""
    return (
        Path(spec).expanduser().exists()
        or spec.startswith((".", "/", "~"))
        or (os.sep in spec and spec.count("/") != 1)
    )


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def model_index(spec: str, option: str = "--model") -> dict | None:
    """``model_index.json`` of a local folder or of a hub id already in the cache (nothing is
    downloaded); None where there is none. A file that is not JSON is bad input.

    Read here rather than through ``superdiff.pipelines.pipeline_class_for`` (which :func:`load_model`
    uses): these up-front checks of every ``--model`` and spec line must never download (diffusers'
    ``load_config`` fetches a hub id's index when online), and they report "problem; fix" strings
    naming the option or spec key as the user wrote it, for all lines at once, instead of raising."""
    path = Path(spec).expanduser()
    index: Path | None = path / "model_index.json" if path.is_dir() else None
    if index is None and not looks_local(spec):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(spec, "model_index.json")
        except Exception:  # noqa: BLE001 - not a valid hub id: the loader will say so
            cached = None
        index = Path(cached) if isinstance(cached, str) else None
    if index is None or not index.is_file():
        return None
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInput(f"{option} {spec!r}: {index} is not readable JSON ({exc}); save the pipeline again with "
                       f"save_pretrained") from None
    if not isinstance(data, dict):
        raise BadInput(f"{option} {spec!r}: {index} holds a JSON {type(data).__name__}, not the object a diffusers "
                       f"model_index.json is; save the pipeline again with save_pretrained")
    return data


def pipeline_class_name(class_name: str | None) -> str | None:
    """The superdiff pipeline for a ``model_index.json`` ``_class_name`` (None: no index, a folder of
    component subfolders, read as Stable Diffusion), or None where superdiff has no such pipeline."""
    from superdiff.pipelines.loading import superdiff_class_name

    return "SuperDiffPipeline" if class_name is None else superdiff_class_name(class_name)


def pipeline_family(spec: str) -> tuple[Any, dict]:
    """The superdiff pipeline class ``spec`` loads as and its ``model_index.json`` (``{}`` without one), read
    without loading or downloading anything; (None, {}) where that is not known here (a hub id not in the
    cache, an unreadable index). Imports the pipelines (seconds): for the checks that need a family's rule."""
    if spec in EMBEDDED:
        name = "SuperDiffUnconditionalPipeline" if spec == "embedded-digits" else "SuperDiffPipeline"
        index: dict | None = {}
    else:
        try:
            index = model_index(spec)
        except BadInput:
            return None, {}
        if index is None and not Path(spec).expanduser().is_dir():
            return None, {}
        name = pipeline_class_name(index.get("_class_name") if index else None)
    if name is None:
        return None, {}
    import superdiff.pipelines

    return getattr(superdiff.pipelines, name, None), index or {}


def pickle_only_components(folder: Path, index: dict | None) -> list[str]:
    """The component subfolders of a local pipeline folder whose weights are all pickle files."""
    names = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is not None] \
        if index else [p.name for p in folder.iterdir() if p.is_dir()]
    found = []
    for name in names:
        sub = folder / name
        if not sub.is_dir():
            continue
        files = [p.name for p in sub.iterdir() if p.is_file()]
        if any(f.endswith(PICKLE_SUFFIXES) for f in files) and not any(f.endswith(".safetensors") for f in files):
            found.append(f"{name}/")
    return found


def model_problem(
    spec: str, items: list[str] | None = None, allow_pickle: bool = False, option: str = "--model"
) -> str | None:
    """What is wrong with ``spec`` as a model, found without loading it (a missing local folder,
    component names embedded-digits lacks, a pipeline class superdiff has no pipeline for, pickle
    weights without ``allow_pickle``, words the embedded shapes model never saw), as "problem; fix";
    None where nothing is known to be wrong."""
    if spec in EMBEDDED:
        from .composition import vocabulary_problem

        return vocabulary_problem(spec, items or ())
    path = Path(spec).expanduser()
    if looks_local(spec) and not path.is_dir():
        return (f"{option} {spec!r}: no such folder; pass a diffusers model folder (with model_index.json or unet/), "
                f"a hub id, or one of the embedded models: {', '.join(EMBEDDED)} (e.g. {option} embedded-shapes)")
    try:
        index = model_index(spec, option)
    except BadInput as exc:
        return exc.message
    if index is None and not path.is_dir() and hub_offline():
        return (f"{option} {spec!r} is not a local folder and not in the hub cache, and the hub is offline here "
                f"(HF_HUB_OFFLINE); pass a local diffusers folder, a cached hub id, or {option} embedded-shapes")
    class_name = index.get("_class_name") if index else None
    if index is not None and (not isinstance(class_name, str) or not class_name.strip()):
        return (
            f"{option} {spec!r}: its model_index.json has _class_name={class_name!r}, which is not a pipeline class "
            f'name; it must be a string such as "StableDiffusionPipeline" '
            "(save the pipeline again with save_pretrained)"
        )
    if index is not None and pipeline_class_name(class_name) is None:
        return (f"{option} {spec!r} is a {class_name}, which superdiff has no pipeline for; use a folder of a "
                f"{SUPPORTED_CLASSES}")
    if path.is_dir():
        from superdiff.pipelines.loading import damaged_message, damaged_safetensors

        damaged = damaged_safetensors(str(path))
        if damaged:  # before the pickle check: a damaged safetensors file is no reason to read pickle
            return f"{option} {spec!r}: {damaged_message(damaged)}"
    if path.is_dir() and not allow_pickle:
        pickled = pickle_only_components(path, index)
        if pickled:
            return (
                f"{option} {spec!r} stores the weights of {', '.join(pickled)} as pickle files, which can run code "
                f"when loaded, and only safetensors are read by default; pass --allow-pickle if you trust this model"
            )
    return None


def load_model(
    spec: str, dtype: torch.dtype, device: str, allow_pickle: bool = False, items: list[str] | None = None
) -> LoadedModel:
    """Load ``spec``: an embedded model name, a local diffusers folder (Stable Diffusion, SDXL, SD3 /
    SD3.5, FLUX.1, Qwen-Image or Z-Image, read from its model_index.json), or a hub id (cached only when
    offline). Only safetensors weights are read unless ``allow_pickle``; ``dtype`` goes to
    ``from_pretrained(dtype=)``."""
    problem = model_problem(spec, items, allow_pickle)
    if problem:
        raise BadInput(problem)
    if spec in PROMPTED_EMBEDDED:
        from superdiff.pipelines import SuperDiffPipeline
        from superdiff.zoo.registry import embedded_path

        pipe = SuperDiffPipeline.from_pretrained(embedded_path(spec.removeprefix("embedded-")), dtype=dtype)
        return LoadedModel(spec, pipe.to(device), "prompts", DEFAULT_ITEMS[spec], 5.0)
    if spec == "embedded-digits":
        from superdiff.zoo.registry import load_digit_pipeline

        names = list(items or DEFAULT_ITEMS[spec])
        return LoadedModel(
            spec, load_digit_pipeline(names, torch_dtype=dtype).to(device), "models", DEFAULT_ITEMS[spec], 0.0
        )
    from superdiff.pipelines import pipeline_class_for
    from superdiff.pipelines.loading import DamagedWeightsError

    path = Path(spec).expanduser()
    files = {"local_files_only": True} if hub_offline() else {}
    kwargs = {"dtype": dtype, "use_safetensors": None if allow_pickle else True} | files
    try:
        pipeline_cls = pipeline_class_for(str(path) if path.is_dir() else spec, **files)
        pipe = pipeline_cls.from_pretrained(str(path) if path.is_dir() else spec, **kwargs)
    except DamagedWeightsError as exc:  # a file damaged after model_problem read it: never suggest pickle
        raise BadInput(f"--model {spec!r}: {exc}") from exc
    except (OSError, ValueError, EnvironmentError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if (
            ".safetensors" in first and "unable to load weights" in first.lower()
        ):  # e.g. a damaged file in the hub cache
            raise BadInput(f"--model {spec!r}: a safetensors weights file could not be read ({first}); it is probably "
                           f"damaged (truncated or corrupt): download the model again") from exc
        if not allow_pickle and ".safetensors" in first:
            raise BadInput(f"--model {spec!r} has no safetensors weights ({first}); only safetensors are read by "
                           f"default: pass --allow-pickle if its weights are pickle files you trust") from exc
        raise BadInput(
            f"--model {spec!r} could not be loaded ({first}). Pass a local diffusers folder or a cached hub id, "
            f"or try --model embedded-shapes"
        ) from exc
    guidance = DEFAULT_GUIDANCE.get(pipeline_cls.__name__, 7.5)
    return LoadedModel(spec, pipe.to(device), "prompts", default_guidance=guidance)


def silence_library_logs() -> None:
    """``--quiet``: diffusers', transformers' and huggingface_hub's own log lines (even their errors,
    which the CLI reports itself, one line) stay off the terminal."""
    import logging

    for name in ("diffusers", "transformers", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        dlog.set_verbosity(logging.CRITICAL)
        tlog.set_verbosity(logging.CRITICAL)
    except Exception:  # noqa: BLE001 - cosmetics only
        pass


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


def apply_speed_options(pipeline: Any, channels_last: bool, compile_mode: str | None) -> None:
    """``--channels-last``, then ``--compile MODE``: only the denoising network(s) change."""
    if channels_last:
        from superdiff.pipelines import to_channels_last

        to_channels_last(pipeline)
    if compile_mode is not None:
        from superdiff.pipelines import compile_networks

        compile_networks(pipeline, mode=compile_mode)
