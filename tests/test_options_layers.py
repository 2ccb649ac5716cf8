"""Every layer honours every sampling option: walking the fields of SamplerOptions, each is a flag of
``generate`` and ``sweep`` and a key of sweep lines whose value reaches the pipeline call, a field of
the app whose value reaches it too, an entry of the sidecars and a column of metrics.csv; ``eval``
groups by every option's value. The worked example adds one field to superdiff/options.py (in a
subprocess, before the CLI is imported) and finds it in all of those places.

The pipeline is a recorder (the model is never loaded: the pipelines' own handling of each field is
tests/test_options.py's), so these checks take seconds.
"""

from __future__ import annotations

import csv
import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from options_values import other_value
from superdiff.options import SamplerOptions, option_fields

CORRECTED = '"red" * "circle"'  # an expression that corrects: particles > 1 apply to it


class Recorder:
    """A stand-in pipeline: records each call's keyword arguments, returns a one-image result."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        n = kwargs.get("num_images_per_prompt", 1)
        return SimpleNamespace(images=[], log_densities=torch.zeros(n, 2), kappa_trace=torch.zeros(1, n, 2),
                               log_density_trace=torch.zeros(2, n, 2))


def fake_model(monkeypatch, module) -> Recorder:
    """Make ``module`` (superdiff_cli.generate or .sweep) load a Recorder instead of a model."""
    from superdiff_cli.models import LoadedModel

    recorder = Recorder()
    monkeypatch.setattr(module, "load_model",
                        lambda model, *a, **k: LoadedModel(model, recorder, "prompts", ("red", "circle"), 5.0))
    return recorder


def capture_sidecars(monkeypatch, module) -> list[dict]:
    """The settings each save_generation of ``module`` would write into the sidecars."""
    saved: list[dict] = []

    def save(out_dir, result, settings, **kwargs):
        saved.append(settings)
        path = Path(out_dir) / "image_000.json"
        path.write_text(json.dumps(settings))
        return [path]

    monkeypatch.setattr(module, "save_generation", save)
    return saved


def cli_words(name: str, value) -> list[str]:
    """``value`` of option ``name`` on the command line, as its generated flag spells it."""
    from superdiff_cli.options import flag

    if isinstance(value, bool):
        return [flag(name) if value else f"--no-{name.replace('_', '-')}"]
    return [flag(name), str(value)]


def resolved_defaults(cls) -> dict:
    """Every field at its default as a run on CORRECTED records it (particles: the composition's K)."""
    from superdiff.expression_syntax import parse_expression
    from superdiff.expressions import compile_expression

    return cls().for_combiner(compile_expression(parse_expression(CORRECTED), ["red", "circle"])).record()


def fields_of(cls) -> list:
    return [(f.name, other_value(spec, f.default)) for f, spec in option_fields(cls)]


def check_generate(monkeypatch, tmp_path: Path, cls=SamplerOptions) -> None:
    """Each field is a flag of generate; its value reaches the pipeline call and the sidecar."""
    import superdiff_cli.generate as generate
    from superdiff_cli.main import cli

    for name, value in fields_of(cls):
        recorder, saved = fake_model(monkeypatch, generate), capture_sidecars(monkeypatch, generate)
        r = CliRunner().invoke(cli, ["generate", "--expr", CORRECTED, "--steps", "2", "--num-images", "1", "--quiet",
                                     "--out", str(tmp_path / f"gen-{name}"), *cli_words(name, value)])
        assert r.exit_code == 0, (name, r.output)
        (call,) = recorder.calls
        assert call[name] == value, name
        assert saved[0][name] == value and json.loads(json.dumps(saved[0]))[name] == value, name
        others = {k: v for k, v in resolved_defaults(cls).items() if k != name}  # the rest at their defaults
        assert {k: call[k] for k in others} == others and {k: saved[0][k] for k in others} == others


def check_sweep(monkeypatch, tmp_path: Path, cls=SamplerOptions) -> None:
    """Each field is a sweep flag (the lines' default) and a line key; the line's value wins, reaches
    the pipeline call and the manifest, and metrics.csv has a column per field."""
    import superdiff_cli.sweep as sweep
    from superdiff_cli.main import cli

    for name, value in fields_of(cls):
        recorder, saved = fake_model(monkeypatch, sweep), capture_sidecars(monkeypatch, sweep)
        spec = tmp_path / f"spec-{name}.jsonl"
        spec.write_text(json.dumps({"expression": CORRECTED}) + "\n"
                        + json.dumps({"expression": CORRECTED, "seeds": [1], name: value}) + "\n")
        out = tmp_path / f"sweep-{name}"
        r = CliRunner().invoke(cli, ["sweep", str(spec), "--steps", "2", "--num-images", "1", "--quiet",
                                     "--out", str(out), *cli_words(name, value)])
        assert r.exit_code == 0, (name, r.output)
        assert [c[name] for c in recorder.calls] == [value, value], name  # the flag, then the line's key
        assert [s[name] for s in saved] == [value, value], name
        rows = list(csv.DictReader((out / "metrics.csv").read_text().splitlines()))
        assert {row[name] for row in rows} == {str(value)}, name
        default = cls.__dataclass_fields__[name].default  # a line's own value over the flag's default
        spec.write_text(json.dumps({"expression": CORRECTED, "seeds": [2], name: default}) + "\n")
        r = CliRunner().invoke(cli, ["sweep", str(spec), "--steps", "2", "--num-images", "1", "--quiet",
                                     "--out", str(out), *cli_words(name, value)])
        assert r.exit_code == 0, (name, r.output)
        assert recorder.calls[-1][name] == (default if default is not None else resolved_defaults(cls)[name]), name


class FakeGradio:
    """gradio's component constructors, recording (kind, keyword arguments) instead of building."""

    def __getattr__(self, kind: str):
        return lambda *args, **kwargs: (kind, dict(kwargs, args=args))


def check_app(monkeypatch, tmp_path: Path, cls=SamplerOptions) -> None:
    """Each field is a field of the app's form (a component with the field's name as elem_id); its
    value reaches the pipeline call and the files the run writes."""
    import superdiff_cli.output as output
    from superdiff_cli.app import Studio, app_fields
    from superdiff_cli.models import LoadedModel

    components = app_fields(FakeGradio())  # the real gradio builds them in test_app.py's browser tests
    assert set(components) == {f.name for f, _ in option_fields(cls)}
    for f, spec in option_fields(cls):
        kind, kwargs = components[f.name]
        assert kwargs["elem_id"] == f.name.replace("_", "-") and kwargs["info"] == spec.help
        expected = "Dropdown" if spec.choices else "Checkbox" if spec.kind is bool else ("Slider", "Number")
        assert kind in expected, (f.name, kind)
    recorder = Recorder()
    loaded = LoadedModel("embedded-shapes", recorder, "prompts", ("red", "circle"), 5.0)
    studio = Studio("embedded-shapes", loaded, torch.float32, "cpu", tmp_path / "app")
    saved = capture_sidecars(monkeypatch, output)
    for name, value in fields_of(cls):
        shown = "auto" if value is None else value
        request = studio.parse([], "and", 1.0, "", 2, 5.0, 0, 1, expression=CORRECTED, options={name: shown})
        studio._work(request, "session", 1, threading.Event(), queue.Queue())
        assert recorder.calls[-1][name] == value, name
        studio._save(request, SimpleNamespace(images=[]), 1)
        assert saved[-1][name] == value, name


def test_every_field_is_a_generate_flag_that_reaches_the_pipeline_and_the_sidecar(monkeypatch, tmp_path):
    check_generate(monkeypatch, tmp_path)


def test_every_field_is_a_sweep_flag_and_key_that_reaches_the_pipeline_and_metrics_csv(monkeypatch, tmp_path):
    check_sweep(monkeypatch, tmp_path)


def test_every_field_is_an_app_field_that_reaches_the_pipeline_and_the_files(monkeypatch, tmp_path):
    check_app(monkeypatch, tmp_path)


def test_particles_without_a_correction_are_refused_alike_everywhere(monkeypatch, tmp_path):
    """Issue 28 item 8: one rule (particles weigh Feynman–Kac corrections) in generate, sweep lines,
    the app and the library, with one message, before any model is loaded."""
    import superdiff_cli.generate as generate
    from superdiff_cli.app import check_run_request, composition_from_rows
    from superdiff_cli.main import cli

    recorder = fake_model(monkeypatch, generate)
    rule = "particles.2 weight an expression's Feynman–Kac corrections"
    for words in (["--and", "red", "--and", "circle"], ["--expr", '"red" | "circle"']):
        r = CliRunner().invoke(cli, ["generate", *words, "--particles", "2", "--out", str(tmp_path / "g")])
        assert r.exit_code == 2 and "particles=2 weight an expression's" in r.output, r.output
    assert recorder.calls == []
    spec = tmp_path / "spec.jsonl"
    spec.write_text(json.dumps({"prompts": ["red", "circle"], "particles": 2}) + "\n")
    r = CliRunner().invoke(cli, ["sweep", str(spec), "--out", str(tmp_path / "s")])
    assert r.exit_code == 2 and "spec.jsonl line 1: particles 2 weight an expression's" in r.output, r.output
    with pytest.raises(ValueError, match=rule):
        check_run_request("embedded-shapes", composition_from_rows("embedded-shapes", ["red", "circle"], "and", 1.0,
                                                                   ""), 2, 5.0, 0, 1, {"particles": 2})


def test_eval_groups_by_every_option_value(tmp_path):
    """Issue 28 item 9: sidecars that differ only in an option (K = 1, 2, 3 particles) are three groups
    of eval, each with its options; a sidecar from before an option counts at its default."""
    from PIL import Image

    from superdiff_cli.main import cli

    base = {"model": "embedded-shapes", "mode": "expression", "expression": 'product("red", "circle")',
            "prompts": ["red", "circle"], "seed": 0}
    for i, k in enumerate([1, 2, 3, 3, None]):
        Image.new("RGB", (8, 8)).save(tmp_path / f"image_{i:03d}.png")
        side = base | ({} if k is None else {"particles": k})  # None: a sidecar written before the option
        (tmp_path / f"image_{i:03d}.json").write_text(json.dumps(side))
    r = CliRunner().invoke(cli, ["eval", str(tmp_path), "--quiet"])
    assert r.exit_code == 0, r.output
    groups = json.loads((tmp_path / "eval.json").read_text())["groups"]
    assert sorted((g["options"]["particles"], g["n"]) for g in groups) == [(1, 2), (2, 1), (3, 2)]
    assert all(g["options"] == SamplerOptions(particles=g["options"]["particles"]).record() for g in groups)
    assert "particles=3" in r.output  # the printed table tells the groups apart


WORKED_EXAMPLE = '''
import sys
from dataclasses import dataclass

import superdiff.options as options

# The one change: a new field declared in superdiff/options.py (here: a subclass put in its place before
# anything imports it, as an edit of the file would).
@dataclass(frozen=True)
class SamplerOptions(options.SamplerOptions):
    churn: float = options._option(0.0, "Stochastic churn per step (EDM's S_churn / steps).", kind=float, low=0,
                                   high=1)

options.SamplerOptions = SamplerOptions
sys.path.insert(0, sys.argv[1])
from click.testing import CliRunner
from superdiff_cli.main import cli

help_text = CliRunner().invoke(cli, ["generate", "--help"]).output
assert "--churn FLOAT RANGE" in help_text and "Stochastic churn per step" in help_text, help_text
assert "--churn" in CliRunner().invoke(cli, ["sweep", "--help"]).output
from superdiff_cli.spec import KEYS
assert "churn" in KEYS
r = CliRunner().invoke(cli, ["generate", "--expr", '"red" * "circle"', "--churn", "2"])
assert r.exit_code == 2 and "--churn" in r.output and "0<=x<=1" in r.output, r.output  # click's range

import pytest
import test_options_layers as layers

mp = pytest.MonkeyPatch()
try:
    from pathlib import Path
    for check in (layers.check_generate, layers.check_sweep, layers.check_app):
        check(mp, Path(sys.argv[2]), SamplerOptions)
finally:
    mp.undo()
print("churn: a flag of generate and sweep, a sweep key, an app field, a sidecar entry and a metrics.csv column")
'''


def test_worked_example_a_new_field_appears_in_every_layer(tmp_path):
    """Adding one field to SamplerOptions makes it a generate and sweep flag (with its range), a sweep
    key, an app field, an entry of the sidecars and a metrics.csv column, with no other edit."""
    here = str(Path(__file__).parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", WORKED_EXAMPLE, here, str(tmp_path)], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "churn: a flag of generate and sweep" in r.stdout


def test_without_particles_an_expression_that_corrects_gets_the_measured_k_everywhere(monkeypatch, tmp_path):
    """Issue 28 item 15: particles not given means DEFAULT_CORRECTING_PARTICLES for an expression that corrects
    and 1 for anything else, in generate, sweep lines and the app; the K that ran is recorded."""
    import superdiff_cli.generate as generate
    import superdiff_cli.sweep as sweep
    from superdiff.options import DEFAULT_CORRECTING_PARTICLES as K
    from superdiff_cli.app import check_run_request, composition_from_expression, composition_from_rows
    from superdiff_cli.main import cli

    assert K > 1
    for n, (words, k) in enumerate(((["--expr", CORRECTED], K), (["--expr", '"red" & "circle"'], 1),
                                    (["--and", "red", "--and", "circle"], 1))):
        recorder, saved = fake_model(monkeypatch, generate), capture_sidecars(monkeypatch, generate)
        r = CliRunner().invoke(cli, ["generate", *words, "--steps", "2", "--quiet", "--out", str(tmp_path / f"g{n}")])
        assert r.exit_code == 0, r.output
        assert recorder.calls[0]["particles"] == k and saved[0]["particles"] == k, words
    recorder, saved = fake_model(monkeypatch, sweep), capture_sidecars(monkeypatch, sweep)
    spec = tmp_path / "spec.jsonl"
    spec.write_text(json.dumps({"expression": CORRECTED}) + "\n" + json.dumps({"prompts": ["red", "circle"]}) + "\n")
    r = CliRunner().invoke(cli, ["sweep", str(spec), "--steps", "2", "--modes", "and", "--quiet",
                                 "--out", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    assert sorted(c["particles"] for c in recorder.calls) == [1, K]
    assert sorted(s["particles"] for s in saved) == [1, K]
    corrected = composition_from_expression("embedded-shapes", CORRECTED)
    plain = composition_from_rows("embedded-shapes", ["red", "circle"], "and", 1.0, "")
    assert check_run_request("embedded-shapes", corrected, 2, 5.0, 0, 1, {}).options.particles == K
    assert check_run_request("embedded-shapes", plain, 2, 5.0, 0, 1, {}).options.particles == 1
