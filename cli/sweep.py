"""``superdiff sweep SPEC``: many generations, resumable, atomic, data-parallel under accelerate.

Each item is generated into a temporary folder that is renamed into ``items/<id>`` when complete,
then one line is appended to this process's manifest shard (``manifest.rank<R>.jsonl``, flushed
and fsynced). A run skips items whose manifest line exists and whose files are all present. At the
end, the main process merges the shards into ``manifest.jsonl`` and writes ``metrics.csv``
(temporary file, then rename), so Ctrl-C at any moment leaves finished items and the manifest
consistent. Under ``accelerate launch`` each process takes every N-th item.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import click

from .errors import handle_errors
from .models import COMPILE_MODES, apply_speed_options, load_model, resolve_device, resolve_dtype, silence_library_logs
from .output import atomic_write_text, ensure_writable_dir, save_generation
from .spec import SweepItem, load_spec

MANIFEST = "manifest.jsonl"


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


def read_manifest(out_dir: Path) -> dict[str, dict]:
    """Finished items from the merged manifest and every shard (a torn last line is ignored)."""
    done: dict[str, dict] = {}
    for path in sorted(out_dir.glob("manifest*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[record["item_id"]] = record
    return done


def is_complete(out_dir: Path, record: dict) -> bool:
    return all((out_dir / f).is_file() for f in record.get("files", []))


def _append_line(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


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
    if item.model == "embedded-shapes":
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
    writer.writerow(["item_id", "prompts", "mode", "seed", "model", "steps", "num_images", *extra])
    for r in records:
        s = r["settings"]
        writer.writerow([r["item_id"], " | ".join(s["prompts"]), s["mode"], s["seed"], s["model"], s["steps"], s["num_images"],
                         *[_csv_value(r["metrics"].get(k)) for k in extra]])
    atomic_write_text(out_dir / "metrics.csv", buf.getvalue())
    return records


@click.command()
@click.argument("spec", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("superdiff-sweep"), show_default=True)
@click.option("--model", default="embedded-shapes", show_default=True, help="Default model for rows that name none.")
@click.option("--modes", default="and", show_default=True, help="Default modes, |-separated (e.g. 'and|or|average').")
@click.option("--seeds", default="0", show_default=True, help="Default seeds, |-separated (e.g. '0|1|2').")
@click.option("--steps", type=int, default=50, show_default=True)
@click.option("--guidance", type=float, default=None, help="Default guidance [model's default].")
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option("--num-images", type=int, default=4, show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto", show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--limit", type=click.IntRange(min=0), default=None, help="Stop after this many new items (for trying a spec).")
@click.option("--allow-pickle", is_flag=True, help="Also read non-safetensors weights (only for models you trust).")
@click.option("--compile", "compile_mode", type=click.Choice(COMPILE_MODES), default=None,
              help="torch.compile each model's network with this mode (paid once per model and batch shape).")
@click.option("--channels-last", is_flag=True, help="Store each model's network in channels-last memory format.")
@click.option("--quiet", is_flag=True)
@handle_errors
def sweep(spec: Path, out_dir: Path, model: str, modes: str, seeds: str, steps: int, guidance: float | None,
          temperature: float, num_images: int, dtype: str, device: str, limit: int | None, allow_pickle: bool,
          compile_mode: str | None, channels_last: bool, quiet: bool) -> None:
    """Run every prompt set × mode × seed of SPEC (CSV or JSONL); resumable and data-parallel.

    \b
    Examples:
      superdiff sweep samples/prompt_pairs.csv --model ./sd-folder --modes 'and|average' --seeds '0|1' --out runs/
      accelerate launch --num_processes 2 -m superdiff_cli.main sweep spec.jsonl --out runs/
    """
    if quiet:
        silence_library_logs()
    defaults = dict(model=model, modes=modes, seeds=seeds, steps=steps, guidance=guidance, temperature=temperature,
                    num_images=num_images, allow_pickle=allow_pickle)
    items = load_spec(spec, defaults)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    ensure_writable_dir(out_dir, "--out")
    rank, world, barrier, acc_device = _distributed(out_dir)
    if acc_device is not None:
        dev = resolve_device(acc_device)
        torch_dtype = resolve_dtype(dtype, dev)
    done = read_manifest(out_dir)
    todo = [it for it in items if not (it.item_id in done and is_complete(out_dir, done[it.item_id]))]
    mine = share_of_rank(items, todo, rank, world)
    if not quiet and rank == 0:
        click.echo(f"{len(items)} items, {len(items) - len(todo)} already done, {len(todo)} to run on {world} process(es)")
    shard = out_dir / f"manifest.rank{rank}.jsonl"
    models: dict[str, object] = {}
    finished = 0
    tmp: Path | None = None
    import torch
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
            scale = loaded.default_guidance if item.guidance is None else item.guidance
            call = dict(mode=item.mode, num_inference_steps=item.steps, temperature=item.temperature,
                        log_weights=None if item.log_weights is None else list(item.log_weights),
                        generator=torch.Generator("cpu").manual_seed(item.seed), output_type="pil", progress=False)
            if loaded.items == "prompts":
                call.update(prompts=list(item.prompts), guidance_scale=scale, num_images_per_prompt=item.num_images)
            else:
                call.update(batch_size=item.num_images)
                scale = None  # unconditional models: no guidance, recorded as null
            result = loaded.pipeline(**call)
            final = out_dir / "items" / item.item_id
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{item.item_id}."))
            settings = item.settings() | {"guidance": scale, "compile": compile_mode, "channels_last": channels_last}
            files = save_generation(tmp, result, settings)
            if final.exists():  # left by an interrupted run before its manifest line: replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            record = {
                "item_id": item.item_id,
                "settings": settings,
                "files": [str(Path("items") / item.item_id / f.name) for f in files],
                "metrics": _item_metrics(result, item),
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "rank": rank,
            }
            _append_line(shard, record)
            finished += 1
    except KeyboardInterrupt:
        click.echo(f"interrupted: {finished} item(s) finished in this run are saved; run the same command to resume", err=True)
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
