"""Which superdiff pipeline loads a model: read from its ``model_index.json`` ``_class_name``.

diffusers' ``from_pretrained`` loads a folder into whatever pipeline class it is called on and
fails late (or not at all) when the components do not fit; these helpers name the right superdiff
pipeline before anything is loaded.
"""

from __future__ import annotations

import os
from typing import Any

from diffusers import DiffusionPipeline

__all__ = ["pipeline_class_for", "superdiff_class_name"]

UNCONDITIONAL_INDEX = "superdiff_unconditional.json"
SD_SUBFOLDERS = ("unet", "text_encoder", "tokenizer", "scheduler")
#: Keyword arguments of ``from_pretrained`` that say where ``model_index.json`` is read from.
CONFIG_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "token")
SUPPORTED = (
    "StableDiffusion*/SuperDiffPipeline (SuperDiffPipeline), StableDiffusionXL*/SuperDiffXLPipeline "
    "(SuperDiffXLPipeline), StableDiffusion3*/SuperDiffFlowPipeline (SuperDiffFlowPipeline)"
)


def superdiff_class_name(class_name: str) -> str | None:
    """The superdiff pipeline for a ``model_index.json`` ``_class_name`` (diffusers' or superdiff's),
    or None where superdiff has none."""
    if class_name.startswith(("StableDiffusionXL", "SuperDiffXL")):
        return "SuperDiffXLPipeline"
    if class_name.startswith(("StableDiffusion3", "SuperDiffFlow")):
        return "SuperDiffFlowPipeline"
    if class_name.startswith("StableDiffusion") or class_name == "SuperDiffPipeline":
        return "SuperDiffPipeline"
    return None


def missing_sd_subfolders(path: str) -> list[str]:
    """The component subfolders a folder without ``model_index.json`` lacks for :class:`SuperDiffPipeline`."""
    return [name for name in SD_SUBFOLDERS if not os.path.isdir(os.path.join(path, name))]


def bare_folder_error(path: str, missing: list[str]) -> ValueError:
    return ValueError(
        f"pretrained_model_name_or_path={path!r} has no model_index.json and lacks the subfolders {missing}; "
        "pass a diffusers pipeline folder (save_pretrained) or one with unet/, text_encoder/, tokenizer/, scheduler/"
    )


def is_bare_folder(path: str) -> bool:
    """A local folder without ``model_index.json`` (component subfolders, or a superdiff unconditional stack)."""
    return os.path.isdir(path) and not os.path.isfile(os.path.join(path, "model_index.json"))


def model_index_class_name(path: str, **config_kwargs: Any) -> str | None:
    """``_class_name`` of the ``model_index.json`` of a local folder or hub id (downloaded alone, or
    read from the cache), None if it has none."""
    config = DiffusionPipeline.load_config(path, **config_kwargs)
    name = config.get("_class_name")
    return name if isinstance(name, str) else None


def pipeline_class_for(pretrained_model_name_or_path: str | os.PathLike, **config_kwargs: Any) -> type:
    """The superdiff pipeline class whose ``from_pretrained`` loads ``pretrained_model_name_or_path``.

    A folder or hub id with ``model_index.json`` is read by its ``_class_name``: Stable Diffusion
    1.x/2.x → :class:`SuperDiffPipeline`, SDXL → :class:`SuperDiffXLPipeline`, SD3 →
    :class:`SuperDiffFlowPipeline` (superdiff's own saved pipelines too). A local folder without one
    is a :class:`SuperDiffUnconditionalPipeline` stack (``superdiff_unconditional.json``) or
    Stable Diffusion component subfolders. ``config_kwargs`` (``local_files_only``, ``revision``,
    ``cache_dir``, ``token``, ...) go to diffusers' ``load_config`` for hub ids.

    Raises ``ValueError`` naming the class (or the missing subfolders) where superdiff has no pipeline
    for it, and diffusers' ``OSError`` where ``model_index.json`` cannot be read (e.g. a hub id not
    in the cache when offline).
    """
    import superdiff.pipelines as pipelines

    path = os.fspath(pretrained_model_name_or_path)
    if is_bare_folder(path):
        if os.path.isfile(os.path.join(path, UNCONDITIONAL_INDEX)):
            return pipelines.SuperDiffUnconditionalPipeline
        missing = missing_sd_subfolders(path)
        if missing:
            raise bare_folder_error(path, missing)
        return pipelines.SuperDiffPipeline
    class_name = model_index_class_name(path, **config_kwargs)
    target = superdiff_class_name(class_name) if class_name else None
    if target is not None:
        return getattr(pipelines, target)
    if class_name in ("DDPMPipeline", "DDIMPipeline"):
        raise ValueError(
            f"pretrained_model_name_or_path={path!r} is a {class_name} (one unconditional UNet): compose two or more "
            "such folders with SuperDiffUnconditionalPipeline.from_pretrained([folder_a, folder_b])"
        )
    raise ValueError(
        f"pretrained_model_name_or_path={path!r} is a {class_name} (model_index.json _class_name), which superdiff has "
        f"no pipeline for; pass a folder or hub id of one of: {SUPPORTED}"
    )


def check_loading_class(path: str, superdiff_class: str, kwargs: dict[str, Any]) -> None:
    """Refuse, before any weights are read, a model whose ``model_index.json`` names a pipeline that
    another superdiff class loads. Unknown class names and unreadable indexes pass: diffusers
    reports those itself."""
    config_kwargs = {k: kwargs[k] for k in CONFIG_KWARGS if k in kwargs}
    try:
        class_name = model_index_class_name(path, **config_kwargs)
    except (OSError, ValueError):
        return
    target = superdiff_class_name(class_name) if class_name else None
    if target is not None and target != superdiff_class:
        raise ValueError(
            f"pretrained_model_name_or_path={path!r} is a {class_name} (model_index.json _class_name), which "
            f"{superdiff_class} cannot load; load it with {target}.from_pretrained "
            "(superdiff.pipelines.pipeline_class_for(path) picks the class)"
        )
