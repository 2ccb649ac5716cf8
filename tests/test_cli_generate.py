"""`superdiff generate` on a tiny local model: files, metadata, determinism, and bad input (exit 2)."""

import json

import pytest
from click.testing import CliRunner
from PIL import Image

from superdiff_cli.main import cli


def invoke(*args):
    return CliRunner().invoke(cli, list(args))


def test_generate_writes_images_sidecars_grid_and_plot(tiny_model, tmp_path):
    out = tmp_path / "out"
    r = invoke("generate", "--model", tiny_model, "--and", "a red circle", "--and", "a blue square",
               "--steps", "6", "--num-images", "2", "--seed", "3", "--out", str(out), "--plot", "--quiet")
    assert r.exit_code == 0, r.output
    side = json.loads((out / "image_001.json").read_text())
    assert side["prompts"] == ["a red circle", "a blue square"] and side["mode"] == "and" and side["seed"] == 3
    assert len(side["kappa_trace"]) == 6 and len(side["log_density_trace"]) == 7
    # AND: the two tracked log-densities are equal
    assert abs(side["log_densities"][0] - side["log_densities"][1]) < 1e-4  # float32 states
    meta = json.loads(Image.open(out / "image_000.png").text["superdiff"])
    assert meta["steps"] == 6 and meta["index"] == 0
    assert (out / "grid.png").exists() and (out / "traces.png").exists()
    again = tmp_path / "again"
    r2 = invoke("generate", "--model", tiny_model, "--and", "a red circle", "--and", "a blue square",
                "--steps", "6", "--num-images", "2", "--seed", "3", "--out", str(again), "--quiet")
    assert r2.exit_code == 0
    assert (again / "image_001.png").read_bytes() == (out / "image_001.png").read_bytes()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--and", "red"], "at least 2"),
        (["--prompt", "", "--prompt", "x", "--mode", "or"], "empty"),
        (["--and", "a", "--and", "b", "--steps", "0"], "--steps"),
        (["--and", "a", "--and", "b", "--guidance", "-1"], "--guidance"),
        (["--and", "a", "--and", "b", "--height", "13"], "height"),
        (
            ["--and", "a", "--and", "b", "--log-weights", "1,2,3"],
            "log_weights=(1.0, 2.0, 3.0) is not valid; pass 2 numbers",
        ),
        (["--and", "a", "--or", "b"], "--and"),
        (["--and", "a", "--and", "b", "--device", "gpu"], "--device 'gpu' is not a device; use auto, cpu, cuda"),
        (["--and", "a", "--and", "b", "--device", "cuda:99"], "--device 'cuda:99'"),  # no CUDA here, or no 100th GPU
        (["--expr", '"a" & & "b"'], "found '&' (at position 6):\n  \"a\" & & \"b\"\n        ^"),
        (["--expr", '"a" & "b"', "--and", "c"], "drop --and"),
        (["--expr", 'or("a", "b")', "--temperature", "2"], "drop --temperature"),
        (["--expr", '"a" | "  "'], "Leaf.name"),
        (["--expr", "0 | 1"], "leaf 0 is a model index, which only a stack of models built in Python takes"),
        (["--expr", '"a" * "b"', "--particles", "0"], "--particles"),
        (["--expr", '"a" * "b"', "--particles", "2", "--resample-threshold", "0"], "--resample-threshold"),
    ],
)
def test_generate_bad_input_exits_2(tiny_model, tmp_path, args, needle):
    r = invoke("generate", "--model", tiny_model, "--out", str(tmp_path), "--quiet", *args)
    assert r.exit_code == 2, r.output
    assert needle in r.output and "Traceback" not in r.output


def test_an_expression_over_the_digit_models_names_them_and_needs_a_reference_for_not(tmp_path):
    r = invoke("generate", "--model", "embedded-digits", "--expr", '"a" * !"b"', "--out", str(tmp_path / "no"))
    assert r.exit_code == 2 and 'give NOT a reference among a, b and all, e.g. not("b", "all")' in r.output, r.output
    r = invoke("generate", "--model", "embedded-digits", "--expr", '"a" * not("b", "all")', "--steps", "4",
               "--num-images", "2", "--out", str(tmp_path / "yes"), "--quiet")
    assert r.exit_code == 0, r.output
    side = json.loads((tmp_path / "yes" / "image_000.json").read_text())
    assert side["prompts"] == ["a", "all", "b"] and side["guidance"] is None  # NOT lists its reference first


def test_an_expression_equals_the_flat_mode_it_spells_and_a_pipeline_call_with_it(tiny_model, tmp_path):
    common = ["--model", tiny_model, "--steps", "5", "--num-images", "2", "--seed", "4", "--quiet"]
    r = invoke("generate", *common, "--expr", '"a red circle" & "a blue square"', "--out", str(tmp_path / "expr"))
    assert r.exit_code == 0, r.output
    r = invoke("generate", *common, "--and", "a red circle", "--and", "a blue square", "--out", str(tmp_path / "and"))
    assert r.exit_code == 0, r.output
    for name in ("image_000", "image_001"):  # an And of two leaves is SuperDiff AND, to the pixel
        expr = Image.open(tmp_path / "expr" / f"{name}.png").convert("RGB").tobytes()
        assert expr == Image.open(tmp_path / "and" / f"{name}.png").convert("RGB").tobytes()
    side = json.loads((tmp_path / "expr" / "image_000.json").read_text())
    assert side["mode"] == "expression" and side["expression"] == 'and("a red circle", "a blue square")'
    assert side["node_weight_trace"] is not None and len(side["node_weight_trace"]) == 1  # one And node


def test_particles_pick_one_weighted_particle_per_image_and_record_its_weight(tiny_model, tmp_path):
    import torch

    from superdiff.pipelines import SuperDiffPipeline

    text, k = '"a red circle" * !"a blue square"', 3
    r = invoke("generate", "--model", tiny_model, "--expr", text, "--particles", str(k), "--steps", "5",
               "--num-images", "2", "--seed", "1", "--out", str(tmp_path), "--quiet")
    assert r.exit_code == 0, r.output
    sides = [json.loads((tmp_path / f"image_{i:03d}.json").read_text()) for i in range(2)]
    for side in sides:
        assert side["particles"] == k and side["prompts"] == ["a red circle", "", "a blue square"]
        assert side["log_weight"] <= 1e-9  # a share of its group's weight
        assert all(1.0 - 1e-6 <= e <= k + 1e-6 for e in side["ess_trace"]) and side["resample_count"] >= 0
    pipe = SuperDiffPipeline.from_pretrained(tiny_model)
    out = pipe(expression=text, particles=k, num_inference_steps=5, num_images_per_prompt=2, output_type="np",
               guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(1), progress=False)
    for i, side in enumerate(sides):  # the CLI is the pipeline call, weights and all
        assert side["log_weight"] == pytest.approx(float(out.log_weights[i]), abs=1e-9)
        assert torch.allclose(torch.tensor(side["log_density_trace"], dtype=torch.float64),
                              out.log_density_trace[:, i].double(), atol=1e-6)


def test_density_variance_reaches_the_sampler_and_the_sidecar(tiny_model, tmp_path):
    common = ["--model", tiny_model, "--or", "a red circle", "--or", "a blue square", "--steps", "5", "--seed", "2",
              "--quiet"]
    r = invoke("generate", *common, "--density-variance", "forward", "--out", str(tmp_path / "f"))
    assert r.exit_code == 0, r.output
    r = invoke("generate", *common, "--out", str(tmp_path / "t"))  # the default
    assert r.exit_code == 0, r.output
    forward, tweedie = (json.loads((tmp_path / d / "image_000.json").read_text()) for d in ("f", "t"))
    assert forward["density_variance"] == "forward" and tweedie["density_variance"] == "tweedie"
    assert forward["log_density_trace"][1] == tweedie["log_density_trace"][1]  # the first step scores as forward
    assert forward["log_density_trace"][-1] != tweedie["log_density_trace"][-1]


def test_generate_missing_model_suggests_the_embedded_one(tmp_path):
    r = invoke("generate", "--model", str(tmp_path / "nope"), "--and", "a", "--and", "b", "--out", str(tmp_path))
    assert r.exit_code == 2 and "embedded-shapes" in r.output
    r2 = invoke(
        "generate", "--model", "someone/not-cached-anywhere", "--and", "a", "--and", "b", "--out", str(tmp_path)
    )
    assert r2.exit_code == 2 and "embedded-shapes" in r2.output


def test_generate_unwritable_out(tiny_model, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = invoke("generate", "--model", tiny_model, "--and", "a", "--and", "b", "--out", str(blocker / "sub"))
    assert r.exit_code == 2 and "--out" in r.output


def test_allow_pickle_still_reads_safetensors_folders(tiny_model, tmp_path):
    # --allow-pickle widens what is read (pickle as a fallback); it must not require pickle files.
    r = invoke("generate", "--model", tiny_model, "--and", "a red circle", "--and", "a blue square",
               "--steps", "2", "--num-images", "1", "--out", str(tmp_path / "p"), "--allow-pickle", "--quiet")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "p" / "image_000.png").exists()


def test_generate_compile_and_channels_last_options(tiny_model, tmp_path, monkeypatch):
    """--channels-last stores the UNet channels-last, then --compile MODE hands it to torch.compile
    with that mode; the images are those of the plain run (the "eager" backend stands in for
    inductor's minutes of codegen)."""
    import torch

    calls = []
    real_compile = torch.compile

    def recording_compile(module, **kwargs):
        calls.append(
            (type(module).__name__, kwargs, module.conv_in.weight.is_contiguous(memory_format=torch.channels_last))
        )
        return real_compile(module, backend="eager")

    args = ["--and", "a red circle", "--and", "a blue square", "--steps", "2", "--num-images", "1", "--quiet"]
    assert invoke("generate", "--model", tiny_model, *args, "--out", str(tmp_path / "plain")).exit_code == 0
    monkeypatch.setattr(torch, "compile", recording_compile)
    r = invoke("generate", "--model", tiny_model, *args, "--compile", "max-autotune", "--channels-last",
               "--out", str(tmp_path / "compiled"))
    assert r.exit_code == 0, r.output
    assert calls == [("UNet2DConditionModel", {"mode": "max-autotune"}, True)]
    plain = Image.open(tmp_path / "plain" / "image_000.png")
    compiled = Image.open(tmp_path / "compiled" / "image_000.png")
    assert list(plain.getdata()) == list(compiled.getdata())
    sidecar = json.loads((tmp_path / "compiled" / "image_000.json").read_text())
    assert sidecar["compile"] == "max-autotune" and sidecar["channels_last"] is True
    assert json.loads((tmp_path / "plain" / "image_000.json").read_text())["channels_last"] is False


@pytest.fixture(scope="module")
def other_pipelines(tmp_path_factory):
    """diffusers' own SDXL and SD3 pipelines, tiny, saved as their model_index.json names them."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionXLPipeline

    from superdiff.testing import tiny_sd3_components, tiny_sdxl_components

    root = tmp_path_factory.mktemp("other")
    StableDiffusionXLPipeline(**tiny_sdxl_components()).save_pretrained(root / "sdxl")
    StableDiffusion3Pipeline(**tiny_sd3_components()).save_pretrained(root / "sd3")
    return root


@pytest.mark.parametrize("name, pipeline", [("sdxl", "SuperDiffXLPipeline"), ("sd3", "SuperDiffFlowPipeline")])
def test_generate_reads_the_pipeline_class_from_model_index(other_pipelines, tmp_path, monkeypatch, name, pipeline):
    import superdiff.pipelines

    loaded = []
    cls = getattr(superdiff.pipelines, pipeline)
    real = cls.from_pretrained.__func__

    def recording(klass, *args, **kwargs):
        loaded.append(klass.__name__)
        return real(klass, *args, **kwargs)

    monkeypatch.setattr(cls, "from_pretrained", classmethod(recording))
    r = invoke("generate", "--model", str(other_pipelines / name), "--and", "a red circle", "--and", "a blue square",
               "--steps", "2", "--num-images", "1", "--out", str(tmp_path / "out"), "--quiet")
    assert r.exit_code == 0, r.output
    assert loaded == [pipeline]
    assert json.loads((tmp_path / "out" / "image_000.json").read_text())["prompts"] == [
        "a red circle",
        "a blue square",
    ]


def test_generate_refuses_a_pipeline_class_superdiff_lacks(tmp_path):
    folder = tmp_path / "kandinsky"
    folder.mkdir()
    (folder / "model_index.json").write_text(
        json.dumps({"_class_name": "KandinskyPipeline", "unet": ["diffusers", "X"]})
    )
    r = invoke("generate", "--model", str(folder), "--and", "a", "--and", "b", "--out", str(tmp_path / "out"))
    assert r.exit_code == 2, r.output
    assert "KandinskyPipeline" in r.output and "StableDiffusionXLPipeline" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "out").exists()  # refused before any work


def test_pickle_weights_are_refused_with_the_option_that_reads_them(tmp_path):
    from superdiff.pipelines import SuperDiffPipeline
    from superdiff.testing import tiny_sd_components

    folder = tmp_path / "pickled"
    SuperDiffPipeline(**tiny_sd_components()).save_pretrained(folder, safe_serialization=False)
    args = [
        "--model",
        str(folder),
        "--and",
        "a red circle",
        "--and",
        "a blue square",
        "--steps",
        "2",
        "--num-images",
        "1",
        "--quiet",
    ]
    r = invoke("generate", *args, "--out", str(tmp_path / "refused"))
    assert r.exit_code == 2, r.output
    assert "pickle" in r.output and "--allow-pickle" in r.output and "unet/" in r.output
    assert "embedded-shapes" not in r.output
    ok = invoke("generate", *args, "--allow-pickle", "--out", str(tmp_path / "read"))
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "read" / "image_000.png").exists()


def test_quiet_keeps_the_libraries_log_lines_off_the_terminal(tiny_model, tmp_path):
    """A folder whose UNet has no weights: diffusers logs "An error occurred while trying to fetch"
    (an ERROR, on its own handler); under --quiet only the CLI's one-line error remains."""
    import logging
    import shutil

    class Recorder(logging.Handler):
        def __init__(self):
            super().__init__(logging.DEBUG)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    folder = tmp_path / "noweights"
    shutil.copytree(tiny_model, folder)
    for weights in (folder / "unet").glob("*.safetensors"):
        weights.unlink()
    recorder, library = Recorder(), logging.getLogger("diffusers")
    library.addHandler(recorder)
    try:
        r = invoke(
            "generate", "--model", str(folder), "--and", "a", "--and", "b", "--out", str(tmp_path / "o"), "--quiet"
        )
    finally:
        library.removeHandler(recorder)
        for name in ("diffusers", "transformers", "huggingface_hub"):
            logging.getLogger(name).setLevel(logging.ERROR)
    assert r.exit_code == 2 and "--allow-pickle" in r.output and "unet" in r.output
    assert not [m for m in recorder.messages if "An error occurred" in m]


def test_an_earlier_run_in_out_is_refused_or_replaced_with_overwrite(tiny_model, tmp_path):
    """A smaller second run into the same --out must not leave the first run's extra images (which
    eval would count): refused before any work, or, with --overwrite, replaced; other files stay."""
    out = tmp_path / "out"
    args = ["generate", "--model", tiny_model, "--and", "a red circle", "--and", "a blue square", "--steps", "2",
            "--out", str(out), "--quiet"]
    assert invoke(*args, "--num-images", "3", "--plot").exit_code == 0
    (out / "eval.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    before = (out / "image_000.png").read_bytes()
    refused = invoke(*args, "--num-images", "1", "--seed", "1")
    assert refused.exit_code == 2 and "--overwrite" in refused.output and "Traceback" not in refused.output
    assert (out / "image_000.png").read_bytes() == before and (out / "image_002.png").exists()
    r = invoke(*args, "--num-images", "1", "--seed", "1", "--overwrite")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "image_000.json", "image_000.png", "notes.txt"]
    assert json.loads((out / "image_000.json").read_text())["seed"] == 1


def test_embedded_digits_takes_no_guidance_and_records_none(tmp_path):
    out = tmp_path / "d"
    refused = invoke(
        "generate", "--model", "embedded-digits", "--or", "a", "--or", "b", "--guidance", "3", "--out", str(out)
    )
    assert refused.exit_code == 2 and "--guidance does not apply to embedded-digits" in refused.output
    assert not out.exists()
    r = invoke("generate", "--model", "embedded-digits", "--or", "a", "--or", "b", "--steps", "2", "--num-images", "1",
               "--out", str(out), "--quiet")
    assert r.exit_code == 0, r.output
    assert json.loads((out / "image_000.json").read_text())["guidance"] is None
    assert json.loads(Image.open(out / "image_000.png").text["superdiff"])["guidance"] is None


def test_embedded_shapes_refuses_words_it_never_saw(tmp_path):
    r = invoke(
        "generate", "--model", "embedded-shapes", "--and", "purple", "--and", "a red circle", "--out", str(tmp_path)
    )
    assert r.exit_code == 2 and "got a, purple" in r.output and "red" in r.output and "Traceback" not in r.output
    assert not list(tmp_path.glob("image_*"))


@pytest.fixture
def no_loading(monkeypatch):
    """Any model load fails the test: the checks must come before one."""
    import superdiff_cli.generate as generate_module

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(generate_module, "load_model", refuse)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--steps", "1001"], "--steps 1001 is more than the 1000 training timesteps of embedded-shapes's scheduler"),
        (["--steps", "100000000"], "use --steps 1000 or fewer"),
        (["--steps", "1e8"], "'1e8' is not a valid integer"),
        (["--seed", str(2**70)], "0<=x<=18446744073709551615"),
        (["--seed", "-1"], "0<=x<=18446744073709551615"),
        (["--num-images", "1000000"], "--num-images 1000000 is more than 1024 images in one batch"),
        (["--height", "100000"], "--height 100000 is more than 8192 pixels"),
        (
            ["--num-images", "65", "--height", "1024", "--width", "1024"],
            "more than the cap of 67,108,864 (2**26); use --num-images 64",
        ),
        (["--num-images", "1024", "--height", "8192"], "1024 images of 8192x16 pixels"),  # the model's default width
        (["--model", "../../../../etc"], "is not a diffusers model folder"),
        (["--model", "."], "is not a diffusers model folder (no model_index.json, no unet/, text_encoder/"),
        (
            ["--and", "red\x1b[2J", "--and", "circle"],
            r"prompt 1 'red\x1b[2J' holds the control character '\x1b' at position 4",
        ),
        (
            ["--negative-prompt", "purple blob"],
            "--negative-prompt 'purple blob': embedded-shapes knows only the words",
        ),
        (["--negative-prompt", "blue\x07"], r"holds the control character '\x07'"),
        (["--and", "red\u200b", "--and", "circle"], r"got red\u200b;"),  # a zero-width space, shown escaped
        (  # the cap names the option that made the batch too large
            ["--expr", '"red" * "circle"', "--particles", "25000"],
            "--num-images 4 x --particles 25000 is 100000 samples in one batch, more than 1024; use --particles 256",
        ),
        (
            ["--expr", '"red" * "circle"', "--particles", "20", "--height", "4096", "--width", "4096"],
            "--num-images 4 x --particles 20 samples of 4096x4096 pixels",
        ),
        (  # embedded-digits refuses --guidance too: the message must not suggest it
            ["--model", "embedded-digits", "--or", "a", "--or", "b", "--true-cfg-scale", "2"],
            "drop it (it composes unconditional models, which take no guidance)",
        ),
    ],
)
def test_limits_are_checked_before_loading_or_creating_out(tmp_path, monkeypatch, no_loading, args, needle):
    """Ranges read from the model's config files, torch's seed range, the batch caps and plain-text
    prompts: exit 2 with the limit and its fix, no traceback, nothing loaded and --out not created."""
    monkeypatch.chdir(tmp_path)  # tmp_path is deeper than four folders: ../../../../etc is /etc
    prompts = [] if {"--and", "--or", "--expr"} & set(args) else ["--and", "red", "--and", "circle"]
    r = invoke("generate", *prompts, "--out", str(tmp_path / "out"), "--quiet", *args)
    assert r.exit_code == 2, r.output
    assert needle in " ".join(r.output.split()) and "Traceback" not in r.output
    assert not (tmp_path / "out").exists()


def test_an_empty_out_is_refused_not_read_as_the_current_folder(tmp_path, monkeypatch, no_loading):
    monkeypatch.chdir(tmp_path)
    for empty in ("", "  "):
        r = invoke("generate", "--and", "red", "--and", "circle", "--out", empty, "--quiet")
        assert r.exit_code == 2 and "names no folder" in r.output and "Traceback" not in r.output, r.output
        spec = tmp_path.parent / f"{tmp_path.name}-spec.jsonl"
        spec.write_text('{"prompts": ["red", "circle"]}\n')
        r = invoke("sweep", str(spec), "--out", empty)
        assert r.exit_code == 2 and "names no folder" in r.output and "--out out/" in r.output, r.output
        r = invoke("eval", empty)
        assert r.exit_code == 2 and "names no folder" in r.output and "DIR out/" in r.output, r.output
    assert list(tmp_path.iterdir()) == []


def test_steps_and_seeds_up_to_their_limits_run(tiny_model, tmp_path):
    """The steps limit is the model folder's own scheduler_config.json num_train_timesteps (here made
    4): 4 steps run, 5 are refused up front; the largest seed torch takes runs."""
    import shutil

    folder = tmp_path / "four-steps"
    shutil.copytree(tiny_model, folder)
    config_path = folder / "scheduler" / "scheduler_config.json"
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"num_train_timesteps": 4}))
    args = ["generate", "--model", str(folder), "--and", "a red circle", "--and", "a blue square", "--num-images", "1",
            "--quiet"]
    too_many = invoke(*args, "--steps", "5", "--out", str(tmp_path / "refused"))
    assert too_many.exit_code == 2 and "--steps 5 is more than the 4 training timesteps" in too_many.output
    assert "use --steps 4 or fewer" in too_many.output and not (tmp_path / "refused").exists()
    ok = invoke(*args, "--steps", "4", "--seed", str(2**64 - 1), "--out", str(tmp_path / "ran"))
    assert ok.exit_code == 0, ok.output
    assert json.loads((tmp_path / "ran" / "image_000.json").read_text())["seed"] == 2**64 - 1


def test_a_size_the_model_cannot_make_is_refused_before_loading(tiny_model, tmp_path, no_loading):
    """Height and width must be multiples of the VAE factor (read from the folder's vae/config.json):
    refused with the multiple and a size that works, before the model is loaded or --out created."""
    from superdiff.pipelines import SuperDiffPipeline

    multiple = SuperDiffPipeline.from_pretrained(tiny_model).vae_scale_factor
    assert multiple > 1
    r = invoke("generate", "--model", tiny_model, "--and", "a", "--and", "b", "--height", str(multiple + 1),
               "--out", str(tmp_path / "out"), "--quiet")
    assert r.exit_code == 2, r.output
    assert f"--height {multiple + 1} is not a multiple of {multiple}" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "out").exists()


def test_a_collapse_of_the_particles_weights_is_printed_as_a_warning(tiny_model, tmp_path, monkeypatch):
    """The sampler's WeightCollapseWarning reaches the terminal, --quiet or not: the tiny random model's
    weights collapse on 2 of the 3 checked steps of a 5-step product with a negation (with a bound of ESS < 1,
    which no group can reach, nothing is printed)."""
    import superdiff.particles

    text = '"a red circle" * !"a blue square"'
    args = ["generate", "--model", tiny_model, "--expr", text, "--particles", "3", "--steps", "5", "--seed", "1",
            "--quiet"]
    with monkeypatch.context() as patch:
        patch.setattr(superdiff.particles, "COLLAPSE_FRACTION", 0.0)
        r = invoke(*args, "--out", str(tmp_path / "a"))
    assert r.exit_code == 0 and "Warning" not in r.output, r.output
    r = invoke(*args, "--out", str(tmp_path / "b"))
    assert r.exit_code == 0, r.output
    assert "Warning: the particles' weights collapsed" in r.output and "not be normalisable" in r.output
