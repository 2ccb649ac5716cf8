"""The library's ranges and caps (superdiff.limits), how expressions bind their leaves, and runs that go
non-finite: each refused before the first network call, or failed naming the step and the node."""

import math

import pytest
import torch

from superdiff import GaussianMixture, MixtureDenoiser, VPLinear, prior_sample, sample_sde
from superdiff.combine import CombineInputs
from superdiff.expression_syntax import ExpressionSyntaxError, parse_expression
from superdiff.expressions import And, Leaf, Not, Product, compile_expression
from superdiff.limits import MAX_DEPTH, MAX_GAIN, MAX_LOG_WEIGHT, MAX_NETWORK_ROWS, NonFiniteError
from superdiff.toy import figure2_models

PROCESS = VPLinear()


class Counting:
    """figure2_models (2 models), counting its network calls; ``nan_from`` makes every prediction
    NaN from that call on (a model that overflows mid-run)."""

    def __init__(self, nan_from=None, outputs=2, unconditional=False):
        self.models = figure2_models()
        self.process, self.sample_shape = self.models.process, self.models.sample_shape
        self.num_outputs, self.unconditional, self.calls, self.nan_from = outputs, unconditional, 0, nan_from

    def __call__(self, x, t):
        self.calls += 1
        out = self.models(x, t)
        out = torch.cat([out] * (self.num_outputs // 2) + [out[:1]] * (self.num_outputs % 2))
        return out * math.nan if self.nan_from is not None and self.calls >= self.nan_from else out


def _kappa(text, models):
    """κ over the models of a parsed expression of products and NOTs (constant weights), one step."""
    expression = compile_expression(parse_expression(text))
    inputs = CombineInputs(torch.zeros(1, models, dtype=torch.float64), score_gram=torch.zeros(1, models, models,
                                                                                               dtype=torch.float64))
    return expression.leaves, expression.step(inputs).kappa[0].tolist()


# --- 1. a bare index is that model -------------------------------------------------------------


@pytest.mark.parametrize(
    "text, kappa",
    [("not(0, 1)", [-1.0, 2.0]),  # q_1^2 q_0^-1: model 1 is the reference
     ("not(1, 0)", [2.0, -1.0]),
     ("0 * not(1, 2)", [1.0, -1.0, 2.0]),
     ("1^2 * 0", [1.0, 2.0])],
)
def test_a_bare_index_weighs_that_model(text, kappa):
    leaves, got = _kappa(text, len(kappa))
    assert leaves == tuple(range(len(kappa))) and got == kappa


def test_not_by_index_samples_the_exact_negation():
    # not(0, 1) with model 0 the child and model 1 the reference: q_1^2 q_0^-1 of isotropic Gaussians is
    # Gaussian with precision 2/s_1² − 1/s_0² (swapped, the target would not be normalisable).
    child, ref = GaussianMixture.create([[1.0, 0.0]], 1.0), GaussianMixture.create([[0.0, 0.0]], 0.5)
    precision = 2 / 0.25 - 1 / 1.0
    mean0 = -1.0 / precision
    models = MixtureDenoiser((child, ref), PROCESS)
    g = torch.Generator().manual_seed(0)
    groups, k = 24, 32
    x = prior_sample(models, groups * k, models.sample_shape, g, dtype=torch.float64)
    out = sample_sde(models, x, PROCESS.time_grid(100), compile_expression(parse_expression("not(0, 1)")),
                     generator=g, particles=k)
    w = torch.softmax(out.log_weights.reshape(groups, k), -1)
    for f, exact in ((lambda s: s[:, 0], mean0), (lambda s: (s[:, 0] - mean0) ** 2, 1 / precision)):
        est = (w * f(out.samples).reshape(groups, k)).sum(-1)
        z = (float(est.mean()) - exact) / (float(est.std()) / math.sqrt(groups))
        assert abs(z) < 4, z


@pytest.mark.parametrize(
    "expression, message",
    [(parse_expression("!0"), 'unconditional model'),  # "" is no model of a stack
     (Product((Leaf("red"), Leaf("circle"))), "leaves="),  # names: only the denoiser knows their order
     (Product((Leaf(0), Leaf(1), Leaf(2))), "indices up to 2")],
)
def test_leaves_that_do_not_match_the_models_are_refused_before_a_network_call(expression, message):
    denoiser = Counting()
    x = prior_sample(denoiser, 4, (2,), torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=message):
        sample_sde(denoiser, x, PROCESS.time_grid(4), compile_expression(expression))
    assert denoiser.calls == 0


# --- 2. ranges that cannot work, refused; runs that go non-finite, failed -----------------------


@pytest.mark.parametrize(
    "text, message",
    [('"red"^1e308 * "circle"', "2\\*\\*23"),
     ('softmin("red", "circle")[sharpness=1e308]', "2\\*\\*-23, 2\\*\\*23"),
     ('softmin("red", "circle")[sharpness=1e-300]', "2\\*\\*-23, 2\\*\\*23"),
     ('and("red", "circle")[weights=1e308;-1e308]', "87.34"),
     ('or("red", "circle")[temperature=1e308]', "2\\*\\*23"),
     ('not("red")[strength=1e10]', "2\\*\\*23")],
)
def test_values_that_cannot_work_are_syntax_errors_with_the_range(text, message):
    with pytest.raises(ExpressionSyntaxError, match=message):
        parse_expression(text)


def test_the_range_edges_are_accepted_and_the_tree_gain_is_bounded():
    parse_expression(f'and("a", "b")[weights={math.floor(MAX_LOG_WEIGHT * 100) / 100};-87.33]')
    compile_expression(Product((Leaf(0), Leaf(1)), (MAX_GAIN / 2, MAX_GAIN / 2)))
    nested = Product((Product((Leaf(0), Leaf(1)), (4096.0, 4096.0)), Leaf(2)), (4096.0, 1.0))  # 2**25 + 1
    with pytest.raises(ValueError, match="multiply the predictions by up to"):
        compile_expression(nested)


@pytest.mark.parametrize("guidance, ok", [(MAX_GAIN / 2, True), (MAX_GAIN / 2 * 1.001, False), (1e300, False)])
def test_guidance_times_the_gain_is_bounded_before_a_network_call(guidance, ok):
    denoiser = Counting(outputs=3, unconditional=True)
    x = prior_sample(denoiser, 4, (2,), torch.Generator().manual_seed(0), dtype=torch.float64)
    product = compile_expression(Product((Leaf(0), Leaf(1))))  # gain 2
    if ok:
        sample_sde(denoiser, x, PROCESS.time_grid(2), product, guidance_scale=guidance)
        return
    with pytest.raises(ValueError, match="guidance_scale="):
        sample_sde(denoiser, x, PROCESS.time_grid(2), product, guidance_scale=guidance)
    assert denoiser.calls == 0


def test_a_run_that_goes_non_finite_fails_naming_the_step_and_the_node():
    denoiser = Counting(nan_from=3)
    x = prior_sample(denoiser, 8, (2,), torch.Generator().manual_seed(0), dtype=torch.float64)
    with pytest.raises(NonFiniteError, match=r"step 3 of 6 .*samples, log-densities.*of models 0, 1"):
        sample_sde(denoiser, x, PROCESS.time_grid(6), compile_expression(And((Leaf(0), Leaf(1)))))
    with pytest.raises(NonFiniteError, match="step 3 of 6 .*samples, log-densities, particle log-weights"):
        sample_sde(Counting(nan_from=3), x, PROCESS.time_grid(6), compile_expression(Product((Leaf(0), Leaf(1)))),
                   particles=2)


def test_a_node_whose_weights_go_non_finite_is_named():
    from superdiff.limits import FiniteWatch

    expression = compile_expression(parse_expression("and(0, or(1, 2))"))
    watch, ok = FiniteWatch(), torch.zeros(2, 3)
    watch.step(ok, ok, ok[:, 0], ok, (ok[:, :2], ok[:, :2]))
    watch.step(ok, ok, ok[:, 0], ok * math.nan, (ok[:, :2], ok[:, :2] * math.inf))
    with pytest.raises(NonFiniteError, match=r"step 2 of 2 .*model weights κ at node or\(1, 2\)"):
        watch.check(expression.nodes, expression.leaves)


# --- 4. rows of one network call ----------------------------------------------------------------


def test_the_rows_of_one_network_call_are_capped_before_it():
    denoiser = Counting(outputs=4)
    x = torch.zeros(MAX_NETWORK_ROWS // 4 + 1, 2)
    with pytest.raises(ValueError, match=f"{MAX_NETWORK_ROWS + 4} rows in one network call.*at most "
                                         f"{MAX_NETWORK_ROWS // 4} samples"):
        sample_sde(denoiser, x, PROCESS.time_grid(2), compile_expression(parse_expression("0 | 1 | 2 | 3")))
    assert denoiser.calls == 0


# --- 6. nesting depth ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["(" * 130 + '"a"' + ")" * 130, "!" * 130 + '"a"', "not(" * 130 + '"a"' + ")" * 130,
                                  '("a" | "b" * ' * 40 + '"c"' + ")" * 40])
def test_deep_nesting_is_a_syntax_error_at_its_position(text):
    with pytest.raises(ExpressionSyntaxError, match=f"nest at most {MAX_DEPTH}") as error:
        parse_expression(text)
    assert 0 < error.value.position < len(text)


def test_nesting_up_to_the_bound_parses_and_compiles():
    node = parse_expression("!" * MAX_DEPTH + '"a"')
    compile_expression(node, ("a", ""))


def test_a_deep_tree_built_in_python_is_refused_by_compile():
    node = Leaf(0)
    for _ in range(5000):  # deeper than Python's recursion limit
        node = Not(node, Leaf(1))
    with pytest.raises(ValueError, match=f"more than {MAX_DEPTH} nodes deep"):
        compile_expression(node)


@pytest.mark.parametrize("dtype, largest", [(torch.float16, 65.504), (torch.bfloat16, MAX_GAIN),
                                            (torch.float32, MAX_GAIN)])
def test_a_distilled_guidance_must_embed_in_the_transformers_dtype(dtype, largest):
    """FLUX embeds guidance × 1000 in the transformer's dtype: float16 overflows above 65.504 (to inf, then
    NaN in the sinusoids); beyond 2**23 the float32 embedding's phase is noise."""
    from superdiff.limits import distilled_guidance_problem

    assert distilled_guidance_problem(largest, dtype) is None
    problem = distilled_guidance_problem(largest * 1.01, dtype)
    assert problem.startswith(f"guidance_scale={largest * 1.01:g} is not valid")
    assert f"{largest:.6g} or less" in problem
