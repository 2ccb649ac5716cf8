"""`superdiff generate` on a tiny local model: files, metadata, determinism, and bad input (exit 2)."""

import json

import pytest
from click.testing import CliRunner
from PIL import Image

from superdiff_cli.main import cli


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from superdiff.pipelines import SuperDiffPipeline
    from superdiff.testing import tiny_sd_components

    path = tmp_path_factory.mktemp("tiny-sd")
    SuperDiffPipeline(**tiny_sd_components()).save_pretrained(path)
    return str(path)


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
        (["--and", "a", "--and", "b", "--log-weights", "1,2,3"], "--log-weights"),
        (["--and", "a", "--or", "b"], "--and"),
    ],
)
def test_generate_bad_input_exits_2(tiny_model, tmp_path, args, needle):
    r = invoke("generate", "--model", tiny_model, "--out", str(tmp_path), "--quiet", *args)
    assert r.exit_code == 2, r.output
    assert needle in r.output and "Traceback" not in r.output


def test_generate_missing_model_suggests_the_embedded_one(tmp_path):
    r = invoke("generate", "--model", str(tmp_path / "nope"), "--and", "a", "--and", "b", "--out", str(tmp_path))
    assert r.exit_code == 2 and "embedded-shapes" in r.output
    r2 = invoke("generate", "--model", "someone/not-cached-anywhere", "--and", "a", "--and", "b", "--out", str(tmp_path))
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
        calls.append((type(module).__name__, kwargs, module.conv_in.weight.is_contiguous(memory_format=torch.channels_last)))
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
