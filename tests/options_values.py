"""Values of a sampling option other than its default, and values outside it, read from its
declaration (superdiff/options.py), for the tests that walk the fields."""

from __future__ import annotations

import math

from superdiff.options import Option


def other_value(spec: Option, default):
    """A valid value of a field other than its default, read from its declared choices or range."""
    if spec.choices is not None:
        return next(c for c in reversed(spec.choices) if c != default)  # the last: edm, not uniform (= linspace)
    if spec.kind is bool:
        return not default
    low = spec.low if spec.low is not None else default
    high = spec.high if spec.high is not None else low + 3
    value = spec.kind((low + high) / 2) if spec.kind is float else int(low) + 1
    return value if value != default else spec.kind(high)


def bad_values(spec: Option) -> list:
    """Values outside a field's declared kind, choices or range."""
    if spec.choices is not None:
        return ["no-such-choice", 1]
    if spec.kind is bool:
        return [1, "yes"]
    bad = ["1", True, math.nan, math.inf]
    if spec.low is not None:
        bad.append(spec.kind(spec.low) if spec.low_open else spec.low - 1)
    if spec.high is not None:
        bad.append(spec.kind(spec.high) if spec.high_open else spec.high + 1)
    return bad
