"""The expression syntax: composition formulas as text, parsed into :mod:`superdiff.expressions` nodes.

Grammar (EBNF; whitespace between tokens is free; binding from loosest to tightest)::

    expression := or_expr
    or_expr    := and_expr { "|" and_expr }            Or          (SuperDiff OR, a mixture)
    and_expr   := product  { "&" product }             And         (SuperDiff AND, equal density)
    product    := unary    { "*" unary }               Product     (Feynman–Kac-corrected q₁·q₂)
    unary      := "!" unary | power                    Not         (against the empty prompt "")
    power      := primary [ "^" number ]               exponent    (annealing q^β; in a product, its β)
    primary    := prompt | index | "(" expression ")" [ options ]
                | function "(" expression { "," expression } ")" [ options ]
    function   := "or" | "and" | "product" | "softmax" | "softmin" | "not" | "anneal"
    options    := "[" option { "," option } "]"
    option     := name [ "=" value ]                   a bare name is "= true"
    value      := number { ";" number } | "true" | "false"
    prompt     := '"' characters '"' | "'" characters "'"   (\\" \\' \\\\ escape; "" is the unconditional model)
    index      := digits                                a model of a stack, by its index

The options each node takes (in brackets after its call or its parenthesised group):

==========================  ============================================================
``or(...)`` / ``a | b``     ``temperature=T`` (> 0), ``weights=ℓ₁;ℓ₂;…`` (log-weights), ``correct``
``and(...)`` / ``a & b``    ``weights=ℓ₁;ℓ₂;…``
``product(...)`` / ``*``    ``exponents=β₁;β₂;…``, ``correct=false`` (the plain score sum)
``softmax`` / ``softmin``   ``sharpness=λ`` (> 0), ``correct=false``
``not(c[, ref])`` / ``!c``  ``strength=γ`` (> 0), ``correct=false``; ``ref`` defaults to ``""``
``anneal(c)`` / ``c^β``     ``exponent=β``, ``correct=false``
==========================  ============================================================

Examples: ``("a dog" | "a cat") & "a hat"``, ``"red" * !"circle"``, ``"red"^2 * "circle"``,
``softmin("red", "circle")[sharpness=4]``, ``("red" * "circle")[correct=false]``, ``0 | 1``.
:func:`superdiff.expressions.describe` writes any tree back in this syntax (function form), and
parsing its text gives the same tree.

Errors are :class:`ExpressionSyntaxError` (a ``ValueError``) with the position, what was expected,
and the expression with a caret under the place. An expression nests at most
:data:`~superdiff.limits.MAX_DEPTH` (64) levels: parentheses, calls and ``!`` in the text, and nodes
from the root to a leaf in the tree it makes.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Callable

from ._text import escape_invisible, excerpt, shorten
from .expressions import UNCONDITIONAL, And, Leaf, Node, Not, Or, Product, SoftMax, SoftMin
from .limits import MAX_DEPTH

__all__ = ["ExpressionSyntaxError", "parse_expression", "FUNCTIONS"]


class ExpressionSyntaxError(ValueError):
    """A composition expression that does not parse, or whose node options are not valid.

    ``position`` is the 0-based character offset of the problem in ``expression``; the message
    shows the expression (a window of it around the position when long, invisible characters
    escaped) with a caret under the position."""

    def __init__(self, expression: str, position: int, problem: str) -> None:
        self.expression, self.position, self.problem = expression, position, problem
        line, column = excerpt(expression, position)
        super().__init__(f"{escape_invisible(problem)} (at position {position}):\n  {line}\n  {' ' * column}^")


@dataclass(frozen=True)
class _Token:
    kind: str  # "prompt", "number", "name", a punctuation character, or "end"
    text: str
    position: int
    value: object = None


_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PUNCTUATION = "|&*!^()[],=;"
_ESCAPES = {'"': '"', "'": "'", "\\": "\\", "n": "\n", "t": "\t"}


def _tokens(text: str) -> list[_Token]:
    out: list[_Token] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c.isspace():
            i += 1
        elif c in "\"'":
            start, chars = i, []
            i += 1
            while i < len(text) and text[i] != c:
                if text[i] == "\\":
                    if i + 1 >= len(text) or text[i + 1] not in _ESCAPES:
                        raise ExpressionSyntaxError(
                            text, i, "unknown escape in a prompt; use \\\" \\' \\\\ \\n or \\t (or the other quote)"
                        )
                    chars.append(_ESCAPES[text[i + 1]])
                    i += 2
                else:
                    chars.append(text[i])
                    i += 1
            if i >= len(text):
                raise ExpressionSyntaxError(text, start, f"this prompt is never closed: expected a closing {c}")
            i += 1
            out.append(_Token("prompt", text[start:i], start, "".join(chars)))
        elif c in _PUNCTUATION:
            out.append(_Token(c, c, i))
            i += 1
        elif (m := _NUMBER.match(text, i)) is not None:
            out.append(_Token("number", m.group(), i, float(m.group())))
            i = m.end()
        elif (m := _NAME.match(text, i)) is not None:
            out.append(_Token("name", m.group(), i))
            i = m.end()
        else:
            raise ExpressionSyntaxError(
                text, i, f"unexpected character {c!r}; expected a prompt in quotes, a model index, an operator "
                "(| & * ! ^), parentheses, or a function such as or(...)"
            )
    out.append(_Token("end", "", len(text)))
    return out


#: The functions of the syntax and the options each takes (name → kind: "number", "numbers", "flag").
FUNCTIONS: dict[str, dict[str, str]] = {
    "or": {"temperature": "number", "weights": "numbers", "correct": "flag"},
    "and": {"weights": "numbers"},
    "product": {"exponents": "numbers", "correct": "flag"},
    "softmax": {"sharpness": "number", "correct": "flag"},
    "softmin": {"sharpness": "number", "correct": "flag"},
    "not": {"strength": "number", "correct": "flag"},
    "anneal": {"exponent": "number", "correct": "flag"},
}
_PRIMARY = "a prompt in quotes, a model index, '(' or a function such as or(...)"


class _Parser:
    def __init__(self, text: str) -> None:
        self.text, self.tokens, self.at = text, _tokens(text), 0
        self.nesting = 0  # open parentheses, calls and '!' around the current token
        self.depths: dict[int, tuple[Node, int]] = {}  # id → (node, nodes from it to its deepest leaf)

    # -- tokens --------------------------------------------------------------------------------
    @property
    def token(self) -> _Token:
        return self.tokens[self.at]

    def fail(self, token: _Token, expected: str) -> None:
        found = "the end of the expression" if token.kind == "end" else shorten(token.text)
        raise ExpressionSyntaxError(self.text, token.position, f"expected {expected}, found {found}")

    def take(self, kind: str, expected: str) -> _Token:
        token = self.token
        if token.kind != kind:
            self.fail(token, expected)
        self.at += 1
        return token

    def accept(self, kind: str) -> _Token | None:
        if self.token.kind == kind:
            self.at += 1
            return self.tokens[self.at - 1]
        return None

    def build(self, position: int, make: Callable[[], Node]) -> Node:
        """A node from its constructor; its ValueError (a bad option value) points at ``position``, as
        does a tree deeper than :data:`~superdiff.limits.MAX_DEPTH` nodes."""
        try:
            node = make()
        except ValueError as exc:
            raise ExpressionSyntaxError(self.text, position, str(exc)) from None
        if not isinstance(node, Leaf):
            depth = 1 + max(self.depth_of(c) for c in node.children)
            if depth > MAX_DEPTH:
                raise ExpressionSyntaxError(self.text, position, f"this expression nests more than {MAX_DEPTH} "
                                            "operations inside each other here; nest at most "
                                            f"{MAX_DEPTH} (e.g. write a product of products as one product)")
            self.depths[id(node)] = (node, depth)
        return node

    def depth_of(self, node: Node) -> int:
        known = self.depths.get(id(node))
        return known[1] if known is not None and known[0] is node else 0

    def enter(self, token: _Token) -> None:
        """One more level of parentheses, call or '!' at ``token``: at most MAX_DEPTH, so the recursive
        descent stays far inside Python's recursion limit."""
        self.nesting += 1
        if self.nesting > MAX_DEPTH:
            raise ExpressionSyntaxError(self.text, token.position, f"more than {MAX_DEPTH} levels of parentheses, "
                                        f"calls and '!' are open here; nest at most {MAX_DEPTH}")

    # -- grammar -------------------------------------------------------------------------------
    def parse(self) -> Node:
        if self.token.kind == "end":
            self.fail(self.token, _PRIMARY)
        node = self.or_expr()
        if self.token.kind != "end":
            ops = "an operator (| & * ^), ',' or ')'" if self.at else _PRIMARY
            self.fail(self.token, f"the end of the expression or {ops}")
        return node

    def _infix(self, symbol: str, operand: Callable[[], Node], make: Callable[[list[Node]], Node]) -> Node:
        start = self.token.position
        children = [operand()]
        while self.accept(symbol):
            children.append(operand())
        return children[0] if len(children) == 1 else self.build(start, lambda: make(children))

    def or_expr(self) -> Node:
        return self._infix("|", self.and_expr, lambda c: Or(tuple(c)))

    def and_expr(self) -> Node:
        return self._infix("&", self.product, lambda c: And(tuple(c)))

    def product(self) -> Node:
        start = self.token.position
        factors = [self.unary()]
        while self.accept("*"):
            factors.append(self.unary())
        if len(factors) == 1:
            node, exponent = factors[0]
            return node if exponent is None else self.build(start, lambda: Product((node,), (exponent,)))
        children = tuple(node for node, _ in factors)
        exponents = tuple(1.0 if b is None else b for _, b in factors)
        return self.build(start, lambda: Product(children, exponents))

    def unary(self) -> tuple[Node, float | None]:
        """A factor and its exponent (None: no ``^``), kept apart so a product takes the exponent as its β."""
        bang = self.accept("!")
        if bang is None:
            return self.power()
        self.enter(bang)
        node, exponent = self.unary()
        self.nesting -= 1
        if exponent is not None:
            node = self.build(bang.position, lambda: Product((node,), (exponent,)))
        return self.build(bang.position, lambda: Not(node, Leaf(UNCONDITIONAL))), None

    def power(self) -> tuple[Node, float | None]:
        node = self.primary()
        if self.accept("^") is None:
            return node, None
        token = self.take("number", "a number after '^' (the exponent, e.g. ^2 or ^0.5)")
        return node, self.finite(token, "an exponent")

    def finite(self, token: _Token, what: str) -> float:
        value = float(token.value)  # type: ignore[arg-type]
        if not math.isfinite(value):
            raise ExpressionSyntaxError(self.text, token.position,
                                        f"{what} must be a finite number, got {shorten(token.text, quote=False)}")
        return value

    def primary(self) -> Node:
        token = self.token
        if token.kind == "prompt":
            self.at += 1
            return self.build(token.position, lambda: Leaf(token.value))  # type: ignore[arg-type]
        if token.kind == "number":
            self.at += 1
            if not re.fullmatch(r"\d+", token.text):
                raise ExpressionSyntaxError(
                    self.text, token.position,
                    "a bare number is a model index (a whole number >= 0, e.g. 0), got "
                    f"{shorten(token.text, quote=False)}; "
                    "put a prompt in quotes",
                )
            return Leaf(int(token.text))
        if token.kind == "(":
            self.at += 1
            self.enter(token)
            node = self.or_expr()
            self.take(")", "')' to close the '(' at position " + str(token.position) + ", or an operator (| & * ^)")
            self.nesting -= 1
            if self.token.kind == "[":
                return self.group_options(node, token)
            return node
        if token.kind == "name":
            if token.text.lower() not in FUNCTIONS:
                hint = ('prompts go in quotes ("' + (token.text if len(token.text) <= 60 else "...") + '")'
                        if self.tokens[self.at + 1].kind != "(" else f"the functions are {', '.join(FUNCTIONS)}")
                raise ExpressionSyntaxError(self.text, token.position, f"unknown name {shorten(token.text)}: {hint}")
            return self.call(token)
        self.fail(token, _PRIMARY)
        raise AssertionError  # unreachable: fail raises

    def call(self, name: _Token) -> Node:
        function = name.text.lower()
        self.at += 1
        self.take("(", f"'(' after {function}")
        self.enter(name)
        args = [self.or_expr()]
        while self.accept(","):
            args.append(self.or_expr())
        self.take(")", f"',' or ')' to close {function}(...) at position {name.position}")
        self.nesting -= 1
        options = self.options(function) if self.token.kind == "[" else {}
        return self.build(name.position, lambda: self.make(function, args, options, name))

    def make(self, function: str, args: list[Node], options: dict[str, object], name: _Token) -> Node:
        flag = bool(options.get("correct", True))
        if function == "or":
            return Or(tuple(args), options.get("temperature", 1.0), options.get("weights"),  # type: ignore[arg-type]
                      bool(options.get("correct", False)))
        if function == "and":
            return And(tuple(args), options.get("weights"))  # type: ignore[arg-type]
        if function == "product":
            return Product(tuple(args), options.get("exponents"), flag)  # type: ignore[arg-type]
        if function in ("softmax", "softmin"):
            kind = SoftMax if function == "softmax" else SoftMin
            return kind(tuple(args), options.get("sharpness", 1.0), flag)  # type: ignore[arg-type]
        if function == "not":
            if len(args) > 2:
                raise ValueError(f"not(...) takes a child and optionally a reference, got {len(args)} arguments; "
                                 'e.g. not("circle") or not("circle", "")')
            reference = args[1] if len(args) == 2 else Leaf(UNCONDITIONAL)
            return Not(args[0], reference, options.get("strength", 1.0), flag)  # type: ignore[arg-type]
        if len(args) != 1 or "exponent" not in options:
            raise ValueError('anneal(...) takes one child and its exponent, e.g. anneal("red")[exponent=2] '
                             '(or "red"^2)')
        return Product((args[0],), (options["exponent"],), flag)  # type: ignore[arg-type]

    def group_options(self, node: Node, paren: _Token) -> Node:
        """Options after a parenthesised group apply to the node the group made (``("a" | "b")[temperature=2]``)."""
        bracket = self.token
        kinds = {Or: "or", And: "and", Product: "product", SoftMax: "softmax", SoftMin: "softmin", Not: "not"}
        function = kinds.get(type(node))  # type: ignore[arg-type]
        if function is None:
            raise ExpressionSyntaxError(self.text, bracket.position, "options apply to an operator's node, and this "
                                        "group is a single prompt or index; drop the brackets")
        options = self.options(function)
        values = {f.name: getattr(node, f.name) for f in dataclasses.fields(node)}
        renamed = {"weights": "log_weights"}
        for key, value in options.items():
            values[renamed.get(key, key)] = value
        if function == "product" and "exponents" in options and any(b != 1.0 for b in node.exponents):  # type: ignore[union-attr]
            raise ExpressionSyntaxError(self.text, bracket.position, "this product already has exponents from '^'; "
                                        "give them either with ^ or with exponents=, not both")
        return self.build(paren.position, lambda: type(node)(**values))

    def options(self, function: str) -> dict[str, object]:
        self.take("[", "'['")
        allowed, out = FUNCTIONS[function], {}
        while True:
            key = self.take("name", f"an option name ({', '.join(allowed)})")
            name = key.text.lower()
            if name not in allowed:
                raise ExpressionSyntaxError(self.text, key.position, f"{function} has no option {key.text!r}; "
                                            f"its options are {', '.join(allowed)}")
            if name in out:
                raise ExpressionSyntaxError(self.text, key.position, f"option {name!r} is given twice")
            out[name] = self.option_value(name, allowed[name], key)
            if self.accept("]"):
                return out
            self.take(",", "',' or ']' after an option")

    def option_value(self, name: str, kind: str, key: _Token) -> object:
        if self.accept("=") is None:
            if kind != "flag":
                self.fail(self.token, f"'=' and a value for {name}")
            return True
        if kind == "flag":
            word = self.take("name", f"true or false for {name}")
            if word.text.lower() not in ("true", "false"):
                self.fail(word, f"true or false for {name}")
            return word.text.lower() == "true"
        what = "a number" if kind == "number" else "numbers separated by ';' (one per child)"
        values = [self.finite(self.take("number", f"{what} for {name}"), name)]
        while kind == "numbers" and self.accept(";"):
            values.append(self.finite(self.take("number", f"a number after ';' in {name}"), name))
        return values[0] if kind == "number" else tuple(values)


def parse_expression(text: str) -> Node:
    """Parse a composition expression (the grammar in this module's docstring) into a node tree.

    Raises :class:`ExpressionSyntaxError` (a ``ValueError``) naming the position and what was
    expected; a non-string is a ``ValueError`` too."""
    if not isinstance(text, str):
        raise ValueError(f"expression={text!r} is not valid; pass a string such as '\"red\" & \"circle\"'")
    return _Parser(text).parse()
