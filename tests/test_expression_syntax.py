"""The expression syntax: precedence, round trips through ``describe``, and errors that point at the problem."""

import pytest

from superdiff.expression_syntax import ExpressionSyntaxError, parse_expression
from superdiff.expressions import And, Anneal, Leaf, Not, Or, Product, SoftMax, SoftMin, describe

A, B, C, U = Leaf("a"), Leaf("b"), Leaf("c"), Leaf("")


@pytest.mark.parametrize(
    "text, tree",
    [
        ('"a" | "b" & "c"', Or((A, And((B, C))))),
        ('"a" & "b" * "c"', And((A, Product((B, C))))),
        ('("a" | "b") & "c"', And((Or((A, B)), C))),
        ('"a" * !"b"', Product((A, Not(B, U)))),
        ('!"a" | "b"', Or((Not(A, U), B))),
        ('"a"^2 * "b"', Product((A, B), (2.0, 1.0))),
        ('"a"^0.5', Anneal(A, 0.5)),
        ('!"a"^2', Not(Anneal(A, 2.0), U)),
        ('"a" | "b" | "c"', Or((A, B, C))),
        ('0 & 1', And((Leaf(0), Leaf(1)))),
        ("'single' | \"say \\\"hi\\\"\" | ''", Or((Leaf("single"), Leaf('say "hi"'), U))),
        ('softmin("a", "b")[sharpness=4]', SoftMin((A, B), 4.0)),
        ('softmax("a", "b")[correct=false]', SoftMax((A, B), 1.0, False)),
        ('not("a", "b")[strength=2]', Not(A, B, 2.0)),
        ('OR("a", "b")[temperature=2, weights=0;-1, correct]', Or((A, B), 2.0, (0.0, -1.0), True)),
        ('("a" * "b")[correct=false]', Product((A, B), None, False)),
        ('("a" | "b")[temperature=0.5]', Or((A, B), 0.5)),
        ('anneal("a")[exponent=3]', Anneal(A, 3.0)),
        ('  "a"\n&\t"b"  ', And((A, B))),
    ],
)
def test_operators_bind_loosest_to_tightest_or_and_product_not_power(text, tree):
    assert parse_expression(text) == tree


TREES = [
    A,
    Leaf(3),
    Leaf('quote " backslash \\ newline \n tab \t'),
    Or((A,)),
    Or((A, B), 0.25, (0.1234567, -2.5), True),
    And((Or((A, B)), Leaf(0)), (1.0, 0.0)),
    Product((A, B, C), (2.0, 1.0, -0.3)),
    Product((A,), (1.0,), False),
    Anneal(Or((A, B)), 1e-7),
    SoftMax((A, B), 3.5, False),
    SoftMin((And((A, B)), C), 0.1),
    Not(Product((A, B)), B, 0.75, False),
    Not(A, U),
    And((Not(Or((A, B), 2.0), U), SoftMin((A, Leaf(1)), 8.0))),
]


@pytest.mark.parametrize("tree", TREES, ids=range(len(TREES)))
def test_describe_parses_back_to_the_same_tree(tree):
    assert parse_expression(describe(tree)) == tree


@pytest.mark.parametrize(
    "text, position, words",
    [
        ("", 0, "expected a prompt in quotes"),
        ('"a" & ', 6, "found the end of the expression"),
        ('"a" "b"', 4, "expected the end of the expression or an operator"),
        ('red & "circle"', 0, 'prompts go in quotes ("red")'),
        ('"a" & "b', 6, "never closed"),
        ('("a" | "b"', 10, "')' to close the '(' at position 0"),
        ('"a" + "b"', 4, "unexpected character '+'"),
        ('xor("a", "b")', 0, "the functions are or, and"),
        ('or("a", "b")[sharpness=2]', 13, "or has no option 'sharpness'; its options are temperature"),
        ('or("a", "b")[temperature=0]', 0, "temperature=0.0 is not valid; use a finite number > 0"),
        ('softmin("a", "b")[sharpness=1e999]', 28, "sharpness must be a finite number"),
        ('or("a", "b")[weights=1]', 0, "pass 2 numbers, one for each of the 2 children"),
        ('or("a", "b")[temperature=2, temperature=3]', 28, "given twice"),
        ('product("a", "b")[correct=maybe]', 26, "true or false for correct"),
        ('"a"^x', 4, "a number after '^'"),
        ("1.5 | 0", 0, "a bare number is a model index"),
        ('not("a", "b", "c")', 0, "takes a child and optionally a reference"),
        ('anneal("a")', 0, "takes one child and its exponent"),
        ('("a")[correct=false]', 5, "this group is a single prompt or index"),
        ('("a"^2 * "b")[exponents=1;1]', 13, "either with ^ or with exponents="),
        ('"a\\q"', 2, "unknown escape"),
        ('"  " & "a"', 0, "Leaf.name"),
    ],
)
def test_errors_name_the_problem_and_point_at_it(text, position, words):
    with pytest.raises(ExpressionSyntaxError) as info:
        parse_expression(text)
    err = info.value
    assert err.position == position and err.expression == text
    assert words in str(err)
    caret_line = str(err).splitlines()[-1]
    assert caret_line.index("^") == 2 + position  # two spaces of indent, then the caret under the place


def test_a_non_string_is_a_value_error():
    with pytest.raises(ValueError, match="pass a string"):
        parse_expression(Leaf("a"))  # type: ignore[arg-type]


def shown_under_caret(err: ExpressionSyntaxError) -> str:
    """The text of the message's expression line from the caret's column on (columns counted as a
    terminal shows them: East Asian wide characters take two)."""
    import unicodedata

    *_, line, caret = str(err).splitlines()
    column, i = caret.index("^"), 0
    while column > 0:
        column -= 2 if unicodedata.east_asian_width(line[i]) in "WF" else 1
        i += 1
    return line[i:]


@pytest.mark.parametrize("text, position, shown", [
    ('"a\u200b\u200b" & & "b"', 8, r'"a\u200b\u200b" & & "b"'),  # zero-width spaces in a prompt
    ('"red\x1b[31m" & & "b"', 13, r'"red\x1b[31m" & & "b"'),  # a terminal escape
    ('"a" &\n&\t"b"', 6, r'"a" &\n&\t"b"'),  # newline and tab: one line, the caret still under the '&'
    ('"紅色" & | "b"', 7, '"紅色" & | "b"'),  # wide characters take two columns
])
def test_invisible_characters_are_escaped_and_the_caret_stays_under_the_place(text, position, shown):
    with pytest.raises(ExpressionSyntaxError) as info:
        parse_expression(text)
    err = info.value
    assert err.position == position and str(err).splitlines()[-2] == "  " + shown
    assert shown_under_caret(err).startswith(text[position])
    assert not any(c in str(err) for c in "\u200b\x1b\t")


@pytest.mark.parametrize("text, position, found", [
    ('"a" & ' * 20000 + '& "b"', 120000, "&"),  # the problem far inside a long expression
    ('"red" * (' + "x" * 100000, 9, "x"),  # a 100k-character name, echoed in the problem too
    ('"a" | "' + "y" * 100000, 6, '"'),  # a prompt never closed
    ("1" * 100000 + ".5", 0, "1"),  # a 100k-digit number
])
def test_a_long_expression_is_shown_around_the_problem_only(text, position, found):
    with pytest.raises(ExpressionSyntaxError) as info:
        parse_expression(text)
    err = info.value
    assert err.position == position and len(str(err)) < 500
    assert shown_under_caret(err).startswith(found) and f"(at position {position})" in str(err)
