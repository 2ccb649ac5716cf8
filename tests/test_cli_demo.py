"""`superdiff demo` on the shipped embedded models: files, the metrics schema, and what the models must show."""

import json

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from superdiff_cli.main import cli

AND_METHODS = {"superdiff", "average", "sum", "joint", "single:red", "single:circle", "single:blue", "single:triangle"}
OR_METHODS = {"superdiff", "average", "model_a", "model_b", "joint_model"}
CALCULUS_METHODS = {"superdiff AND", "score sum (product, uncorrected)", "NOT, negative weight (uncorrected)",
                    "OR of ANDs", "product, corrected, K=2", "NOT, corrected, K=2"}
SCENES_METHODS = {"joint prompt", "single A", "single B", "average", "score sum", "superdiff AND",
                  "product, corrected, K=2", "soft-min"}


def assert_one_bar_per_experiment(stderr: str, steps: int) -> None:
    """The demo's stderr holds four tqdm bars, OR digits, AND shapes, the calculus, then AND scenes,
    each ending at its total of methods × steps, whose descriptions named every method on the way; no
    other bar (the pipelines' own)."""
    lines = stderr.split(
        "\n"
    )  # tqdm redraws a bar after "\r" and ends it with "\n" (not splitlines: it splits at "\r")
    finished = [line.split("\r")[-1] for line in lines if "|" in line]
    bars = ["OR digits", "AND shapes", "calculus shapes", "AND scenes"]
    assert [line.split(":")[0] for line in finished] == bars, stderr[-2000:]
    assert f"{5 * steps}/{5 * steps}" in finished[0] and f"{12 * steps}/{12 * steps}" in finished[1]
    assert f"{6 * steps}/{6 * steps}" in finished[2] and f"{8 * steps}/{8 * steps}" in finished[3]
    states = [state for line in lines for state in line.split("\r") if "|" in state]
    assert all(state.startswith(tuple(bars)) for state in states)
    descriptions = {state.split("%")[0].rsplit(":", 1)[0].strip() for state in states}
    assert {f"OR digits: {m}" for m in OR_METHODS} <= descriptions
    assert {f"AND shapes {p}: {m}" for p in ("red+circle", "blue+triangle") for m in AND_METHODS
            if not m.startswith("single:") or m.split(":")[1] in p.split("+")} <= descriptions
    assert {f"calculus shapes: {m}" for m in CALCULUS_METHODS} <= descriptions
    assert {f"AND scenes red circle+green square: {m}" for m in SCENES_METHODS} <= descriptions


def test_demo_writes_pictures_and_metrics_and_the_models_behave(tmp_path):
    out = tmp_path / "demo"
    # Not --quiet, so the same run also shows the console output: one progress bar per experiment.
    r = CliRunner().invoke(cli, ["demo", "--out", str(out), "--steps", "12", "--digits-samples", "48",
                                 "--shapes-samples", "4", "--calculus-samples", "4", "--scenes-samples", "2",
                                 "--particles", "2"])
    assert r.exit_code == 0, r.output
    assert_one_bar_per_experiment(r.stderr, steps=12)
    for name in ("or.png", "and.png", "calculus.png", "scenes.png", "traces.png"):
        assert Image.open(out / name).size[0] > 100
    metrics = json.loads((out / "metrics.json").read_text())

    assert {m["method"] for m in metrics["and"]} == AND_METHODS
    for m in metrics["and"]:
        assert m["prompts"] in (["red", "circle"], ["blue", "triangle"]) and m["n"] == 4
        assert 0 <= m["both_rate"] <= 1 and 0 <= m["neither_rate"] <= 1 - m["both_rate"] + 1e-9

    calculus = {m["method"]: m for m in metrics["calculus"]}
    assert set(calculus) == CALCULUS_METHODS
    for m in calculus.values():
        assert m["n"] == 4 and 0 <= m["hit_rate"] <= 1 and m["seconds_per_image"] > 0
    assert calculus["NOT, corrected, K=2"] == calculus["NOT, corrected, K=2"] | {
        "expression": '"red" * not("circle")', "particles": 2, "target": "red-circle"}

    scenes = {m["method"][len("and: "):]: m for m in metrics["scenes"]}
    assert set(scenes) == SCENES_METHODS
    for m in scenes.values():
        assert m["pair"] == ["a red circle", "a green square"] and m["n"] == 2 and m["seconds_per_image"] > 0
        assert 0 <= m["colour_attribution"] <= m["two_objects"] <= 1
    assert "AND of two objects on embedded-scenes" in r.output and "superdiff AND" in r.output

    rows = {m["method"]: m for m in metrics["or"]}
    assert set(rows) == OR_METHODS
    for m in rows.values():
        assert len(m["class_fractions"]) == 10 and abs(sum(m["class_fractions"]) - 1) < 1e-3
        assert m["n"] == 48 and m["frechet"] >= 0
    # The models trained on disjoint halves stay (mostly) on their own digits; OR reaches both halves.
    assert sum(rows["model_a"]["class_fractions"][:5]) >= 0.8
    assert sum(rows["model_b"]["class_fractions"][5:]) >= 0.8
    superdiff_low = sum(rows["superdiff"]["class_fractions"][:5])
    assert 0.2 <= superdiff_low <= 0.8


def test_demo_rejects_a_pair_that_is_not_colour_and_shape(tmp_path):
    r = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path / "d"), "--pair", "circle", "red"])
    assert r.exit_code == 2 and "--pair" in r.output and "Traceback" not in r.output


def test_demo_needs_two_digit_samples_for_the_frechet_distance(tmp_path):
    r = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path / "d"), "--digits-samples", "1"])
    assert r.exit_code == 2 and "--digits-samples must be >= 2" in r.output
    from superdiff.zoo.digits import frechet_distance

    with pytest.raises(ValueError, match="at least 2 samples"):
        frechet_distance(torch.zeros(1, 4), torch.zeros(5, 4))


def test_demo_particles_is_the_options_field_with_its_own_default(tmp_path):
    """``--particles`` takes the type, range and help of SamplerOptions' ``particles`` (its default, 4, is the
    demo's): a value out of the field's range is click's usage error, before any work."""
    from superdiff.options import option_spec

    param = next(p for p in cli.commands["demo"].params if p.name == "particles")
    assert param.default == 4 and param.help.startswith(option_spec("particles").help)
    r = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path / "d"), "--particles", "0"])
    assert r.exit_code == 2 and "Invalid value for '--particles': 0 is not in the range x>=1" in r.output
    assert not (tmp_path / "d").exists()


def test_a_demo_pair_equal_to_the_held_out_pair_is_run_once():
    from superdiff.zoo.demo import DemoConfig, demo_pairs

    assert demo_pairs(DemoConfig(pair=("blue", "triangle"))) == (("blue", "triangle"),)
    assert demo_pairs(DemoConfig(pair=("red", "square"))) == (("red", "square"), ("blue", "triangle"))


def test_a_collapse_warning_is_said_as_the_cli_says_warnings(tmp_path, monkeypatch):
    """A WeightCollapseWarning raised inside the demo reaches stderr as generate's and sweep's
    ``Warning: …`` line (not as Python's warning with a file and line), and the demo still succeeds."""
    import warnings

    import superdiff.zoo.demo as zoo_demo
    from superdiff.particles import WeightCollapseWarning

    def run_demo(out_dir, cfg, progress=True):
        warnings.warn("the particles' weights collapsed at 3 of 4 steps", WeightCollapseWarning, stacklevel=2)
        return {}

    monkeypatch.setattr(zoo_demo, "run_demo", run_demo)
    monkeypatch.setattr(zoo_demo, "format_demo_table", lambda metrics: "table")
    r = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path / "d")])
    assert r.exit_code == 0, r.output
    assert "Warning: the particles' weights collapsed at 3 of 4 steps" in r.stderr
    assert "WeightCollapseWarning" not in r.stderr
