"""The shipped latent scene model (``embedded-scenes``): a standard Stable Diffusion folder that
diffusers loads and samples, that ``SuperDiffPipeline`` composes through its VAE, and whose VAE
the scene checker reads as it reads the renders."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from superdiff.zoo.registry import WEIGHTS
from superdiff.zoo.scenes import OBJECTS, read_objects, sample_scenes

FOLDER = WEIGHTS / "scenes"
pytestmark = pytest.mark.skipif(not (FOLDER / "model_index.json").is_file(), reason="embedded-scenes not trained yet")


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(FOLDER / "vae", dtype=torch.float32).eval()


def _round_trip(vae, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vae.decode(vae.encode(images).latent_dist.mean).sample.clamp(-1, 1)


def _reconstructions_read(n: int = 150) -> tuple[list, list]:
    scenes = sample_scenes(n, seed=31)
    truth = [sorted(OBJECTS[k] for k in row if k >= 0) for row in scenes.objects.tolist()]
    return [r if r is None else sorted(r, key=str) for r in read_objects(_round_trip(_vae(), scenes.images))], truth


def test_the_checker_reads_the_colours_of_the_vae_reconstructions_as_of_the_renders():
    """Every object and its colour survive the round trip through the shipped VAE (a broken
    decoder fails this)."""
    read, truth = _reconstructions_read()
    colours = lambda objs: sorted(c for c, _ in objs) if objs is not None else None  # noqa: E731
    assert sum(colours(r) == colours(t) for r, t in zip(read, truth)) >= 0.99 * len(truth)


def test_the_checker_reads_the_vae_reconstructions_exactly_as_the_renders():
    """Every object with its colour and its shape survives the round trip: the VAE keeps the corners
    that tell a small square from a small circle (a blurring decoder fails this)."""
    read, truth = _reconstructions_read()
    assert sum(r == t for r, t in zip(read, truth)) >= 0.99 * len(truth)


def test_diffusers_loads_and_samples_the_folder():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(FOLDER, dtype=torch.float32, local_files_only=True)
    out = pipe("a red circle", num_inference_steps=3, guidance_scale=5.0, output_type="pt",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 3, 32, 32) and torch.isfinite(out.images).all()


def test_superdiff_composes_through_the_vae():
    """AND of two prompts: the images are the VAE's decoding of the composed latents."""
    from superdiff.zoo.registry import load_scenes_pipeline

    pipe = load_scenes_pipeline()
    assert pipe.vae is not None and pipe.vae_scale_factor == 4
    kwargs = dict(prompts=["a red circle", "a yellow square"], mode="and", guidance_scale=5.0, num_inference_steps=3,
                  num_images_per_prompt=2, progress=False)
    images = pipe(**kwargs, output_type="pt", generator=torch.Generator().manual_seed(1)).images
    latents = pipe(**kwargs, output_type="latent", generator=torch.Generator().manual_seed(1)).images
    assert latents.shape == (2, 4, 8, 8) and images.shape == (2, 3, 32, 32)
    with torch.no_grad():
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    torch.testing.assert_close(images, (decoded / 2 + 0.5).clamp(0, 1), atol=1e-5, rtol=0)


def test_the_cli_generates_with_embedded_scenes_and_refuses_unknown_words(tmp_path):
    from superdiff_cli.main import cli

    r = CliRunner().invoke(cli, ["generate", "--model", "embedded-scenes", "--and", "a red circle", "--and",
                                 "a yellow square", "--steps", "3", "--out", str(tmp_path), "--quiet"])
    assert r.exit_code == 0, r.output
    from PIL import Image

    pngs = sorted(tmp_path.glob("image_*.png"))
    assert pngs and Image.open(pngs[0]).size == (32, 32)
    r = CliRunner().invoke(cli, ["generate", "--model", "embedded-scenes", "--and", "a purple circle", "--and",
                                 "a red square", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "purple" in r.output and "embedded-scenes knows only the words" in r.output
