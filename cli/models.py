"""Turning ``--model`` into a loaded pipeline, with answers that say what to pass instead."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import BadInput

EMBEDDED = ("embedded-shapes", "embedded-digits")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    """A pipeline and how its composed items are named: prompts, or component models (digits)."""

    name: str
    pipeline: Any
    items: str  # "prompts" or "models"
    default_items: tuple[str, ...] = ()
    default_guidance: float = 7.5


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BadInput(f"--device {device!r} was asked for but CUDA is not available here; use --device cpu")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    if device == "cpu" and dtype == "float16":
        raise BadInput("--dtype float16 is not supported on the CPU; use float32 (or bfloat16)")
    return DTYPES[dtype]


def load_model(spec: str, dtype: torch.dtype, device: str, allow_pickle: bool = False, items: list[str] | None = None) -> LoadedModel:
    """Load ``spec``: an embedded model name, a local diffusers folder, or a hub id (cached only
    when offline). Only safetensors weights are read unless ``allow_pickle``."""
    if spec == "embedded-shapes":
        from superdiff.pipelines import SuperDiffPipeline
        from superdiff.zoo.registry import embedded_path

        pipe = SuperDiffPipeline.from_pretrained(embedded_path("shapes"), torch_dtype=dtype)
        return LoadedModel(spec, pipe.to(device), "prompts", ("red", "circle"), 5.0)
    if spec == "embedded-digits":
        from superdiff.zoo.registry import load_digit_pipeline

        names = list(items or ("a", "b"))
        unknown = [n for n in names if n not in ("a", "b", "all")]
        if unknown:
            raise BadInput(f"embedded-digits composes the models a (digits 0-4), b (5-9) and all; got {unknown}")
        return LoadedModel(spec, load_digit_pipeline(names, torch_dtype=dtype).to(device), "models", ("a", "b"), 0.0)
    path = Path(spec).expanduser()
    looks_local = path.exists() or spec.startswith((".", "/", "~")) or os.sep in spec and spec.count("/") != 1
    if looks_local and not path.is_dir():
        raise BadInput(
            f"--model {spec!r}: no such folder. Pass a diffusers model folder (with model_index.json or unet/), "
            f"a hub id, or one of the embedded models: {', '.join(EMBEDDED)} (e.g. --model embedded-shapes)"
        )
    from superdiff.pipelines import SuperDiffPipeline

    kwargs = {"torch_dtype": dtype, "use_safetensors": None if allow_pickle else True}
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        kwargs["local_files_only"] = True
    try:
        pipe = SuperDiffPipeline.from_pretrained(str(path) if path.is_dir() else spec, **kwargs)
    except (OSError, ValueError, EnvironmentError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInput(
            f"--model {spec!r} could not be loaded ({first}). Pass a local diffusers folder or a cached hub id, "
            f"or try --model embedded-shapes"
        ) from exc
    return LoadedModel(spec, pipe.to(device), "prompts")


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


def apply_speed_options(pipeline: Any, channels_last: bool, compile_mode: str | None) -> None:
    """``--channels-last``, then ``--compile MODE``: only the denoising network(s) change."""
    if channels_last:
        from superdiff.pipelines import to_channels_last

        to_channels_last(pipeline)
    if compile_mode is not None:
        from superdiff.pipelines import compile_networks

        compile_networks(pipeline, mode=compile_mode)
