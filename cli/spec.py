"""Sweep specifications: CSV or JSONL rows of prompts × modes × seeds, expanded into items.

A row names its prompts (JSONL: ``"prompts": [...]``; CSV: a ``prompts`` column separated by
``|``, or columns ``prompt_1``, ``prompt_2``, …) and may set ``modes`` and ``seeds`` (lists, or
``|``-separated in CSV) and per-row settings (``model``, ``steps``, ``guidance``, ``temperature``,
``num_images``, ``log_weights``). Command-line options give the defaults.

A row may give an ``expression`` (the syntax of :mod:`superdiff.expression_syntax`) instead of
prompts and modes: its leaves are the item's prompts, its mode is "expression". Temperature and
log-weights are then node options of the expression, so a row giving them beside it is refused.

A row may also set any sampling option by its name (``particles``, ``resample_threshold``,
``density_variance``, ...: the fields of :class:`superdiff.options.SamplerOptions`, whose flags
give the defaults); ``particles`` above 1 needs an expression that corrects (Feynman–Kac).
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from superdiff.combine import MODES, Combiner, make_combiner
from superdiff.expression_syntax import ExpressionSyntaxError, parse_expression
from superdiff.expressions import compile_expression, describe
from superdiff.limits import guidance_problem
from superdiff.options import SamplerOptions

from .composition import expression_items, vocabulary_problem
from .errors import BadInput
from .limits import (
    control_character_problem,
    images_problem,
    model_folder_problem,
    network_rows_problem,
    seed_problem,
    steps_problem,
)
from .models import EMBEDDED, model_problem
from .options import sweep_keys, sweep_options

SETTINGS = ("model", "steps", "guidance", "temperature", "num_images", "log_weights", *sweep_keys())
KEYS = ("prompts", "modes", "mode", "expression", "seeds", "seed", *SETTINGS)
PROMPT_COLUMN = re.compile(r"prompt_[0-9]+")


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
    expression: str | None = None  # its canonical text (describe); the prompts are its leaves
    options: SamplerOptions = field(default_factory=SamplerOptions)

    def __post_init__(self) -> None:  # particles=None: the composition's K, so the id and the run agree
        if self.options.particles is None:
            object.__setattr__(self, "options", self.options.for_combiner(self.combiner()))

    @property
    def particles(self) -> int:
        return self.options.particles

    def _fields(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "options"}

    @property
    def item_id(self) -> str:
        """Stable across runs and releases: an item without an expression and with the default options
        has the id of the release before expressions; ``particles`` enters with an expression (as it
        did), every other option only where it is not its default."""
        fields = self._fields()
        if self.expression is None and self.particles == 1:  # the ids of items from before expressions
            del fields["expression"]
        else:
            fields["particles"] = self.particles
        defaults = SamplerOptions().record()
        fields |= {k: v for k, v in self.options.record().items() if k != "particles" and v != defaults[k]}
        digest = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:8]
        return f"{self.row:04d}-{self.mode}-s{self.seed}-{digest}"

    def settings(self) -> dict[str, Any]:
        """What the item's sidecars and manifest line record: its fields, every sampling option, its id."""
        return self._fields() | self.options.record() | {"item_id": self.item_id}

    def combiner(self) -> Combiner:
        """The item's combiner (its line was checked by building it: :func:`parse_row`)."""
        if self.expression is not None:
            return compile_expression(parse_expression(self.expression), self.prompts)
        return make_combiner(self.mode, len(self.prompts), self.temperature, self.log_weights, what="prompts")


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
    """A whole number (JSON int, integral float such as 2.0, or CSV text), not a bool. Integers are
    taken exactly (through a float, seeds above 2**53 would be rounded to another seed)."""
    exact = value if isinstance(value, int) and not isinstance(value, bool) else None
    if isinstance(value, str):
        try:
            exact = int(value.strip())
        except ValueError:
            exact = None
    if exact is not None:
        if minimum is not None and exact < minimum:
            raise LineError(f"{name} must be >= {minimum}, got {exact}; use {minimum} or more")
        return exact
    try:
        number = _number(value)
    except (TypeError, ValueError):
        raise LineError(f"{name} {_shown(value)} is not a whole number; write e.g. {name} 4") from None
    if not math.isfinite(number) or number != int(number):
        raise LineError(f"{name} {_shown(value)} is not a whole number; write e.g. {name} {max(minimum or 0, 1)}")
    if minimum is not None and number < minimum:
        raise LineError(f"{name} must be >= {minimum}, got {int(number)}; use {minimum} or more")
    return int(number)


def _parsed(name: str, value: Any) -> float:
    """A number as the line writes it (JSON or CSV text); its range is checked where it is used."""
    try:
        return _number(value)
    except (TypeError, ValueError):
        raise LineError(f"{name} {_shown(value)} is not a number; write e.g. {name} 1.0") from None


def _real(name: str, value: Any, minimum: float) -> float:
    """A finite number >= ``minimum`` (the guidance scale, which no combiner owns)."""
    number = _parsed(name, value)
    if not math.isfinite(number) or number < minimum:
        raise LineError(f"{name} {_shown(value)} must be a finite number >= {minimum:g}; write e.g. {name} 7.5")
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
            raise LineError(
                f'prompt {i + 1} is {_shown(p)}; every prompt must be a non-empty string, e.g. "a red circle"'
            )
        problem = control_character_problem(p, f"prompt {i + 1}")
        if problem:
            raise LineError(problem)
    return prompts


def unknown_key_problems(keys: list[str], what: str = "key") -> list[str]:
    """One "problem; fix" per key that is not a spec key (a misspelling such as ``guidence`` would
    otherwise be ignored and the default used), with the nearest known key where one is close."""
    problems = []
    for key in keys:
        if key in KEYS or PROMPT_COLUMN.fullmatch(key):
            continue
        close = difflib.get_close_matches(key, [*KEYS, "prompt_1"], n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        problems.append(
            f"unknown {what} {key!r}; {hint}the known ones are {', '.join(KEYS)} and prompt_1, prompt_2, ..."
        )
    return problems


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


def _seed(value: Any) -> int:
    """A whole number that torch.Generator takes as a distinct seed (see cli/limits.py)."""
    seed = _integer("seed", value)
    problem = seed_problem(seed, "seed")
    if problem:
        raise LineError(problem)
    return seed


def parse_seeds(value: Any, name: str = "seeds") -> list[int]:
    seeds = [_seed(s) for s in _split(value)]
    if not seeds:
        raise LineError(f"{name} is empty; give at least one seed, e.g. 0|1|2")
    if len(set(seeds)) != len(seeds):
        raise LineError(f"{name} {seeds} repeats a seed; list each once")
    return seeds


def parse_log_weights(value: Any) -> tuple[float, ...] | None:
    """A line's log_weights as numbers (the combiner checks that they are finite and one per prompt)."""
    if value is None:
        return None
    raw = value if isinstance(value, list) else str(value).split("|")
    try:
        return tuple(_number(v) for v in raw)
    except (TypeError, ValueError):
        raise LineError(f"log_weights {_shown(value)} must be numbers, one per prompt, e.g. [0, 1.5]") from None


def check_combiners(
    prompts: list[str], modes: list[str], temperature: float, log_weights: tuple[float, ...] | None
) -> None:
    """Build each mode's combiner for the line: the combiner checks its own values (two prompts or
    more for and/or, a temperature > 0, log-weights one per prompt and only for and/or)."""
    for mode in modes:
        try:
            make_combiner(mode, len(prompts), temperature, log_weights, what="prompts")
        except ValueError as exc:
            raise LineError(str(exc)) from None


def check_defaults(defaults: dict[str, Any]) -> None:
    """The command-line defaults, checked once and named as options, before any line."""
    try:
        parse_modes(defaults["modes"], "--modes")
        parse_seeds(defaults["seeds"], "--seeds")
        if defaults.get("guidance") is not None:
            _real("--guidance", defaults["guidance"], minimum=0.0)
        _integer("--steps", defaults["steps"], 1)
        _integer("--num-images", defaults["num_images"], 1)
    except LineError as exc:
        raise BadInput(str(exc)) from None
    if defaults["model"] != "embedded-digits":  # a digits default is checked with each line's model names
        model = str(defaults["model"])
        problem = (
            model_folder_problem(model)
            or model_problem(model, allow_pickle=defaults.get("allow_pickle", False))
            or steps_problem(int(defaults["steps"]), model, None)
            or images_problem(int(defaults["num_images"]), None, None, model, options=("--num-images", "", ""),
                              particles=defaults.get("options", SamplerOptions()).particles or 1)
        )
        if problem:
            raise BadInput(problem)


def model_limit_problem(model: str, prompts: list[str], steps: int, num_images: int, rec: dict[str, Any],
                        defaults: dict[str, Any], particles: int = 1) -> str | None:
    """The checks of a line's model that need its config files (steps up to its scheduler's
    training timesteps, one batch of images within the caps), made where the line sets the model or
    the value: the defaults' own were made once, as options, by check_defaults."""
    own_model = model == "embedded-digits" or model != defaults["model"]
    items = prompts if model == "embedded-digits" else None
    if own_model or "steps" in rec:
        problem = steps_problem(steps, model, items, option="steps")
        if problem:
            return problem
    if own_model or "num_images" in rec or "particles" in rec or particles > 1:  # > 1: given or by the expression
        return images_problem(num_images, None, None, model, items, options=("num_images", "", ""),
                              particles=particles, particles_option="particles")
    return None


def parse_expression_row(rec: dict[str, Any], model: Any) -> tuple[list[str], str]:
    """A row's expression: its leaves (the prompts, "" the unconditional model; checked for
    ``model`` as ``generate --expr`` checks them) and its canonical text; the keys it replaces must
    be absent, and a syntax error names its position."""
    text = rec["expression"]
    if not isinstance(text, str) or not text.strip():
        example = """'"red" & "circle"'"""
        raise LineError(f"expression {_shown(text)} must be a non-empty string; write e.g. {example}")
    clash = [k for k in rec if k in ("prompts", "modes", "mode", "temperature", "log_weights") or
             PROMPT_COLUMN.fullmatch(k)]
    if clash:
        raise LineError(f"expression names the prompts and how to compose them; drop {', '.join(clash)} from this "
                        "line (temperature and weights are node options, e.g. or(\"a\", \"b\")[temperature=2])")
    try:
        node = parse_expression(text)
    except ExpressionSyntaxError as exc:  # one line per problem: no caret picture
        raise LineError(f"expression {text!r}: {exc.problem} at position {exc.position}; correct it there "
                        '(the syntax is in the README, "Expressions")') from None

    try:
        prompts = expression_items(node, model)
    except BadInput as exc:
        raise LineError(exc.message) from None
    try:  # the library's checks of the tree (degrees, corrections under an And, its gain), as generate makes them
        compile_expression(node, prompts)
    except ValueError as exc:
        raise LineError(f"expression {text!r}: {exc}") from None
    return prompts, describe(node)


def limits_problem(item: SweepItem) -> str | None:
    """The library's ranges for one line's item (:mod:`superdiff.limits`): guidance times the
    composition's gain, and the rows of one network call."""
    problem = guidance_problem(item.guidance, float(getattr(item.combiner(), "gain", 1.0)), "guidance")
    return problem or network_rows_problem(item.model, item.num_images, item.particles, len(item.prompts),
                                           item.guidance, options=("num_images", "particles"))


def parse_row(n: int, rec: dict[str, Any], defaults: dict[str, Any]) -> list[SweepItem]:
    """The items of spec line ``n``; raises :class:`LineError` for its first malformed value."""
    expression = None
    if "expression" in rec:
        prompts, expression = parse_expression_row(rec, rec.get("model", defaults["model"]))
        modes, temperature, log_weights = ["expression"], 1.0, None
    else:
        prompts = parse_prompts(rec)
        modes = parse_modes(rec.get("modes", rec.get("mode", defaults["modes"])))
        temperature = _parsed("temperature", rec.get("temperature", defaults["temperature"]))
        log_weights = parse_log_weights(rec.get("log_weights", defaults.get("log_weights")))
        check_combiners(prompts, modes, temperature, log_weights)
    try:
        options = sweep_options(rec, defaults.get("options", SamplerOptions()))
        combiner = (compile_expression(parse_expression(expression), prompts) if expression is not None
                    else make_combiner(modes[0], len(prompts), temperature, log_weights, what="prompts"))
        options = options.for_combiner(combiner)
    except ValueError as exc:
        raise LineError(str(exc).replace("=", " ", 1) if str(exc).startswith("particles=") else str(exc)) from None
    particles = options.particles
    seeds = parse_seeds(rec.get("seeds", rec.get("seed", defaults["seeds"])))
    steps = _integer("steps", rec.get("steps", defaults["steps"]), 1)
    num_images = _integer("num_images", rec.get("num_images", defaults["num_images"]), 1)
    guidance = rec.get("guidance", defaults["guidance"])
    guidance = None if guidance is None else _real("guidance", guidance, minimum=0.0)
    model = rec.get("model", defaults["model"])
    if not isinstance(model, str) or not model.strip():
        raise LineError(
            f"model {_shown(model)} must be a non-empty string: a folder, a hub id, or {', '.join(EMBEDDED)}"
        )
    if model == "embedded-digits" or model != defaults["model"]:  # the default was checked once, as --model
        problem = (
            model_folder_problem(model, option="model")  # first: no need to look inside a folder that is no model
            or model_problem(model, prompts, defaults.get("allow_pickle", False), option="model")
        )
    else:  # the default model, checked once as --model: the line's words, as generate checks them
        problem = vocabulary_problem(model, prompts)
    if problem:
        raise LineError(problem)
    problem = model_limit_problem(model, prompts, steps, num_images, rec, defaults, particles)
    if problem:
        raise LineError(problem)
    items = [SweepItem(n, tuple(prompts), mode, seed, model, steps, guidance, temperature, num_images, log_weights,
                       expression, options)
             for mode in modes for seed in seeds]
    for item in items[:: len(seeds)]:  # one per mode: the seed changes neither check
        problem = limits_problem(item)
        if problem:
            raise LineError(problem)
    return items


def _csv_rows(path: Path, text: str) -> tuple[list[tuple[int, dict[str, Any]]], list[str]]:
    """The rows of a CSV spec by the line each starts on (a quoted prompt may span lines), and its
    problems: unknown columns (once, as line 1), rows with more values than columns, and a quote
    that is never closed, named with the line it opens on (csv would otherwise swallow the rest of
    the file into one prompt, reported as a row with too few prompts)."""
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    rows: list[tuple[int, dict[str, Any]]] = []
    errors: list[str] = []
    try:
        fieldnames = reader.fieldnames
    except csv.Error as exc:
        raise BadInput(f"{path.name} line 1: the column names are not valid CSV ({exc}); "
                       f"write e.g. prompt_1,prompt_2,modes") from None
    if not fieldnames:
        raise BadInput(
            f"{path.name}: empty CSV; the first line must name the columns, e.g. prompt_1,prompt_2,modes,seeds"
        )
    errors += [
        f"{path.name} line 1: {p}"
        for p in unknown_key_problems([k.strip() for k in fieldnames if k.strip()], "column")
    ]
    lines = io.StringIO(text, newline="").readlines()  # as csv counts them in reader.line_num
    ended = reader.line_num  # the last line of the previous row; the next row starts after it
    while True:
        start = next((i for i in range(ended + 1, len(lines) + 1) if lines[i - 1].strip()), ended + 1)
        try:
            rec = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            if "unexpected end of data" in str(exc):
                errors.append(f"{path.name} line {start}: a quote (\") opens here and is never closed; close it, "
                              f"or write a quote inside a quoted prompt as \"\"")
            else:
                errors.append(
                    f"{path.name} line {start}: not valid CSV ({exc}); quote prompts that contain commas or quotes, "
                    f'e.g. "a red, round circle"'
                )
            break  # the reader cannot tell where the next row starts
        ended = reader.line_num
        if None in rec:
            errors.append(f"{path.name} line {start}: more values than columns ({len(fieldnames)}); "
                          f"quote prompts that contain commas")
            continue
        rows.append(
            (start, {k.strip(): v for k, v in rec.items() if k is not None and v is not None and v.strip() != ""})
        )
    return rows, errors


def _rows(path: Path) -> tuple[list[tuple[int, dict[str, Any]]], list[str]]:
    """The spec's rows with their line numbers, and the lines that could not be read as rows. A
    UTF-8 byte-order mark (spreadsheets write one) is accepted."""
    if not path.is_file():
        raise BadInput(f"SPEC {str(path)!r} is not a file; pass a .csv or .jsonl sweep specification")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(
            f"SPEC {str(path)!r} could not be read as UTF-8 text ({exc}); pass a .csv or .jsonl file"
        ) from None
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
                errors.append(f'{path.name} line {n}: each line must be a JSON object like {{"prompts": ["a", "b"]}}')
                continue
            unknown = unknown_key_problems(list(obj))
            if unknown:
                errors += [f"{path.name} line {n}: {p}" for p in unknown]
                continue
            rows.append((n, obj))
        return rows, errors
    if path.suffix.lower() != ".csv":
        raise BadInput(f"SPEC {str(path)!r} must end in .csv or .jsonl")
    return _csv_rows(path, text)


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
