"""What the commands leave on disk: file modes under the umask, no partial set after a full disk or
Ctrl-C (exit 130), damaged sweep items found and redone on resume, a lock against a second sweep on
one --out, stale temporary folders of killed runs removed, and manifest lines this command did not
write reported with their file and line (exit 2)."""

import errno
import fcntl
import hashlib
import json
import os
import stat

import pytest
from click.testing import CliRunner

import superdiff_cli.output as output_module
import superdiff_cli.sweep as sweep_module
from superdiff_cli.main import cli


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def generate(out, *extra):
    return invoke(
        "generate", "--and", "red", "--and", "circle", "--steps", 2, "--num-images", 2, "--out", out, "--quiet", *extra
    )


def write_spec(tmp_path, rows=(["red", "circle"], ["blue", "square"])):
    spec = tmp_path / "spec.jsonl"
    spec.write_text("".join(json.dumps({"prompts": list(p)}) + "\n" for p in rows))
    return spec


def sweep(spec, out, *extra):
    return invoke(
        "sweep", spec, "--out", out, "--model", "embedded-shapes", "--steps", 2, "--num-images", 1, "--quiet", *extra
    )


def manifest(out):
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def hashes(out):
    """SHA-256 of every item file, by path relative to ``out``."""
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((out / "items").rglob("*")) if p.is_file()}


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def all_entries(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


@pytest.fixture
def umask():
    """Set the process umask for one test, and put the old one back."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_outputs_have_the_modes_the_umask_allows(tmp_path, umask, mask):
    umask(mask)
    files, folders = 0o666 & ~mask, 0o777 & ~mask
    gen = tmp_path / "gen"
    assert generate(gen).exit_code == 0
    written = sorted(gen.iterdir())
    assert {p.name for p in written} == {
        "image_000.png",
        "image_000.json",
        "image_001.png",
        "image_001.json",
        "grid.png",
    }
    assert {p.name: mode(p) for p in written} == {p.name: files for p in written}

    out = tmp_path / "sweep"
    r = sweep(write_spec(tmp_path), out)
    assert r.exit_code == 0, r.output
    items = sorted((out / "items").iterdir())
    assert len(items) == 2 and all(mode(p) == folders for p in [out / "items", *items])
    item_files = [p for item in items for p in item.iterdir()]
    assert len(item_files) == 6 and all(mode(p) == files for p in item_files)
    for name in ("manifest.jsonl", "metrics.csv", sweep_module.LOCK):
        assert mode(out / name) == files, name

    toy = tmp_path / "toy"
    assert invoke("toy", "--out", toy, "--samples", 20, "--steps", 5, "--quiet").exit_code == 0
    assert {p.name: mode(p) for p in toy.iterdir()} == {"figure2.png": files, "metrics.json": files}


def failing_writer(monkeypatch, on_call, exc):
    """Make the ``on_call``-th file write raise ``exc`` (the earlier ones reach the disk)."""
    real, calls = output_module._write_all, []

    def write(f, data):
        calls.append(1)
        if len(calls) == on_call:
            raise exc
        real(f, data)

    monkeypatch.setattr(output_module, "_write_all", write)


def test_a_full_disk_names_the_file_and_leaves_no_partial_set(tmp_path, monkeypatch):
    failing_writer(monkeypatch, 2, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    out = tmp_path / "out"
    r = generate(out)
    assert r.exit_code == 1, r.output
    (line,) = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert f"could not write {out / 'image_000.json'} (No space left on device)" in line  # the 2nd file
    assert "removed the 1 file(s)" in line and "Traceback" not in r.output
    assert all_entries(out) == []  # neither image_000.png nor any temporary file is left


def test_overwrite_on_a_full_disk_keeps_the_earlier_run(tmp_path, monkeypatch):
    """--overwrite replaces an earlier run only once the new set is complete: a full disk mid-way
    leaves the earlier files byte for byte (it used to remove them before writing)."""
    out = tmp_path / "out"
    assert generate(out, "--num-images", 3).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    failing_writer(monkeypatch, 3, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    r = generate(out, "--overwrite", "--seed", 1)
    assert r.exit_code == 1, r.output
    assert f"could not write {out / 'image_001.png'} (No space left on device)" in r.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.undo()
    assert generate(out, "--overwrite", "--seed", 1).exit_code == 0  # a 2-image run replaces the 3-image one whole
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "image_000.json", "image_000.png", "image_001.json",
                                                     "image_001.png"]
    assert (out / "image_000.png").read_bytes() != before["image_000.png"]


def test_ctrl_c_exits_130_and_leaves_no_partial_set(tmp_path, monkeypatch):
    failing_writer(monkeypatch, 3, KeyboardInterrupt())
    out = tmp_path / "out"
    r = generate(out)
    assert r.exit_code == 130, r.output
    assert "Interrupted" in r.output and "Traceback" not in r.output
    assert all_entries(out) == []

    import superdiff_cli.generate as generate_module

    def interrupted_load(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(generate_module, "load_model", interrupted_load)
    r = generate(tmp_path / "other")
    assert r.exit_code == 130 and "Interrupted" in r.output


def test_damaged_items_are_redone_on_resume_to_the_same_files(tmp_path):
    spec, out = write_spec(tmp_path, [["red", "circle"], ["blue", "square"], ["green", "triangle"]]), tmp_path / "out"
    assert sweep(spec, out).exit_code == 0
    first, before = manifest(out), hashes(out)
    truncated, rewritten, intact = (out / r["files"][0] for r in first)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    data = bytearray(rewritten.read_bytes())  # same size, one byte changed: only the hash can tell
    data[-20] ^= 0xFF
    rewritten.write_bytes(bytes(data))

    r = invoke("eval", out, "--quiet")  # eval names the damaged file
    assert r.exit_code == 2 and str(truncated) in r.output and "Traceback" not in r.output

    r = invoke("sweep", spec, "--out", out, "--model", "embedded-shapes", "--steps", 2, "--num-images", 1)
    assert r.exit_code == 0, r.output
    assert "3 items, 1 already done, 2 to run" in r.output and "2 finished item(s) have damaged files" in r.output
    assert hashes(out) == before  # redone to exactly the files an uninterrupted run wrote
    again = {rec["item_id"]: rec for rec in manifest(out)}
    assert again[first[2]["item_id"]] == first[2] and intact.is_file()
    assert all(again[rec["item_id"]]["checks"] == rec["checks"] for rec in first)
    assert invoke("eval", out, "--quiet").exit_code == 0


@pytest.mark.parametrize(
    "line, problem",
    [
        ('{"files": ["items/x/image_000.png"]}', "line 2 has no item_id"),
        ('["a", "b"]', "line 2 is a JSON list, not an object with an item_id"),
        ("not json at all", "line 2 is not valid JSON"),
        (
            '{"item_id": "0009-and-s0-0000abcd", "files": [], "settings": {}, "metrics": {}}',
            "line 2 has no list of files",
        ),
    ],
)
def test_a_manifest_line_this_command_did_not_write_is_named(tmp_path, monkeypatch, line, problem):
    spec, out = write_spec(tmp_path), tmp_path / "out"
    assert sweep(spec, out).exit_code == 0
    good = (out / "manifest.jsonl").read_text().splitlines()
    (out / "manifest.jsonl").write_text("\n".join([good[0], line, good[1]]) + "\n")

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the manifest was checked")

    monkeypatch.setattr(sweep_module, "load_model", no_loading)
    r = sweep(spec, out)
    assert r.exit_code == 2, r.output
    assert f"{out / 'manifest.jsonl'} {problem}" in r.output and "remove that line" in r.output
    assert "Traceback" not in r.output


def test_a_torn_last_manifest_line_is_redone_and_never_joins_the_next(tmp_path):
    """A killed run can leave half a line at the end of its shard; the item runs again, and the
    record appended after it stays a line of its own (else that record is lost too)."""
    spec, out = write_spec(tmp_path), tmp_path / "out"
    assert sweep(spec, out).exit_code == 0
    records = (out / "manifest.jsonl").read_text().splitlines()
    (out / "manifest.jsonl").unlink()
    (out / "manifest.rank0.jsonl").write_text(records[0] + "\n" + records[1][:40])
    r = sweep(spec, out)
    assert r.exit_code == 0, r.output
    assert [rec["item_id"] for rec in manifest(out)] == [json.loads(x)["item_id"] for x in records]
    assert not list(out.glob("manifest.rank*.jsonl"))


def hold_lock(out, owner="someone-else"):
    """Hold the sweep lock of ``out`` as a live sweep would; returns the descriptor to close."""
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / sweep_module.LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, f"4242 {owner}\n".encode())
    return fd


def test_a_second_sweep_on_the_same_out_stops_at_once(tmp_path, monkeypatch):
    spec, out = write_spec(tmp_path), tmp_path / "out"
    stale = out / "items" / f"{sweep_module.TMP_PREFIX}pid1-dead.0001-and-s0-00000000.abcdefgh"
    stale.mkdir(parents=True)
    fd = hold_lock(out)
    try:
        r = sweep(spec, out)
    finally:
        os.close(fd)
    assert r.exit_code == 2, r.output
    assert "in use by another superdiff sweep" in r.output and "process 4242" in r.output
    assert str(out / sweep_module.LOCK) in r.output and "Traceback" not in r.output
    assert not (out / "manifest.jsonl").exists() and [p.name for p in (out / "items").iterdir()] == [stale.name]
    r = sweep(spec, out)  # the lock released: the sweep runs, and clears the stale folder
    assert r.exit_code == 0, r.output
    assert len(manifest(out)) == 2 and not stale.exists()


def test_stale_temporary_folders_are_removed_and_nothing_else(tmp_path):
    spec, out = write_spec(tmp_path), tmp_path / "out"
    items = out / "items"
    stale = [items / f"{sweep_module.TMP_PREFIX}pid7-1a2b3c4d.0001-and-s0-0123abcd.x1y2z3w4",  # a killed run's
             items / ".0001-and-s0-0123abcd.k9_j8h7g"]  # as the command named them before (mkdtemp)
    kept = [items / ".my-notes", items / "0001-and-s0-0123abcd.x1y2z3w4"]  # not ours, or not hidden
    for path in stale + kept:
        path.mkdir(parents=True)
        (path / "image_000.png").write_bytes(b"partial")
    (out / ".metrics.csv.abc123.tmp").write_text("partial")
    (out / "my.tmp").write_text("mine")
    r = sweep(spec, out)
    assert r.exit_code == 0, r.output
    assert not any(p.exists() for p in stale) and all(p.is_dir() for p in kept)
    assert not (out / ".metrics.csv.abc123.tmp").exists() and (out / "my.tmp").exists()


def test_the_ranks_of_one_launch_share_the_lock_and_no_other_sweep_does(tmp_path):
    from superdiff_cli.errors import BadInput, CommandFailed

    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(CommandFailed, match="did not take the lock"):
        sweep_module.lock_out_dir(out, 1, "launch-a", wait_s=0.3)  # rank 0 never came
    fd = sweep_module.lock_out_dir(out, 0, "launch-a")
    try:
        assert sweep_module.lock_out_dir(out, 1, "launch-a", wait_s=5) is None  # rank 1 of the same launch
        with pytest.raises(BadInput, match="in use by another superdiff sweep"):
            sweep_module.lock_out_dir(out, 1, "launch-b", wait_s=5)  # a rank of another launch
        with pytest.raises(BadInput, match=f"process {os.getpid()} holds the lock"):
            sweep_module.lock_out_dir(out, 0, "launch-b")
    finally:
        os.close(fd)
    fd = sweep_module.lock_out_dir(out, 0, "launch-b")  # free again once released
    os.close(fd)


SLOW_SAVES = """
import signal, sys, time
# Ctrl-C as at a terminal: a background job (CI launched with &) starts with SIGINT ignored, which its
# children inherit and Python then leaves ignored; the user's shell does not.
signal.signal(signal.SIGINT, signal.default_int_handler)
import superdiff_cli.sweep as sweep
real_save = sweep.save_generation
def slow_save(*args, **kwargs):
    time.sleep(0.5)  # a window in which Ctrl-C lands mid-item
    return real_save(*args, **kwargs)
sweep.save_generation = slow_save
from superdiff_cli.main import cli
cli(sys.argv[1:], prog_name="superdiff")
"""


def test_a_real_ctrl_c_exits_130_and_the_resumed_sweep_equals_an_uninterrupted_one(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    spec = write_spec(tmp_path, [["red", "circle"], ["blue", "square"], ["green", "triangle"], ["red", "square"]])
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert sweep(spec, whole).exit_code == 0
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            SLOW_SAVES,
            "sweep",
            str(spec),
            "--out",
            str(resumed),
            "--model",
            "embedded-shapes",
            "--steps",
            "2",
            "--num-images",
            "1",
            "--quiet",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    shard, deadline = resumed / "manifest.rank0.jsonl", time.monotonic() + 120
    while (
        not (shard.is_file() and shard.read_text().count("\n") >= 1)
        and proc.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, output
    assert (
        "Interrupted (Ctrl-C)." in output and "Traceback" not in output and "run the same command to resume" in output
    )
    assert not [p for p in (resumed / "items").iterdir() if p.name.startswith(".")]
    assert 1 <= len(list((resumed / "items").iterdir())) < 4
    r = sweep(spec, resumed)
    assert r.exit_code == 0, r.output
    assert hashes(resumed) == hashes(whole)
    strip = lambda records: [{k: v for k, v in r.items() if k != "finished_at"} for r in records]  # noqa: E731
    assert strip(manifest(resumed)) == strip(manifest(whole))


def test_ctrl_c_while_the_libraries_load_exits_130(monkeypatch):
    import superdiff_cli.main as main_module

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(main_module, "quiet_libraries", interrupted)
    r = invoke("toy", "--help")
    assert r.exit_code == 130 and "Interrupted (Ctrl-C)." in r.output and "Aborted" not in r.output
