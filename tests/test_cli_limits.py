"""The library's ranges and caps (superdiff.limits) at the commands: refused before a model is loaded
(exit 2, nothing written), each sweep line with its own error, the app's form with the message; and
a run that goes non-finite fails (exit 1) without writing its images."""

import json

import pytest
from click.testing import CliRunner

from superdiff.limits import MAX_DEPTH, NonFiniteError
from superdiff_cli.main import cli

SHAPES = ("red", "green", "blue", "yellow", "circle", "square", "triangle")
SIXTEEN = [f"{a} {b}" for a in SHAPES[:4] for b in SHAPES[4:]] + ["red", "green", "blue", "yellow"]  # 16 leaves


def _no_loading(*args, **kwargs):
    raise AssertionError("a model was loaded before the input was checked")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--expr", '"red"^1e308 * "circle"', "--particles", "2"], "at most 2**23"),
        (["--expr", 'softmin("red", "circle")[sharpness=1e308]'], "[2**-23, 2**23]"),
        (["--expr", 'and("red", "circle")[weights=1e308;-1e308]'], "[-87.34, 87.34]"),
        (["--expr", '"red" * "circle"', "--guidance", "1e300"], "--guidance=1e+300 is not valid"),
        (["--expr", '"red" * "circle"', "--guidance", "5e6"], "use --guidance 4.1943e+06 or less"),  # gain 2
        (["--and", "red", "--and", "circle", "--guidance", "1e300"], "use --guidance 8.38861e+06 or less"),
        (["--expr", " * ".join(f'"{p}"' for p in SIXTEEN), "--particles", "64", "--num-images", "16"],
         "16 images x 64 particles x (16 models + the unconditional row) = 17408 rows in one network call, more "
         "than the cap of 16384 (superdiff.limits.MAX_NETWORK_ROWS); lower --particles to 60 or fewer"),
        (["--expr", "(" * 130 + '"red"' + ")" * 130], f"nest at most {MAX_DEPTH}"),
        (["--expr", "!" * 130 + '"red"'], f"nest at most {MAX_DEPTH}"),
    ],
)
def test_generate_refuses_what_cannot_work_before_loading(tmp_path, monkeypatch, args, needle):
    import superdiff_cli.generate as generate_module

    monkeypatch.setattr(generate_module, "load_model", _no_loading)
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["generate", "--model", "embedded-shapes", "--out", str(out), "--quiet", *args])
    assert r.exit_code == 2, r.output
    assert needle in " ".join(r.output.split()), r.output
    assert "Traceback" not in r.output and not out.exists()


@pytest.mark.parametrize("index, guidance, true_cfg, refused", [
    ({"_class_name": "StableDiffusionPipeline"}, None, None, True),  # guidance 7.5 by default: 16 x 64 x 17 rows
    ({"_class_name": "StableDiffusionPipeline"}, 1.0, None, False),  # guidance 1: no unconditional row, 16384 fit
    ({"_class_name": "Flux2Pipeline"}, None, None, False),  # guidance-distilled: never an unconditional row
    ({"_class_name": "FluxPipeline"}, 3.5, None, False),  # distilled guidance; true CFG off
    ({"_class_name": "FluxPipeline"}, 3.5, 4.0, True),  # true CFG: the negative prompt's row
    ({"_class_name": "ZImagePipeline"}, 0.5, None, True),  # Z-Image guides for any guidance above 0
    ({"_class_name": "ZImagePipeline"}, 0.0, None, False),  # Z-Image-Turbo
    ({"_class_name": "Flux2KleinPipeline", "is_distilled": False}, 4.0, None, True),
    ({"_class_name": "Flux2KleinPipeline", "is_distilled": True}, 4.0, None, False),  # step-distilled: unguided
    ({"_class_name": "QwenImagePipeline"}, None, 4.0, False),  # true CFG runs only with a negative prompt
])
def test_the_row_cap_counts_the_unconditional_row_as_the_models_family_guides(tmp_path, index, guidance, true_cfg,
                                                                                refused):
    """16 images x 64 particles x 16 models are exactly the cap of 16384 rows: the run fits unless the family's
    guidance adds the unconditional row, read from the folder's model_index.json before loading."""
    from superdiff_cli.limits import network_rows_problem

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps(index))
    problem = network_rows_problem(str(folder), 16, 64, 16, guidance, true_cfg)
    assert (problem is not None) == refused, problem
    assert problem is None or "(16 models + the unconditional row) = 17408 rows" in problem


def _failing_sampler(*args, **kwargs):
    raise NonFiniteError("step 2 of 3 produced non-finite (NaN or infinite) samples (the log-densities of models "
                         "'red', 'circle'); nothing was returned")


def test_generate_fails_a_non_finite_run_without_writing_it(tmp_path, monkeypatch):
    import superdiff.pipelines.base as common  # the loop calls sample_sde there

    monkeypatch.setattr(common, "sample_sde", _failing_sampler)
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["generate", "--model", "embedded-shapes", "--and", "red", "--and", "circle",
                                 "--steps", "3", "--num-images", "1", "--out", str(out), "--quiet"])
    assert r.exit_code == 1, r.output
    assert "step 2 of 3 produced non-finite" in r.output
    assert not list(out.glob("image_*")) and not (out / "grid.png").exists()


LINES = [
    ('{"expression": "' + "(" * 130 + '\\"red\\"' + ")" * 130 + '"}', f"nest at most {MAX_DEPTH}"),
    ('{"expression": "\\"red\\" * \\"circle\\"", "guidance": 1e300}', "guidance=1e+300 is not valid"),
    ('{"expression": "or(\\"red\\" * \\"circle\\", \\"blue\\")"}', "exponents must sum alike"),
    ('{"expression": "' + " * ".join(f'\\"{p}\\"' for p in SIXTEEN) + '", "particles": 64, "num_images": 16}',
     "lower particles to 60 or fewer"),
    ('{"prompts": ["red", "circle"], "modes": ["and"], "guidance": 1e300}', "guidance=1e+300 is not valid"),
]


def test_each_sweep_line_gets_its_own_limit_error_before_any_work(tmp_path, monkeypatch):
    import superdiff_cli.sweep as sweep_module

    monkeypatch.setattr(sweep_module, "load_model", _no_loading)
    spec = tmp_path / "spec.jsonl"
    spec.write_text('{"prompts": ["red", "circle"]}\n' + "".join(line + "\n" for line, _ in LINES))
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["sweep", str(spec), "--out", str(out), "--model", "embedded-shapes", "--quiet"])
    assert r.exit_code == 2, r.output
    assert "line 1:" not in r.output and "Traceback" not in r.output
    for n, (_, needle) in enumerate(LINES, start=2):
        (reported,) = [line for line in r.output.splitlines() if f"spec.jsonl line {n}: " in line]
        assert needle in reported, (n, reported)
    assert not out.exists()


def test_a_sweep_item_that_fails_at_run_time_is_named(tmp_path, monkeypatch):
    import superdiff.pipelines.base as common  # the loop calls sample_sde there

    monkeypatch.setattr(common, "sample_sde", _failing_sampler)
    spec = tmp_path / "spec.jsonl"
    spec.write_text('{"prompts": ["red", "circle"], "modes": ["and"]}\n')
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["sweep", str(spec), "--out", str(out), "--model", "embedded-shapes", "--steps", "3",
                                 "--num-images", "1", "--quiet"])
    assert r.exit_code == 1, r.output
    assert "item 0001-and-s0-" in r.output and "(spec line 1) failed" in r.output and "step 2 of 3" in r.output
    assert not (out / "items").exists() or not any((out / "items").iterdir())


@pytest.mark.parametrize(
    "expression, guidance, particles, needle",
    [('"red" * "circle"', 1e300, 1, "guidance=1e+300 is not valid"),
     (" * ".join(f'"{p}"' for p in SIXTEEN), 5.0, 64, "lower particles to"),
     ("!" * 130 + '"red"', 5.0, 1, f"nest at most {MAX_DEPTH}")],
)
def test_the_app_form_refuses_what_cannot_work_with_the_message(expression, guidance, particles, needle):
    from superdiff_cli.app import check_run_request, composition_from_expression
    from superdiff_cli.errors import BadInput

    with pytest.raises((BadInput, ValueError)) as error:
        composition = composition_from_expression("embedded-shapes", expression)
        check_run_request("embedded-shapes", composition, 3, guidance, 0, 16, {"particles": particles})
    message = error.value.message if isinstance(error.value, BadInput) else str(error.value)
    assert needle in message


def test_sidecars_of_a_finite_run_hold_no_nan(tmp_path):
    """The issue's black images came with NaN in the sidecars: a run at the edge of the ranges is finite."""
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["generate", "--model", "embedded-shapes", "--expr", '"red"^4 * "circle"',
                                 "--particles", "2", "--steps", "4", "--num-images", "1", "--out", str(out),
                                 "--quiet"])
    assert r.exit_code == 0, r.output
    text = (out / "image_000.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    json.loads(text)


def test_flux_true_cfg_beyond_the_cap_is_refused_before_loading(tmp_path, monkeypatch):
    """The issue's `--true-cfg-scale 1e300` overflowed after FLUX loaded; now exit 2 before loading."""
    import superdiff_cli.generate as generate_module
    from test_pipelines_flux import flux_pipes

    ours, _ = flux_pipes(tmp_path / "tok")
    ours.save_pretrained(tmp_path / "flux")
    monkeypatch.setattr(generate_module, "load_model", _no_loading)
    r = CliRunner().invoke(cli, ["generate", "--model", str(tmp_path / "flux"), "--and", "a red circle", "--and",
                                 "a blue square", "--true-cfg-scale", "1e300", "--negative-prompt", "a cat",
                                 "--out", str(tmp_path / "out"), "--quiet"])
    assert r.exit_code == 2, r.output
    assert "--true-cfg-scale=1e+300 is not valid" in r.output
    assert "use --true-cfg-scale 8.38861e+06 or less" in r.output
    assert not (tmp_path / "out").exists()


def test_qwen_image_counts_the_unconditional_row_with_a_negative_prompt(tmp_path):
    """Qwen-Image guides (true CFG above 1, its default 4.0) only with a negative prompt, as diffusers does."""
    from superdiff_cli.limits import network_rows_problem

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "QwenImagePipeline"}))
    assert network_rows_problem(str(folder), 16, 64, 16, None, None) is None
    assert "the unconditional row" in network_rows_problem(str(folder), 16, 64, 16, None, None, negative_prompt=" ")
