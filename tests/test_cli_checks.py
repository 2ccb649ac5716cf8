"""The sweep's up-front check of its spec: every bad line reported with its number before any work
(exit 2, no traceback, no model loaded, no --out created), and spreadsheet CSVs read as written."""

import json

import pytest
from click.testing import CliRunner

from superdiff_cli.main import cli
from superdiff_cli.spec import load_spec

DEFAULTS = dict(
    model="embedded-shapes", modes="and", seeds="0", steps=50, guidance=None, temperature=1.0, num_images=4
)


@pytest.fixture
def no_loading(monkeypatch):
    """Any model load fails the test: every check here must come before one."""
    import superdiff_cli.sweep as sweep_module

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the spec was checked")

    monkeypatch.setattr(sweep_module, "load_model", refuse)


def refused(spec, out, *options):
    """Run the sweep on a spec that must be refused: exit 2, no traceback, nothing created; the output lines."""
    r = CliRunner().invoke(cli, ["sweep", str(spec), "--out", str(out), "--quiet", *options])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and not out.exists()
    return r.output.splitlines()


def reported(lines, name, n):
    """The one output line that reports line ``n`` of spec ``name``."""
    (line,) = [x for x in lines if f"{name} line {n}: " in x]
    return line


BAD_LINES = [  # each line's problem is found only in its model's config files or in torch's seed range
    ({"prompts": ["red", "circle"], "model": "../../../../etc"}, "is not a diffusers model folder"),
    ({"prompts": ["red", "circle"], "model": "."}, "is not a diffusers model folder"),
    ({"prompts": ["red", "circle"], "seeds": [0, 2**64]}, "seed 18446744073709551616 is outside 0…2**64-1"),
    ({"prompts": ["red", "circle"], "seeds": [-1]}, "seed -1 is outside 0…2**64-1"),
    ({"prompts": ["red", "circle"], "steps": 1001}, "steps 1001 is more than the 1000 training timesteps"),
    (
        {"prompts": ["a", "b"], "model": "embedded-digits", "modes": "or", "steps": 1500},
        "steps 1500 is more than the 1000",
    ),
    ({"prompts": ["red", "circle"], "num_images": 1000000}, "num_images 1000000 is more than 1024 images"),
    ({"prompts": ["red", "circle\x1b[31m"]}, r"the control character '\x1b' at position 7"),
]


def test_every_line_whose_model_limits_it_breaks_is_reported_before_any_work(tmp_path, monkeypatch, no_loading):
    """Folders that are not models (an escaping relative path; the current folder), seeds outside
    torch's range, steps beyond the scheduler's training timesteps and oversized batches: each line
    named with its problem and fix, all at once, after a good first line and before any item ran."""
    monkeypatch.chdir(tmp_path)  # tmp_path is deeper than four folders: ../../../../etc is /etc
    spec = tmp_path / "spec.jsonl"
    spec.write_text(json.dumps({"prompts": ["red", "circle"], "steps": 1000, "seeds": [2**64 - 1]}) + "\n"
                    + "".join(json.dumps(rec) + "\n" for rec, _ in BAD_LINES))
    lines = refused(spec, tmp_path / "out")
    assert not [x for x in lines if "line 1:" in x]  # the limits themselves are accepted
    for n, (_, needle) in enumerate(BAD_LINES, start=2):
        line = reported(lines, "spec.jsonl", n)
        assert needle in line and ";" in line.split(needle, 1)[1], (n, line)
        assert "--model" not in line  # a line's own value is named as the line writes it
    assert "'/etc'" in reported(lines, "spec.jsonl", 2)  # where the path leads, not only how it was written


@pytest.mark.parametrize("options, needle", [
    (["--steps", "1001"], "--steps 1001 is more than the 1000 training timesteps of embedded-shapes's scheduler"),
    (["--seeds", "0|18446744073709551616"], "is outside 0…2**64-1"),
    (["--num-images", "5000"], "--num-images 5000 is more than 1024 images"),
    (["--model", "."], "--model '.' is the folder"),
])
def test_bad_defaults_against_the_default_model_are_named_once_as_options(
    tmp_path, monkeypatch, no_loading, options, needle
):
    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "spec.jsonl"
    spec.write_text('{"prompts": ["red", "circle"]}\n{"prompts": ["blue", "square"]}\n')
    lines = refused(spec, tmp_path / "out", *options)
    assert sum(needle in x for x in lines) == 1 and not [x for x in lines if " line " in x], lines


def test_misspelled_keys_and_columns_are_refused_with_the_nearest_known_one(tmp_path, no_loading):
    jsonl = tmp_path / "spec.jsonl"
    jsonl.write_text('{"prompts": ["red", "circle"], "guidence": 3}\n{"prompts": ["red", "circle"], "num_image": 2}\n'
                     '{"prompts": ["red", "circle"], "colour": "red"}\n')
    lines = refused(jsonl, tmp_path / "out")
    assert "unknown key 'guidence'; did you mean 'guidance'?" in reported(lines, "spec.jsonl", 1)
    assert "unknown key 'num_image'; did you mean 'num_images'?" in reported(lines, "spec.jsonl", 2)
    third = reported(lines, "spec.jsonl", 3)
    assert "unknown key 'colour'" in third and "did you mean" not in third and "guidance" in third  # the known keys
    csv_spec = tmp_path / "spec.csv"
    csv_spec.write_text("prompt_1,prompt_2,guidence\nred,circle,3\nblue,square,4\n")
    lines = refused(csv_spec, tmp_path / "out")
    assert "unknown column 'guidence'; did you mean 'guidance'?" in reported(lines, "spec.csv", 1)
    assert not [x for x in lines if " line 2" in x or " line 3" in x]  # the header's mistake, named once


def test_a_spreadsheets_byte_order_mark_is_read_as_nothing():
    """Excel's "CSV UTF-8" starts with U+FEFF; read as text it glued itself to the first column's name."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        spec = Path(folder) / "spec.csv"
        spec.write_bytes("prompt_1,prompt_2,seeds\r\nred,circle,0|1\r\n".encode("utf-8-sig"))
        items = load_spec(spec, DEFAULTS)
    assert [(it.row, it.prompts, it.seed) for it in items] == [(2, ("red", "circle"), 0), (2, ("red", "circle"), 1)]


def test_an_unterminated_quote_is_named_with_the_line_it_opens_on(tmp_path, no_loading):
    spec = tmp_path / "spec.csv"
    spec.write_text('prompt_1,prompt_2\nred,circle\n"blue,square\nred,square\n')
    lines = refused(spec, tmp_path / "out")
    assert "a quote (\") opens here and is never closed" in reported(lines, "spec.csv", 3)
    assert not [x for x in lines if "at least 2 prompts" in x]


def test_rows_after_a_quoted_prompt_spanning_lines_keep_their_line_numbers(tmp_path, no_loading):
    """A quoted field may hold a line break; the rows after it are named by the line they are on
    (counting rows would be off by one), and the break itself is a control character in a prompt."""
    spec = tmp_path / "spec.csv"
    spec.write_text('prompt_1,prompt_2\n"red\ncircle",blue\nonly one\n')
    lines = refused(spec, tmp_path / "out")
    assert r"prompt 1 'red\ncircle' holds the control character '\n' at position 4" in reported(lines, "spec.csv", 2)
    assert "mode='and' composes at least 2 prompts" in reported(lines, "spec.csv", 4)


def test_large_seeds_are_taken_exactly(tmp_path):
    """Seeds above 2**53 are distinct seeds to torch; read through a float they became their neighbours."""
    jsonl = tmp_path / "spec.jsonl"
    jsonl.write_text(json.dumps({"prompts": ["red", "circle"], "seeds": [2**60 + 1, 2**64 - 1]}) + "\n")
    assert [it.seed for it in load_spec(jsonl, DEFAULTS)] == [2**60 + 1, 2**64 - 1]
    csv_spec = tmp_path / "spec.csv"
    csv_spec.write_text(f"prompt_1,prompt_2,seeds\nred,circle,{2**60 + 1}|{2**60}\n")
    assert [it.seed for it in load_spec(csv_spec, DEFAULTS)] == [2**60 + 1, 2**60]


def test_the_model_folder_rule_names_the_subfolders_the_loader_reads():
    from superdiff.pipelines.loading import SD_SUBFOLDERS
    from superdiff_cli.limits import SD_SUBFOLDERS as CHECKED

    assert CHECKED == SD_SUBFOLDERS
