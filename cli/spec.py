"""Sweep specifications: CSV or JSONL rows of prompts × modes × seeds, expanded into items.

A row names its prompts (JSONL: ``"prompts": [...]``; CSV: a ``prompts`` column separated by
``|``, or columns ``prompt_1``, ``prompt_2``, …) and may set ``modes`` and ``seeds`` (lists, or
``|``-separated in CSV) and per-row settings (``model``, ``steps``, ``guidance``, ``temperature``,
``num_images``, ``log_weights``). Command-line options give the defaults.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import BadInput
from .models import EMBEDDED, model_problem

MODES = ("and", "or", "average", "sum")
SETTINGS = ("model", "steps", "guidance", "temperature", "num_images", "log_weights")


@dataclass(frozen=True)
class SweepItem:
    """One generation of the sweep; ``item_id`` is stable across runs, so runs can resume."""

    row: int
    prompts: tuple[str, ...]
    mode: str
    seed: int
    model: str
    steps: int
    guidance: float | None
    temperature: float
    num_images: int
    log_weights: tuple[float, ...] | None

    @property
    def item_id(self) -> str:
        digest = hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:8]
        return f"{self.row:04d}-{self.mode}-s{self.seed}-{digest}"

    def settings(self) -> dict[str, Any]:
        return asdict(self) | {"item_id": self.item_id}


class LineError(ValueError):
    """One malformed value of a spec line (or of a command-line default): "problem; fix"."""


def _split(value: Any) -> list[Any]:
    """A list as given (JSONL), or a ``|``-separated string (CSV, or a JSONL string)."""
    if isinstance(value, list):
        return value
    return [v.strip() for v in str(value).split("|") if v.strip() != ""]


def _shown(value: Any) -> str:
    """A spec value as its line wrote it: 'text' for strings, JSON (true, 1.5, [0, 1]) otherwise."""
    if isinstance(value, str) or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return repr(value)
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _number(value: Any) -> float:
    """A real number from JSON (not a bool) or from CSV text; raises TypeError/ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"{_shown(value)} is not a number")
    return float(value)


def _integer(name: str, value: Any, minimum: int | None = None) -> int:
    """A whole number (JSON int, integral float such as 2.0, or CSV text), not a bool."""
    try:
        number = _number(value)
    except (TypeError, ValueError):
        raise LineError(f"{name} {_shown(value)} is not a whole number; write e.g. {name} 4") from None
    if not math.isfinite(number) or number != int(number):
        raise LineError(f"{name} {_shown(value)} is not a whole number; write e.g. {name} {max(minimum or 0, 1)}")
    if minimum is not None and number < minimum:
        raise LineError(f"{name} must be >= {minimum}, got {int(number)}; use {minimum} or more")
    return int(number)


def _real(name: str, value: Any, positive: bool) -> float:
    """A finite number, > 0 (``positive``) or >= 0."""
    try:
        number = _number(value)
    except (TypeError, ValueError):
        number = None
    if number is None or not math.isfinite(number) or number < 0 or (positive and number == 0):
        bound = "> 0" if positive else ">= 0"
        raise LineError(f"{name} {_shown(value)} must be a finite number {bound}; write e.g. {name} {1.0 if positive else 7.5}")
    return number


def parse_prompts(rec: dict[str, Any]) -> list[str]:
    if "prompts" in rec:
        prompts = _split(rec["prompts"])
    else:
        keys = sorted((k for k in rec if k.startswith("prompt_")),
                      key=lambda k: int(k.split("_")[1]) if k.split("_")[1].isdigit() else 0)
        prompts = [rec[k] for k in keys]
    if not prompts:
        raise LineError("no prompts; give a 'prompts' list (JSONL) or prompt_1, prompt_2 columns (CSV)")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise LineError(f"prompt {i + 1} is {_shown(p)}; every prompt must be a non-empty string, e.g. \"a red circle\"")
    return prompts


def parse_modes(value: Any, name: str = "modes") -> list[str]:
    modes = _split(value)
    if not modes:
        raise LineError(f"{name} is empty; give at least one of {', '.join(MODES)}")
    for m in modes:
        if m not in MODES:
            raise LineError(f"unknown mode {m!r}; use {', '.join(MODES)}")
    if len(set(modes)) != len(modes):
        raise LineError(f"{name} {modes} repeats a mode; list each once")
    return modes


def parse_seeds(value: Any, name: str = "seeds") -> list[int]:
    seeds = [_integer("seed", s) for s in _split(value)]
    if not seeds:
        raise LineError(f"{name} is empty; give at least one seed, e.g. 0|1|2")
    if len(set(seeds)) != len(seeds):
        raise LineError(f"{name} {seeds} repeats a seed; list each once")
    return seeds


def parse_log_weights(value: Any, prompts: list[str], modes: list[str]) -> tuple[float, ...] | None:
    if value is None:
        return None
    raw = value if isinstance(value, list) else str(value).split("|")
    try:
        weights = tuple(_number(v) for v in raw)
    except (TypeError, ValueError):
        raise LineError(f"log_weights {_shown(value)} must be numbers, one per prompt, e.g. [0, 1.5]") from None
    if not all(math.isfinite(w) for w in weights):
        raise LineError(f"log_weights {_shown(value)} must be finite numbers, one per prompt")
    if len(weights) != len(prompts):
        raise LineError(f"log_weights has {len(weights)} value(s) for {len(prompts)} prompts; give one per prompt")
    other = [m for m in modes if m not in ("and", "or")]
    if other:
        raise LineError(f"log_weights apply to modes and/or, not {', '.join(other)}; drop log_weights or those modes")
    return weights


def check_defaults(defaults: dict[str, Any]) -> None:
    """The command-line defaults, checked once and named as options, before any line."""
    try:
        parse_modes(defaults["modes"], "--modes")
        parse_seeds(defaults["seeds"], "--seeds")
        if defaults.get("guidance") is not None:
            _real("--guidance", defaults["guidance"], positive=False)
        _real("--temperature", defaults["temperature"], positive=True)
        _integer("--steps", defaults["steps"], 1)
        _integer("--num-images", defaults["num_images"], 1)
    except LineError as exc:
        raise BadInput(str(exc)) from None
    if defaults["model"] != "embedded-digits":  # a digits default is checked with each line's model names
        problem = model_problem(str(defaults["model"]), allow_pickle=defaults.get("allow_pickle", False))
        if problem:
            raise BadInput(problem)


def parse_row(n: int, rec: dict[str, Any], defaults: dict[str, Any]) -> list[SweepItem]:
    """The items of spec line ``n``; raises :class:`LineError` for its first malformed value."""
    prompts = parse_prompts(rec)
    modes = parse_modes(rec.get("modes", rec.get("mode", defaults["modes"])))
    for m in modes:
        if m in ("and", "or") and len(prompts) < 2:
            raise LineError(f"mode {m!r} needs at least 2 prompts, got {len(prompts)}; add one or use mode average")
    seeds = parse_seeds(rec.get("seeds", rec.get("seed", defaults["seeds"])))
    steps = _integer("steps", rec.get("steps", defaults["steps"]), 1)
    num_images = _integer("num_images", rec.get("num_images", defaults["num_images"]), 1)
    guidance = rec.get("guidance", defaults["guidance"])
    guidance = None if guidance is None else _real("guidance", guidance, positive=False)
    temperature = _real("temperature", rec.get("temperature", defaults["temperature"]), positive=True)
    log_weights = parse_log_weights(rec.get("log_weights", defaults.get("log_weights")), prompts, modes)
    model = rec.get("model", defaults["model"])
    if not isinstance(model, str) or not model.strip():
        raise LineError(f"model {_shown(model)} must be a non-empty string: a folder, a hub id, or {', '.join(EMBEDDED)}")
    if model == "embedded-digits" or model != defaults["model"]:  # the default was checked once, as --model
        problem = model_problem(model, prompts, defaults.get("allow_pickle", False), option="model")
        if problem:
            raise LineError(problem)
    return [SweepItem(n, tuple(prompts), mode, seed, model, steps, guidance, temperature, num_images, log_weights)
            for mode in modes for seed in seeds]


def _rows(path: Path) -> tuple[list[tuple[int, dict[str, Any]]], list[str]]:
    """The spec's rows with their line numbers, and the lines that could not be read as rows."""
    if not path.is_file():
        raise BadInput(f"SPEC {str(path)!r} is not a file; pass a .csv or .jsonl sweep specification")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"SPEC {str(path)!r} could not be read as UTF-8 text ({exc}); pass a .csv or .jsonl file") from None
    rows: list[tuple[int, dict[str, Any]]] = []
    errors: list[str] = []
    if path.suffix.lower() in (".jsonl", ".json"):
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                errors.append(f"{path.name} line {n}: not valid JSON ({exc.msg}); each line must be one JSON object")
                continue
            if not isinstance(obj, dict):
                errors.append(f"{path.name} line {n}: each line must be a JSON object like {{\"prompts\": [\"a\", \"b\"]}}")
                continue
            rows.append((n, obj))
        return rows, errors
    if path.suffix.lower() != ".csv":
        raise BadInput(f"SPEC {str(path)!r} must end in .csv or .jsonl")
    reader = csv.DictReader(text.splitlines())
    if not reader.fieldnames:
        raise BadInput(f"{path.name}: empty CSV; the first line must name the columns, e.g. prompt_1,prompt_2,modes,seeds")
    for n, rec in enumerate(reader, start=2):
        if None in rec:
            errors.append(f"{path.name} line {n}: more values than columns ({len(reader.fieldnames)}); "
                          f"quote prompts that contain commas")
            continue
        rows.append((n, {k.strip(): v for k, v in rec.items() if k is not None and v is not None and v.strip() != ""}))
    return rows, errors


def load_spec(path: Path, defaults: dict[str, Any]) -> list[SweepItem]:
    """Parse and validate the whole specification before any work: every malformed line is
    reported, one per output line, as "FILE line N: problem; fix" (exit 2)."""
    check_defaults(defaults)
    rows, errors = _rows(path)
    if not rows and not errors:
        raise BadInput(f"SPEC {path.name} has no rows; add one line per prompt set")
    items: list[SweepItem] = []
    for n, rec in rows:
        try:
            items += parse_row(n, rec, defaults)
        except LineError as exc:
            errors.append(f"{path.name} line {n}: {exc}")
    if errors:
        errors.sort(key=lambda e: int(e.split(" line ", 1)[1].split(":", 1)[0]))
        raise BadInput("\n".join(errors))
    return items
