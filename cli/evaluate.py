"""``superdiff eval DIR``: score the images of a ``generate`` or ``sweep`` output folder.

Images are the PNGs with a JSON sidecar (or, failing that, superdiff PNG metadata) in DIR and in
DIR/items/*/; grids and trace plots have neither and are ignored. A sidecar (or metadata) that is
there but does not describe a generation (not an object, prompts that are not a list of strings, an
expression that does not parse, ...) is bad input naming the file and the reason, before any
scoring: dropping its image would change the groups' counts without a word. Prompt compositions get the CLIP
score (with ``--clip``), embedded-shapes images the attribute checker, embedded-scenes images the
scene checker (GenEval-style), embedded-digits images the digit classifier; the metrics themselves
live in :mod:`superdiff.metrics` and :mod:`superdiff.zoo.scenes`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import click

from .errors import BadInput, handle_errors
from .limits import output_folder
from .models import EMBEDDED, resolve_device, silence_library_logs
from .options import recorded_options
from .output import atomic_write_text, ensure_writable_dir

EVAL_FILE = "eval.json"
MAX_LISTED = 20  # bad sidecars named in one message; the rest are counted
OFFLINE_VALUES = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Generated:
    """One generated image and what made it (from its sidecar)."""

    path: Path
    file: str  # relative to DIR, with forward slashes
    model: str
    mode: str
    prompts: tuple[str, ...]
    seed: int | None
    expression: str | None = None  # an expression's canonical text; its leaves are the prompts
    options: dict = field(default_factory=dict)  # the sampling options it ran with (superdiff.options)

    @property
    def group(self) -> tuple:
        """Images of one composition sampled alike: the mode names it, or, for an expression, its text;
        and every sampling option's value (K = 1, 2, 3 particles are three groups)."""
        options = tuple((k, v if isinstance(v, (str, int, float, bool, type(None))) else repr(v))
                        for k, v in self.options.items())  # a hand-edited sidecar's list stays hashable
        return self.model, self.expression or self.mode, self.prompts, options


def _json_kind(value: object) -> str:
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "true or false", type(None): "null"}
    return kinds.get(type(value), "a number")


def sidecar_problem(meta: object) -> str | None:
    """Why the JSON of a sidecar (or of a PNG's superdiff text) does not describe a generation that
    eval can score and group: an object with the model and mode (strings), the prompts (a list of
    strings), the seed (a whole number, or absent) and, for an expression, its text, which must parse."""
    from superdiff._text import shorten
    from superdiff.expression_syntax import parse_expression

    if not isinstance(meta, dict):
        return f"it holds {_json_kind(meta)}, where a generation's sidecar holds an object"
    missing = [k for k in ("model", "mode", "prompts") if k not in meta]
    if missing:
        return f"it has no {' and no '.join(missing)}"
    for key in ("model", "mode"):
        if not isinstance(meta[key], str):
            return f"its {key} is {_json_kind(meta[key])}, not a string"
    if not isinstance(meta["prompts"], list) or not all(isinstance(p, str) for p in meta["prompts"]):
        what = _json_kind(meta["prompts"]) if not isinstance(meta["prompts"], list) else "a list holding a non-string"
        return f"its prompts are {what}, not a list of strings"
    seed = meta.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        return f"its seed is {_json_kind(seed)}, not a whole number"
    expression = meta.get("expression")
    if expression is None:
        return "its mode is 'expression' but it has no expression" if meta["mode"] == "expression" else None
    if not isinstance(expression, str):
        return f"its expression is {_json_kind(expression)}, not a string"
    try:
        parse_expression(expression)
    except ValueError as exc:
        problem = getattr(exc, "problem", str(exc).splitlines()[0])
        return f"its expression {shorten(expression)} does not parse ({problem})"
    return None


def _metadata(png: Path) -> dict | None:
    """What made ``png``: its sidecar (or, without one, its superdiff PNG text); None for a PNG with
    neither (a grid, a trace plot). Bad input naming the file where either is there but does not
    describe a generation (:func:`sidecar_problem`): the images it stands for cannot be grouped, so
    no summary is trusted."""
    sidecar = png.with_suffix(".json")
    fix = f"regenerate it, or remove {png.name} and its sidecar"
    if sidecar.is_file():
        where = str(sidecar)
        try:
            meta = json.loads(sidecar.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadInput(f"{sidecar} is not valid JSON ({exc}); {fix}") from None
    else:
        from PIL import Image

        where, fix = f"{png} (its superdiff PNG text)", f"regenerate it, or remove {png.name}"
        try:
            with Image.open(png) as im:
                text = getattr(im, "text", {}).get("superdiff")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            return None  # without a sidecar, a file PIL cannot read is not known to be ours
        if text is None:
            return None
        try:
            meta = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BadInput(f"{where} is not valid JSON ({exc}); {fix}") from None
    problem = sidecar_problem(meta)
    if problem:
        raise BadInput(f"{where}: {problem}; {fix}")
    return meta


def find_generated(root: Path) -> list[Generated]:
    """Every generated image in ``root`` (a generate folder) and ``root/items/*/`` (a sweep folder),
    sorted by path; hidden folders (a sweep's unfinished items) are skipped. Bad input listing
    every sidecar that does not describe a generation (the first :data:`MAX_LISTED`), each with why."""
    folders = [root]
    items = root / "items"
    if items.is_dir():
        folders += sorted(p for p in items.iterdir() if p.is_dir() and not p.name.startswith("."))
    found, problems = [], []
    for folder in folders:
        for png in sorted(folder.glob("*.png")):
            try:
                meta = _metadata(png)
            except BadInput as exc:
                problems.append(exc.message)
                continue
            if meta is None:
                continue
            seed, expression = meta.get("seed"), meta.get("expression")
            found.append(Generated(png, png.relative_to(root).as_posix(), str(meta["model"]), str(meta["mode"]),
                                   tuple(meta["prompts"]), seed if isinstance(seed, int) else None,
                                   expression if isinstance(expression, str) else None, recorded_options(meta)))
    if len(problems) == 1:
        raise BadInput(problems[0])
    if problems:
        more = len(problems) - MAX_LISTED
        raise BadInput(f"{len(problems)} images in {str(root)!r} have a record that describes no generation, so "
                       "their groups cannot be trusted:\n" + "\n".join(f"  {p}" for p in problems[:MAX_LISTED])
                       + (f"\n  ... and {more} more" if more > 0 else ""))
    return found


def _offline() -> bool:
    return any(os.environ.get(k, "").lower() in OFFLINE_VALUES for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def check_clip_spec(spec: str) -> None:
    path = Path(spec).expanduser()
    looks_local = path.exists() or spec.startswith((".", "/", "~")) or os.sep in spec and spec.count("/") != 1
    if looks_local and not path.is_dir():
        raise BadInput(
            f"--clip {spec!r}: no such folder. Pass a local CLIP folder (config.json, model.safetensors, the "
            f"tokenizer and preprocessor_config.json) or a hub id such as openai/clip-vit-large-patch14"
        )


def load_clip(spec: str, device: str, allow_pickle: bool):
    from superdiff.metrics import CLIPScorer

    path = Path(spec).expanduser()
    offline = _offline()
    try:
        return CLIPScorer.from_pretrained(str(path) if path.is_dir() else spec, device=device,
                                          use_safetensors=None if allow_pickle else True, local_files_only=offline)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = (
            "the hub is offline here, so pass a local CLIP folder"
            if offline and not path.is_dir()
            else "pass a local CLIP folder"
        )
        raise BadInput(
            f"--clip {spec!r} could not be loaded ({first}); {where} (with config.json, model.safetensors, the "
            "tokenizer and preprocessor_config.json) or a cached hub id"
            + ("" if allow_pickle else "; only safetensors weights are read unless --allow-pickle")
        ) from exc


def _unreadable(path: Path, exc: BaseException) -> BadInput:
    """Bad input naming an image file that cannot be read, why, and the fix."""
    from PIL import Image

    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        why = f"it has more pixels than the {Image.MAX_IMAGE_PIXELS} PIL reads safely (a decompression bomb?)"
    else:
        why = f"not a readable image: {str(exc).strip() or type(exc).__name__}"
    return BadInput(
        f"{path}: {why}; remove it and its sidecar, or regenerate it (a sweep run again redoes damaged items)"
    )


def _open(path: Path, mode: str):
    """The image at ``path`` converted to ``mode``; bad input naming the file where it cannot be read."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return im.convert(mode)
    except Exception as exc:  # noqa: BLE001 - whatever PIL raises for a damaged file, the file is named
        raise _unreadable(path, exc) from exc


def check_images(gens: list[Generated]) -> None:
    """Every image is a whole, readable image of a safe size, checked before any scoring (PIL's
    verify reads each chunk and its checksum without decoding the pixels)."""
    import warnings

    from PIL import Image

    for g in gens:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(g.path) as im:
                    im.verify()
        except Exception as exc:  # noqa: BLE001 - see _open
            raise _unreadable(g.path, exc) from exc


def score_clip(gens: list[Generated], scorer, batch_size: int, progress: bool) -> dict[Path, dict]:
    """Per image: CLIP score against each of its prompts, their min and mean (images in batches)."""
    import torch
    from tqdm.auto import tqdm

    from superdiff.metrics import clip_score

    prompts = sorted({p for g in gens for p in g.prompts})
    text = torch.cat([scorer.embed_texts(prompts[i:i + batch_size]) for i in range(0, len(prompts), batch_size)])
    row = {p: i for i, p in enumerate(prompts)}
    embeds = []
    with tqdm(total=len(gens), disable=not progress, desc="CLIP score", unit="img") as bar:
        for start in range(0, len(gens), batch_size):
            chunk = gens[start:start + batch_size]
            embeds.append(scorer.embed_images([_open(g.path, "RGB") for g in chunk]))
            bar.update(len(chunk))
    out = {}
    for g, e in zip(gens, torch.cat(embeds)):
        scores = clip_score(e[None], text[[row[p] for p in g.prompts]])[0].tolist()
        out[g.path] = {"scores": scores, "min": min(scores), "mean": sum(scores) / len(scores)}
    return out


def score_shapes(gens: list[Generated], notes: list[str]) -> dict[Path, dict]:
    """Per embedded-shapes image: the colour and shape read, and which prompt attributes it shows."""
    from superdiff.metrics import pil_to_pixels, prompt_attributes, read_prompt_attributes

    buckets: dict[tuple, list[tuple[Generated, object]]] = {}
    unnamed = 0
    for g in gens:
        named, _ = prompt_attributes(g.prompts)
        if not named:
            unnamed += 1
            continue
        image = _open(g.path, "RGB")
        buckets.setdefault((tuple(named), image.size), []).append((g, image))
    if unnamed:
        notes.append(f"attribute metrics skipped for {unnamed} embedded-shapes image(s) whose prompts name no colour "
                     f"or shape word")
    out = {}
    for (named, size), members in buckets.items():
        if size[0] != size[1]:
            notes.append(
                f"attribute metrics skipped for {len(members)} embedded-shapes image(s) of size {size[0]}x{size[1]}; "
                f"the checker reads square images"
            )
            continue
        read = read_prompt_attributes(pil_to_pixels([im for _, im in members]), named)
        out.update({g.path: r for (g, _), r in zip(members, read)})
    return out


def score_scenes(gens: list[Generated], notes: list[str]) -> dict[Path, dict]:
    """Per embedded-scenes image: the objects the scene checker reads (None: no scene) and which of
    the objects its prompts name it holds (:func:`superdiff.zoo.scenes.scene_presence`)."""
    from superdiff.metrics import pil_to_pixels
    from superdiff.zoo.scenes import SIZE, named_objects, read_objects, scene_presence

    images = [(g, _open(g.path, "RGB")) for g in gens]
    wrong = [g for g, im in images if im.size != (SIZE, SIZE)]
    if wrong:
        notes.append(f"scene metrics skipped for {len(wrong)} embedded-scenes image(s) that are not {SIZE}x{SIZE}")
    images = [(g, im) for g, im in images if im.size == (SIZE, SIZE)]
    if not images:
        return {}
    read = read_objects(pil_to_pixels([im for _, im in images]))
    return {g.path: {"objects": None if objs is None else [list(o) for o in objs]}
            | scene_presence(objs, named_objects(g.prompts)) for (g, _), objs in zip(images, read)}


def score_digits(gens: list[Generated], device: str, notes: list[str]) -> dict[Path, dict]:
    """Per embedded-digits image: the classifier's digit and its confidence."""
    from superdiff.metrics import classify_digits, pil_to_pixels
    from superdiff.zoo.registry import load_digit_classifier

    images = [(g, _open(g.path, "L")) for g in gens]
    wrong = [g for g, im in images if im.size != (8, 8)]
    if wrong:
        notes.append(f"digit metrics skipped for {len(wrong)} embedded-digits image(s) that are not 8x8")
    images = [(g, im) for g, im in images if im.size == (8, 8)]
    if not images:
        return {}
    labels, confidence = classify_digits(pil_to_pixels([im for _, im in images]), load_digit_classifier(device))
    return {g.path: {"label": int(lab), "confidence": float(c)} for (g, _), lab, c in zip(images, labels, confidence)}


def summarise(gens: list[Generated], records: dict[Path, dict]) -> list[dict]:
    """One entry per (model, mode, prompts, sampling options): n, mean ± std of CLIP min and mean,
    attribute rates, digit summary; ``options`` holds the sampling options of the group."""
    from superdiff.expression_syntax import parse_expression
    from superdiff.expressions import conjunctive
    from superdiff.metrics import attribute_rates, digit_summary, mean_std, prompt_attributes
    from superdiff.zoo.scenes import named_objects, scene_rates

    groups: dict[tuple, list[dict]] = {}
    expressions = {g.expression for g in gens if g.expression}
    for g in gens:
        groups.setdefault(g.group, []).append(records[g.path])
    out = []
    for (model, mode, prompts, options), recs in groups.items():
        entry: dict = {"model": model, "mode": mode, "prompts": list(prompts), "options": dict(options),
                       "n": len(recs)}
        clip = [r["clip"] for r in recs if "clip" in r]
        if clip:
            entry["clip_min"] = mean_std([c["min"] for c in clip])
            entry["clip_mean"] = mean_std([c["mean"] for c in clip])
            entry["clip_n"] = len(clip)
        attrs = [r["attributes"]["present"] for r in recs if "attributes" in r]
        if attrs:
            entry["attributes"] = {"named": prompt_attributes(prompts)[0], **attribute_rates(attrs)}
            if mode in expressions and not conjunctive(parse_expression(mode)):  # OR, NOT: not "all named"
                entry["attributes"] |= {"both_rate": None, "neither_rate": None}
        scenes = [r["scene"] for r in recs if "scene" in r]
        if scenes:
            entry["scenes"] = {"named": [" ".join(w for w in o if w) for o in named_objects(prompts)],
                               **scene_rates(scenes)}
            if mode == "or" or mode in expressions and not conjunctive(parse_expression(mode)):
                entry["scenes"] |= {"all_rate": None, "all_shapes_rate": None, "none_rate": None}
        digits = [r["digit"] for r in recs if "digit" in r]
        if digits:
            entry["digits"] = digit_summary([d["label"] for d in digits], [d["confidence"] for d in digits])
        out.append(entry)
    return out


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def _pm(stat: dict) -> str:
    return f"{stat['mean']:.2f}" + (f" ± {stat['std']:.2f}" if stat["std"] is not None else "")


def format_tables(groups: list[dict], clip_model: str | None) -> str:
    """The printed summary: one table per kind of metric present."""
    parts = []
    # The options that tell groups apart (those not the same in every group) label each row's mode.
    differ = [k for k in (groups[0]["options"] if groups else {}) if len({repr(g["options"][k]) for g in groups}) > 1]

    def head(g: dict) -> list[str]:
        mode = g["mode"] + "".join(f" {k}={g['options'][k]}" for k in differ)
        return [g["model"], mode, " | ".join(g["prompts"]), str(g["n"])]

    rows = [head(g) + [_pm(g["clip_min"]), _pm(g["clip_mean"])] for g in groups if "clip_min" in g]
    if rows:
        parts.append(f"CLIP score = max(100·cos, 0), {clip_model}; per image min and mean over its prompts, "
                     f"mean ± std over the group\n" + _table(["model", "mode", "prompts", "n", "min", "mean"], rows))

    def rate(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    rows = [head(g) + [rate(g["attributes"]["both_rate"]), rate(g["attributes"]["neither_rate"]),
                       ", ".join(f"{a} {r:.3f}" for a, r in g["attributes"]["rates"].items())]
            for g in groups if "attributes" in g]
    if rows:
        parts.append(
            "Attribute checker (embedded-shapes): fraction of images showing every / none of the named attributes\n"
            + _table(["model", "mode", "prompts", "n", "both", "neither", "per attribute"], rows)
        )
    rows = [head(g) + [rate(g["scenes"]["all_rate"]), rate(g["scenes"]["all_shapes_rate"]),
                       rate(g["scenes"]["none_rate"]), rate(g["scenes"]["unreadable_rate"]),
                       ", ".join(f"{a} {r:.3f}" for a, r in g["scenes"]["rates"].items())]
            for g in groups if "scenes" in g]
    if rows:
        parts.append(
            "Scene checker (embedded-scenes, GenEval-style): fraction of images holding every named object with "
            "its colour / every named shape / no named object / no scene at all\n"
            + _table(["model", "mode", "prompts", "n", "all", "all shapes", "none", "no scene", "per object"], rows)
        )
    rows = [head(g) + [f"{g['digits']['class_entropy']:.3f}", f"{g['digits']['confidence']:.3f}",
                       " ".join(f"{f:.2f}" for f in g["digits"]["class_fractions"])]
            for g in groups if "digits" in g]
    if rows:
        parts.append(
            "Digit classifier (embedded-digits): class entropy (nats, log 10 = 2.303 is uniform), mean confidence, "
            "fraction of each digit 0-9\n"
            + _table(["model", "mode", "models", "n", "entropy", "confidence", "fractions 0-9"], rows)
        )
    return "\n\n".join(parts)


@click.command("eval")
@click.argument("directory", metavar="DIR", type=click.Path(), callback=output_folder)
@click.option("--clip", "clip_model", default=None,
              help="CLIP model for the CLIP score: a local folder or a hub id (e.g. openai/clip-vit-large-patch14).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=f"Where to write the results [default: DIR/{EVAL_FILE}].")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Images per CLIP forward pass.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
@click.option(
    "--allow-pickle", is_flag=True, help="Also read non-safetensors CLIP weights (only for models you trust)."
)
@click.option("--quiet", is_flag=True, help="Print the tables only: no progress bar, no notes.")
@handle_errors
def evaluate(directory: Path, clip_model: str | None, json_path: Path | None, batch_size: int, device: str,
             allow_pickle: bool, quiet: bool) -> None:
    """Score the images of a `generate` or `sweep` output folder DIR.

    Prompt compositions: CLIP score (max(100·cos, 0) of CLIP image and text embeddings) of each image
    against each of its prompts, reported per image as min and mean over the prompts (needs --clip).
    embedded-shapes: the attribute checker (both / neither rate of the named colour and shape).
    embedded-scenes: the scene checker, GenEval-style (every named object with its colour, every
    named shape, none of them, no scene).
    embedded-digits: the digit classifier (class fractions, class entropy, confidence). Groups are
    (model, mode, prompts) and every sampling option (particles, density variance, ...); the table
    shows mean ± std, and DIR/eval.json has every number.

    \b
    Examples:
      superdiff eval superdiff-out
      superdiff eval runs/ --clip openai/clip-vit-large-patch14 --json runs-eval.json
      superdiff eval superdiff-out --clip ./clip-vit-base-patch32 --quiet
    """
    if quiet:
        silence_library_logs()
    if not directory.exists():
        raise BadInput(
            f"DIR {str(directory)!r} does not exist; pass a folder written by superdiff generate or superdiff sweep"
        )
    if not directory.is_dir():
        raise BadInput(
            f"DIR {str(directory)!r} is not a folder; pass the --out folder of superdiff generate or superdiff sweep"
        )
    if batch_size < 1:
        raise BadInput(f"--batch-size must be >= 1, got {batch_size}")
    gens = find_generated(directory)
    if not gens:
        raise BadInput(
            f"DIR {str(directory)!r} holds no generated images (PNGs with a JSON sidecar, here or in items/*/); "
            f"pass the --out folder of superdiff generate or superdiff sweep"
        )
    shapes = [g for g in gens if g.model == "embedded-shapes"]
    scenes = [g for g in gens if g.model == "embedded-scenes"]
    digits = [g for g in gens if g.model == "embedded-digits"]
    prompted = [g for g in gens if g.model not in EMBEDDED]
    if clip_model is None and not shapes and not scenes and not digits:
        models = ", ".join(sorted({g.model for g in prompted}))
        raise BadInput(
            f"the images in {str(directory)!r} come from {models}, which only the CLIP score can evaluate; pass "
            f"--clip with a CLIP model (a local folder, or a hub id such as openai/clip-vit-large-patch14)"
        )
    if clip_model is not None:
        check_clip_spec(clip_model)
    check_images(gens)
    json_path = json_path or directory / EVAL_FILE
    ensure_writable_dir(json_path.parent, "--json")
    dev = resolve_device(device)

    notes: list[str] = []
    records: dict[Path, dict] = {g.path: {} for g in gens}
    if clip_model is None and prompted:
        notes.append(
            f"CLIP score skipped for {len(prompted)} image(s) of {', '.join(sorted({g.model for g in prompted}))}: "
            f"no --clip given (pass --clip with a local CLIP folder or hub id to score them)"
        )
    if clip_model is not None and digits:
        notes.append(
            f"CLIP score does not apply to the {len(digits)} embedded-digits image(s): they compose models, not "
            "prompts"
        )
    if clip_model is not None and prompted + shapes + scenes:
        scorer = load_clip(clip_model, dev, allow_pickle)
        for path, rec in score_clip(prompted + shapes + scenes, scorer, batch_size, progress=not quiet).items():
            records[path]["clip"] = rec
    if shapes:
        for path, rec in score_shapes(shapes, notes).items():
            records[path]["attributes"] = rec
    if scenes:
        for path, rec in score_scenes(scenes, notes).items():
            records[path]["scene"] = rec
    if digits:
        for path, rec in score_digits(digits, dev, notes).items():
            records[path]["digit"] = rec

    groups = summarise(gens, records)
    report = {
        "dir": str(directory),
        "clip_model": clip_model,
        "clip_score": "max(100 * cos(image, text), 0)",
        "notes": notes,
        "groups": groups,
        "images": [{"file": g.file, "model": g.model, "mode": g.mode, "prompts": list(g.prompts), "seed": g.seed,
                    "options": g.options, **records[g.path]} for g in gens],
    }
    atomic_write_text(json_path, json.dumps(report, indent=1) + "\n")
    tables = format_tables(groups, clip_model)
    if tables:
        click.echo(tables)
    if not quiet:
        for note in notes:
            click.echo(f"note: {note}")
        click.echo(f"wrote {json_path} ({len(gens)} image(s), {len(groups)} group(s))")
