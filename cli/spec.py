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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import BadInput

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


def _split(value: Any) -> list[str]:
    if isinstance(value, list):
        return [str(v) for v in value]
    return [v.strip() for v in str(value).split("|") if v.strip() != ""]


def _fail(where: str, message: str) -> None:
    raise BadInput(f"{where}: {message}")


def _rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise BadInput(f"SPEC {str(path)!r} is not a file; pass a .csv or .jsonl sweep specification")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                _fail(f"{path.name} line {n}", f"not valid JSON ({exc.msg}); each line must be one JSON object")
            if not isinstance(obj, dict):
                _fail(f"{path.name} line {n}", "each line must be a JSON object like {\"prompts\": [\"a\", \"b\"]}")
            rows.append((n, obj))
        return rows
    if path.suffix.lower() != ".csv":
        raise BadInput(f"SPEC {str(path)!r} must end in .csv or .jsonl")
    reader = csv.DictReader(text.splitlines())
    if not reader.fieldnames:
        _fail(path.name, "empty CSV; the first line must name the columns, e.g. prompt_1,prompt_2,modes,seeds")
    rows = []
    for n, rec in enumerate(reader, start=2):
        if None in rec:
            _fail(f"{path.name} line {n}", f"more values than columns ({len(reader.fieldnames)}); quote prompts that contain commas")
        rows.append((n, {k.strip(): v for k, v in rec.items() if v is not None and v.strip() != ""}))
    return rows


def load_spec(path: Path, defaults: dict[str, Any]) -> list[SweepItem]:
    """Parse and validate the whole specification before any work; errors give the line number."""
    items: list[SweepItem] = []
    rows = _rows(path)
    if not rows:
        raise BadInput(f"SPEC {path.name} has no rows")
    for n, rec in rows:
        where = f"{path.name} line {n}"
        if "prompts" in rec:
            prompts = _split(rec["prompts"])
        else:
            keys = sorted((k for k in rec if k.startswith("prompt_")), key=lambda k: int(k.split("_")[1]) if k.split("_")[1].isdigit() else 0)
            prompts = [str(rec[k]) for k in keys]
        if not prompts or any(not p.strip() for p in prompts):
            _fail(where, "needs non-empty prompts (a 'prompts' field, or prompt_1, prompt_2 columns)")
        modes = _split(rec.get("modes", rec.get("mode", defaults["modes"])))
        for m in modes:
            if m not in MODES:
                _fail(where, f"unknown mode {m!r}; use {', '.join(MODES)}")
            if m in ("and", "or") and len(prompts) < 2:
                _fail(where, f"mode {m!r} needs at least 2 prompts, got {len(prompts)}")
        try:
            seeds = [int(s) for s in _split(rec.get("seeds", rec.get("seed", defaults["seeds"])))]
            steps = int(rec.get("steps", defaults["steps"]))
            guidance = rec.get("guidance", defaults["guidance"])
            guidance = None if guidance is None else float(guidance)
            temperature = float(rec.get("temperature", defaults["temperature"]))
            num_images = int(rec.get("num_images", defaults["num_images"]))
            lw = rec.get("log_weights", defaults.get("log_weights"))
            log_weights = None if lw is None else tuple(float(v) for v in (lw if isinstance(lw, list) else str(lw).split("|")))
        except (TypeError, ValueError) as exc:
            _fail(where, f"a setting is not a number ({exc})")
        if steps < 1 or num_images < 1 or temperature <= 0 or (guidance is not None and guidance < 0) or not seeds:
            _fail(where, "steps and num_images must be >= 1, temperature > 0, guidance >= 0, and at least one seed")
        if log_weights is not None and len(log_weights) != len(prompts):
            _fail(where, f"log_weights has {len(log_weights)} values for {len(prompts)} prompts")
        model = str(rec.get("model", defaults["model"]))
        for mode in modes:
            for seed in seeds:
                items.append(SweepItem(n, tuple(prompts), mode, seed, model, steps, guidance, temperature, num_images, log_weights))
    ids = [i.item_id for i in items]
    if len(set(ids)) != len(ids):
        raise BadInput(f"SPEC {path.name} repeats an item (same prompts, mode, seed and settings on one line)")
    return items
