"""Which superdiff pipeline loads a model: read from its ``model_index.json`` ``_class_name``.

diffusers' ``from_pretrained`` loads a folder into whatever pipeline class it is called on and
fails late (or not at all) when the components do not fit; these helpers name the right superdiff
pipeline before anything is loaded.
"""

from __future__ import annotations

import glob
import inspect
import json
import os
import warnings
from typing import Any

import diffusers
import torch
import transformers
from diffusers import DiffusionPipeline
from packaging.version import Version

__all__ = [
    "DamagedWeightsError",
    "check_components",
    "check_safetensors_files",
    "damaged_safetensors",
    "diffusers_dtype",
    "pipeline_class_for",
    "pop_dtype",
    "scheduler_class",
    "superdiff_class_name",
    "transformers_dtype",
    "UnconditionalStackIO",
]

UNCONDITIONAL_INDEX = "superdiff_unconditional.json"
SD_SUBFOLDERS = ("unet", "text_encoder", "tokenizer", "scheduler")
#: Keyword arguments of ``from_pretrained`` that say where ``model_index.json`` is read from.
CONFIG_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "token")

#: ``model_index.json`` ``_class_name`` s each superdiff pipeline loads: superdiff's own name, and the
#: diffusers pipelines whose components (and text-to-image network) are the same. Left out on
#: purpose: inpainting, depth-to-image, instruct-pix2pix and upscaling pipelines, whose UNets take
#: extra input channels (mask, depth, image), so they cannot sample text-to-image; and every
#: other pipeline family. Exact names only: a prefix would let ``StableDiffusionPipelineEVIL`` in.
PIPELINE_CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "SuperDiffPipeline": ("SuperDiffPipeline", "StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"),
    "SuperDiffXLPipeline": ("SuperDiffXLPipeline", "StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"),
    "SuperDiffFlowPipeline": ("SuperDiffFlowPipeline", "StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline"),
    "SuperDiffFluxPipeline": ("SuperDiffFluxPipeline", "FluxPipeline", "FluxImg2ImgPipeline"),
    "SuperDiffQwenImagePipeline": ("SuperDiffQwenImagePipeline", "QwenImagePipeline", "QwenImageImg2ImgPipeline"),
    "SuperDiffZImagePipeline": ("SuperDiffZImagePipeline", "ZImagePipeline", "ZImageImg2ImgPipeline"),
    "SuperDiffFlux2Pipeline": ("SuperDiffFlux2Pipeline", "Flux2Pipeline"),
    "SuperDiffFlux2KleinPipeline": ("SuperDiffFlux2KleinPipeline", "Flux2KleinPipeline"),
}
SUPPORTED = "; ".join(
    f"{', '.join(names[1:])} or {names[0]} ({target})" for target, names in PIPELINE_CLASS_NAMES.items()
)


def _base_version(module: Any) -> Version:
    return Version(Version(module.__version__).base_version)


#: The name of the loading dtype in the installed libraries: diffusers renamed ``torch_dtype`` to
#: ``dtype`` in v0.40.0 (PR #14205; ``DiffusionPipeline.from_pretrained(torch_dtype=...)`` warns since),
#: transformers in v4.56. superdiff takes ``dtype=`` (and ``torch_dtype=``, with diffusers' warning) and
#: passes it on under the name the library takes, so none of its own calls warns.
DIFFUSERS_DTYPE = "dtype" if _base_version(diffusers) >= Version("0.40.0") else "torch_dtype"
TRANSFORMERS_DTYPE = "dtype" if _base_version(transformers) >= Version("4.56.0") else "torch_dtype"
TORCH_DTYPE_DEPRECATION = (
    "`torch_dtype` is deprecated and will be removed in version 1.0.0. Please use `dtype` instead."
)


def pop_dtype(kwargs: dict[str, Any], stacklevel: int = 3) -> Any:
    """Take the loading dtype out of ``kwargs``: ``dtype=``, or its deprecated name ``torch_dtype=``
    (a ``FutureWarning`` with diffusers' text, pointing ``stacklevel`` frames up: the caller of the
    ``from_pretrained`` / ``from_pipe`` that calls this); both at once is a ``ValueError``, raised
    before anything is read. Returns the dtype (or None)."""
    torch_dtype, dtype = kwargs.pop("torch_dtype", None), kwargs.pop("dtype", None)
    if torch_dtype is None:
        return dtype
    if dtype is not None:
        raise ValueError(
            f"dtype={dtype!r} and torch_dtype={torch_dtype!r} are not valid together: they are two names for one "
            "argument; pass dtype= only (torch_dtype is its deprecated name, as in diffusers >= 0.40)"
        )
    warnings.warn(TORCH_DTYPE_DEPRECATION, FutureWarning, stacklevel=stacklevel)
    return torch_dtype


def pop_loading_dtype(kwargs: dict[str, Any]) -> Any:
    """:func:`pop_dtype` for ``from_pretrained``: ``torch.float32`` where none is given, diffusers'
    documented default, so every component loads in one dtype (transformers >= 5 otherwise keeps a
    text encoder's stored float16, which the CPU cannot run beside a float32 UNet)."""
    dtype = pop_dtype(kwargs, stacklevel=4)
    return torch.float32 if dtype is None else dtype


def diffusers_dtype(dtype: Any) -> dict[str, Any]:
    """``dtype`` as the keyword argument the installed diffusers' loaders take ({} for None)."""
    return {} if dtype is None else {DIFFUSERS_DTYPE: dtype}


def transformers_dtype(dtype: Any) -> dict[str, Any]:
    """``dtype`` as the keyword argument the installed transformers' ``from_pretrained`` takes."""
    return {} if dtype is None else {TRANSFORMERS_DTYPE: dtype}


class DamagedWeightsError(ValueError):
    """A safetensors weights file that cannot be read: truncated or corrupt (not a missing file)."""


def superdiff_class_name(class_name: str) -> str | None:
    """The superdiff pipeline for a ``model_index.json`` ``_class_name`` (diffusers' or superdiff's,
    matched exactly: :data:`PIPELINE_CLASS_NAMES`), or None where superdiff has none."""
    for target, names in PIPELINE_CLASS_NAMES.items():
        if class_name in names:
            return target
    return None


def _is_class_from(module: Any, name: Any, bases: tuple[type, ...]) -> bool:
    """Whether ``module.name`` is a class derived from one of ``bases`` (and not a base itself)."""
    found = getattr(module, name, None) if isinstance(name, str) else None
    return isinstance(found, type) and issubclass(found, bases) and found not in bases


def is_scheduler_class_name(name: Any) -> bool:
    """Whether ``name`` is one of diffusers' scheduler classes (subclasses of ``SchedulerMixin`` in
    ``diffusers.schedulers``)."""
    import diffusers.schedulers
    from diffusers import SchedulerMixin

    return _is_class_from(diffusers.schedulers, name, (SchedulerMixin,))


def scheduler_class(folder: str) -> type:
    """The scheduler class ``folder/scheduler_config.json`` names, taken from diffusers' schedulers
    only: any other class (a pipeline, a model) would load weights from the folder, out of reach of
    ``use_safetensors`` (a nested pipeline reads pickle files). Raises ``ValueError`` naming the
    file and the class."""
    import diffusers.schedulers

    config_file = os.path.join(folder, "scheduler_config.json")
    try:
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{config_file} is not a readable scheduler config ({exc}); save the scheduler again with "
                         "save_pretrained") from None
    name = config.get("_class_name") if isinstance(config, dict) else None
    if not is_scheduler_class_name(name):
        raise ValueError(
            f"{config_file} names _class_name={name!r}, which is not a diffusers scheduler class; a scheduler folder "
            "must name one of diffusers.schedulers (e.g. 'EulerDiscreteScheduler', 'DDPMScheduler'), and nothing "
            "else is loaded from it"
        )
    return getattr(diffusers.schedulers, name)


def _component_bases(library: str) -> tuple[type, ...] | None:
    """The classes a pipeline component of ``library`` may derive from: networks, schedulers,
    tokenizers; never a pipeline (a nested pipeline loads without the caller's loading options)."""
    if library == "diffusers":
        from diffusers import ModelMixin, SchedulerMixin

        return (ModelMixin, SchedulerMixin)
    if library == "transformers":
        from transformers import PreTrainedModel, PreTrainedTokenizerBase

        return (PreTrainedModel, PreTrainedTokenizerBase)
    return None


def check_components(path: str, config: dict[str, Any], pipeline_class: type) -> None:
    """Refuse, before diffusers loads anything, a ``model_index.json`` entry for one of
    ``pipeline_class``'s components that names something other than a diffusers network or
    scheduler or a transformers model or tokenizer (the scheduler slot: a diffusers scheduler).
    diffusers would load a pipeline named there with pickle fallback whatever ``use_safetensors``
    says. Raises ``ValueError`` naming the file, the component and the class."""
    import importlib

    slots = [n for n in inspect.signature(pipeline_class.__init__).parameters if n != "self"]
    index_file = os.path.join(path, "model_index.json")
    for slot in slots:
        entry = config.get(slot)
        if not isinstance(entry, (list, tuple)) or len(entry) != 2 or entry[0] is None:
            continue  # not a component entry (a config value), or a null component
        library, name = entry
        bases = _component_bases(library) if isinstance(library, str) else None
        module = importlib.import_module(library) if bases is not None else None
        if slot == "scheduler":
            fits = library == "diffusers" and is_scheduler_class_name(name)
        else:
            fits = bases is not None and _is_class_from(module, name, bases)
        if not fits:
            what = "a diffusers scheduler class" if slot == "scheduler" else (
                "a diffusers model or scheduler, or a transformers model or tokenizer")
            raise ValueError(
                f"{index_file}: component {slot!r} is {list(entry)!r}, which is not {what}; superdiff loads only "
                "those (a pipeline or other class there would load without the loading options, e.g. pickle "
                "weights despite use_safetensors); save the pipeline again with save_pretrained"
            )


def damaged_safetensors(path: str) -> list[tuple[str, str]]:
    """``(file, reason)`` for each ``*.safetensors`` file in a local model folder (at its top or in
    a component subfolder) whose header safetensors cannot read: truncated or corrupt files.
    Only headers are read (the tensors are memory-mapped, not loaded)."""
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(glob.escape(path), "*.safetensors")) +
                   glob.glob(os.path.join(glob.escape(path), "*", "*.safetensors")))
    damaged = []
    for file in files:
        try:
            with safe_open(file, framework="pt"):
                pass
        except Exception as exc:  # noqa: BLE001 - SafetensorError (a Rust exception) or OSError: unreadable
            damaged.append((file, str(exc).strip() or type(exc).__name__))
    return damaged


def damaged_message(damaged: list[tuple[str, str]]) -> str:
    """One sentence naming the damaged weights files and what to do (never: read pickle instead)."""
    names = "; ".join(f"{file} ({reason})" for file, reason in damaged)
    return (f"the weights file(s) {names} are damaged: truncated or corrupt, so they cannot be read; download the "
            "model again or save it again with save_pretrained")


def check_safetensors_files(path: str) -> None:
    """Raise :class:`DamagedWeightsError` naming every damaged safetensors file of a local folder
    (nothing for a hub id: diffusers reads those)."""
    if not os.path.isdir(path):
        return
    damaged = damaged_safetensors(path)
    if damaged:
        raise DamagedWeightsError(f"pretrained_model_name_or_path={path!r}: {damaged_message(damaged)}")


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


def read_model_index(path: str, **config_kwargs: Any) -> dict[str, Any]:
    """The ``model_index.json`` of a local folder or hub id (downloaded alone, or read from the cache)."""
    return DiffusionPipeline.load_config(path, **config_kwargs)


def index_class_name(path: str, config: Any) -> str:
    """The ``_class_name`` of a read ``model_index.json``; ``ValueError`` where it is missing or
    not a string (``{}``, a list), which diffusers would fail on with a Python error."""
    name = config.get("_class_name") if isinstance(config, dict) else None
    if not isinstance(name, str) or not name.strip():
        given = config.get("_class_name") if isinstance(config, dict) else config
        raise ValueError(
            f"pretrained_model_name_or_path={path!r}: its model_index.json has _class_name={given!r}, which is not a "
            "pipeline class name; it must be a string such as 'StableDiffusionPipeline' (save the pipeline again with "
            "save_pretrained)"
        )
    return name


def model_index_class_name(path: str, **config_kwargs: Any) -> str:
    """``_class_name`` of the ``model_index.json`` of a local folder or hub id (``ValueError`` if it
    has none, or not a string)."""
    return index_class_name(path, read_model_index(path, **config_kwargs))


def pipeline_class_for(pretrained_model_name_or_path: str | os.PathLike, **config_kwargs: Any) -> type:
    """The superdiff pipeline class whose ``from_pretrained`` loads ``pretrained_model_name_or_path``.

    A folder or hub id with ``model_index.json`` is read by its ``_class_name``, matched exactly
    (:data:`PIPELINE_CLASS_NAMES`): Stable Diffusion 1.x/2.x → :class:`SuperDiffPipeline`, SDXL →
    :class:`SuperDiffXLPipeline`, SD3 / SD3.5 → :class:`SuperDiffFlowPipeline`, FLUX.1 →
    :class:`SuperDiffFluxPipeline`, FLUX.2 dev → :class:`SuperDiffFlux2Pipeline`, FLUX.2 klein →
    :class:`SuperDiffFlux2KleinPipeline`, Qwen-Image → :class:`SuperDiffQwenImagePipeline`, Z-Image →
    :class:`SuperDiffZImagePipeline` (their Img2Img variants and superdiff's own saved pipelines
    too). A local folder without one is a :class:`SuperDiffUnconditionalPipeline` stack
    (``superdiff_unconditional.json``) or Stable Diffusion component subfolders. ``config_kwargs``
    (``local_files_only``, ``revision``, ``cache_dir``, ``token``, ...) go to diffusers' ``load_config``
    for hub ids.

    Raises ``ValueError`` naming the class (or the missing subfolders) where superdiff has no pipeline
    for it or ``_class_name`` is not a string, and diffusers' ``OSError`` where ``model_index.json``
    cannot be read (e.g. a hub id not in the cache when offline).
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
    target = superdiff_class_name(class_name)
    if target is not None:
        return getattr(pipelines, target)
    if class_name in ("DDPMPipeline", "DDIMPipeline"):
        raise ValueError(
            f"pretrained_model_name_or_path={path!r} is a {class_name} (one unconditional UNet): compose two or more "
            "such folders with SuperDiffUnconditionalPipeline.from_pretrained([folder_a, folder_b])"
        )
    raise ValueError(
        f"pretrained_model_name_or_path={path!r} is a {class_name} (model_index.json _class_name), which superdiff "
        f"has no pipeline for; pass a folder or hub id of one of: {SUPPORTED}"
    )


def check_loading_class(path: str, superdiff_class: str, kwargs: dict[str, Any], pipeline_class: type) -> None:
    """Refuse, before any weights are read: a model whose ``model_index.json`` names a pipeline that
    another superdiff class loads, or has no string ``_class_name``; component entries that are not
    networks, schedulers or tokenizers (:func:`check_components`); damaged safetensors files of a
    local folder (:class:`DamagedWeightsError`). ``superdiff_class`` names the superdiff pipeline
    loading (``pipeline_class`` is the class itself, perhaps a subclass, whose components are
    checked). Unknown class names and unreadable indexes pass: diffusers reports those itself."""
    config_kwargs = {k: kwargs[k] for k in CONFIG_KWARGS if k in kwargs}
    try:
        config = read_model_index(path, **config_kwargs)
    except (OSError, ValueError):
        return
    class_name = index_class_name(path, config)
    target = superdiff_class_name(class_name)
    if target is not None and target != superdiff_class:
        raise ValueError(
            f"pretrained_model_name_or_path={path!r} is a {class_name} (model_index.json _class_name), which "
            f"{superdiff_class} cannot load; load it with {target}.from_pretrained "
            "(superdiff.pipelines.pipeline_class_for(path) picks the class)"
        )
    check_components(path, config, pipeline_class)
    check_safetensors_files(path)


#: ``from_pretrained`` options a folder of component subfolders (no ``model_index.json``) honours,
#: besides ``dtype`` (or its deprecated name ``torch_dtype``).
SUBFOLDER_KWARGS = ("use_safetensors", "variant", "local_files_only")


def load_sd_subfolders(cls: type, path: str, dtype: Any = None, **kwargs: Any) -> Any:
    """A Stable Diffusion pipeline ``cls`` from a folder of ``unet/``, ``text_encoder/``, ``tokenizer/``,
    ``scheduler/`` [, ``vae/``] without ``model_index.json``, each component loaded with the options
    diffusers would pass it (``use_safetensors=True`` refuses pickle weights, as it does with
    ``model_index.json``). The scheduler class comes from diffusers' schedulers only
    (:func:`scheduler_class`): a config naming a pipeline there would load its weights without these options."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    unknown = sorted(set(kwargs) - set(SUBFOLDER_KWARGS))
    if unknown:
        raise ValueError(
            f"{unknown} are not supported when loading {path!r}, a folder without model_index.json; "
            f"pass only dtype and {list(SUBFOLDER_KWARGS)}, or save the pipeline with save_pretrained to use "
            "diffusers' other options"
        )
    missing = missing_sd_subfolders(path)
    if missing:
        raise bare_folder_error(path, missing)
    scheduler_cls = scheduler_class(os.path.join(path, "scheduler"))
    check_safetensors_files(path)
    files = {k: kwargs[k] for k in ("local_files_only",) if k in kwargs}
    weights = files | {k: kwargs[k] for k in ("use_safetensors", "variant") if k in kwargs}
    networks, text = weights | diffusers_dtype(dtype), weights | transformers_dtype(dtype)
    vae_dir = os.path.join(path, "vae")
    return cls(
        vae=AutoencoderKL.from_pretrained(vae_dir, **networks) if os.path.isdir(vae_dir) else None,
        text_encoder=CLIPTextModel.from_pretrained(os.path.join(path, "text_encoder"), **text),
        tokenizer=CLIPTokenizer.from_pretrained(os.path.join(path, "tokenizer"), **files),
        unet=UNet2DConditionModel.from_pretrained(os.path.join(path, "unet"), **networks),
        scheduler=scheduler_cls.from_pretrained(os.path.join(path, "scheduler"), **files),
    )


#: ``from_pretrained`` options a scheduler folder honours (it has a config, no weights).
SCHEDULER_KWARGS = ("local_files_only", "cache_dir", "revision", "token", "force_download", "proxies")


def _load_scheduler(folder: str, kwargs: dict[str, Any]) -> Any:
    """The scheduler of ``folder``: a diffusers scheduler class only (:func:`scheduler_class`; a
    pipeline named there would load weights without the loading options), with the file options."""
    return scheduler_class(folder).from_pretrained(folder, **{k: kwargs[k] for k in SCHEDULER_KWARGS if k in kwargs})


def load_unconditional(paths: Any, scheduler: Any, dtype: Any, kwargs: dict[str, Any]) -> tuple[list, list, Any, Any]:
    """(unets, the schedulers to check against each other, the scheduler, prediction types) of an
    unconditional stack: a folder written by ``SuperDiffUnconditionalPipeline.save_pretrained``, or a list
    of ``DDPMPipeline`` / ``DDIMPipeline`` folders (``unet/`` + ``scheduler/``) or bare ``UNet2DModel``
    folders (then ``scheduler`` is needed);
    the schedulers of a list must define one process (checked by the caller's ``check_schedulers``)."""
    from diffusers import UNet2DModel

    cast = diffusers_dtype(dtype)
    if isinstance(paths, (str, os.PathLike)):
        root = os.fspath(paths)
        with open(os.path.join(root, UNCONDITIONAL_INDEX)) as f:
            index = json.load(f)
        loaded = _load_scheduler(os.path.join(root, "scheduler"), kwargs)
        check_safetensors_files(root)
        unets = [UNet2DModel.from_pretrained(os.path.join(root, name), **cast, **kwargs) for name in index["unets"]]
        return unets, [], loaded, index.get("prediction_types")
    unets, schedulers = [], []
    for p in map(os.fspath, paths):
        check_safetensors_files(p)
        if os.path.isdir(os.path.join(p, "unet")):
            schedulers.append(_load_scheduler(os.path.join(p, "scheduler"), kwargs))
            unets.append(UNet2DModel.from_pretrained(p, subfolder="unet", **cast, **kwargs))
        else:
            unets.append(UNet2DModel.from_pretrained(p, **cast, **kwargs))
    if scheduler is None and not schedulers:
        raise ValueError("scheduler=None is not valid: pass a scheduler when loading bare UNet2DModel folders")
    predictions = (
        [s.config.get("prediction_type", "epsilon") for s in schedulers] if len(schedulers) == len(unets) else None
    )
    chosen = scheduler if scheduler is not None else schedulers[0]
    return unets, schedulers + ([scheduler] if schedulers and scheduler is not None else []), chosen, predictions


def save_unconditional(root: str, unets: list, scheduler: Any, prediction_types: list, **kwargs: Any) -> None:
    """Write an unconditional stack: one ``unet_i/`` folder per model, ``scheduler/`` and the index."""
    os.makedirs(root, exist_ok=True)
    names = [f"unet_{i}" for i in range(len(unets))]
    for name, unet in zip(names, unets):
        unet.save_pretrained(os.path.join(root, name), **kwargs)
    scheduler.save_pretrained(os.path.join(root, "scheduler"))
    with open(os.path.join(root, UNCONDITIONAL_INDEX), "w") as f:
        json.dump({"unets": names, "prediction_types": prediction_types}, f, indent=2)


class UnconditionalStackIO:
    """diffusers' loading conventions for a stack of separately trained ``UNet2DModel`` s under one scheduler
    (``from_pretrained``, ``from_pipe``, ``save_pretrained``, ``.to``), for a class built as
    ``cls(unets, scheduler, prediction_types)`` with ``unets``, ``scheduler`` and ``prediction_types``."""

    @staticmethod
    def check_schedulers(schedulers: Any) -> None:
        """Models trained under different noise schedules have different processes: refuse them."""
        from .denoisers import check_one_process

        check_one_process(schedulers)

    @classmethod
    def from_pretrained(
        cls, paths: Any, scheduler: Any = None,
        dtype: torch.dtype | None = None, torch_dtype: torch.dtype | None = None, **kwargs: Any,
    ) -> Any:
        """Load from a folder written by :meth:`save_pretrained`, or from a list of diffusers
        ``DDPMPipeline``/``DDIMPipeline`` folders (``unet/`` + ``scheduler/``) or bare ``UNet2DModel``
        folders (then pass ``scheduler``). ``dtype`` casts the weights (``torch_dtype``: its deprecated
        name, with diffusers' ``FutureWarning``; not both). ``local_files_only`` and other kwargs go to
        diffusers."""
        cast = pop_dtype({"dtype": dtype, "torch_dtype": torch_dtype})
        unets, to_check, chosen, predictions = load_unconditional(paths, scheduler, cast, kwargs)
        if to_check:
            cls.check_schedulers(to_check)
        return cls(unets, chosen, predictions)

    @classmethod
    def from_pipe(cls, pipes: Any, **kwargs: Any) -> Any:
        """Share the UNets of already loaded ``DDPMPipeline``/``DDIMPipeline`` s (no copies)."""
        schedulers = [p.scheduler for p in pipes]
        cls.check_schedulers(schedulers)
        predictions = [s.config.get("prediction_type", "epsilon") for s in schedulers]
        return cls([p.unet for p in pipes], kwargs.pop("scheduler", schedulers[0]), predictions)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        save_unconditional(os.fspath(save_directory), self.unets, self.scheduler, self.prediction_types, **kwargs)

    def to(self, *args: Any, **kwargs: Any) -> Any:
        for unet in self.unets:
            unet.to(*args, **kwargs)
        return self

    @property
    def device(self) -> torch.device:
        """Where the stack lives (its first model's device, as ``.to`` moves them all)."""
        return self.unets[0].device

    _execution_device = device

    @property
    def dtype(self) -> torch.dtype:
        """The stack's weights' dtype (its first model's)."""
        return self.unets[0].dtype

