"""The sampling options' CLI flags, sweep keys, app fields and table columns, generated from the
fields of :class:`superdiff.options.SamplerOptions` (their default, allowed values and help). A
field added there appears in every layer here; nothing in this module names a field.

Every generator takes the options dataclass (``cls``), so a subclass with one more field (the
worked example in tests/test_options_layers.py) gets its flag, key, app field and column too.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable

import click

from superdiff.options import Option, SamplerOptions, option_fields

from .calls import FiniteFloat

__all__ = [
    "flag", "click_type", "sampler_click_options", "options_from_params", "sweep_keys", "parse_sweep_option",
    "sweep_options", "app_fields", "options_from_app", "option_columns", "recorded_options",
]  # fmt: skip

AUTO = "auto"  # the app's label for a field whose None means "the sampler's choice"


def flag(name: str) -> str:
    """A field's command-line flag: ``resample_threshold`` → ``--resample-threshold``."""
    return "--" + name.replace("_", "-")


def click_type(spec: Option) -> click.ParamType:
    """click's type for a field: Choice for choices, IntRange / FloatRange (finite) for ranges."""
    if spec.choices is not None:
        return click.Choice(spec.choices)
    if spec.kind is int:
        return click.IntRange(min=spec.low, max=spec.high, min_open=spec.low_open, max_open=spec.high_open)
    if spec.kind is float:
        return FiniteFloat(min=spec.low, max=spec.high, min_open=spec.low_open, max_open=spec.high_open)
    return click.STRING


def sampler_click_options(cls: type = SamplerOptions) -> Callable:
    """A decorator adding one click option per field of ``cls``: ``--name`` with the field's type,
    default and help (a bool field is ``--name/--no-name``). The command receives the values under
    the fields' names (read them back with :func:`options_from_params`)."""

    def decorate(command: Callable) -> Callable:
        for f, spec in reversed(list(option_fields(cls))):
            if spec.kind is bool and spec.choices is None:
                option = click.option(f"{flag(f.name)}/--no-{f.name.replace('_', '-')}", f.name, default=f.default,
                                      show_default=True, help=spec.help)
            elif f.default is None:
                option = click.option(flag(f.name), f.name, type=click_type(spec), default=None,
                                      help=f"{spec.help} [default: {spec.none}]")
            else:
                option = click.option(flag(f.name), f.name, type=click_type(spec), default=f.default,
                                      show_default=True, help=spec.help)
            command = option(command)
        return command

    return decorate


def options_from_params(params: dict[str, Any], cls: type = SamplerOptions) -> Any:
    """Take the fields of ``cls`` out of a command's ``params`` (removing them) and build the options."""
    return cls(**{f.name: params.pop(f.name) for f, _ in option_fields(cls) if f.name in params})


# --- sweep ---------------------------------------------------------------------------------------

def sweep_keys(cls: type = SamplerOptions) -> tuple[str, ...]:
    """The spec keys (JSONL keys, CSV columns) that set an option for a line: the fields' names."""
    return tuple(f.name for f, _ in option_fields(cls))


def _shown(value: Any) -> str:
    return repr(value) if isinstance(value, str) else json.dumps(value)


def parse_sweep_option(name: str, value: Any, cls: type = SamplerOptions) -> Any:
    """A spec line's value of option ``name`` as the field's kind: JSON values as given, CSV text
    converted (``"2"`` → 2, ``"0.5"`` → 0.5, ``"true"`` → True, ``""``/``"null"`` → None where
    None is allowed). Raises ``ValueError`` ("problem; fix") where it is not of that kind; the
    range and choices are checked by the dataclass."""
    spec = cls.__dataclass_fields__[name].metadata["option"]
    if isinstance(value, str) and spec.choices is None:
        text = value.strip()
        if spec.none is not None and text.lower() in ("", "null", "none"):
            return None
        if spec.kind is bool:
            if text.lower() in ("true", "false"):
                return text.lower() == "true"
        else:
            try:
                number = float(text) if spec.kind is float else int(text)
            except ValueError:
                number = None
            if number is not None:
                return number
        raise ValueError(f"{name} {_shown(value)} is not {spec.works()}; write e.g. {name} "
                         f"{_shown(cls.__dataclass_fields__[name].default)}")
    if spec.kind is int and isinstance(value, float) and math.isfinite(value) and value == int(value):
        return int(value)  # JSON 2.0
    return value


def sweep_options(rec: dict[str, Any], defaults: Any, cls: type = SamplerOptions) -> Any:
    """The options of one spec line: each key the line sets, parsed, over ``defaults`` (the command's
    flags); ``ValueError`` naming the key where a value does not work."""
    given = {name: parse_sweep_option(name, rec[name], cls) for name in sweep_keys(cls) if name in rec}
    try:
        return defaults.replace(**given) if given else defaults
    except ValueError as exc:  # "particles=0 is not valid; ..." as the line writes it
        raise ValueError(str(exc).replace("=", " ", 1)) from None


# --- app -----------------------------------------------------------------------------------------

def _label(name: str) -> str:
    return name.replace("_", " ")


def app_fields(gr: Any, cls: type = SamplerOptions) -> dict[str, Any]:
    """One gradio component per field, built from it: a Dropdown for choices (with "auto" where None
    means the sampler's choice), a Checkbox for a bool, a Number with the range's bounds otherwise
    (a Slider where the range is closed at both ends). ``elem_id`` is the field's name."""
    out = {}
    for f, spec in option_fields(cls):
        common = dict(label=_label(f.name), info=spec.help, elem_id=f.name.replace("_", "-"))
        if spec.choices is not None:
            choices = [AUTO, *spec.choices] if spec.none is not None else list(spec.choices)
            out[f.name] = gr.Dropdown(choices, value=AUTO if f.default is None else f.default, **common)
        elif spec.kind is bool:
            out[f.name] = gr.Checkbox(value=f.default, **common)
        elif spec.low is not None and spec.high is not None and not spec.low_open:
            out[f.name] = gr.Slider(spec.low, spec.high, value=f.default, step=1 if spec.kind is int else 0.05,
                                    **common)
        else:
            out[f.name] = gr.Number(value=f.default, precision=0 if spec.kind is int else None,
                                    minimum=spec.low, maximum=spec.high, **common)
    return out


def options_from_app(values: dict[str, Any], cls: type = SamplerOptions) -> Any:
    """The options from the app's fields (gradio hands numbers as floats or None, and "auto" for
    None); ``ValueError`` naming the field where a value does not work."""
    kwargs = {}
    for f, spec in option_fields(cls):
        if f.name not in values:
            continue
        value = values[f.name]
        if value == AUTO and spec.none is not None:
            value = None
        elif spec.kind is int and isinstance(value, float) and math.isfinite(value) and value == int(value):
            value = int(value)
        elif spec.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except ValueError as exc:  # named as the form labels it
        name = str(exc).split("=", 1)[0]
        raise ValueError(str(exc).replace(f"{name}=", f"{_label(name)} ", 1)) from None


# --- records: metrics.csv, eval ------------------------------------------------------------------

def option_columns(cls: type = SamplerOptions) -> tuple[str, ...]:
    """The columns of metrics.csv (and eval's group keys) that hold the options: the fields' names."""
    return tuple(f.name for f, _ in option_fields(cls))


def recorded_options(settings: dict[str, Any], cls: type = SamplerOptions) -> dict[str, Any]:
    """The options a sidecar or manifest line records, each missing one (an older record) at the
    default it then ran with."""
    out = {}
    for f, spec in option_fields(cls):
        value = settings.get(f.name, f.default if spec.absent is None else spec.absent)
        out[f.name] = f.default if value is None and spec.none is None else value  # None: not in use then
    return out
