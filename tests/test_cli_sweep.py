"""`superdiff sweep`: manifest, resume after an interruption, malformed specs, and 2 processes under accelerate."""

import json
import os
import signal
import subprocess
import sys

import pytest
from click.testing import CliRunner

from superdiff_cli.main import cli


def write_spec(tmp_path, model):
    spec = tmp_path / "spec.jsonl"
    spec.write_text(
        json.dumps({"prompts": ["a red circle", "a blue square"], "modes": ["and", "average"]}) + "\n"
        + json.dumps({"prompts": ["a cat", "a dog"], "modes": ["or"], "seeds": [0, 1]}) + "\n"
    )
    return spec


def run_sweep(spec, out, model, *extra):
    return CliRunner().invoke(cli, ["sweep", str(spec), "--out", str(out), "--model", model, "--steps", "3",
                                    "--num-images", "1", "--quiet", *extra])


def manifest(out):
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_sweep_runs_every_item_and_resumes_without_redoing(tiny_model, tmp_path, monkeypatch):
    spec, out = write_spec(tmp_path, tiny_model), tmp_path / "out"
    # interrupt the run while its second item is being written
    import superdiff_cli.sweep as sweep_module

    real_save, calls = sweep_module.save_generation, []

    def flaky_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_save(*args, **kwargs)

    monkeypatch.setattr(sweep_module, "save_generation", flaky_save)
    first = run_sweep(spec, out, tiny_model)
    assert first.exit_code == 130 and "Interrupted (Ctrl-C)." in first.output
    shard = [json.loads(line) for p in out.glob("manifest*.jsonl") for line in p.read_text().splitlines()]
    assert len(shard) == 1 and all((out / f).is_file() for f in shard[0]["files"])
    assert not [p for p in (out / "items").iterdir() if p.name.startswith(".")]  # no half-written item left
    monkeypatch.setattr(sweep_module, "save_generation", real_save)
    finished_before = shard[0]["finished_at"], shard[0]["item_id"]
    second = run_sweep(spec, out, tiny_model)
    assert second.exit_code == 0, second.output
    records = manifest(out)
    assert len(records) == 4 and len({r["item_id"] for r in records}) == 4
    again = {r["item_id"]: r["finished_at"] for r in records}
    assert again[finished_before[1]] == finished_before[0]  # not redone
    assert (out / "metrics.csv").read_text().count("\n") == 5
    third = run_sweep(spec, out, tiny_model)
    assert third.exit_code == 0 and manifest(out) == records  # nothing left to do


def test_sweep_speed_options_apply_once_per_model(tiny_model, tmp_path, monkeypatch):
    """--channels-last then --compile MODE, once for the model that all four items share, recorded in
    every sidecar (the "eager" backend stands in for inductor)."""
    import torch

    calls, real_compile = [], torch.compile

    def recording_compile(module, **kwargs):
        calls.append((kwargs, module.conv_in.weight.is_contiguous(memory_format=torch.channels_last)))
        return real_compile(module, backend="eager")

    monkeypatch.setattr(torch, "compile", recording_compile)
    out = tmp_path / "out"
    result = run_sweep(
        write_spec(tmp_path, tiny_model), out, tiny_model, "--compile", "reduce-overhead", "--channels-last"
    )
    assert result.exit_code == 0, result.output
    assert calls == [({"mode": "reduce-overhead"}, True)]
    sidecars = [json.loads(p.read_text()) for p in (out / "items").glob("*/image_000.json")]
    assert len(sidecars) == 4 and all(s["compile"] == "reduce-overhead" and s["channels_last"] for s in sidecars)


@pytest.mark.parametrize(
    "name, text, needle",
    [
        ("bad.csv", "prompt_1,prompt_2\na,b\nc,d,e\n", "line 3"),
        ("bad.jsonl", '{"prompts": ["a", "b"]}\n{not json}\n', "line 2"),
        ("mode.jsonl", '{"prompts": ["a", "b"], "modes": ["xor"]}\n', "line 1"),
        ("single.csv", "prompt_1\nonly one\n", "line 2"),
    ],
)
def test_malformed_spec_names_the_line(tiny_model, tmp_path, name, text, needle):
    spec = tmp_path / name
    spec.write_text(text)
    r = run_sweep(spec, tmp_path / "out", tiny_model)
    assert r.exit_code == 2 and needle in r.output and "Traceback" not in r.output


MALFORMED = [
    ('{"prompts": ["red", "circle"], "guidance": "nan"}', "guidance 'nan' must be a finite number"),
    ('{"prompts": ["red", "circle"], "temperature": "inf"}', "temperature=inf is not valid; use a finite number > 0"),
    (
        '{"prompts": ["red", "circle"], "modes": ["and", "average"], "log_weights": [0, 1]}',
        "log_weights apply to mode 'or' (a bias) and 'and' (offsets), not 'average'",
    ),
    ('{"prompts": ["red", "circle"], "modes": "sum", "log_weights": "0|1"}', "not 'sum'"),
    (
        '{"prompts": ["red", "circle"], "log_weights": [0, 1, 2]}',
        "log_weights=(0.0, 1.0, 2.0) is not valid; pass 2 numbers",
    ),
    ('{"prompts": ["red", "circle"], "model": "./no-such-folder"}', "model './no-such-folder': no such folder"),
    ('{"prompts": ["a", "c"], "model": "embedded-digits", "modes": "or"}', "got ['c']; use a, b or all"),
    ('{"prompts": ["red", "circle"], "modes": []}', "modes is empty"),
    ('{"prompts": ["red", "circle"], "steps": true}', "steps true is not a whole number"),
    ('{"prompts": ["red", "circle"], "num_images": 1.5}', "num_images 1.5 is not a whole number"),
    ('{"prompts": ["red", "circle"], "seeds": [0, 2.5]}', "seed 2.5 is not a whole number"),
    ('{"prompts": [1, 2]}', "prompt 1 is 1; every prompt must be a non-empty string"),
    ('{"prompts": ["red", "circle"], "seeds": [0, 0]}', "repeats a seed"),
    ('{"prompts": ["red", "circle"]', "not valid JSON"),
    ('{"expression": "\\"red\\" & & \\"circle\\""}', "expected a prompt in quotes, a model index"),
    ('{"expression": "\\"red\\" & \\"circle\\"", "modes": ["or"]}', "expression names the prompts"),
    ('{"expression": "\\"red\\" | \\"circle\\"", "temperature": 2}', "how to compose them"),
    ('{"expression": ""}', "must be a non-empty string"),
    ('{"expression": "\\"red\\" * \\"circle\\"", "particles": 0}', "particles 0 is not valid; use an integer >= 1"),
    ('{"prompts": ["red", "circle"], "particles": 4}', "particles 4 weight an expression's"),
    ('{"expression": "\\"red\\" & \\"circle\\"", "particles": 2}', "particles 2 weight an expression's"),
    ('{"prompts": ["purple", "circle"]}', "embedded-shapes knows only the words"),  # generate's vocabulary check
    ('{"expression": "\\"purple\\" * \\"circle\\""}', "embedded-shapes knows only the words"),
    ('{"prompts": ["red", "circle"], "density_variance": "exact"}', "density_variance 'exact' is not valid"),
    ('{"prompts": ["red", "circle"], "resample_threshold": "half"}', "resample_threshold 'half' is not a number"),
    ('{"expression": "\\"a\\" * !\\"b\\"", "model": "embedded-digits"}', "no unconditional model for"),
]


def test_every_malformed_line_is_reported_before_any_work(tmp_path, monkeypatch):
    """One spec, one malformed value per line after a good first line: every line is named with its
    problem and fix, exit 2, and no model is loaded and no folder created."""
    import superdiff_cli.sweep as sweep_module

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the spec was checked")

    monkeypatch.setattr(sweep_module, "load_model", no_loading)
    spec = tmp_path / "spec.jsonl"
    spec.write_text('{"prompts": ["red", "circle"], "steps": 2.0, "num_images": "1"}\n'
                    + "".join(line + "\n" for line, _ in MALFORMED))
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["sweep", str(spec), "--out", str(out), "--model", "embedded-shapes", "--quiet"])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and "line 1:" not in r.output
    for n, (_, needle) in enumerate(MALFORMED, start=2):
        (reported,) = [line for line in r.output.splitlines() if f"spec.jsonl line {n}: " in line]
        assert needle in reported, (n, reported)
        assert ";" in reported.split(needle, 1)[1] or ";" in needle  # the fix follows the problem
    assert not out.exists()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--limit", "-1"], "--limit"),
        (["--modes", "and|xor"], "unknown mode 'xor'"),
        (["--seeds", ""], "--seeds is empty"),
        (["--guidance", "nan"], "--guidance nan must be a finite number"),
        (["--device", "gpu"], "--device 'gpu' is not a device"),
        (["--model", "./no-such-folder"], "--model './no-such-folder': no such folder"),
    ],
)
def test_bad_command_line_defaults_are_named_once(tmp_path, args, needle):
    spec = tmp_path / "spec.jsonl"
    spec.write_text('{"prompts": ["red", "circle"]}\n{"prompts": ["blue", "square"]}\n')
    r = CliRunner().invoke(cli, ["sweep", str(spec), "--out", str(tmp_path / "out"), "--steps", "2", "--quiet", *args])
    assert r.exit_code == 2, r.output
    assert r.output.count(needle) == 1 and "line" not in r.output
    assert not (tmp_path / "out").exists()


def test_sweep_both_rate_reads_prompts_as_eval_does(tmp_path):
    """both_rate names the colour and shape whatever the prompts' order or phrasing, equal to
    `superdiff eval`'s rate on the same images, and is empty where no colour-shape pair is named."""
    spec = tmp_path / "spec.jsonl"
    prompt_sets = [["circle", "red"], ["red circle", "red"], ["red", "circle"], ["red", "blue"]]
    spec.write_text("".join(json.dumps({"prompts": p}) + "\n" for p in prompt_sets))
    out = tmp_path / "out"
    s = CliRunner().invoke(
        cli, ["sweep", str(spec), "--out", str(out), "--steps", "10", "--num-images", "4", "--quiet"]
    )
    assert s.exit_code == 0, s.output
    e = CliRunner().invoke(cli, ["eval", str(out), "--quiet"])
    assert e.exit_code == 0, e.output
    groups = {tuple(g["prompts"]): g for g in json.loads((out / "eval.json").read_text())["groups"]}
    rates = {tuple(r["settings"]["prompts"]): r["metrics"]["both_rate"] for r in manifest(out)}
    for prompts in map(tuple, prompt_sets[:3]):
        assert rates[prompts] == groups[prompts]["attributes"]["both_rate"], prompts
    assert rates[("circle", "red")] > 0 and rates[("red circle", "red")] > 0  # red circles are drawn
    assert rates[("red", "blue")] is None
    import csv

    rows = {r["prompts"]: r for r in csv.DictReader((out / "metrics.csv").read_text().splitlines())}
    assert (
        rows["red | blue"]["both_rate"] == "" and float(rows["circle | red"]["both_rate"]) == rates[("circle", "red")]
    )


def test_sweep_records_no_guidance_for_unconditional_models(tmp_path):
    spec = tmp_path / "spec.jsonl"
    spec.write_text(json.dumps({"prompts": ["a", "b"], "model": "embedded-digits", "modes": "or"}) + "\n")
    out = tmp_path / "out"
    r = CliRunner().invoke(
        cli, ["sweep", str(spec), "--out", str(out), "--steps", "2", "--num-images", "1", "--quiet"]
    )
    assert r.exit_code == 0, r.output
    (record,) = manifest(out)
    assert record["settings"]["guidance"] is None
    assert json.loads((out / record["files"][1]).read_text())["guidance"] is None


def test_sweep_is_data_parallel_under_accelerate(tiny_model, tmp_path):
    spec, out = write_spec(tmp_path, tiny_model), tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--main_process_port",
        "0",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "superdiff_cli.main",
        "sweep",
        str(spec),
        "--out",
        str(out),
        "--model",
        tiny_model,
        "--steps",
        "3",
        "--num-images",
        "1",
        "--quiet",
    ]
    env["LOGLEVEL"] = "INFO"  # torchrun's launcher says how far it got, should this ever hang again
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"accelerate launch did not finish in 240 s; its output:\n{output[-4000:]}")
    assert proc.returncode == 0, output[-4000:]
    records = manifest(out)
    assert len(records) == 4 and {r["rank"] for r in records} == {0, 1}
    assert not list(out.glob("manifest.rank*.jsonl"))


def test_every_item_has_a_rank_whenever_each_rank_reads_the_manifest():
    """A rank that starts after another has finished items sees fewer left to do; the split must
    still give every remaining item to exactly one rank."""
    from superdiff_cli.sweep import share_of_rank

    items = list(range(7))

    class Item(int):
        item_id = property(lambda self: int(self))

    items = [Item(i) for i in items]
    early = share_of_rank(items, items, 0, 2)  # rank 0 read the manifest before anything was done
    done_by_then = set(early[:2])  # ... and had finished two of its items when rank 1 started
    late = share_of_rank(items, [it for it in items if it not in done_by_then], 1, 2)
    assert sorted(early + late) == items
    assert not set(early) & set(late)


def test_sweep_barrier_counts_only_this_launchs_markers(tmp_path, monkeypatch):
    """Rank 0 merges only after every rank of THIS launch left its marker; a marker an interrupted
    earlier launch left behind must not let it merge early. Other ranks never wait."""
    from superdiff_cli.sweep import _distributed, _launch_key

    for name, value in dict(RANK="0", WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT="29555", TORCHELASTIC_RUN_ID="none").items():
        monkeypatch.setenv(name, value)
    (tmp_path / ".done.an-earlier-launch.rank1").write_text("done\n")
    rank, world, barrier, _ = _distributed(tmp_path)
    assert (rank, world) == (0, 2)
    with pytest.raises(RuntimeError, match="run the sweep again"):
        barrier(timeout=0.5)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    monkeypatch.setenv("RANK", "1")
    _, _, barrier_1, _ = _distributed(fresh)
    barrier_1(timeout=0.0)  # rank 1 leaves its marker and returns at once, before rank 0 has finished
    monkeypatch.setenv("RANK", "0")
    _, _, barrier_0, _ = _distributed(fresh)
    barrier_0(timeout=5.0)
    key = _launch_key()
    monkeypatch.setenv("MASTER_PORT", "29556")
    assert _launch_key() != key  # another launch on this machine
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run-7")
    assert _launch_key() == "run-7"  # torchrun's rendezvous id, shared across machines


def test_item_ids_of_lines_without_an_expression_are_the_ones_earlier_releases_wrote():
    """A sweep from before expressions resumes: its items keep their ids (the id of this item as the
    release before expressions computed it), while an expression or particles make a new one."""
    from superdiff.options import SamplerOptions
    from superdiff_cli.spec import SweepItem

    args = (1, ("a red circle", "a blue square"), "and", 0, "embedded-shapes", 3, None, 1.0, 1, None)
    assert SweepItem(*args).item_id == "0001-and-s0-16a888bc"
    assert SweepItem(*args, options=SamplerOptions(particles=2)).item_id != SweepItem(*args).item_id
    assert SweepItem(*args, options=SamplerOptions(time_grid="edm")).item_id != SweepItem(*args).item_id
