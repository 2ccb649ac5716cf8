"""Loading pipelines from folders (CPU, offline): loading options in folders without model_index.json,
and the superdiff pipeline class each diffusers folder needs."""

from __future__ import annotations

import warnings

import pytest
import torch

from superdiff.pipelines import SuperDiffPipeline
from superdiff.testing import tiny_sd_components

# ------------------------------------------------------------------------------------------------
# Loading: loading options in folders without model_index.json; the pipeline class a model needs
# ------------------------------------------------------------------------------------------------


def test_component_folder_honours_use_safetensors(tmp_path):
    """A folder without model_index.json passes use_safetensors (and the other loading options) to
    every component: pickle weights are refused with use_safetensors=True, as diffusers refuses them."""
    comps = tiny_sd_components(vae=False, tokenizer_dir=tmp_path / "tok")
    bare = tmp_path / "bare"
    comps["unet"].save_pretrained(bare / "unet", safe_serialization=False)
    for name in ("text_encoder", "tokenizer", "scheduler"):
        comps[name].save_pretrained(bare / name)
    assert sorted(p.name for p in (bare / "unet").iterdir()) == ["config.json", "diffusion_pytorch_model.bin"]
    with pytest.raises(OSError, match="safetensors"):
        SuperDiffPipeline.from_pretrained(bare, use_safetensors=True, local_files_only=True)
    # None (diffusers' default): safetensors where there are some, else pickle. (False asks for pickle
    # only, which transformers 5 never writes: it fails on text_encoder/ here, as diffusers' own loader does.)
    loaded = SuperDiffPipeline.from_pretrained(
        bare, use_safetensors=None, local_files_only=True, dtype=torch.float64
    )
    assert loaded.unet.dtype == torch.float64 and loaded.text_encoder.dtype == torch.float64
    for name, value in comps["unet"].state_dict().items():
        torch.testing.assert_close(loaded.unet.state_dict()[name], value.double(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="low_cpu_mem_usage.*not supported.*without model_index.json"):
        SuperDiffPipeline.from_pretrained(bare, low_cpu_mem_usage=False)
    # the unconditional stack's loader (its own index, one folder per UNet) passes the options on too
    from superdiff.pipelines import SuperDiffUnconditionalPipeline
    from superdiff.testing import tiny_unconditional_components

    SuperDiffUnconditionalPipeline(**tiny_unconditional_components()).save_pretrained(
        tmp_path / "stack", safe_serialization=False
    )
    with pytest.raises(OSError, match="safetensors"):
        SuperDiffUnconditionalPipeline.from_pretrained(tmp_path / "stack", use_safetensors=True, local_files_only=True)
    assert len(SuperDiffUnconditionalPipeline.from_pretrained(tmp_path / "stack", use_safetensors=False).unets) == 2


def test_pipeline_class_for_and_from_pretrained_of_another_pipelines_folder(tmp_path):
    """model_index.json's _class_name picks the superdiff pipeline; loading a folder into the wrong one
    fails at once with a ValueError naming the class to use (it used to fail at the first call)."""
    from diffusers import DDPMPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    from superdiff.pipelines import (
        SuperDiffFlowPipeline,
        SuperDiffUnconditionalPipeline,
        SuperDiffXLPipeline,
        pipeline_class_for,
    )
    from superdiff.testing import tiny_sd3_components, tiny_sdxl_components, tiny_unconditional_components

    sd = tiny_sd_components(tokenizer_dir=tmp_path / "tok")
    StableDiffusionPipeline(
        **sd, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    ).save_pretrained(tmp_path / "sd")
    StableDiffusionXLPipeline(**tiny_sdxl_components(tokenizer_dir=tmp_path / "tok")).save_pretrained(tmp_path / "xl")
    StableDiffusion3Pipeline(**tiny_sd3_components(tokenizer_dir=tmp_path / "tok")).save_pretrained(tmp_path / "sd3")
    folders = {
        "sd": ("StableDiffusionPipeline", SuperDiffPipeline),
        "xl": ("StableDiffusionXLPipeline", SuperDiffXLPipeline),
        "sd3": ("StableDiffusion3Pipeline", SuperDiffFlowPipeline),
    }
    for folder, (class_name, right) in folders.items():
        assert pipeline_class_for(tmp_path / folder) is right
        assert type(right.from_pretrained(tmp_path / folder, local_files_only=True)) is right
        for wrong in {SuperDiffPipeline, SuperDiffXLPipeline, SuperDiffFlowPipeline} - {right}:
            with pytest.raises(
                ValueError, match=f"is a {class_name} .*{wrong.__name__} cannot load.*{right.__name__}.from_pretrained"
            ):
                wrong.from_pretrained(tmp_path / folder, local_files_only=True)
    # folders without model_index.json, and classes superdiff has no pipeline for
    for name in ("unet", "text_encoder", "tokenizer", "scheduler"):
        sd[name].save_pretrained(tmp_path / "bare" / name)
    assert pipeline_class_for(tmp_path / "bare") is SuperDiffPipeline
    uncond = tiny_unconditional_components()
    SuperDiffUnconditionalPipeline(**uncond).save_pretrained(tmp_path / "stack")
    assert pipeline_class_for(tmp_path / "stack") is SuperDiffUnconditionalPipeline
    with pytest.raises(ValueError, match=r"lacks the subfolders \['unet', 'text_encoder', 'tokenizer', 'scheduler'\]"):
        pipeline_class_for(tmp_path / "tok")
    DDPMPipeline(unet=uncond["unets"][0], scheduler=uncond["scheduler"]).save_pretrained(tmp_path / "ddpm")
    with pytest.raises(
        ValueError, match=r"is a DDPMPipeline .*SuperDiffUnconditionalPipeline.from_pretrained\(\[folder_a"
    ):
        pipeline_class_for(tmp_path / "ddpm")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model_index.json").write_text('{"_class_name": "KandinskyPipeline"}')
    with pytest.raises(ValueError, match="is a KandinskyPipeline .*no pipeline for"):
        pipeline_class_for(tmp_path / "other")


def test_dtype_and_its_deprecated_name_torch_dtype_in_every_loader(tmp_path):
    """dtype= (diffusers' name since v0.40) casts without a warning; torch_dtype= casts too, with diffusers'
    FutureWarning pointing at the caller's line; both at once is a ValueError before anything is read. In a
    model_index.json folder, a folder of component subfolders, from_pipe and the unconditional stack's loader."""
    from diffusers import StableDiffusionPipeline

    from superdiff.pipelines import SuperDiffUnconditionalPipeline
    from superdiff.testing import tiny_unconditional_components

    comps = tiny_sd_components(vae=False, tokenizer_dir=tmp_path / "tok")
    sd = StableDiffusionPipeline(**comps, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    sd.save_pretrained(tmp_path / "sd")
    for name in ("unet", "text_encoder", "tokenizer", "scheduler"):
        comps[name].save_pretrained(tmp_path / "bare" / name)
    SuperDiffUnconditionalPipeline(**tiny_unconditional_components()).save_pretrained(tmp_path / "stack")
    loaders = {
        "sd": lambda **kw: SuperDiffPipeline.from_pretrained(tmp_path / "sd", local_files_only=True, **kw).unet,
        "bare": lambda **kw: SuperDiffPipeline.from_pretrained(tmp_path / "bare", local_files_only=True, **kw).unet,
        "stack": lambda **kw: SuperDiffUnconditionalPipeline.from_pretrained(tmp_path / "stack", **kw).unets[0],
    }
    for name, load in loaders.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            assert load(dtype=torch.float64).dtype == torch.float64, name
        with pytest.warns(FutureWarning, match="`torch_dtype` is deprecated.*Please use `dtype` instead") as record:
            assert load(torch_dtype=torch.float64).dtype == torch.float64, name
        assert [w.filename for w in record if "torch_dtype" in str(w.message)] == [__file__], name
        with pytest.raises(ValueError, match=r"^dtype=torch.float64 and torch_dtype=torch.float16 are not valid"):
            load(dtype=torch.float64, torch_dtype=torch.float16)
    with pytest.warns(FutureWarning, match="torch_dtype"):
        assert SuperDiffPipeline.from_pipe(sd, torch_dtype=torch.float64).unet.dtype == torch.float64


def test_from_pretrained_without_a_dtype_loads_every_component_in_float32(tmp_path):
    """A folder saved in float16 (the embedded models are): diffusers documents float32 as the
    default, and transformers >= 5 would keep the text encoder's stored float16 beside a float32
    UNet, which the CPU cannot run. With dtype= the weights are cast as asked."""
    pipe = SuperDiffPipeline(**tiny_sd_components(vae=False, tokenizer_dir=tmp_path / "tok"))
    pipe.unet.half(), pipe.text_encoder.half()
    pipe.save_pretrained(tmp_path / "half")
    loaded = SuperDiffPipeline.from_pretrained(tmp_path / "half", local_files_only=True)
    assert loaded.unet.dtype == torch.float32 and loaded.text_encoder.dtype == torch.float32
    kept = SuperDiffPipeline.from_pretrained(tmp_path / "half", local_files_only=True, dtype=torch.float16)
    assert kept.unet.dtype == torch.float16 and kept.text_encoder.dtype == torch.float16
