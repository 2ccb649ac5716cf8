"""Where the shipped embedded models live, and loaders for them (offline, safetensors only)."""

from __future__ import annotations

from pathlib import Path

import torch

from .digits import DigitClassifier

WEIGHTS = Path(__file__).parent / "weights"
NAMES = ("shapes", "scenes", "digits-a", "digits-b", "digits-all", "digit-classifier")

__all__ = ["WEIGHTS", "NAMES", "embedded_path", "load_digit_model", "load_digit_classifier", "load_digit_pipeline",
           "load_shapes_pipeline", "load_scenes_pipeline"]


def embedded_path(name: str) -> str:
    """Folder of the embedded model ``name`` ("shapes", "scenes", "digits-a", "digits-b", "digits-all")."""
    key = name if name in NAMES else f"digits-{name}"
    if key not in NAMES:
        raise ValueError(f"unknown embedded model {name!r}; known: {', '.join(NAMES)}")
    path = WEIGHTS / key
    if not path.is_dir():
        raise FileNotFoundError(
            f"the embedded model {key!r} is not in {WEIGHTS}; train it with `python -m superdiff.zoo.train`"
        )
    return str(path)


def load_digit_model(name: str, torch_dtype: torch.dtype = torch.float32):
    """(UNet2DModel, DDPMScheduler) of digit model "a" (0–4), "b" (5–9) or "all"; the float16
    weights are cast to ``torch_dtype`` (float32 by default, what the CPU needs)."""
    from diffusers import DDPMScheduler, UNet2DModel

    from ..pipelines.loading import diffusers_dtype

    path = Path(embedded_path(name))
    unet = UNet2DModel.from_pretrained(path / "unet", use_safetensors=True, **diffusers_dtype(torch_dtype))
    return unet.eval(), DDPMScheduler.from_pretrained(path / "scheduler")


def load_digit_classifier(device: str | torch.device = "cpu") -> DigitClassifier:
    """The digit classifier trained on the training split (float32, eval mode)."""
    from safetensors.torch import load_file

    model = DigitClassifier()
    model.load_state_dict(load_file(str(Path(embedded_path("digit-classifier")) / "model.safetensors")))
    return model.to(device).eval()


def load_digit_pipeline(names: tuple[str, ...] | list[str] = ("a", "b"), torch_dtype: torch.dtype = torch.float32):
    """The unconditional composition pipeline over the embedded digit models ``names`` (a, b, all)."""
    from ..pipelines.unconditional import SuperDiffUnconditionalPipeline

    unets, scheduler = [], None
    for name in names:
        unet, scheduler = load_digit_model(name, torch_dtype)
        unets.append(unet)
    return SuperDiffUnconditionalPipeline(unets, scheduler)


def load_shapes_pipeline(torch_dtype: torch.dtype = torch.float32):
    """The composition pipeline (``SuperDiffPipeline``) over the embedded shapes model."""
    from ..pipelines import SuperDiffPipeline

    return SuperDiffPipeline.from_pretrained(embedded_path("shapes"), dtype=torch_dtype)


def load_scenes_pipeline(torch_dtype: torch.dtype = torch.float32):
    """The composition pipeline (``SuperDiffPipeline``) over the embedded latent scene model (VAE included)."""
    from ..pipelines import SuperDiffPipeline

    return SuperDiffPipeline.from_pretrained(embedded_path("scenes"), dtype=torch_dtype)
