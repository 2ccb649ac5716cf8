"""Composition expressions: trees of models (leaves) under OR, AND, products, soft-min/max and NOT.

An expression is a frozen tree of nodes whose leaves name the models of one denoiser (prompts of one
network, or separately trained models). Every node defines a *potential* ``φ`` over the noisy
marginals of its children, a function of their log-densities ``ℓ_c = log q_c``; its score ``∇φ =
Σ_c Φ_c ∇φ_c`` (``Φ_c = ∂φ/∂φ_c``) drives the step, so every node turns its children's weights into
the leaves' weights κ, and a whole tree still costs one batched network call per step:

========================  =========================================  ==============================
node                      potential φ                                weights Φ over the children
========================  =========================================  ==============================
``Or(T, ℓ)``              ``(1/T) log Σ_c exp(T φ_c + ℓ_c)``          ``softmax(T φ + ℓ)`` (SuperDiff
                          (T = 1: the mixture ``Σ e^{ℓ_c} q_c``)      OR, Algorithm 1 / Prop. 4)
``And(ℓ)``                none: a control, not a density. κ makes     solved per step from the Itô
                          ``φ_c − ℓ_c`` change equally (Prop. 6)      system (Eqs. 75–78)
``Product(β)``            ``Σ_c β_c φ_c`` (``Π q_c^β_c``;             ``β``
                          one child: annealing ``q^β``)
``SoftMax(λ)``            ``(1/λ) log Σ_c exp(λ φ_c)``                ``softmax(λ φ)``
``SoftMin(λ)``            ``−(1/λ) log Σ_c exp(−λ φ_c)``              ``softmax(−λ φ)``
``Not(c, ref, γ)``        ``(1+γ) φ_ref − γ φ_c``                     ``(1+γ, −γ)``
========================  =========================================  ==============================

SoftMax / SoftMin are the power-norm ("Dombi") disjunction and conjunction of Blohm & Garg (ICLR
2026); Not is their negation against a reference (e.g. the unconditional model), and with
``correct=False`` it is Composable Diffusion's negative weight (Liu et al. 2022).

**Feynman–Kac corrections** (Skreta et al., ICML 2025, Prop. 3.1 and App. D). Driving the reverse
SDE ``dx = (−f + g² ∇φ) dτ + g dW`` by the score of an unnormalised potential ``φ`` samples
``e^φ`` only if each particle carries the log-weight ``∫ G dτ``. From the Fokker–Planck equation
of every ``qᵢ`` (``∂_t ℓᵢ = −∇·f − ⟨f, sᵢ⟩ + g²/2 (Δℓᵢ + ‖sᵢ‖²)``) and ``φ = Φ(ℓ₁, …, ℓ_M)``,

    G = (Σᵢ Φᵢ − 1) ∇·f + g²/2 [ ‖Σᵢ Φᵢ sᵢ‖² − Σᵢ Φᵢ ‖sᵢ‖² + Σᵢⱼ Φᵢⱼ ⟨sᵢ, sⱼ⟩ ],

with ``Φᵢⱼ = ∂²Φ/∂ℓᵢ∂ℓⱼ``; the Laplacians cancel, so no divergence of any network is needed. For a
product of two, ``G = g²⟨s₁, s₂⟩ + ∇·f`` (the issue's form); for annealing ``q^β``,
``G = β(β−1) g²/2 ‖s‖² + (β−1)∇·f`` (FKC Prop. D.1); for OR at T = 1, ``G = 0`` (a mixture of
diffused densities is the diffused mixture, which is why OR needs no weights). For a tree, G is
recursive: ``G_node = local_node + Σ_c Φ_c G_c``, where the local term is the bracket above written
over the children's scores ``S_c = ∇φ_c``. Every node here has a constant total weight ``Σᵢ Φᵢ``
(its *degree*), so the ``∇·f`` term is common to all particles and drops out of their normalised
weights. Discretised, one step from s to t has ``g² dτ ≈ S² = σ_s² − (α_s/α_t)² σ_t²`` (the forward
kernel's variance, finite even where α_s = 0) and the scores at the step's start. The particles
start from the prior ``p_T`` while the corrected target there is ``e^{φ(log p_T, …)}``: their initial
log-weight is ``(D − 1) log p_T(x)`` for a tree of degree D, by the same recursion.

Guidance wraps the expression as an uncorrected product ``q_u^{1 − wD} e^{wφ}``, so its corrections
enter multiplied by w.
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass, field, replace
from typing import Sequence, Union

import torch
from torch import Tensor

from ._numeric import f64
from ._text import shorten
from .combine import (
    CombineInputs,
    _check_at_least_two,
    _check_count,
    _device_constant,
    and_feedback_offsets,
    and_weights,
)
from .limits import MAX_DEPTH, MAX_GAIN, gain_problem, log_weight_problem, scale_problem

__all__ = [
    "UNCONDITIONAL", "Leaf", "Or", "And", "Product", "SoftMax", "SoftMin", "Not", "Anneal", "Node",
    "leaf_names", "conjunctive", "uncorrected", "describe", "CompiledExpression", "ExpressionStep",
    "compile_expression", "bind_combiner", "expression_depth",
]  # fmt: skip


def _refuse(argument: str, given: object, works: str) -> None:
    shown = shorten(given) if isinstance(given, str) else repr(given)  # a long prompt is not echoed whole
    raise ValueError(f"{argument}={shown} is not valid; {works}")


def _finite(name: str, value: object, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        _refuse(name, value, "use a finite number" + (" > 0" if positive else ""))
    if positive and not value > 0:
        _refuse(name, value, "use a finite number > 0")
    return float(value)


def _in_range(problem: str | None) -> None:
    """Raise the range problem of :mod:`superdiff.limits`, if any."""
    if problem:
        raise ValueError(problem)


def _scale(name: str, value: object) -> float:
    """A sharpness or temperature: finite, > 0 and within :func:`superdiff.limits.scale_problem`'s range."""
    out = _finite(name, value, positive=True)
    _in_range(scale_problem(name, out))
    return out


def _finite_tuple(name: str, values: Sequence[float] | None, count: int | None, log_weights: bool = False,
                  ) -> tuple[float, ...] | None:
    """``count`` finite numbers (None stays None; ``count`` None: one per model, counted when bound),
    each within the range of a gain (exponents) or, with ``log_weights``, of a log-weight
    (:mod:`superdiff.limits`)."""
    if values is None:
        return None
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        _refuse(name, values, "pass a sequence of numbers, one per model, e.g. (0.0, 1.5)" if count is None else
                f"pass {count} numbers, one per child")
    out = tuple(_finite(f"{name}[{i}]", v) for i, v in enumerate(values))
    if count is not None and len(out) != count:
        _refuse(name, tuple(values), f"pass {count} numbers, one for each of the {count} children")
    check = log_weight_problem if log_weights else gain_problem
    for i, v in enumerate(out):
        _in_range(check(f"{name}[{i}]", v))
    return out


def _children(kind: str, children: Sequence["Node"] | None, at_least: int = 2) -> tuple["Node", ...] | None:
    if children is None:  # every model of the denoiser, bound by compile_expression: the flat combiner
        return None
    if isinstance(children, (str, bytes)) or not isinstance(children, Sequence):
        _refuse(f"{kind}.children", children, "pass a sequence of nodes (Leaf, Or, And, ...)")
    out = tuple(children)
    if len(out) < at_least:
        _refuse(f"{kind}.children", out, f"{kind} needs at least {at_least} child{'ren' if at_least > 1 else ''}")
    for i, c in enumerate(out):
        if not isinstance(c, NODE_TYPES):
            _refuse(f"{kind}.children[{i}]", c, "every child must be a node: Leaf('a prompt'), Or(...), And(...), ...")
    return out


@dataclass(frozen=True)
class Leaf:
    """One model of the denoiser: a prompt's text, or a model's name or index. The empty prompt
    ``Leaf("")`` (:data:`UNCONDITIONAL`) is the unconditional model, NOT's default reference."""

    name: str | int

    def __post_init__(self) -> None:
        if isinstance(self.name, bool) or not isinstance(self.name, (str, int)) or (
            isinstance(self.name, str) and self.name and not self.name.strip()
        ) or (isinstance(self.name, int) and self.name < 0):
            _refuse("Leaf.name", self.name,
                    'use a prompt or model name ("" for the unconditional model), or an index >= 0')


#: The name of the unconditional model (the empty prompt) among the leaves.
UNCONDITIONAL = ""


class _Composable:
    """What the nodes that may stand alone offer as combiners (``combiner=Or()``, ``And(rtol=1e-10)``,
    ``Fixed((0.7, 0.3))``): without children a node composes every model of the denoiser, and is bound
    to them (:meth:`bind`) by the sampler; with children it is bound to the leaves it names."""

    @property
    def needs_system(self) -> bool:
        """True when an And node with more than one child (or over all the models) needs AND's system."""
        return _needs_system(self)

    @property
    def affine(self) -> bool:
        """True when the leaves' weights sum to 1 (degree 1): a mixture, not a product."""
        return abs(_degree(self) - 1.0) < 1e-12

    @property
    def needs_scores(self) -> bool:
        return any(_corrects(n) for n in _walk(self))

    @property
    def expected_system(self) -> bool:
        """True when an And solves κ from the expected increments (``feedback``): the sampler then builds
        the system without the step's noise (:func:`superdiff.density.expected_step_moments`)."""
        return any(isinstance(n, And) and n.feedback is not None for n in _walk(self))

    def bind(self, num_models: int) -> "CompiledExpression":
        """The node compiled over the denoiser's ``num_models`` outputs (leaves 0 … M−1)."""
        return _bind(self, num_models)

    def check_num_models(self, num_models: int, what: str = "models") -> None:
        """Raise ``ValueError`` unless the node can weigh ``num_models`` models: OR and AND over all the
        models need 2 or more, and weights or log-weights one entry per model."""
        if self.children is None:
            _check_flat(self, num_models, what)
        else:
            _bind(self, num_models).check_num_models(num_models, what)

    def __call__(self, inputs: "CombineInputs") -> Tensor:
        """κ (B, M) for one step, as the combiner of :func:`superdiff.sampling.sample_sde`."""
        return _bind(self, inputs.log_q.shape[-1]).step(inputs).kappa


@dataclass(frozen=True)
class Or(_Composable):
    """Mixture (SuperDiff OR): κ over the children is ``softmax(T φ + ℓ)``; T = 1 samples ``Σ e^{ℓ_c} q_c``.

    ``correct`` adds the Feynman–Kac weights of the tempered target ``(1/T) log Σ exp(T φ_c + ℓ_c)``
    (zero at T = 1); off by default, so the temperature sharpens κ as in the paper. Without
    ``children`` (``Or()``, ``Or(temperature=2.0)``) it is OR over all the models.
    """

    children: tuple["Node", ...] | None = None
    temperature: float = 1.0
    log_weights: tuple[float, ...] | None = None
    correct: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "children", _children("Or", self.children, 1))
        object.__setattr__(self, "temperature", _scale("temperature", self.temperature))
        object.__setattr__(self, "log_weights",
                           _finite_tuple("log_weights", self.log_weights, _count(self), log_weights=True))


@dataclass(frozen=True)
class And(_Composable):
    """Equal density (SuperDiff AND, Prop. 6): κ keeps ``φ_c − ℓ_c`` changing equally for every child.

    Nested, an And solves its own system as if its weights alone drove the step. It has no
    potential of its own: a parent reads the mean of its children's. Without ``children``
    (``And()``, ``And(log_weights=(1.0, 0.0))``) it is AND over all the models; ``rtol`` says what
    counts as a singular system (:func:`superdiff.combine.and_weights`).

    ``feedback`` ρ in (0, 1] (None: off) solves κ from each child's *expected* increment over the step's
    noise instead of the increment of the noise drawn, and removes the share ρ of the tracked gap
    ``(φ_c − ℓ_c) − mean`` at every step (:func:`superdiff.combine.and_feedback_offsets`): the tracked
    densities are then only close, but κ no longer follows each step's noise (``docs/guarantees.md``).
    Start the tracked values equal (``log_q_init`` None).
    """

    children: tuple["Node", ...] | None = None
    log_weights: tuple[float, ...] | None = None
    rtol: float = 1e-8
    feedback: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "children", _children("And", self.children, 1))
        object.__setattr__(self, "log_weights",
                           _finite_tuple("log_weights", self.log_weights, _count(self), log_weights=True))
        if isinstance(self.rtol, bool) or not isinstance(self.rtol, numbers.Real) or not (0 < self.rtol < 1):
            _refuse("rtol", self.rtol, "use a number in (0, 1), e.g. 1e-8")
        if self.feedback is not None and (
            isinstance(self.feedback, bool) or not isinstance(self.feedback, numbers.Real)
            or not 0 < self.feedback <= 1
        ):
            _refuse("feedback", self.feedback, "use None (solve each step exactly) or a share in (0, 1], e.g. 0.5")


@dataclass(frozen=True)
class Product(_Composable):
    """Product of experts ``Π q_c^{β_c}`` (exponents default to 1; one child: annealing ``q^β``).

    ``correct=True`` (the default) adds the Feynman–Kac weights that make the particles sample the
    normalised product; ``correct=False`` is the plain score sum (Composable Diffusion's AND).
    Without ``children`` it is the product of all the models with fixed weights κ = β
    (:func:`superdiff.combine.Fixed`).
    """

    children: tuple["Node", ...] | None = None
    exponents: tuple[float, ...] | None = None
    correct: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "children", _children("Product", self.children, 1))
        exponents = _finite_tuple("exponents", self.exponents, _count(self))
        if self.children is None and exponents is None:
            _refuse("exponents", None, "a product over all the models needs one exponent per model")
        object.__setattr__(self, "exponents", exponents or (1.0,) * len(self.children))

    @property
    def weights(self) -> tuple[float, ...]:
        """The fixed κ of a product over all the models (its exponents)."""
        return self.exponents


def _count(node: "Node") -> int | None:
    return None if node.children is None else len(node.children)


@dataclass(frozen=True)
class SoftMax:
    """Power-norm disjunction ``(1/λ) log Σ exp(λ φ_c)`` (Dombi OR): λ → ∞ is the max, λ = 1 is OR."""

    children: tuple["Node", ...]
    sharpness: float = 1.0
    correct: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "children", _children("SoftMax", self.children, 1))
        object.__setattr__(self, "sharpness", _scale("sharpness", self.sharpness))


@dataclass(frozen=True)
class SoftMin:
    """Power-norm conjunction ``−(1/λ) log Σ exp(−λ φ_c)`` (Dombi AND): λ → ∞ is the min of the densities."""

    children: tuple["Node", ...]
    sharpness: float = 1.0
    correct: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "children", _children("SoftMin", self.children, 1))
        object.__setattr__(self, "sharpness", _scale("sharpness", self.sharpness))


@dataclass(frozen=True)
class Not:
    """Negation against a reference: ``q_ref^{1+γ} q^{−γ}`` (``correct=False``: Composable Diffusion's
    negative weight). The reference is usually the unconditional model (the empty prompt)."""

    child: "Node"
    reference: "Node"
    strength: float = 1.0
    correct: bool = True

    def __post_init__(self) -> None:
        for name in ("child", "reference"):
            if not isinstance(getattr(self, name), NODE_TYPES):
                _refuse(f"Not.{name}", getattr(self, name), "pass a node: Leaf('a prompt'), Or(...), ...")
        object.__setattr__(self, "strength", _finite("strength", self.strength, positive=True))
        _in_range(gain_problem("strength", self.strength))

    @property
    def children(self) -> tuple["Node", "Node"]:
        return (self.reference, self.child)

    @property
    def exponents(self) -> tuple[float, float]:
        return (1.0 + self.strength, -self.strength)


def Anneal(child: "Node", exponent: float, correct: bool = True) -> Product:  # noqa: N802 - a node constructor
    """Annealing ``q^β``: a one-child :class:`Product` (FKC Prop. D.1 when corrected)."""
    return Product((child,), (exponent,), correct)


Node = Union[Leaf, Or, And, Product, SoftMax, SoftMin, Not]
NODE_TYPES = (Leaf, Or, And, Product, SoftMax, SoftMin, Not)


def leaf_names(node: Node) -> tuple[str | int, ...]:
    """The leaves' names in the order they first appear (a leaf used twice is listed once)."""
    seen: dict[str | int, None] = {}

    def walk(n: Node) -> None:
        if isinstance(n, Leaf):
            seen.setdefault(n.name, None)
        else:
            for c in n.children or ():
                walk(c)

    walk(node)
    return tuple(seen)


def conjunctive(node: Node) -> bool:
    """Whether every node asks for all its children at once (And, Product, SoftMin): only then is
    "every leaf's attribute shown" the expression's target (an Or or a Not wants another thing)."""
    if isinstance(node, Leaf):
        return True
    return isinstance(node, (And, Product, SoftMin)) and all(conjunctive(c) for c in node.children or ())


def uncorrected(node: Node) -> Node:
    """The same tree with every Feynman–Kac correction off: plain score composition."""
    if isinstance(node, Leaf):
        return node
    if isinstance(node, Not):
        return Not(uncorrected(node.child), uncorrected(node.reference), node.strength, False)
    if node.children is None:
        return node if isinstance(node, And) else replace(node, correct=False)
    kids = tuple(uncorrected(c) for c in node.children)
    if isinstance(node, And):
        return replace(node, children=kids)
    if isinstance(node, Or):
        return Or(kids, node.temperature, node.log_weights, False)
    if isinstance(node, Product):
        return Product(kids, node.exponents, False)
    return type(node)(kids, node.sharpness, False)


def _number(v: float) -> str:
    """The shortest text that reads back as exactly ``v`` (``2``, ``0.5``, ``0.1234567``)."""
    short = f"{v:g}"
    return short if float(short) == v else repr(float(v))


def _quoted(prompt: str) -> str:
    escaped = prompt.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return '"' + escaped + '"'


def describe(node: Node) -> str:
    """The expression in the syntax of :mod:`superdiff.expression_syntax` (parses back to ``node``)."""
    if isinstance(node, Leaf):
        return str(node.name) if isinstance(node.name, int) else _quoted(node.name)
    if isinstance(node, Not):
        opts = [f"strength={_number(node.strength)}"] if node.strength != 1.0 else []
        opts += [] if node.correct else ["correct=false"]
        ref = describe(node.reference)
        return f"not({describe(node.child)}, {ref})" + (f"[{', '.join(opts)}]" if opts else "")
    kids = ", ".join(describe(c) for c in node.children or ())
    opts: list[str] = []
    if isinstance(node, Or):
        name = "or"
        if node.temperature != 1.0:
            opts.append(f"temperature={_number(node.temperature)}")
        if node.log_weights is not None:
            opts.append("weights=" + ";".join(_number(v) for v in node.log_weights))
        if node.correct:
            opts.append("correct=true")
    elif isinstance(node, And):
        name = "and"
        if node.log_weights is not None:
            opts.append("weights=" + ";".join(_number(v) for v in node.log_weights))
    elif isinstance(node, Product):
        name = "product"
        if any(b != 1.0 for b in node.exponents):
            opts.append("exponents=" + ";".join(_number(v) for v in node.exponents))
        if not node.correct:
            opts.append("correct=false")
    else:
        name = "softmax" if isinstance(node, SoftMax) else "softmin"
        if node.sharpness != 1.0:
            opts.append(f"sharpness={_number(node.sharpness)}")
        if not node.correct:
            opts.append("correct=false")
    return f"{name}({kids})" + (f"[{', '.join(opts)}]" if opts else "")


# ---------------------------------------------------------------------------------------------
# Static analysis: degrees and what the sampler must provide
# ---------------------------------------------------------------------------------------------


def _degree(node: Node, path: str = "expression") -> float:
    """``Σᵢ ∂φ/∂ℓᵢ``, constant for every node here; children of a mixture-type node must agree."""
    if isinstance(node, Leaf):
        return 1.0
    if node.children is None:  # over all the models: leaves of degree 1
        return sum(node.exponents) if isinstance(node, Product) else 1.0
    degrees = [_degree(c, f"{path}.children[{i}]") for i, c in enumerate(node.children)]
    if isinstance(node, (Product, Not)):
        if isinstance(node, Not) and abs(degrees[0] - degrees[1]) > 1e-12:
            raise ValueError(
                f"{path}: not(child, reference) needs a child and a reference of one degree (their log-density "
                f"exponents summing alike), got {degrees[1]:g} and {degrees[0]:g}"
            )
        return sum(b * d for b, d in zip(node.exponents, degrees))
    if any(abs(d - degrees[0]) > 1e-12 for d in degrees):
        kind = type(node).__name__
        raise ValueError(
            f"{path}: {kind} compares its children's densities, so their exponents must sum alike; got degrees "
            f"{[round(d, 12) for d in degrees]} (a product of two has degree 2). Give the products exponents that "
            "sum to 1 (e.g. exponents=0.5;0.5), or compose them with a product instead"
        )
    return degrees[0]


def _corrects(node: Node) -> bool:
    """Whether the node adds a local Feynman–Kac term of its own."""
    if isinstance(node, Leaf) or isinstance(node, And):
        return False
    if isinstance(node, Or):
        return node.correct and node.temperature != 1.0
    return node.correct


def _check_no_correction_under_and(node: Node, under_and: bool = False, path: str = "expression") -> None:
    if under_and and _corrects(node):
        raise ValueError(
            f"{path}: a Feynman–Kac-corrected {type(node).__name__} inside an And has no target (And is a control, "
            "not a density); pass correct=false for it, or put the And inside it"
        )
    if isinstance(node, Leaf):
        return
    for i, c in enumerate(node.children):
        _check_no_correction_under_and(c, under_and or isinstance(node, And), f"{path}.children[{i}]")


def _walk(node: Node):
    """The internal nodes of a tree in pre-order (a node over all the models has no others), walked
    without recursion (a tree built in Python may be deeper than the interpreter's stack)."""
    stack = [node]
    while stack:
        n = stack.pop()
        if not isinstance(n, Leaf):
            yield n
            stack.extend(reversed(n.children or ()))


def _needs_system(node: Node) -> bool:
    return any(isinstance(n, And) and (n.children is None or len(n.children) > 1) for n in _walk(node))


def _check_flat(node: Node, num_models: int, what: str) -> None:
    """The checks of a node over all the models (the flat combiners): OR and AND compare two or more
    models, weights and log-weights have one entry per model."""
    kind = {Or: "or", And: "and"}.get(type(node))
    if kind is not None:
        _check_at_least_two(kind, num_models, what)
    if num_models < 1:
        _refuse(what, [], f"pass at least one of the {what} to compose")
    name, values = ("weights", node.exponents) if isinstance(node, Product) else ("log_weights", node.log_weights)
    _check_count(name, values, num_models, what)


def _with_leaves(node: Node, leaves: tuple[str | int, ...]) -> Node:
    """``node`` with every node over all the models given the leaves ``leaves`` as children."""
    if isinstance(node, Leaf):
        return node
    if node.children is None:
        return replace(node, children=tuple(Leaf(n) for n in leaves))
    if isinstance(node, Not):
        return replace(node, child=_with_leaves(node.child, leaves), reference=_with_leaves(node.reference, leaves))
    return replace(node, children=tuple(_with_leaves(c, leaves) for c in node.children))


@functools.lru_cache(maxsize=256)
def _bind(node: Node, num_models: int) -> "CompiledExpression":
    return compile_expression(node, tuple(range(num_models)))


# ---------------------------------------------------------------------------------------------
# Evaluation of one step
# ---------------------------------------------------------------------------------------------


@dataclass
class _Value:
    """A node's value at one step: its leaf weights κ (B, M), potential φ (B,), and Feynman–Kac
    log-weight increment (B,) (zero where nothing below it corrects)."""

    kappa: Tensor
    potential: Tensor
    fk: Tensor


@dataclass(frozen=True)
class ExpressionStep:
    """What an expression gives the sampler for one step.

    ``kappa`` (B, M) the leaves' weights; ``log_weight_increment`` (B,) float64 the particles'
    Feynman–Kac log-weight increment (None when nothing in the tree corrects); ``node_weights`` one
    (B, children) tensor per internal node, in :meth:`CompiledExpression.nodes` order.
    """

    kappa: Tensor
    log_weight_increment: Tensor | None
    node_weights: tuple[Tensor, ...]


def _lse_family(node: Node) -> tuple[float, float]:
    """(sign·λ, λ) for the log-sum-exp nodes: φ = (1/(sλ)) log Σ exp(sλ φ_c + ℓ_c)."""
    if isinstance(node, Or):
        return node.temperature, node.temperature
    if isinstance(node, SoftMax):
        return node.sharpness, node.sharpness
    return -node.sharpness, node.sharpness  # SoftMin


@dataclass(frozen=True, eq=False)
class CompiledExpression:
    """An expression bound to the denoiser's leaf order: a combiner (it returns κ) that also gives
    Feynman–Kac log-weight increments (:meth:`step`). Build it with :func:`compile_expression`."""

    expression: Node
    leaves: tuple[str | int, ...]
    degree: float
    needs_system: bool
    needs_scores: bool
    nodes: tuple[Node, ...] = field(repr=False)
    gain: float = 1.0
    #: built from a node over all the models (a flat combiner: ``And()``, ``Or()``, ``Fixed``): its one
    #: node's weights are κ, so no node weights are reported.
    flat: bool = False
    #: ids of the nodes whose children are the leaves in order (their κ is their Φ, no matrix products).
    over_leaves: frozenset[int] = field(default=frozenset(), repr=False)

    @property
    def affine(self) -> bool:
        """True when the leaves' weights sum to 1 (the tree has degree 1): a mixture, not a product."""
        return abs(self.degree - 1.0) < 1e-12

    @property
    def expected_system(self) -> bool:
        """True when an And solves κ from the expected increments (``feedback``)."""
        return any(isinstance(n, And) and n.feedback is not None for n in self.nodes)

    def check_num_models(self, num_models: int, what: str = "models") -> None:
        """Raise ``ValueError`` unless the denoiser has one output per leaf."""
        if num_models != len(self.leaves):
            if self.leaves == tuple(range(len(self.leaves))):
                _refuse(what, f"<{num_models} given>",
                        f"the expression's leaves are model indices up to {len(self.leaves) - 1}, so it is bound to "
                        f"the {len(self.leaves)} models 0 … {len(self.leaves) - 1}; pass a denoiser with exactly "
                        "those models (or compile with leaves=range(M) to leave the models it does not name unused)")
            _refuse(what, f"<{num_models} given>",
                    f"the expression has {len(self.leaves)} leaves {list(self.leaves)}; pass one model per leaf, "
                    "in that order")

    def __call__(self, inputs: CombineInputs) -> Tensor:
        return self.step(inputs).kappa

    def bind(self, num_models: int) -> "CompiledExpression":
        """Itself: it is bound already (:meth:`check_num_models` checks ``num_models``)."""
        return self

    def initial_log_weight(self, log_prior: Tensor, guidance_scale: float | None = None) -> Tensor | None:
        """The particles' log-weight at the start, ``(D − 1) log p_T(x)`` by the corrected nodes'
        recursion (times w under guidance); None when nothing corrects. ``log_prior``: (B,) float64."""
        if not self.needs_scores:
            return None
        w = 1.0 if guidance_scale is None else guidance_scale
        return w * self._initial(self.expression, log_prior)

    def _initial(self, node: Node, log_prior: Tensor) -> Tensor:
        if isinstance(node, Leaf):
            return torch.zeros_like(log_prior)
        kids = [self._initial(c, log_prior) for c in node.children]
        if isinstance(node, (Product, Not)):
            total = sum(b * k for b, k in zip(node.exponents, kids))
            if node.correct:
                total = total + (sum(node.exponents) - 1.0) * log_prior
            return total
        # Children of a mixture-type node share one degree, so at the prior their initial weights differ
        # by constants only, which any weights summing to 1 (Σ Φ = 1: no local term) leave common.
        return sum(kids) / len(kids)

    def step(self, inputs: CombineInputs) -> ExpressionStep:
        """κ, the Feynman–Kac log-weight increment and the node weights for one step.

        Reads ``inputs.log_q`` (B, M); the increment system when :attr:`needs_system`; the leaves'
        score Gram ``⟨sᵢ, sⱼ⟩`` (B, M, M) and ``g²dτ`` when :attr:`needs_scores`.
        """
        if self.needs_system and (inputs.increment_matrix is None or inputs.increment_offset is None):
            raise ValueError("this expression has an And node, which needs the sampler's increment system")
        if self.needs_scores and inputs.score_gram is None:
            raise ValueError("this expression corrects (Feynman–Kac), which needs the sampler's score Gram matrix")
        weights: list[Tensor] = []
        value = self._evaluate(self.expression, inputs, weights, root=True)
        fk = value.fk if self.needs_scores else None
        return ExpressionStep(value.kappa, fk, () if self.flat else tuple(weights))

    def and_gap(self, log_q_before: Tensor, log_q_after: Tensor, step_fraction: float) -> Tensor:
        """How far one step left the tree's Ands from their condition, per sample (B,) float64.

        For every And node, the spread (max − min) over its children of ``Δφ_c − ℓ_c · step_fraction``,
        the change of each child's potential from ``log_q_before`` to ``log_q_after`` (B, M) less its
        prescribed share; the largest over the nodes. Zero (to rounding) where each And's condition
        was met; an And over mixture-type children can miss it where the condition has no root.
        """
        before, after = f64(log_q_before), f64(log_q_after)
        gap = before.new_zeros(before.shape[0])
        for node in self.nodes:
            if not isinstance(node, And) or len(node.children) < 2:
                continue
            change = torch.stack([self._potential(c, after) - self._potential(c, before) for c in node.children], -1)
            if node.log_weights is not None:
                change = change - step_fraction * _device_constant(node.log_weights, change.dtype, change.device)
            gap = torch.maximum(gap, change.amax(-1) - change.amin(-1))
        return gap

    @property
    def nonlinear_and(self) -> bool:
        """Whether an And has a child that is not a leaf, so its condition is solved iteratively
        (:meth:`and_gap` then tells where it was met)."""
        return any(isinstance(n, And) and len(n.children) > 1 and not all(isinstance(c, Leaf) for c in n.children)
                   for n in self.nodes)

    @property
    def affine_in_offset(self) -> bool:
        """Whether :meth:`step`'s κ and node weights are affine in the system's offset b, with no Feynman–Kac
        term: every And has two children, both leaves (the closed form of :func:`superdiff.combine.and_weights`,
        affine in b up to rounding), and the other nodes weigh their children by what does not depend on b
        (log q, constants). The sampler then reads the κ of ``(A, b + t r)`` off the solves at b and b + r
        instead of solving again at t (:func:`superdiff.sampling._quadratic_system_weights`). The solve of
        three or more children is not: it picks, per sample, an exact or a damped solution by their residuals
        (over all the leaves it takes b and b + r as columns instead: :attr:`solves_offset_columns`)."""
        return not self.needs_scores and all(
            len(n.children) == 2 and all(isinstance(c, Leaf) for c in n.children)
            for n in self.nodes if isinstance(n, And) and len(n.children) > 1)

    @property
    def solves_offset_columns(self) -> bool:
        """Whether :meth:`step` takes several offsets for one system, ``increment_offset`` (B, M, k), and
        answers κ (B, M, k) linear along them: an And over all the leaves in order, with no Feynman–Kac
        term (:func:`superdiff.combine.and_weights` solves the columns with one kind of solution per sample,
        NaN where they would differ). The sampler then reads κ at ``b + t r`` off one solve of b and b + r."""
        root = self.expression
        return not self.needs_scores and isinstance(root, And) and id(root) in self.over_leaves

    def _potential(self, node: Node, log_q: Tensor) -> Tensor:
        """The node's potential φ (B,) at the leaves' log-densities ``log_q`` (B, M) (module table)."""
        if isinstance(node, Leaf):
            return log_q[:, self.leaves.index(node.name)]
        kids = torch.stack([self._potential(c, log_q) for c in node.children], -1)
        if isinstance(node, (Product, Not)):
            return (kids * _device_constant(node.exponents, kids.dtype, kids.device)).sum(-1)
        if isinstance(node, And):
            return kids.mean(-1)
        signed, _ = _lse_family(node)
        logits = signed * kids
        if getattr(node, "log_weights", None) is not None:
            logits = logits + _device_constant(node.log_weights, kids.dtype, kids.device)
        return torch.logsumexp(logits, -1) / signed

    def _evaluate(self, node: Node, inputs: CombineInputs, weights: list[Tensor], root: bool = False) -> _Value:
        """The node's κ, potential (not at the root, which no one reads) and Feynman–Kac increment."""
        log_q = f64(inputs.log_q)
        batch, m = log_q.shape
        if isinstance(node, Leaf):
            i = self.leaves.index(node.name)
            one_hot = tuple(1.0 if j == i else 0.0 for j in range(m))
            kappa = _device_constant(one_hot, log_q.dtype, log_q.device).expand(batch, m)
            return _Value(kappa, log_q[:, i], log_q.new_zeros(batch))
        slot = len(weights)
        weights.append(None)  # pre-order: this node's slot before its children's
        if id(node) in self.over_leaves:  # children = the leaves in order: κ_c, φ_c are one-hot, log q
            k_mat, potentials, child_fk = None, log_q, None
        else:
            kids = [self._evaluate(c, inputs, weights) for c in node.children]
            k_mat = torch.stack([v.kappa for v in kids], 1)  # (B, C, M)
            potentials = torch.stack([v.potential for v in kids], 1)  # (B, C)
            child_fk = torch.stack([v.fk for v in kids], 1) if self.needs_scores else None  # (B, C)
        phi, potential, hessian_scale = self._node_weights(node, k_mat, potentials, inputs, root)
        weights[slot] = phi
        kappa = phi if k_mat is None else (phi[:, :, None] * k_mat).sum(1)
        fk = None
        if self.needs_scores:
            fk = log_q.new_zeros(batch) if child_fk is None else (phi * child_fk).sum(-1)
            if _corrects(node):
                fk = fk + self._local_correction(phi, hessian_scale, k_mat, inputs)
        return _Value(kappa, potential, fk)

    def _node_weights(self, node: Node, k_mat: Tensor | None, potentials: Tensor, inputs: CombineInputs,
                      root: bool) -> tuple[Tensor, Tensor | None, float]:
        """Φ (B, C) over the children, the potential φ (B,) (None at the root) and the Hessian scale of
        the log-sum-exp nodes (Φ_cc' = scale · (diag π − ππᵀ); 0 for the others)."""
        batch = potentials.shape[0]
        if isinstance(node, (Product, Not)):
            phi = _device_constant(node.exponents, potentials.dtype, potentials.device).expand(batch, -1)
            return phi, None if root else (phi * potentials).sum(-1), 0.0
        if isinstance(node, And):
            phi = self._and_weights(node, k_mat, potentials, inputs)
            return phi, None if root else potentials.mean(-1), 0.0
        signed, sharp = _lse_family(node)
        logits = signed * potentials
        lw = getattr(node, "log_weights", None)
        if lw is not None:
            logits = logits + _device_constant(lw, potentials.dtype, potentials.device)
        finfo = torch.finfo(logits.dtype)
        logits = torch.nan_to_num(logits, nan=finfo.min, posinf=finfo.max, neginf=finfo.min)
        phi = torch.softmax(logits, -1)
        return phi, None if root else torch.logsumexp(logits, -1) / signed, signed

    @staticmethod
    def _local_correction(phi: Tensor, hessian_scale: float, k_mat: Tensor | None, inputs: CombineInputs) -> Tensor:
        """``g²dτ/2 [ΦᵀΓΦ − Σ_c Φ_c Γ_cc + Σ_cc' Φ_cc' Γ_cc']`` over the children's scores, ``Γ_cc' = ⟨S_c, S_c'⟩``."""
        gram = f64(inputs.score_gram)
        if k_mat is not None:
            gram = k_mat @ gram @ k_mat.mT  # (B, C, C)
        diag = gram.diagonal(dim1=-2, dim2=-1)
        quad = (phi[:, :, None] * gram * phi[:, None, :]).sum((-2, -1))
        bracket = quad - (phi * diag).sum(-1)
        if hessian_scale != 0.0:  # Σ Φ_cc' Γ_cc' = λ (Σ π_c Γ_cc − πᵀΓπ)
            bracket = bracket + hessian_scale * ((phi * diag).sum(-1) - quad)
        return 0.5 * inputs.g2_dt * bracket

    def _and_weights(self, node: And, k_mat: Tensor | None, potentials: Tensor, inputs: CombineInputs) -> Tensor:
        """Prop. 6 over the children, as if the node's κ = Σ_c λ_c κ_c alone drove the step.

        Each child's potential changes by ``Δφ_c(κ) = φ_c(ℓ + A κ + b) − φ_c(ℓ)`` (up to the term
        common to every child of one degree). For leaves that is linear, ``κ_cᵀ(A κ + b)``, and the
        C × C system ``(K A Kᵀ, K b)`` is solved once by :func:`and_weights`: flat AND exactly. For
        a mixture-type child it is not (log Σ e^{ℓᵢ + Δᵢ} has an Itô term ½ Var_π(Δ) that a
        first-order row misses), so :func:`_and_newton` solves the nonlinear condition from there. Over the leaves in
        order (``k_mat`` None: K = I) the system is (A, b) itself.
        """
        batch, c = potentials.shape
        if c == 1:
            return potentials.new_ones(batch, 1)
        a = f64(inputs.increment_matrix)
        b = f64(inputs.increment_offset)
        target = None
        if node.feedback is not None:  # the share ρ of the tracked gap of φ_c − ℓ_c, on the expected increments
            lw = None if node.log_weights is None else _device_constant(node.log_weights, potentials.dtype,
                                                                         potentials.device)
            target = and_feedback_offsets(potentials, node.feedback, lw, inputs.step_fraction)
        elif node.log_weights is not None:
            offsets = _device_constant(node.log_weights, potentials.dtype, potentials.device)
            target = (offsets * inputs.step_fraction).expand(batch, c)
        if k_mat is None:
            return and_weights(a, b, target, node.rtol)
        lam = and_weights(k_mat @ a @ k_mat.mT, (k_mat @ b[:, :, None])[..., 0], target, node.rtol)
        if all(isinstance(child, Leaf) for child in node.children) or inputs.step_fraction == 0.0:
            return lam  # leaves are linear; a last step onto σ = 0 has a system only up to scale
        return self._and_newton(node, k_mat, potentials, inputs, lam, target)

    def _and_newton(self, node: And, k_mat: Tensor, potentials: Tensor, inputs: CombineInputs, lam: Tensor,
                    target: Tensor | None) -> Tensor:
        """Solve ``Δφ_c(κ(λ)) − target_c`` equal for every child by Newton's method with a line search.

        Each iteration linearises every child at the current λ and solves that C × C system
        (:func:`and_weights`); of the steps 1, ½, ¼, ⅛ and 0 along the Newton direction each sample
        keeps the one with the smallest squared residual (the spread of the rows), so the residual never
        grows. Plain Newton steps had overshot where κ is large (ill-conditioned steps), leaving the
        children's tracked potentials apart on a quarter of the samples of ``(0 | 1) & 2`` at 25 steps.
        Where the condition has no root (the convex ½ Var_π(Δ) of a mixture child can keep it above
        zero) the search settles where the residual is smallest. A fixed number of iterations, so
        nothing waits for the device.
        """
        a = f64(inputs.increment_matrix)
        b = f64(inputs.increment_offset)
        log_q = f64(inputs.log_q)
        goal = 0.0 if target is None else target

        def evaluate(lam_: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            kappa = (lam_[:, :, None] * k_mat).sum(1)
            delta = (a @ kappa[:, :, None])[..., 0] + b  # the leaves' increments at this κ (B, M)
            moved = CombineInputs(log_q + delta, a, b, inputs.step_fraction)
            after = [self._evaluate(child, moved, []) for child in node.children]
            value = torch.stack([v.potential for v in after], 1) - potentials  # Δφ_c(κ) (B, C)
            gap = value - goal
            residual = torch.nan_to_num((gap - gap.mean(-1, keepdim=True)).square().sum(-1), nan=math.inf)
            return value, residual, torch.stack([v.kappa for v in after], 1)

        value, residual, k_after = evaluate(lam)
        for _ in range(_NEWTON_ITERATIONS):
            kappa = (lam[:, :, None] * k_mat).sum(1)
            slope = k_after @ a  # (B, C, M): d Δφ_c / dκ, with ∂φ_c/∂ℓ at the moved point
            a_nodes = slope @ k_mat.mT
            b_nodes = value - (slope @ kappa[:, :, None])[..., 0]
            direction = and_weights(a_nodes, b_nodes, target, node.rtol) - lam
            best = (lam, value, residual, k_after)
            for fraction in _LINE_SEARCH:
                trial = lam + fraction * direction
                t_value, t_residual, t_after = evaluate(trial)
                better = t_residual < best[2]
                best = tuple(_where_rows(better, new, old) for new, old in
                             zip((trial, t_value, t_residual, t_after), best))
            lam, value, residual, k_after = best
        return lam


_NEWTON_ITERATIONS = 6
_LINE_SEARCH = (1.0, 0.5, 0.25, 0.125)


def _where_rows(mask: Tensor, chosen: Tensor, other: Tensor) -> Tensor:
    """Rows (dim 0) of ``chosen`` where ``mask`` (B,), else of ``other``."""
    return torch.where(mask.reshape(-1, *([1] * (chosen.dim() - 1))), chosen, other)


@dataclass(frozen=True)
class _CallableCombiner:
    """A user's own combiner (a callable ``inputs -> κ`` with ``needs_system``) seen as an expression
    step: κ only, no Feynman–Kac increment, no node weights."""

    combiner: object
    needs_scores: bool = False

    @property
    def needs_system(self) -> bool:
        return bool(self.combiner.needs_system)

    @property
    def affine(self) -> bool:
        return bool(getattr(self.combiner, "affine", True))

    @property
    def affine_in_offset(self) -> bool:
        """A user's combiner declares it (``affine_in_offset = True``); otherwise its κ is checked by solving again."""
        return bool(getattr(self.combiner, "affine_in_offset", False))

    @property
    def solves_offset_columns(self) -> bool:
        """A user's combiner declares it (``solves_offset_columns = True``): it takes offsets (B, M, k) and
        answers κ (B, M, k) linear along them (:attr:`CompiledExpression.solves_offset_columns`)."""
        return bool(getattr(self.combiner, "solves_offset_columns", False))

    def __call__(self, inputs: CombineInputs) -> Tensor:
        return self.combiner(inputs)

    def step(self, inputs: CombineInputs) -> ExpressionStep:
        return ExpressionStep(self.combiner(inputs).to(torch.float64), None, ())


def bind_combiner(combiner: object, num_models: int) -> "CompiledExpression | _CallableCombiner":
    """The combiner a sampler steps with, over ``num_models`` models: a node or compiled expression
    bound to the models (``And()`` over all of them), or a user's own callable wrapped to give
    :meth:`CompiledExpression.step`'s answer. Check it first (:func:`superdiff.combine.check_combiner`)."""
    bind = getattr(combiner, "bind", None)
    return bind(num_models) if bind is not None else _CallableCombiner(combiner)


def _without_single_child_nodes(node: Node) -> Node:
    """A one-child node is its child: Or / And / SoftMax / SoftMin of one (without log-weights, which
    would shift its potential) and a Product of one with exponent 1."""
    if isinstance(node, Leaf):
        return node
    if isinstance(node, Not):
        return Not(_without_single_child_nodes(node.child), _without_single_child_nodes(node.reference),
                   node.strength, node.correct)
    kids = tuple(_without_single_child_nodes(c) for c in node.children)
    if len(kids) == 1 and (
        (isinstance(node, Product) and node.exponents == (1.0,))
        or (not isinstance(node, Product) and getattr(node, "log_weights", None) is None)
    ):
        return kids[0]
    if isinstance(node, Or):
        return Or(kids, node.temperature, node.log_weights, node.correct)
    if isinstance(node, And):
        return replace(node, children=kids)
    if isinstance(node, Product):
        return Product(kids, node.exponents, node.correct)
    return type(node)(kids, node.sharpness, node.correct)


def expression_depth(node: Node) -> int:
    """The internal nodes on the longest path from ``node`` to a leaf (a leaf: 0), walked without
    recursion and once per node object, so a tree built in Python as deep as memory allows (or one
    sharing subtrees) is measured, not a RecursionError."""
    depth: dict[int, int] = {}
    stack: list[tuple[Node, bool]] = [(node, False)]
    while stack:
        n, children_done = stack.pop()
        if id(n) in depth:
            continue
        if isinstance(n, Leaf):
            depth[id(n)] = 0
        elif children_done:  # a node without children composes all the models: one level
            depth[id(n)] = 1 + max((depth[id(c)] for c in n.children or ()), default=0)
        else:
            stack.append((n, True))
            stack.extend((c, False) for c in n.children or () if id(c) not in depth)
    return depth[id(node)]


def _gain(node: Node) -> tuple[float, Node]:
    """The largest ``Σ|κ|`` the tree's weights can give the leaves (a product multiplies its
    children's by ``Σ|β_c|``; the other nodes weigh their children by weights summing to 1, taken as a
    convex combination), and the node where it is largest."""
    if isinstance(node, Leaf):
        return 1.0, node
    kids = [_gain(c) for c in node.children]
    if isinstance(node, (Product, Not)):
        return sum(abs(b) * g for b, (g, _) in zip(node.exponents, kids)), node
    return max(kids, key=lambda k: k[0])


def _bind_leaves(names: tuple[str | int, ...]) -> tuple[int, ...]:
    """The default binding: a bare index ``i`` is the denoiser's output ``i``, so the expression is
    bound to the outputs 0 … max index. Prompts or names need ``leaves=`` (their order is the denoiser's)."""
    named = [n for n in names if not isinstance(n, int)]
    if named:
        if UNCONDITIONAL in named and len(named) == 1:
            raise ValueError('the expression uses "", the unconditional model (NOT\'s default reference, as in !0 or '
                             "not(0)), which a stack of models does not have; give NOT a reference by index, e.g. "
                             'not(0, 1), or pass leaves= naming every output ("" included)')
        _refuse("leaves", None, f"the expression names models {named} rather than indexing them, and only the "
                "denoiser knows their order; pass leaves=(the name of each denoiser output, in order), or write the "
                "models as indices 0, 1, ...")
    return tuple(range(max(names) + 1))


def compile_expression(expression: Node, leaves: Sequence[str | int] | None = None) -> CompiledExpression:
    """Check ``expression`` and bind it to the denoiser's outputs.

    Args:
        expression: a tree of nodes, at most :data:`~superdiff.limits.MAX_DEPTH` nodes deep.
        leaves: the name of each denoiser output in order (prompts, model names or indices). By
            default a leaf's index is its output (``Leaf(i)`` is output i, so the denoiser has the
            outputs 0 … the largest index); an expression that names its leaves needs ``leaves``.

    Returns:
        A :class:`CompiledExpression`, a combiner for :func:`superdiff.sampling.sample_sde`.

    Raises:
        ValueError: for a tree nested too deeply, a leaf the denoiser does not have (or names
            without ``leaves``), mixture-type nodes over children of different degrees, a corrected
            node inside an And, or weights whose product exceeds :data:`~superdiff.limits.MAX_GAIN`.
    """
    if not isinstance(expression, NODE_TYPES):
        _refuse("expression", expression, "pass a node such as And((Leaf('red'), Leaf('circle')))")
    flat = not isinstance(expression, Leaf) and expression.children is None
    if any(n.children is None for n in _walk(expression)):
        if leaves is None:
            _refuse("leaves", None, "a node over all the models (no children) needs the models' names")
        expression = _with_leaves(expression, tuple(leaves))
    depth = expression_depth(expression)
    if depth > MAX_DEPTH:
        raise ValueError(f"expression=<a tree more than {MAX_DEPTH} nodes deep> is not valid; nest at most "
                         f"{MAX_DEPTH} nodes (superdiff.limits.MAX_DEPTH), e.g. by writing a product of products as "
                         "one product")
    names = leaf_names(expression)
    leaves = _bind_leaves(names) if leaves is None else tuple(leaves)
    if len(set(leaves)) != len(leaves):
        _refuse("leaves", leaves, "name every denoiser output once")
    missing = [n for n in names if n not in leaves]
    if missing:
        _refuse("expression", describe(expression), f"its leaves {missing} are not among the models {list(leaves)}")
    degree = _degree(expression)
    _check_no_correction_under_and(expression)
    gain, where = _gain(expression)
    if gain > MAX_GAIN:
        raise ValueError(f"expression={describe(expression)!r} is not valid: its weights multiply the predictions by "
                         f"up to {gain:g} (at {describe(where)[:80]}), more than 2**23 = {MAX_GAIN:.0f}, where the "
                         "networks' float32 rounding is as large as their outputs; use smaller exponents or strengths")
    expression = _without_single_child_nodes(expression)
    nodes: list[Node] = []

    def walk(n: Node) -> None:
        if not isinstance(n, Leaf):
            nodes.append(n)
            for c in n.children:
                walk(c)

    walk(expression)
    in_order = tuple(Leaf(n) for n in leaves)
    return CompiledExpression(
        expression=expression,
        leaves=leaves,
        degree=degree,
        needs_system=any(isinstance(n, And) and len(n.children) > 1 for n in nodes),
        needs_scores=any(_corrects(n) for n in nodes),
        nodes=tuple(nodes),
        flat=flat,
        over_leaves=frozenset(id(n) for n in nodes if not isinstance(n, Not) and n.children == in_order),
        gain=gain,
    )
