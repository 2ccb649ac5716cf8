"""What a run composes, checked once for every command (generate, sweep lines, the app): its prompts
(or embedded model names), an expression's leaves, and the words an embedded model knows."""

from __future__ import annotations

from superdiff.expressions import UNCONDITIONAL, Node, leaf_names

from .errors import BadInput
from .limits import control_character_problem


def expression_items(node: Node, model: str) -> list[str]:
    """An expression's leaves as the run's prompts (model names for embedded-digits), checked: names
    in quotes (a bare index is for stacks built in Python), and the empty prompt only where the
    model has an unconditional branch."""
    leaves = leaf_names(node)
    digits = model == "embedded-digits"
    what = "model name" if digits else "prompt"
    for leaf in leaves:
        if isinstance(leaf, int):
            example = '"a" | "b"' if digits else '"red" & "circle"'
            raise BadInput(f"the expression's leaf {leaf} is a model index, which only a stack of models built in "
                           f"Python takes; write each {what} in quotes, e.g. {example}")
    if digits and UNCONDITIONAL in leaves:
        raise BadInput('embedded-digits has no unconditional model for "" (NOT\'s default reference); give NOT a '
                       'reference among a, b and all, e.g. not("b", "all")')
    items = [str(leaf) for leaf in leaves]
    check_items(items, what, allow_empty=not digits)
    return items


def check_items(items: list[str], what: str, allow_empty: bool = False) -> None:
    """Each prompt (model name) non-empty plain text; how many a mode needs is the combiner's check.
    ``allow_empty``: an expression's leaves, where the empty prompt is the unconditional model."""
    for i, p in enumerate(items):
        if allow_empty and p == UNCONDITIONAL:
            continue
        if not p.strip():
            raise BadInput(f"{what} {i + 1} is empty; every {what} must be a non-empty string")
        problem = control_character_problem(p, f"{what} {i + 1}")
        if problem:
            raise BadInput(problem)


def vocabulary_problem(model: str, items: list[str] | tuple[str, ...]) -> str | None:
    """What an embedded model cannot compose in ``items``, as "problem; fix": words the embedded
    shapes or scenes model's captions never had (its tokenizer would spell them letter by letter), or names
    that are not embedded-digits' models; None for every other model. The one vocabulary check of
    generate, sweep lines and the app (through :func:`~superdiff_cli.models.model_problem`)."""
    from .models import DEFAULT_ITEMS, PROMPTED_EMBEDDED, caption_words

    if model in PROMPTED_EMBEDDED:
        words = caption_words(model)
        unknown = sorted({w for p in items for w in p.lower().split() if w not in words})
        if unknown:
            example = " ".join(f"--and {p!r}" if " " in p else f"--and {p}" for p in DEFAULT_ITEMS[model])
            return (f"{model} knows only the words {', '.join(words)}; got {', '.join(unknown)}; "
                    f"compose those words, e.g. {example}")
    elif model == "embedded-digits":
        from .models import DIGIT_MODELS

        unknown = [n for n in items if n not in DIGIT_MODELS]
        if unknown:
            return (
                f"embedded-digits composes the models a (digits 0-4), b (5-9) and all; got {unknown}; use a, b or all"
            )
    return None
