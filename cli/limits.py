"""Range checks the commands make before loading a model or creating an output folder.

Everything here reads only small JSON config files (a model folder's ``scheduler/``, ``unet/``,
``transformer/`` and ``vae/`` configs, from the folder, the embedded models' folders or the hub
cache), never weights, so a bad value is refused in milliseconds with the limit it broke.
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path
from typing import Any

from .models import EMBEDDED, PROMPTED_EMBEDDED, caption_words, looks_local, pipeline_family

SEED_MIN, SEED_MAX = 0, 2**64 - 1
"""``torch.Generator.manual_seed`` takes -2⁶³ … 2⁶⁴-1 and wraps negatives modulo 2⁶⁴ (-1 is the
same seed as 2⁶⁴-1), so the commands take the unsigned 64-bit range, where each seed is distinct."""

MAX_NUM_IMAGES = 1024
MAX_SIDE = 8192
MAX_IMAGE_PIXELS = 2**26
"""Caps, not a memory estimate (memory per pixel differs by model and device by orders of magnitude).
One generation samples all its images in one batch, so memory grows with num_images × height × width.
2²⁶ pixels was chosen as 64 images at 1024² (SDXL's and SD3's native size), 256 at 512²: beyond
the batches those models are run at on one device (not measured here: no such weights offline), so
above it a run would most likely stop only when the allocator fails.
1024 images per call bounds the tiny models (the embedded shapes model measured ≈1.4 MiB per 16×16
image on the CPU: ≈1.4 GiB for 1024), and 8192 pixels a side is 8× the largest native resolution.
Below the caps a batch can still exceed a device's memory; the runtime then reports it. A sweep
(more seeds) is the way to more images."""


def embedded_folders(spec: str, items: list[str] | None) -> list[Path]:
    """The folders of an embedded model: the shapes or scenes folder, or one per composed digits model."""
    from superdiff.zoo.registry import WEIGHTS

    if spec in PROMPTED_EMBEDDED:
        return [WEIGHTS / spec.removeprefix("embedded-")]
    return [WEIGHTS / f"digits-{name}" for name in (items or ("a", "b"))]


def read_model_config(spec: str, relative: str, items: list[str] | None = None) -> dict | None:
    """The JSON file ``relative`` (e.g. ``scheduler/scheduler_config.json``) of model ``spec``: of
    its first embedded folder, of a local folder, or of a hub id already in the cache (nothing is
    downloaded); None where it is absent or unreadable (the loader then says what is wrong)."""
    if spec in EMBEDDED:
        path: Path | None = embedded_folders(spec, items)[0] / relative
    elif Path(spec).expanduser().is_dir():
        path = Path(spec).expanduser() / relative
    elif looks_local(spec):
        path = None
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(spec, relative)
        except Exception:  # noqa: BLE001 - not a valid hub id: the loader will say so
            cached = None
        path = Path(cached) if isinstance(cached, str) else None
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path is not None and path.is_file() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def train_timesteps(spec: str, items: list[str] | None = None) -> int | None:
    """The scheduler's ``num_train_timesteps`` (the smallest over the embedded digits models
    composed), read from ``scheduler/scheduler_config.json``; None where it cannot be read."""
    if spec == "embedded-digits":
        counts = []
        for folder in embedded_folders(spec, items):
            config = read_model_config(str(folder), "scheduler/scheduler_config.json")
            counts.append(_positive_int((config or {}).get("num_train_timesteps")))
        return None if None in counts or not counts else min(counts)
    config = read_model_config(spec, "scheduler/scheduler_config.json", items)
    return _positive_int((config or {}).get("num_train_timesteps"))


def steps_problem(steps: int, spec: str, items: list[str] | None, option: str = "--steps") -> str | None:
    """Whether ``steps`` exceeds the training steps of ``spec``'s scheduler: a finer grid than the
    network was trained on repeats timesteps, which the sampler cannot step between."""
    limit = train_timesteps(spec, items)
    if limit is not None and steps > limit:
        return (f"{option} {steps} is more than the {limit} training timesteps of {spec}'s scheduler "
                f"(scheduler/scheduler_config.json num_train_timesteps); use {option} {limit} or fewer")
    return None


def seed_problem(seed: int, option: str = "--seed") -> str | None:
    """Whether ``seed`` is outside what ``torch.Generator.manual_seed`` takes as a distinct seed."""
    if not SEED_MIN <= seed <= SEED_MAX:
        return f"{option} {seed} is outside {SEED_MIN}…2**64-1 (the seeds torch.Generator takes); use e.g. {option} 0"
    return None


def _side(value: Any) -> tuple[int, int] | None:
    if _positive_int(value):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(_positive_int(v) for v in value):
        return int(value[0]), int(value[1])
    return None


def default_image_size(spec: str, items: list[str] | None = None) -> tuple[int, int] | None:
    """(height, width) the model makes when none is given: the network's ``sample_size`` times the
    VAE's downsampling (2^(blocks-1); 1 without a VAE, as in the embedded models); None if unknown."""
    network = read_model_config(spec, "unet/config.json", items) or read_model_config(
        spec, "transformer/config.json", items
    )
    size = _side((network or {}).get("sample_size"))
    if size is None:
        return None
    factor = _vae_factor(spec, items)
    return size[0] * factor, size[1] * factor


def _vae_factor(spec: str, items: list[str] | None) -> int:
    """The VAE's downsampling as diffusers' pipelines compute it: 2^(blocks-1), or for Qwen-Image's 3-D
    VAE 2^(its temporal downsampling levels); 1 without a VAE."""
    config = read_model_config(spec, "vae/config.json", items) or {}
    blocks, levels = config.get("block_out_channels"), config.get("temperal_downsample")
    if isinstance(levels, list) and not blocks:
        return 2 ** len(levels)
    return 2 ** (len(blocks) - 1) if isinstance(blocks, list) and blocks else 1


#: ``model_index.json`` class names (prefixes) of the pipelines that pack latents in 2×2 patches
#: (FLUX.1, FLUX.2): their images are multiples of twice the VAE factor.
PACKED_2X2 = ("Flux", "SuperDiffFlux")


def size_multiple(spec: str, items: list[str] | None = None) -> int:
    """What height and width must be multiples of, as the pipelines require: the VAE factor, times
    the transformer's patch size for SD3-, Qwen-Image- and Z-Image-type models, and 2 for FLUX's 2×2 packing
    (read from the configs; 1 where unknown)."""
    config = read_model_config(spec, "transformer/config.json", items) or {}
    patch = config.get("patch_size", (config.get("all_patch_size") or [None])[0])
    name = (read_model_config(spec, "model_index.json", items) or {}).get("_class_name")
    packed = 2 if isinstance(name, str) and name.startswith(PACKED_2X2) else 1
    return _vae_factor(spec, items) * (patch if _positive_int(patch) else 1) * packed


def images_problem(num_images: int, height: int | None, width: int | None, spec: str, items: list[str] | None = None,
                   options: tuple[str, str, str] = ("--num-images", "--height", "--width"), particles: int = 1,
                   particles_option: str = "--particles") -> str | None:
    """Whether one batch of ``num_images`` images of ``height`` × ``width`` (the model's default
    where None), each drawn from ``particles`` samples, passes the caps of this module
    (:data:`MAX_NUM_IMAGES`, :data:`MAX_SIDE`, :data:`MAX_IMAGE_PIXELS`); the message names the
    option given (``particles_option`` where the particles make the batch too large)."""
    count, tall, wide = options
    if num_images * particles > MAX_NUM_IMAGES:
        if particles > 1:
            return (f"{count} {num_images} x {particles_option} {particles} is {num_images * particles} samples in "
                    f"one batch, more than {MAX_NUM_IMAGES}; use {particles_option} "
                    f"{max(1, MAX_NUM_IMAGES // num_images)} or fewer, or fewer images")
        return (f"{count} {num_images} is more than {MAX_NUM_IMAGES} images in one batch; use {count} "
                f"{MAX_NUM_IMAGES} or fewer and more seeds (superdiff sweep) for more images")
    for name, value in ((tall, height), (wide, width)):
        if value is not None and value > MAX_SIDE:
            return f"{name} {value} is more than {MAX_SIDE} pixels; use {name} {MAX_SIDE} or less"
    multiple = size_multiple(spec, items)
    for name, value in ((tall, height), (wide, width)):
        if value is not None and value % multiple:
            return (f"{name} {value} is not a multiple of {multiple} (image pixels per latent pixel or transformer "
                    f"patch); use e.g. {name} {max(multiple, value // multiple * multiple)}")
    default = default_image_size(spec, items)
    h = height if height is not None else (default[0] if default else None)
    w = width if width is not None else (default[1] if default else None)
    if h is None or w is None or num_images * particles * h * w <= MAX_IMAGE_PIXELS:
        return None
    fits = max(1, MAX_IMAGE_PIXELS // (h * w * particles))
    if particles > 1:
        return (f"{count} {num_images} x {particles_option} {particles} samples of {h}x{w} pixels is "
                f"{num_images * particles * h * w:,} pixels in one batch, more than the cap of {MAX_IMAGE_PIXELS:,} "
                f"(2**26); use fewer particles or images (e.g. {count} {fits}), or smaller images")
    return (f"{count} {num_images} images of {h}x{w} pixels is {num_images * h * w:,} pixels in one batch, more than "
            f"the cap of {MAX_IMAGE_PIXELS:,} (2**26); use {count} {fits} or fewer at this size, or smaller images")


def network_rows_problem(model: str, images: int, particles: int, leaves: int, guidance: float | None,
                         true_cfg_scale: float | None = None,
                         options: tuple[str, str] = ("--num-images", "--particles"),
                         negative_prompt: str | None = None) -> str | None:
    """The library's cap on the rows of one network call (:func:`superdiff.limits.rows_problem`:
    images × particles × (leaves + the unconditional row)), checked before loading. Whether the
    unconditional row is evaluated is the model's family's rule (its pipeline's ``guides``: Z-Image guides
    for guidance above 0, FLUX.1 for a true CFG scale above 1, Qwen-Image for one with a negative prompt,
    FLUX.2 dev and unconditional stacks never, the others for guidance above 1), read only where the rows
    would not fit with the row."""
    from superdiff.limits import rows_problem

    if rows_problem(images, particles, leaves, True, names=options) is None:
        return None  # it fits whatever guidance adds
    family, config = pipeline_family(model)
    if family is not None:
        unconditional = family.guides(guidance, true_cfg_scale, negative_prompt=negative_prompt, config=config)
    else:  # a family not known before loading: count the row wherever some family's guidance adds it
        unconditional = guidance is None or guidance > 0 or (true_cfg_scale is not None and true_cfg_scale > 1)
    return rows_problem(images, particles, leaves, unconditional, names=options)


SD_SUBFOLDERS = ("unet", "text_encoder", "tokenizer", "scheduler")
"""What ``superdiff.pipelines.loading`` loads a folder without model_index.json from, named here
because importing the pipelines (diffusers) takes seconds, more than every other check together."""


def model_folder_problem(spec: str, option: str = "--model") -> str | None:
    """Whether a local path names a folder that is not a diffusers model (``model_index.json``, or
    the unet/, text_encoder/, tokenizer/, scheduler/ subfolders): such as ``../../../../etc``."""
    path = Path(spec).expanduser()
    if spec in EMBEDDED or not path.is_dir() or (path / "model_index.json").is_file():
        return None
    missing = [name for name in SD_SUBFOLDERS if not (path / name).is_dir()]
    if not missing:
        return None
    return (
        f"{option} {spec!r} is the folder {str(path.resolve())!r}, which is not a diffusers model folder (no "
        f"model_index.json, no {', '.join(m + '/' for m in missing)}); pass a model folder saved with "
        f"save_pretrained, a hub id, or one of {', '.join(EMBEDDED)}"
    )


def control_character_problem(text: str, what: str) -> str | None:
    """Whether ``text`` holds a control character (escape, newline, NUL …), named escaped as
    Python writes it (\\x1b), since printed raw it would be invisible or move the cursor."""
    for i, char in enumerate(text):
        if unicodedata.category(char) == "Cc":
            return (f"{what} {text!r} holds the control character {char!r} at position {i + 1}; "
                    f"remove it (prompts are plain text on one line)")
    return None


def caption_words_problem(text: str, option: str, model: str = "embedded-shapes") -> str | None:
    """Whether ``text`` uses words the embedded prompted ``model``'s captions never had (its
    tokenizer would spell them letter by letter): the rule ``model_problem`` applies to prompts."""
    words = caption_words(model)
    unknown = sorted({w for w in text.lower().split() if w not in words})
    if unknown:
        return (f"{option} {text!r}: {model} knows only the words {', '.join(words)}; got "
                f"{', '.join(unknown)}; use those words (e.g. {option} blue) or drop {option}")
    return None


def output_folder(ctx: Any, param: Any, value: str | None) -> Path | None:
    """A click callback for a folder option or argument (``--out``, eval's DIR): the folder as a Path,
    refusing an empty or blank name, which ``Path("")`` would silently read as the current directory."""
    import click

    if value is not None and not str(value).strip():
        name = param.opts[0] if getattr(param, "opts", None) and param.opts[0].startswith("-") else "DIR"
        raise click.BadParameter(f"{str(value)!r} names no folder (it would use the current directory); "
                                 f"pass a folder name, e.g. {name} out/, or {name} . for the current directory")
    return None if value is None else Path(value)
