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

import math
import numbers
from dataclasses import dataclass, field
from typing import Sequence, Union

import torch
from torch import Tensor

from .combine import CombineInputs, _device_constant, and_weights

__all__ = [
    "UNCONDITIONAL", "Leaf", "Or", "And", "Product", "SoftMax", "SoftMin", "Not", "Anneal", "Node",
    "leaf_names", "conjunctive", "uncorrected", "describe", "CompiledExpression", "ExpressionStep",
    "compile_expression",
]  # fmt: skip


def _refuse(argument: str, given: object, works: str) -> None:
    raise ValueError(f"{argument}={given!r} is not valid; {works}")


def _finite(name: str, value: object, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        _refuse(name, value, "use a finite number" + (" > 0" if positive else ""))
    if positive and not value > 0:
        _refuse(name, value, "use a finite number > 0")
    return float(value)


def _finite_tuple(name: str, values: Sequence[float] | None, count: int) -> tuple[float, ...] | None:
    if values is None:
        return None
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        _refuse(name, values, f"pass {count} numbers, one per child")
    out = tuple(_finite(f"{name}[{i}]", v) for i, v in enumerate(values))
    if len(out) != count:
        _refuse(name, tuple(values), f"pass {count} numbers, one for each of the {count} children")
    return out


def _children(kind: str, children: Sequence["Node"], at_least: int = 2) -> tuple["Node", ...]:
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


@dataclass(frozen=True)
class Or:
    """Mixture (SuperDiff OR): κ over the children is ``softmax(T φ + ℓ)``; T = 1 samples ``Σ e^{ℓ_c} q_c``.

    ``correct`` adds the Feynman–Kac weights of the tempered target ``(1/T) log Σ exp(T φ_c + ℓ_c)``
    (zero at T = 1); off by default, so the temperature sharpens κ as in the paper.
    """

    children: tuple["Node", ...]
    temperature: float = 1.0
    log_weights: tuple[float, ...] | None = None
    correct: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "children", _children("Or", self.children, 1))
        object.__setattr__(self, "temperature", _finite("temperature", self.temperature, positive=True))
        object.__setattr__(self, "log_weights", _finite_tuple("log_weights", self.log_weights, len(self.children)))


@dataclass(frozen=True)
class And:
    """Equal density (SuperDiff AND, Prop. 6): κ keeps ``φ_c − ℓ_c`` changing equally for every child.

    Nested, an And solves its own system as if its weights alone drove the step. It has no
    potential of its own: a parent reads the mean of its children's.
    """

    children: tuple["Node", ...]
    log_weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "children", _children("And", self.children, 1))
        object.__setattr__(self, "log_weights", _finite_tuple("log_weights", self.log_weights, len(self.children)))


@dataclass(frozen=True)
class Product:
    """Product of experts ``Π q_c^{β_c}`` (exponents default to 1; one child: annealing ``q^β``).

    ``correct=True`` (the default) adds the Feynman–Kac weights that make the particles sample the
    normalised product; ``correct=False`` is the plain score sum (Composable Diffusion's AND).
    """

    children: tuple["Node", ...]
    exponents: tuple[float, ...] | None = None
    correct: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "children", _children("Product", self.children, 1))
        exponents = _finite_tuple("exponents", self.exponents, len(self.children))
        object.__setattr__(self, "exponents", exponents or (1.0,) * len(self.children))


@dataclass(frozen=True)
class SoftMax:
    """Power-norm disjunction ``(1/λ) log Σ exp(λ φ_c)`` (Dombi OR): λ → ∞ is the max, λ = 1 is OR."""

    children: tuple["Node", ...]
    sharpness: float = 1.0
    correct: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "children", _children("SoftMax", self.children, 1))
        object.__setattr__(self, "sharpness", _finite("sharpness", self.sharpness, positive=True))


@dataclass(frozen=True)
class SoftMin:
    """Power-norm conjunction ``−(1/λ) log Σ exp(−λ φ_c)`` (Dombi AND): λ → ∞ is the min of the densities."""

    children: tuple["Node", ...]
    sharpness: float = 1.0
    correct: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "children", _children("SoftMin", self.children, 1))
        object.__setattr__(self, "sharpness", _finite("sharpness", self.sharpness, positive=True))


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
            for c in n.children:
                walk(c)

    walk(node)
    return tuple(seen)


def conjunctive(node: Node) -> bool:
    """Whether every node asks for all its children at once (And, Product, SoftMin): only then is
    "every leaf's attribute shown" the expression's target (an Or or a Not wants another thing)."""
    if isinstance(node, Leaf):
        return True
    return isinstance(node, (And, Product, SoftMin)) and all(conjunctive(c) for c in node.children)


def uncorrected(node: Node) -> Node:
    """The same tree with every Feynman–Kac correction off: plain score composition."""
    if isinstance(node, Leaf):
        return node
    if isinstance(node, Not):
        return Not(uncorrected(node.child), uncorrected(node.reference), node.strength, False)
    kids = tuple(uncorrected(c) for c in node.children)
    if isinstance(node, And):
        return And(kids, node.log_weights)
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
    kids = ", ".join(describe(c) for c in node.children)
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

    @property
    def affine(self) -> bool:
        """True when the leaves' weights sum to 1 (the tree has degree 1): a mixture, not a product."""
        return abs(self.degree - 1.0) < 1e-12

    def check_num_models(self, num_models: int, what: str = "models") -> None:
        """Raise ``ValueError`` unless the denoiser has one output per leaf."""
        if num_models != len(self.leaves):
            _refuse(what, f"<{num_models} given>",
                    f"the expression has {len(self.leaves)} leaves {list(self.leaves)}; pass one model per leaf, "
                    "in that order")

    def __call__(self, inputs: CombineInputs) -> Tensor:
        return self.step(inputs).kappa

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
        value = self._evaluate(self.expression, inputs, weights)
        fk = value.fk if self.needs_scores else None
        return ExpressionStep(value.kappa, fk, tuple(weights))

    def _evaluate(self, node: Node, inputs: CombineInputs, weights: list[Tensor]) -> _Value:
        log_q = inputs.log_q.to(torch.float64)
        batch, m = log_q.shape
        if isinstance(node, Leaf):
            i = self.leaves.index(node.name)
            one_hot = tuple(1.0 if j == i else 0.0 for j in range(m))
            kappa = _device_constant(one_hot, log_q.dtype, log_q.device).expand(batch, m)
            return _Value(kappa, log_q[:, i], log_q.new_zeros(batch))
        slot = len(weights)
        weights.append(log_q.new_empty(0))  # pre-order: this node's slot before its children's
        kids = [self._evaluate(c, inputs, weights) for c in node.children]
        k_mat = torch.stack([v.kappa for v in kids], 1)  # (B, C, M)
        potentials = torch.stack([v.potential for v in kids], 1)  # (B, C)
        child_fk = torch.stack([v.fk for v in kids], 1)  # (B, C)
        hessian_scale = 0.0  # Φ_cc' = hessian_scale · (diag π − ππᵀ) for the log-sum-exp nodes
        if isinstance(node, (Product, Not)):
            phi = _device_constant(node.exponents, log_q.dtype, log_q.device).expand(batch, -1)
            potential = (phi * potentials).sum(-1)
        elif isinstance(node, And):
            phi = self._and_weights(node, k_mat, potentials, inputs)
            potential = potentials.mean(-1)
        else:
            signed, sharp = _lse_family(node)
            logits = signed * potentials
            lw = getattr(node, "log_weights", None)
            if lw is not None:
                logits = logits + _device_constant(lw, log_q.dtype, log_q.device)
            finfo = torch.finfo(logits.dtype)
            logits = torch.nan_to_num(logits, nan=finfo.min, posinf=finfo.max, neginf=finfo.min)
            phi = torch.softmax(logits, -1)
            potential = torch.logsumexp(logits, -1) / signed
            hessian_scale = signed
        weights[slot] = phi
        kappa = (phi[:, :, None] * k_mat).sum(1)
        fk = (phi * child_fk).sum(-1)
        if _corrects(node):
            fk = fk + self._local_correction(phi, hessian_scale, k_mat, inputs)
        return _Value(kappa, potential, fk)

    @staticmethod
    def _local_correction(phi: Tensor, hessian_scale: float, k_mat: Tensor, inputs: CombineInputs) -> Tensor:
        """``g²dτ/2 [ΦᵀΓΦ − Σ_c Φ_c Γ_cc + Σ_cc' Φ_cc' Γ_cc']`` over the children's scores, ``Γ_cc' = ⟨S_c, S_c'⟩``."""
        gram = k_mat @ inputs.score_gram.to(torch.float64) @ k_mat.mT  # (B, C, C)
        diag = gram.diagonal(dim1=-2, dim2=-1)
        quad = (phi[:, :, None] * gram * phi[:, None, :]).sum((-2, -1))
        bracket = quad - (phi * diag).sum(-1)
        if hessian_scale != 0.0:  # Σ Φ_cc' Γ_cc' = λ (Σ π_c Γ_cc − πᵀΓπ)
            bracket = bracket + hessian_scale * ((phi * diag).sum(-1) - quad)
        return 0.5 * inputs.g2_dt * bracket

    def _and_weights(self, node: And, k_mat: Tensor, potentials: Tensor, inputs: CombineInputs) -> Tensor:
        """Prop. 6 over the children, as if the node's κ = Σ_c λ_c κ_c alone drove the step.

        Each child's potential changes by ``Δφ_c(κ) = φ_c(ℓ + A κ + b) − φ_c(ℓ)`` (up to the term
        common to every child of one degree). For leaves that is linear, ``κ_cᵀ(A κ + b)``, and the
        C × C system ``(K A Kᵀ, K b)`` is solved once by :func:`and_weights`: flat AND exactly. For
        a mixture-type child it is not (log Σ e^{ℓᵢ + Δᵢ} has an Itô term ½ Var_π(Δ) that a
        first-order row misses; it left 0.5 nats between (A | B) and C at 400 steps), so two Newton
        steps follow, each linearising every child at the current κ.
        """
        c = k_mat.shape[1]
        if c == 1:
            return k_mat.new_ones(k_mat.shape[0], 1)
        a = inputs.increment_matrix.to(torch.float64)
        b = inputs.increment_offset.to(torch.float64)
        target = None
        if node.log_weights is not None:
            offsets = _device_constant(node.log_weights, k_mat.dtype, k_mat.device)
            target = (offsets * inputs.step_fraction).expand(k_mat.shape[0], c)
        lam = and_weights(k_mat @ a @ k_mat.mT, (k_mat @ b[:, :, None])[..., 0], target)
        if all(isinstance(child, Leaf) for child in node.children) or inputs.step_fraction == 0.0:
            return lam  # leaves are linear; a last step onto σ = 0 has a system only up to scale
        log_q = inputs.log_q.to(torch.float64)
        for _ in range(2):
            kappa = (lam[:, :, None] * k_mat).sum(1)
            delta = (a @ kappa[:, :, None])[..., 0] + b  # the leaves' increments at this κ (B, M)
            moved = CombineInputs(log_q + delta, a, b, inputs.step_fraction)
            after = [self._evaluate(child, moved, []) for child in node.children]
            k_after = torch.stack([v.kappa for v in after], 1)  # ∂φ_c/∂ℓ at the moved point (B, C, M)
            value = torch.stack([v.potential for v in after], 1) - potentials  # Δφ_c(κ) (B, C)
            slope = k_after @ a  # (B, C, M): d Δφ_c / dκ
            a_nodes = slope @ k_mat.mT
            b_nodes = value - (slope @ kappa[:, :, None])[..., 0]
            lam = and_weights(a_nodes, b_nodes, target)
        return lam


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
        return And(kids, node.log_weights)
    if isinstance(node, Product):
        return Product(kids, node.exponents, node.correct)
    return type(node)(kids, node.sharpness, node.correct)


def compile_expression(expression: Node, leaves: Sequence[str | int] | None = None) -> CompiledExpression:
    """Check ``expression`` and bind it to the denoiser's outputs.

    Args:
        expression: a tree of nodes.
        leaves: the name of each denoiser output in order (prompts, model names or indices); by
            default the expression's own leaves in order of first appearance (:func:`leaf_names`).

    Returns:
        A :class:`CompiledExpression`, a combiner for :func:`superdiff.sampling.sample_sde`.

    Raises:
        ValueError: for a leaf the denoiser does not have, mixture-type nodes over children of
            different degrees, or a corrected node inside an And.
    """
    if not isinstance(expression, NODE_TYPES):
        _refuse("expression", expression, "pass a node such as And((Leaf('red'), Leaf('circle')))")
    names = leaf_names(expression)
    leaves = tuple(names if leaves is None else leaves)
    if len(set(leaves)) != len(leaves):
        _refuse("leaves", leaves, "name every denoiser output once")
    missing = [n for n in names if n not in leaves]
    if missing:
        _refuse("expression", describe(expression), f"its leaves {missing} are not among the models {list(leaves)}")
    degree = _degree(expression)
    _check_no_correction_under_and(expression)
    expression = _without_single_child_nodes(expression)
    nodes: list[Node] = []

    def walk(n: Node) -> None:
        if not isinstance(n, Leaf):
            nodes.append(n)
            for c in n.children:
                walk(c)

    walk(expression)
    return CompiledExpression(
        expression=expression,
        leaves=leaves,
        degree=degree,
        needs_system=any(isinstance(n, And) and len(n.children) > 1 for n in nodes),
        needs_scores=any(_corrects(n) for n in nodes),
        nodes=tuple(nodes),
    )
