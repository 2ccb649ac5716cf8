"""``superdiff sweep SPEC``: many generations, resumable, atomic, data-parallel under accelerate.

Each item is generated into a temporary folder that is renamed into ``items/<id>`` when complete,
then one line is appended to this process's manifest shard (``manifest.rank<R>.jsonl``, flushed
and fsynced) with the size and SHA-256 of each file. A run skips items whose manifest line exists
and whose files are all present, of that size and hash; damaged items are run again. At the end,
the main process merges the shards into ``manifest.jsonl`` and writes ``metrics.csv`` (temporary
file, then rename), so Ctrl-C at any moment leaves finished items and the manifest consistent.
Under ``accelerate launch`` each process takes every N-th item.

One sweep at a time works in an ``--out``: the main process holds an flock on
``--out/.superdiff-sweep.lock`` (the other processes of its launch check that it does), and a
second sweep on the same ``--out`` stops at once with exit 2. Holding the lock, the main process
removes the temporary folders a killed run left behind.
"""

from __future__ import annotations

import csv
import fcntl
import functools
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import time
from pathlib import Path

import click

from superdiff.expression_syntax import parse_expression
from superdiff.expressions import conjunctive

from .calls import FiniteFloat, pipeline_call_kwargs
from .errors import BadInput, CommandFailed, handle_errors, surface_warnings
from .limits import output_folder
from .models import COMPILE_MODES, apply_speed_options, load_model, resolve_device, resolve_dtype, silence_library_logs
from .options import option_columns, options_from_params, recorded_options, sampler_click_options
from .output import atomic_write_text, ensure_writable_dir, make_temp_dir, save_generation
from .spec import SweepItem, load_spec

MANIFEST = "manifest.jsonl"
LOCK = ".superdiff-sweep.lock"
TMP_PREFIX = ".sweep-tmp."  # + owner tag + "." + item id + "." + random: an item being written
LOCK_WAIT_S = 300.0  # how long a process of a launch waits for its main process to take the lock
# Folders an earlier version of this command (mkdtemp(prefix=f".{item_id}.")) left when killed.
LEGACY_TMP = re.compile(r"\.\d{4,}-[a-z]+-s-?\d+-[0-9a-f]{8}\.[A-Za-z0-9_]{8}")
RECORD_SETTINGS = ("prompts", "mode", "seed", "model", "steps", "num_images")  # what metrics.csv reads


def _launch_key() -> str:
    """A name shared by the processes of one launch and no other: torchrun's rendezvous id where it
    has one; on one machine, the launcher's pid (the parent of every worker) and port."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if run_id != "none":
        return run_id
    key = f"{os.environ.get('MASTER_ADDR', '')}-{os.environ.get('MASTER_PORT', '')}"
    if os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE")) == os.environ.get("WORLD_SIZE"):
        key += f"-{os.getppid()}"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in key)


def _distributed(out_dir: Path):
    """(rank, world size, barrier, device) of this process.

    Under ``accelerate launch`` (or torchrun) the launcher sets RANK, WORLD_SIZE and LOCAL_RANK.
    A sweep needs no collective communication, so no process group is created (with one, a
    2-process CPU sweep hung on the project's CI machine, cause not pinned down): each process
    takes every WORLD_SIZE-th item, uses GPU LOCAL_RANK where there are GPUs, and the barrier before
    rank 0's merge is a marker file per rank, named for this launch so an earlier run's markers never count.
    """
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1:
        return 0, 1, (lambda: None), None
    import torch

    device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}" if torch.cuda.is_available() else None
    key = _launch_key()

    def file_barrier(timeout: float = 24 * 3600.0) -> None:
        """Every rank leaves its marker; only rank 0, which merges, waits for all of them."""
        (out_dir / f".done.{key}.rank{rank}").write_text("done\n")
        if rank != 0:
            return
        start = time.monotonic()
        while not all((out_dir / f".done.{key}.rank{r}").exists() for r in range(world)):
            if time.monotonic() - start > timeout:
                raise RuntimeError("other sweep processes did not finish; run the sweep again to merge their work")
            time.sleep(0.2)

    return rank, world, file_barrier, device


def share_of_rank(items: list[SweepItem], todo: list[SweepItem], rank: int, world: int) -> list[SweepItem]:
    """This process's items: every ``world``-th item of the whole spec, less those already done.

    The split is made on the spec, not on what is left to do, because each process reads the
    manifest when it starts: one that starts after another has finished an item would otherwise
    see a shorter list, stride it differently, and skip items no process then runs.
    """
    left = {it.item_id for it in todo}
    return [it for it in items[rank::world] if it.item_id in left]


class ManifestLineError(ValueError):
    """A manifest line this command did not write (hand-edited or damaged), named by file and line."""


def _manifest_record(line: str, path: Path, number: int) -> dict:
    """The record on line ``number`` of ``path``; ManifestLineError where it is not one this command writes."""
    fix = "remove that line (its item will be run again) or choose another --out"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ManifestLineError(f"{path} line {number} is not valid JSON ({exc.msg}); {fix}") from None
    if not isinstance(record, dict):
        raise ManifestLineError(
            f"{path} line {number} is a JSON {type(record).__name__}, not an object with an item_id; {fix}"
        )
    problem = None
    if not isinstance(record.get("item_id"), str) or not record["item_id"]:
        problem = "has no item_id"
    elif (
        not isinstance(record.get("files"), list)
        or not record["files"]
        or not all(isinstance(f, str) for f in record["files"])
    ):
        problem = "has no list of files"
    elif not isinstance(record.get("settings"), dict) or not set(RECORD_SETTINGS) <= record["settings"].keys():
        problem = f"has no settings with {', '.join(RECORD_SETTINGS)}"
    elif not isinstance(record.get("metrics"), dict):
        problem = "has no metrics"
    elif not isinstance(record.get("checks", {}), dict):
        problem = "has checks that are not an object"
    if problem:
        raise ManifestLineError(f"{path} line {number} {problem}; {fix}")
    return record


def read_manifest(out_dir: Path) -> dict[str, dict]:
    """Finished items from the merged manifest and every shard, later lines winning.

    A last line with no newline that is not JSON is a write a killed run left torn: it is ignored
    (its item runs again; repair_torn_tail cuts it off before the shard is appended to). Any other
    line that is not a record this command writes is bad input naming the file and line, before
    any work starts.
    """
    done: dict[str, dict] = {}
    for path in sorted(out_dir.glob("manifest*.jsonl")):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ManifestLineError(f"{path} is not UTF-8 text; remove it (its items will be run again) "
                                    f"or choose another --out") from None
        lines = text.split("\n")
        torn = lines.pop()  # "" when the file ends with a newline, as every complete write does
        for number, line in enumerate(lines, start=1):
            if line.strip():
                record = _manifest_record(line, path, number)
                done[record["item_id"]] = record
        if torn.strip():
            try:
                json.loads(torn)
            except json.JSONDecodeError:
                continue  # half a record: its item runs again
            record = _manifest_record(torn, path, len(lines) + 1)
            done[record["item_id"]] = record
    return done


def repair_torn_tail(shard: Path) -> None:
    """End ``shard`` with a newline before appending to it: a torn last line a killed run left is cut
    off (a complete one is kept), so the next record never joins it. Only the shard's own process calls this."""
    if not shard.is_file():
        return
    data = shard.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    head, _, tail = data.rpartition(b"\n")
    try:
        json.loads(tail)
    except (json.JSONDecodeError, UnicodeDecodeError):
        with open(shard, "r+b") as f:
            f.truncate(len(head) + 1 if head else 0)
        return
    with open(shard, "ab") as f:
        f.write(b"\n")


def file_checks(out_dir: Path, files: list[str]) -> dict[str, dict]:
    """Size and SHA-256 of each written file (paths relative to ``out_dir``), kept in its manifest line."""
    checks = {}
    for name in files:
        data = (out_dir / name).read_bytes()
        checks[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return checks


def damaged_files(out_dir: Path, record: dict) -> list[str]:
    """What is wrong with a finished item's files: missing, or not the size and hash its line
    recorded (a line from before checks were recorded is checked for presence only)."""
    problems = []
    checks = record.get("checks", {})
    for name in record["files"]:
        path, check = out_dir / name, checks.get(name)
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif isinstance(check, dict) and path.stat().st_size != check.get("bytes"):
            problems.append(f"{name} has {path.stat().st_size} bytes, {check.get('bytes')} were written")
        elif isinstance(check, dict) and hashlib.sha256(path.read_bytes()).hexdigest() != check.get("sha256"):
            problems.append(f"{name} is not the file written (its SHA-256 differs)")
    return problems


def _append_line(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def sweep_owner(world: int) -> str:
    """A name shared by the processes of this sweep and no other, safe in a file name and free of
    dots (it ends at the first dot of a temporary folder's name)."""
    key = _launch_key() if world > 1 else f"pid{os.getpid()}-{secrets.token_hex(4)}"
    return key.replace(".", "_")


def _lock_holder(path: Path) -> tuple[str, str]:
    """(pid, owner) written in the lock file by the process holding it ("?" where unreadable)."""
    try:
        pid, owner = path.read_text(encoding="utf-8").split()
        return pid, owner
    except (OSError, ValueError, UnicodeDecodeError):
        return "?", "?"


def _in_use(out_dir: Path, path: Path) -> BadInput:
    pid, _ = _lock_holder(path)
    return BadInput(
        f"--out {str(out_dir)!r} is in use by another superdiff sweep (process {pid} holds the lock {path}); "
        f"wait for it to finish, or choose another --out"
    )


def lock_out_dir(out_dir: Path, rank: int, owner: str, wait_s: float = LOCK_WAIT_S) -> int | None:
    """Make this sweep the only one working in ``out_dir``; returns the lock's file descriptor (rank 0,
    which holds it until the sweep ends) or None (the other ranks).

    Rank 0 takes an exclusive flock on ``out_dir/.superdiff-sweep.lock`` and writes its pid and
    ``owner`` into it; a lock already held is another sweep: bad input. The ranks of one launch
    share ``out_dir``, so the others take no lock: each waits until the lock is held and names
    ``owner`` (rank 0 of its own launch), and stops like rank 0 when it names another sweep.
    """
    path = out_dir / LOCK
    if rank == 0:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        for _ in range(20):  # another rank's probe holds a shared lock for microseconds
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(0.05)
        else:
            os.close(fd)
            raise _in_use(out_dir, path)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {owner}\n".encode(), 0)
        return fd
    start, other_since = time.monotonic(), None
    while True:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            held = False
        except BlockingIOError:
            held = True
        finally:
            os.close(fd)
        now = time.monotonic()
        if held and _lock_holder(path)[1] == owner:
            return None
        if held:  # another sweep's name, or rank 0 has locked and not yet written ours: give it a moment
            other_since = now if other_since is None else other_since
            if now - other_since > 2.0:
                raise _in_use(out_dir, path)
        else:
            other_since = None
        if now - start > wait_s:
            raise CommandFailed(f"the main process of this launch did not take the lock {path} within {wait_s:.0f} s; "
                                f"run the sweep again")
        time.sleep(0.1)


def remove_stale_temporaries(out_dir: Path, owner: str) -> list[Path]:
    """Remove what killed runs left in ``out_dir``: their temporary item folders (named with
    TMP_PREFIX, or as an earlier version named them) and atomic-write temporaries. Only rank 0
    calls this, holding the lock, so no other sweep is alive; the folders of this sweep's other
    ranks (``owner``'s) are kept. Returns what was removed."""
    removed: list[Path] = []
    items = out_dir / "items"
    if items.is_dir():
        for path in items.iterdir():
            name = path.name
            ours = name.startswith(f"{TMP_PREFIX}{owner}.")
            stale = (name.startswith(TMP_PREFIX) and not ours) or LEGACY_TMP.fullmatch(name) is not None
            if stale and path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    for pattern in (f".{MANIFEST}.*.tmp", ".metrics.csv.*.tmp"):
        for path in out_dir.glob(pattern):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def shapes_both_rate(images: list, prompts: tuple[str, ...]) -> float | None:
    """Fraction of embedded-shapes ``images`` showing every colour and shape word the prompts name,
    read as ``superdiff eval`` reads them (any order, any phrasing: ["circle", "red"] and
    ["red circle", "red"] name red and circle); None where the prompts name no colour–shape pair."""
    from superdiff.metrics import attribute_rates, pil_to_pixels, prompt_attributes, read_prompt_attributes
    from superdiff.zoo.shapes import COLOURS, SHAPES

    named, _ = prompt_attributes(prompts)
    if not images or not any(a in COLOURS for a in named) or not any(a in SHAPES for a in named):
        return None
    read = read_prompt_attributes(pil_to_pixels([im.convert("RGB") for im in images]), named)
    return attribute_rates([r["present"] for r in read])["both_rate"]


def _item_metrics(result, item: SweepItem) -> dict:
    ld = result.log_densities
    metrics = {
        "log_density_spread": float((ld.max(-1).values - ld.min(-1).values).mean()),
        "final_kappa_mean": [round(float(v), 4) for v in result.kappa_trace[-1].mean(0)],
    }
    if item.model == "embedded-shapes" and (
        item.expression is None or conjunctive(parse_expression(item.expression))
    ):  # an OR or a NOT wants another thing than "all named": bench/composition_calculus.py counts those
        metrics["both_rate"] = shapes_both_rate(list(result.images), item.prompts)
    return metrics


def _csv_value(value: object) -> str:
    """A metric as a metrics.csv cell: JSON, or empty where there is none."""
    return "" if value is None else json.dumps(value)


def merge_and_summarise(out_dir: Path) -> list[dict]:
    """Merge the shards into manifest.jsonl and write metrics.csv, both atomically."""
    records = sorted(read_manifest(out_dir).values(), key=lambda r: r["item_id"])
    atomic_write_text(out_dir / MANIFEST, "".join(json.dumps(r) + "\n" for r in records))
    for shard in out_dir.glob("manifest.rank*.jsonl"):
        shard.unlink()
    buf = io.StringIO()
    writer = csv.writer(buf)
    extra = sorted({k for r in records for k in r.get("metrics", {})})
    expressions = any(r["settings"].get("expression") for r in records)  # the column only where one is
    writer.writerow(["item_id", "prompts", "mode", *(["expression"] if expressions else []), "seed", "model", "steps",
                     "num_images", *option_columns(), *extra])
    for r in records:
        s = r["settings"]
        writer.writerow(
            [
                r["item_id"],
                " | ".join(s["prompts"]),
                s["mode"],
                *([s.get("expression") or ""] if expressions else []),
                s["seed"],
                s["model"],
                s["steps"],
                s["num_images"],
                *recorded_options(s).values(),  # a line from before an option: the default it ran with
                *[_csv_value(r["metrics"].get(k)) for k in extra],
            ]
        )
    atomic_write_text(out_dir / "metrics.csv", buf.getvalue())
    return records


@click.command()
@click.argument("spec", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), callback=output_folder, default="superdiff-sweep",
              show_default=True)
@click.option("--model", default="embedded-shapes", show_default=True, help="Default model for rows that name none.")
@click.option("--modes", default="and", show_default=True, help="Default modes, |-separated (e.g. 'and|or|average').")
@click.option("--seeds", default="0", show_default=True, help="Default seeds, |-separated (e.g. '0|1|2').")
@click.option("--steps", type=int, default=50, show_default=True)
@click.option("--guidance", type=float, default=None, help="Default guidance [model's default].")
@click.option("--temperature", type=FiniteFloat(min=0, min_open=True), default=1.0, show_default=True)
@click.option("--num-images", type=int, default=4, show_default=True)
@click.option(
    "--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto", show_default=True
)
@click.option("--device", default="auto", show_default=True)
@click.option(
    "--limit", type=click.IntRange(min=0), default=None, help="Stop after this many new items (for trying a spec)."
)
@click.option("--allow-pickle", is_flag=True, help="Also read non-safetensors weights (only for models you trust).")
@click.option("--compile", "compile_mode", type=click.Choice(COMPILE_MODES), default=None,
              help="torch.compile each model's network with this mode (paid once per model and batch shape).")
@click.option("--channels-last", is_flag=True, help="Store each model's network in channels-last memory format.")
@click.option("--quiet", is_flag=True)
@sampler_click_options()
@handle_errors
def sweep(spec: Path, out_dir: Path, model: str, modes: str, seeds: str, steps: int, guidance: float | None,
          temperature: float, num_images: int, dtype: str, device: str, limit: int | None, allow_pickle: bool,
          compile_mode: str | None, channels_last: bool, quiet: bool, **sampler_options: object) -> None:
    """Run every prompt set × mode × seed of SPEC (CSV or JSONL); resumable and data-parallel.

    The sampling options (--particles, --density-variance, ...) are the defaults of the lines, which
    may set each by its name (e.g. {"expression": "\"red\" * \"circle\"", "particles": 4}).

    \b
    Examples:
      superdiff sweep samples/prompt_pairs.csv --model ./sd-folder --modes 'and|average' --seeds '0|1' --out runs/
      accelerate launch --num_processes 2 -m superdiff_cli.main sweep spec.jsonl --out runs/
    """
    if quiet:
        silence_library_logs()
    defaults = dict(model=model, modes=modes, seeds=seeds, steps=steps, guidance=guidance, temperature=temperature,
                    num_images=num_images, allow_pickle=allow_pickle, options=options_from_params(sampler_options))
    items = load_spec(spec, defaults)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    ensure_writable_dir(out_dir, "--out")
    rank, world, barrier, acc_device = _distributed(out_dir)
    if acc_device is not None:
        dev = resolve_device(acc_device)
        torch_dtype = resolve_dtype(dtype, dev)
    owner = sweep_owner(world)
    lock = lock_out_dir(out_dir, rank, owner)
    if lock is not None:  # held until the command ends, however it ends
        click.get_current_context().call_on_close(functools.partial(os.close, lock))
    if rank == 0:
        remove_stale_temporaries(out_dir, owner)
    done = read_manifest(out_dir)
    damaged = {it.item_id: damaged_files(out_dir, done[it.item_id]) for it in items if it.item_id in done}
    damaged = {item_id: problems for item_id, problems in damaged.items() if problems}
    todo = [it for it in items if it.item_id not in done or it.item_id in damaged]
    mine = share_of_rank(items, todo, rank, world)
    if not quiet and rank == 0:
        click.echo(
            f"{len(items)} items, {len(items) - len(todo)} already done, {len(todo)} to run on {world} process(es)"
        )
        if damaged:
            problems = next(iter(damaged.values()))
            click.echo(
                f"{len(damaged)} finished item(s) have damaged files and run again (e.g. {problems[0]})", err=True
            )
    shard = out_dir / f"manifest.rank{rank}.jsonl"
    repair_torn_tail(shard)
    models: dict[str, object] = {}
    finished = 0
    tmp: Path | None = None
    from tqdm.auto import tqdm

    try:
        for item in tqdm(mine, disable=quiet, desc=f"sweep[{rank}]"):
            if limit is not None and finished >= limit:
                break
            key = item.model if item.model != "embedded-digits" else f"digits:{','.join(item.prompts)}"
            if key not in models:
                models[key] = load_model(item.model, torch_dtype, dev, allow_pickle, items=list(item.prompts))
                apply_speed_options(models[key].pipeline, channels_last, compile_mode)
            loaded = models[key]
            call, scale = pipeline_call_kwargs(
                loaded,
                item.prompts,
                item.combiner(),
                item.steps,
                item.guidance,
                item.seed,
                item.num_images,
                progress=False,
                options=item.options,
            )
            try:
                with surface_warnings(f" (item {item.item_id})"):
                    result = loaded.pipeline(**call)
            except ValueError as exc:  # the library refused the item: bad input, named
                raise ValueError(f"item {item.item_id} (spec line {item.row}): {exc}") from exc
            except Exception as exc:  # noqa: BLE001 - a runtime failure (e.g. NonFiniteError), named
                raise CommandFailed(f"item {item.item_id} (spec line {item.row}) failed, {finished} item(s) of this "
                                    f"run are saved: {type(exc).__name__}: {exc}") from exc
            final = out_dir / "items" / item.item_id
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = make_temp_dir(final.parent, prefix=f"{TMP_PREFIX}{owner}.{item.item_id}.")
            settings = item.settings() | {"pipeline": type(loaded.pipeline).__name__, "guidance": scale,
                                          "compile": compile_mode, "channels_last": channels_last}
            files = save_generation(tmp, result, settings)
            if final.exists():  # left by an interrupted run before its manifest line: replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            names = [str(Path("items") / item.item_id / f.name) for f in files]
            record = {
                "item_id": item.item_id,
                "settings": settings,
                "files": names,
                "checks": file_checks(out_dir, names),
                "metrics": _item_metrics(result, item),
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "rank": rank,
            }
            _append_line(shard, record)
            finished += 1
    except KeyboardInterrupt:
        click.echo(
            f"interrupted: {finished} item(s) finished in this run are saved; run the same command to resume", err=True
        )
        raise
    finally:
        if tmp is not None and tmp.exists():  # this process's half-written item, never another's
            shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    if rank == 0:
        records = merge_and_summarise(out_dir)
        for marker in out_dir.glob(".done.*"):
            marker.unlink(missing_ok=True)
        if not quiet:
            click.echo(f"{len(records)} items in {out_dir / MANIFEST}; metrics in {out_dir / 'metrics.csv'}")
