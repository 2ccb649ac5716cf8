"""The sampling options, declared once: one frozen dataclass whose fields carry their default,
their allowed values, their help text and their check.

Everything else is derived from the fields: the pipelines take them as keyword arguments (forwarded
into :class:`SamplerOptions`), the CLI's flags, the sweep's keys and the app's fields are generated
from them (``superdiff_cli.options``), and :meth:`SamplerOptions.record` is what a sidecar keeps.
A new option is one field here plus its implementation. This module imports no CLI or diffusers
code: the math core depends on it, not the other way round.
"""

from __future__ import annotations

import difflib
import math
import numbers
from dataclasses import dataclass, field, fields, replace
from typing import Any, Iterator

from .time_grids import GRIDS

__all__ = [
    "Option", "SamplerOptions", "option_fields", "KERNEL_VARIANCES", "DENSITY_VARIANCES", "DEFAULT_DENSITY_VARIANCE",
    "TIME_GRIDS", "check_particles_apply", "option_spec",
]  # fmt: skip

#: The reverse kernel's variances by name (:func:`superdiff.density.reverse_kernel_variance`).
KERNEL_VARIANCES = ("posterior", "forward", "euler")
#: The estimator's and the step's variances: one of the kernel's for all models, or "tweedie", each
#: model's own per sample (:func:`superdiff.density.tweedie_density_variance`).
DENSITY_VARIANCES = (*KERNEL_VARIANCES, "tweedie")
#: "scheduler": a pipeline's scheduler's own timesteps (diffusers' ``set_timesteps``); the others are
#: :data:`superdiff.time_grids.GRIDS` between the same ends.
TIME_GRIDS = ("scheduler", *GRIDS)


@dataclass(frozen=True)
class Option:
    """What a field of :class:`SamplerOptions` accepts: a ``kind`` (bool, int, float or str),
    ``choices`` or a range (``low``/``high``, open or closed), whether None is allowed (``none``:
    what None means), and ``note``, appended to the error's "what works". ``absent``: the value a
    record written before the field (or before its default changed) ran with, where not the default."""

    help: str
    kind: type = str
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    none: str | None = None
    note: str = ""
    absent: Any = None  # what a record (sidecar, manifest) without this field ran with; None: the default

    def works(self) -> str:
        """What values work, in words: "one of (...)", "an integer >= 1", "a number in (0, 1]"."""
        if self.choices is not None:
            text = f"one of {self.choices}"
        elif self.kind is bool:
            text = "True or False"
        else:
            what = "an integer" if self.kind is int else "a number"
            if self.low is not None and self.high is not None:
                left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
                text = f"{what} in {left}{self.low:g}, {self.high:g}{right}"
            elif self.low is not None:
                text = f"{what} {'>' if self.low_open else '>='} {self.low:g}"
            elif self.high is not None:
                text = f"{what} {'<' if self.high_open else '<='} {self.high:g}"
            else:
                text = f"a finite {'integer' if self.kind is int else 'number'}"
        if self.none is not None:
            text += f" or None ({self.none})"
        return text + self.note

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` is of this option's kind and within its choices or range."""
        if value is None:
            return self.none is not None
        if self.choices is not None:
            return isinstance(value, str) and value in self.choices
        if self.kind is bool:
            return isinstance(value, bool)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral if self.kind is int else numbers.Real):
            return False
        if not math.isfinite(value):
            return False
        low_ok = self.low is None or (value > self.low if self.low_open else value >= self.low)
        high_ok = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return low_ok and high_ok

    def check(self, name: str, value: Any) -> None:
        """Raise ``ValueError`` naming the field, the value and what works, unless it is accepted."""
        if not self.accepts(value):
            raise ValueError(f"{name}={value!r} is not valid; use {self.works()}")


def _option(default: Any, help: str, **spec: Any) -> Any:
    return field(default=default, metadata={"option": Option(help, **spec)})


#: K for an expression that corrects (a product, NOT, soft-min, annealing) where ``particles`` is not given:
#: the K of smallest mean error against exact targets at 25 and 50 steps, measured by ``bench/particles.py``
#: (docs/benchmarks/particles.md).
DEFAULT_CORRECTING_PARTICLES = 4


@dataclass(frozen=True)
class SamplerOptions:
    """The options of the sampler that every layer exposes (pipelines, CLI flags, sweep keys, the
    app, sidecars). Each field is checked when the object is built: ``ValueError`` names the field,
    the value given and what works."""

    particles: int | None = _option(
        None, "Weighted particles per image for an expression's Feynman–Kac corrections; each image is one drawn by "
              f"weight from its group of K, and costs K samples. Default: {DEFAULT_CORRECTING_PARTICLES} for an "
              "expression that corrects, else 1.",
        kind=int, low=1, none=f"{DEFAULT_CORRECTING_PARTICLES} for an expression that corrects, else 1",
        note=" (1: no weighted particles)", absent=1,
    )
    resample_threshold: float = _option(
        0.5, "A group of particles resamples when its effective sample size falls below this × particles.",
        kind=float, low=0, high=1, low_open=True,
        note=": a group resamples when its effective sample size falls below threshold × particles (e.g. 0.5)",
    )
    variance: str | None = _option(
        None, "The step's kernel variance: posterior (DDPM's β̃), forward, euler (Thm. 2) or tweedie (per sample, "
              "the exact transition's to first order).",
        choices=DENSITY_VARIANCES,
        none="the sampler's choice: 'posterior', or 'forward' for an expression that corrects",
    )
    density_variance: str = _option(
        "tweedie", "The density estimator's kernel variance: tweedie reads each model's own from the steps; "
                   "forward, posterior, euler: one for all.",
        choices=DENSITY_VARIANCES,
        note=" ('tweedie' gives each model its own variance, read for free from the steps)",
    )
    time_grid: str = _option(
        "scheduler", "The times the steps visit: the scheduler's own timesteps, or a superdiff grid (uniform in t, "
                     "quadratic, uniform in log-SNR, EDM's ρ = 7) between the same ends.",
        choices=TIME_GRIDS,
    )
    final_denoise: bool = _option(
        True, "Land the last step on σ = 0 (the denoised sample), as diffusers' schedulers do; without it the last "
              "step lands on the grid's last time (still a little noisy), the densities tracked to it.",
        kind=bool,
    )

    def __post_init__(self) -> None:
        for f, spec in option_fields(type(self)):
            spec.check(f.name, getattr(self, f.name))

    @classmethod
    def from_kwargs(cls, options: "SamplerOptions | None" = None, **kwargs: Any) -> "SamplerOptions":
        """The options from keyword arguments, the others from ``options`` (the object whole; a
        pipeline's ``options=``) or at their defaults; an unknown name is a ``TypeError`` naming the
        nearest known one."""
        if options is not None:
            if not isinstance(options, cls):
                raise TypeError(f"options={options!r} is not a {cls.__name__}; pass {cls.__name__}(...) or the "
                                f"options as keyword arguments ({', '.join(cls.names())})")
            return options.replace(**kwargs)
        names = cls.names()
        for key in kwargs:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise TypeError(f"{key!r} is not a sampling option; {hint}the options are {', '.join(names)}")
        return cls(**kwargs)

    def for_combiner(self, combiner: Any) -> "SamplerOptions":
        """These options for one composition: ``particles=None`` becomes
        :data:`DEFAULT_CORRECTING_PARTICLES` where the composition carries Feynman–Kac weights and 1
        elsewhere; a K given is checked against it (:func:`check_particles_apply`). Every layer calls
        this once the combiner is known, so sidecars record the K that ran."""
        if self.particles is None:
            corrects = getattr(combiner, "needs_scores", False)
            return replace(self, particles=DEFAULT_CORRECTING_PARTICLES if corrects else 1)
        check_particles_apply(self.particles, combiner)
        return self

    def replace(self, **changes: Any) -> "SamplerOptions":
        """A copy with ``changes`` (checked as at construction)."""
        type(self).from_kwargs(**changes)  # names checked first, with their hint
        return replace(self, **changes)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f, _ in option_fields(cls))

    def kwargs(self) -> dict[str, Any]:
        """The fields as keyword arguments (a pipeline's or :meth:`from_kwargs`')."""
        return {name: getattr(self, name) for name in self.names()}

    def record(self) -> dict[str, Any]:
        """The fields as JSON-safe values, for sidecars and manifests."""
        out: dict[str, Any] = {}
        for f, spec in option_fields(type(self)):
            value = getattr(self, f.name)
            if value is not None and spec.choices is None:
                value = spec.kind(value)  # numpy scalars and the like become plain Python numbers
            out[f.name] = value
        return out


def option_fields(cls: type = SamplerOptions) -> Iterator[tuple[Any, Option]]:
    """Each field of the options dataclass ``cls`` with its :class:`Option`, in declaration order."""
    for f in fields(cls):
        spec = f.metadata.get("option")
        if spec is not None:
            yield f, spec


def option_spec(name: str, cls: type = SamplerOptions) -> Option:
    """The :class:`Option` of field ``name`` (its check, for a layer that takes the value alone)."""
    return cls.__dataclass_fields__[name].metadata["option"]


#: The estimator's variance unless one is named (the field's default).
DEFAULT_DENSITY_VARIANCE: str = SamplerOptions.__dataclass_fields__["density_variance"].default


def check_particles_apply(particles: int, combiner: Any) -> None:
    """Weighted particles only where the composition carries Feynman–Kac weights: without them every
    particle weighs the same, no group ever resamples, and the image drawn from K is distributed as
    one sample at K times the cost. ``ValueError`` otherwise, before any work."""
    if particles > 1 and not getattr(combiner, "needs_scores", False):
        raise ValueError(
            f"particles={particles} weight an expression's Feynman–Kac corrections, and this composition has none "
            f"(a mode, or an expression of AND/OR/leaves only): each image would cost {particles} samples for the "
            "same result; write an expression that corrects (a product *, not(...) or softmin(...)), e.g. "
            '"red" * "circle", or use particles=1'
        )
