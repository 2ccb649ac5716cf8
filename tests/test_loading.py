"""Loading models safely and clearly, and the diffusers call arguments users expect (CPU, offline).

Crafted folders check that no path reads pickle weights behind ``use_safetensors`` (a scheduler
config or a model_index.json entry naming a pipeline), that damaged safetensors files are named as
damaged (not as "pass --allow-pickle"), that pipeline classes match by exact name, and that a
``_class_name`` that is not a string is a clear ValueError / exit 2. Then ``latents=``,
``prompt_embeds=`` and the unconditional pipeline's share of the call signature.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from superdiff.pipelines import SuperDiffPipeline, SuperDiffUnconditionalPipeline, pipeline_class_for
from superdiff.sampling import randn
from superdiff.testing import tiny_sd_components, tiny_unconditional_components
from superdiff_cli.main import cli

PROMPTS = ["a red circle", "a blue square"]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


class WritesMarker:
    """Unpickling this object creates ``path`` (what a malicious pickle weights file could do)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def torch_load_calls(monkeypatch):
    """Every ``torch.load`` made while the test runs (diffusers reads pickle weights through it)."""
    calls = []
    original = torch.load

    def spy(*args, **kwargs):
        calls.append(args[0] if args else kwargs.get("f"))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return calls


def nested_pipeline_scheduler(folder: Path, marker: Path) -> None:
    """Make ``folder`` a scheduler folder whose config names StableDiffusionPipeline, with a nested
    pipeline in it whose UNet weights are a pickle that writes ``marker`` when unpickled."""
    folder.mkdir(parents=True)
    (folder / "scheduler_config.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                         "unet": ["diffusers", "UNet2DConditionModel"]}))
    comps = tiny_sd_components(vae=False)
    comps["unet"].save_config(folder / "unet")
    with open(folder / "unet" / "diffusion_pytorch_model.bin", "wb") as f:
        pickle.dump(WritesMarker(marker), f)


def sd_folder(root: Path, with_index: bool) -> Path:
    """A tiny Stable Diffusion folder (safetensors), with or without model_index.json."""
    comps = tiny_sd_components(vae=False, tokenizer_dir=root / "tok")
    folder = root / ("indexed" if with_index else "bare")
    if with_index:
        SuperDiffPipeline(**comps).save_pretrained(folder)
    else:
        for name in ("unet", "text_encoder", "tokenizer", "scheduler"):
            comps[name].save_pretrained(folder / name)
    return folder


# ------------------------------------------------------------------------------------------------
# No pickle behind use_safetensors: scheduler classes are diffusers schedulers, components are
# networks, schedulers or tokenizers
# ------------------------------------------------------------------------------------------------


def test_a_scheduler_config_naming_a_pipeline_is_refused_before_any_pickle_is_read(tmp_path, torch_load_calls):
    marker = tmp_path / "MARKER"
    bare = sd_folder(tmp_path, with_index=False)
    shutil.rmtree(bare / "scheduler")
    nested_pipeline_scheduler(bare / "scheduler", marker)
    for kwargs in (dict(use_safetensors=True), dict()):
        with pytest.raises(ValueError, match=r"scheduler_config\.json names _class_name='StableDiffusionPipeline', "
                                             r"which is not a diffusers scheduler class"):
            SuperDiffPipeline.from_pretrained(bare, local_files_only=True, **kwargs)
    # the same scheduler folder in a model_index.json folder, named there as the scheduler's class
    indexed = sd_folder(tmp_path, with_index=True)
    shutil.rmtree(indexed / "scheduler")
    nested_pipeline_scheduler(indexed / "scheduler", marker)
    index = json.loads((indexed / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "StableDiffusionPipeline"]
    (indexed / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(
        ValueError, match=r"model_index\.json: component 'scheduler' is \['diffusers', 'StableDiffusionPipeline'\]"
    ):
        SuperDiffPipeline.from_pretrained(indexed, local_files_only=True, use_safetensors=True)
    index["scheduler"], index["unet"] = (
        ["diffusers", "EulerDiscreteScheduler"],
        ["diffusers", "StableDiffusionPipeline"],
    )
    (indexed / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"component 'unet' is \['diffusers', 'StableDiffusionPipeline'\]"):
        SuperDiffPipeline.from_pretrained(indexed, local_files_only=True, use_safetensors=True)
    # an unconditional stack's scheduler folder
    stack = tmp_path / "stack"
    SuperDiffUnconditionalPipeline(**tiny_unconditional_components()).save_pretrained(stack)
    shutil.rmtree(stack / "scheduler")
    nested_pipeline_scheduler(stack / "scheduler", marker)
    with pytest.raises(ValueError, match="not a diffusers scheduler class"):
        SuperDiffUnconditionalPipeline.from_pretrained(stack, use_safetensors=True, local_files_only=True)
    assert torch_load_calls == [] and not marker.exists()


# ------------------------------------------------------------------------------------------------
# Damaged safetensors: named as damaged, never "pass --allow-pickle"
# ------------------------------------------------------------------------------------------------


def truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def test_a_truncated_safetensors_file_is_named_as_damaged(tmp_path):
    indexed = sd_folder(tmp_path, with_index=True)
    bare = sd_folder(tmp_path, with_index=False)
    for folder in (indexed, bare):
        truncate(folder / "unet" / "diffusion_pytorch_model.safetensors")
        with pytest.raises(
            ValueError, match=r"unet/diffusion_pytorch_model\.safetensors \(.*\) are damaged: truncated"
        ):
            SuperDiffPipeline.from_pretrained(folder, use_safetensors=True, local_files_only=True)
        r = invoke("generate", "--model", folder, "--and", "a", "--and", "b", "--out", tmp_path / "out", "--quiet")
        assert r.exit_code == 2, r.output
        assert "unet/diffusion_pytorch_model.safetensors" in r.output and "damaged" in r.output
        assert "--allow-pickle" not in r.output and "pickle" not in r.output and "Traceback" not in r.output
        assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------
# Pipeline classes by exact name; _class_name must be a string
# ------------------------------------------------------------------------------------------------


def test_pipeline_classes_match_exact_names_only(tmp_path):
    indexed = sd_folder(tmp_path, with_index=True)
    index = json.loads((indexed / "model_index.json").read_text())
    for name in ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "SuperDiffPipeline"):
        (indexed / "model_index.json").write_text(json.dumps(index | {"_class_name": name}))
        assert pipeline_class_for(indexed) is SuperDiffPipeline
    for name in ("StableDiffusionPipelineEVIL", "StableDiffusionXLPipelineX", "StableDiffusionInpaintPipeline",
                 "SuperDiffFlowPipelineNot"):
        (indexed / "model_index.json").write_text(json.dumps(index | {"_class_name": name}))
        with pytest.raises(ValueError, match=f"is a {name} .*no pipeline for"):
            pipeline_class_for(indexed)
        r = invoke("generate", "--model", indexed, "--and", "a", "--and", "b", "--out", tmp_path / "out", "--quiet")
        assert r.exit_code == 2 and f"is a {name}, which superdiff has no pipeline for" in r.output, r.output


@pytest.mark.parametrize("class_name", [{}, ["StableDiffusionPipeline"], None, 3])
def test_a_class_name_that_is_not_a_string_is_a_clear_error(tmp_path, class_name):
    indexed = sd_folder(tmp_path, with_index=True)
    index = json.loads((indexed / "model_index.json").read_text())
    (indexed / "model_index.json").write_text(json.dumps(index | {"_class_name": class_name}))
    shown = repr(class_name).replace("[", r"\[").replace("]", r"\]")
    for load in (pipeline_class_for, lambda p: SuperDiffPipeline.from_pretrained(p, local_files_only=True)):
        with pytest.raises(
            ValueError, match=rf"model_index\.json has _class_name={shown}, which is not a pipeline class name"
        ):
            load(indexed)
    r = invoke("generate", "--model", indexed, "--and", "a", "--and", "b", "--out", tmp_path / "out", "--quiet")
    assert r.exit_code == 2, r.output
    assert f"_class_name={class_name!r}" in r.output and "Traceback" not in r.output


def test_a_model_index_that_is_a_json_list_exits_2(tmp_path):
    indexed = sd_folder(tmp_path, with_index=True)
    (indexed / "model_index.json").write_text("[1, 2]")
    r = invoke("generate", "--model", indexed, "--and", "a", "--and", "b", "--out", tmp_path / "out", "--quiet")
    assert r.exit_code == 2 and "holds a JSON list" in r.output, r.output


def test_the_embedded_shapes_index_names_a_class_that_loads_it():
    """Its _class_name is the pipeline that loads it (diffusers' StableDiffusionPipeline cannot: it
    requires a VAE, and this model is pixel space), and it still loads and samples as before."""
    import diffusers

    import superdiff.pipelines
    from superdiff.zoo.registry import embedded_path

    path = Path(embedded_path("shapes"))
    name = json.loads((path / "model_index.json").read_text())["_class_name"]
    named = getattr(superdiff.pipelines, name, None) or getattr(diffusers, name)
    pipe = named.from_pretrained(path, local_files_only=True, use_safetensors=True)
    assert type(pipe) is named and pipeline_class_for(path) is named
    assert pipe.vae is None and pipe.unet.config.in_channels == 3
    out = pipe(prompts=["red", "circle"], num_inference_steps=2, guidance_scale=5.0, output_type="np", progress=False,
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 16, 16, 3) and np.isfinite(out.images).all()


# ------------------------------------------------------------------------------------------------
# latents=, prompt_embeds=, and the unconditional pipeline's call signature
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd_pipe(tmp_path_factory):
    return SuperDiffPipeline(**tiny_sd_components(tokenizer_dir=tmp_path_factory.mktemp("tok")))


def test_sd_latents_are_the_starting_noise_as_in_diffusers(sd_pipe):
    """``latents=z`` with the generator that drew z equals the run whose generator drew z itself; the
    start is init_noise_sigma · z (Euler's σ_max-scaled prior, as diffusers' prepare_latents)."""
    kw = dict(prompts=PROMPTS, num_inference_steps=3, num_images_per_prompt=2, output_type="latent", progress=False)
    drawn = sd_pipe(generator=torch.Generator().manual_seed(5), **kw)
    g = torch.Generator().manual_seed(5)
    z = randn((2, 4, 8, 8), g, "cpu", torch.float32)
    starts = []

    def record(pipe, step, timestep, tensors):
        starts.append(tensors["latents"].clone())
        return tensors

    given = sd_pipe(generator=g, latents=z.clone(), callback_on_step_end=record, **kw)
    torch.testing.assert_close(given.images, drawn.images, rtol=0, atol=0)
    torch.testing.assert_close(given.log_density_trace, drawn.log_density_trace, rtol=0, atol=0)
    # another z gives another sample; the start really is init_noise_sigma · z
    other = sd_pipe(generator=torch.Generator().manual_seed(5), latents=torch.zeros(2, 4, 8, 8), **kw)
    assert not torch.equal(other.images, drawn.images)
    assert sd_pipe.scheduler.init_noise_sigma > 1.0 and len(starts) == 3


def test_latents_of_the_wrong_shape_and_precomputed_embeddings_are_refused(sd_pipe):
    from superdiff.pipelines import SuperDiffFlowPipeline
    from superdiff.testing import tiny_sd3_components

    kw = dict(prompts=PROMPTS, num_inference_steps=2, progress=False)
    with pytest.raises(
        ValueError, match=r"^latents=<a tensor of shape \(1, 4, 4, 4\)> .*samples shape \(1, 4, 8, 8\)"
    ):
        sd_pipe(latents=torch.zeros(1, 4, 4, 4), **kw)
    with pytest.raises(ValueError, match=r"^latents=.*\(2, 4, 8, 8\)"):
        sd_pipe(latents=torch.zeros(1, 4, 8, 8), num_images_per_prompt=2, **kw)
    with pytest.raises(ValueError, match="^latents=.*finite"):
        sd_pipe(latents=torch.full((1, 4, 8, 8), float("nan")), **kw)
    for name in ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds"):
        with pytest.raises(ValueError, match=f"^{name}=.*do not take precomputed text embeddings"):
            sd_pipe(**{name: torch.zeros(2, 16, 32)}, **kw)
    flow = SuperDiffFlowPipeline(**tiny_sd3_components())
    with pytest.raises(ValueError, match=r"^latents=<a tensor of shape \(1, 4, 3, 3\)>"):
        flow(latents=torch.zeros(1, 4, 3, 3), **kw)
    with pytest.raises(ValueError, match="^prompt_embeds="):
        flow(prompt_embeds=torch.zeros(2, 16, 32), **kw)


def test_flow_latents_are_the_starting_noise():
    from superdiff.pipelines import SuperDiffFlowPipeline
    from superdiff.testing import tiny_sd3_components

    pipe = SuperDiffFlowPipeline(**tiny_sd3_components())
    kw = dict(prompts=PROMPTS, num_inference_steps=2, output_type="latent", progress=False)
    drawn = pipe(generator=torch.Generator().manual_seed(2), **kw)
    g = torch.Generator().manual_seed(2)
    z = randn(tuple(drawn.images.shape), g, "cpu", torch.float32)
    torch.testing.assert_close(pipe(generator=g, latents=z, **kw).images, drawn.images, rtol=0, atol=0)


def test_unconditional_takes_the_text_pipelines_batch_name_and_latents_and_refuses_prompts():
    pipe = SuperDiffUnconditionalPipeline(**tiny_unconditional_components(num_models=2))
    kw = dict(mode="or", num_inference_steps=2, output_type="pt", progress=False)
    by_batch = pipe(batch_size=2, generator=torch.Generator().manual_seed(1), **kw)
    by_num = pipe(num_images_per_prompt=2, generator=torch.Generator().manual_seed(1), **kw)
    torch.testing.assert_close(by_num.images, by_batch.images, rtol=0, atol=0)
    assert pipe(progress=False, num_inference_steps=1, output_type="pt").images.shape[0] == 1  # default: one image
    g = torch.Generator().manual_seed(1)
    z = randn((2, 3, 8, 8), g, "cpu", torch.float32)
    torch.testing.assert_close(pipe(num_images_per_prompt=2, generator=g, latents=z, **kw).images, by_batch.images,
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"^latents=<a tensor of shape \(1, 3, 8, 8\)>.*\(2, 3, 8, 8\)"):
        pipe(batch_size=2, latents=torch.zeros(1, 3, 8, 8), **kw)
    with pytest.raises(ValueError, match="^num_images_per_prompt=3 .*another name for batch_size, given as 2"):
        pipe(batch_size=2, num_images_per_prompt=3, **kw)
    with pytest.raises(ValueError, match="^num_images_per_prompt=0 "):
        pipe(num_images_per_prompt=0, **kw)
    for name, value in (
        ("prompt", "a cat"),
        ("prompts", ["a", "b"]),
        ("guidance_scale", 7.5),
        ("negative_prompt", "x"),
    ):
        with pytest.raises(
            ValueError, match=f"^{name}=.*unconditional stack has no prompts and no classifier-free guidance"
        ):
            pipe(**{name: value}, **kw)
