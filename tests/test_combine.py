"""Combiners: OR is a softmax that never NaNs; AND solves Eq. 78 exactly, and degrades gracefully."""

import math

import pytest
import torch

from superdiff.combine import And, CombineInputs, Or, and_weights, make_combiner, or_weights


def test_or_weights_are_the_tempered_biased_softmax_and_survive_overflow():
    log_q = torch.tensor(
        [[0.0, math.log(3.0)], [1e308, 1e308], [float("-inf"), 0.0], [float("nan"), 1.0]], dtype=torch.float64
    )
    k = or_weights(log_q)
    torch.testing.assert_close(k[0], torch.tensor([0.25, 0.75], dtype=torch.float64))
    torch.testing.assert_close(k[1], torch.tensor([0.5, 0.5], dtype=torch.float64))
    torch.testing.assert_close(k[2], torch.tensor([0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(k[3], torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert bool(torch.isfinite(or_weights(torch.full((2, 3), float("-inf")))).all())
    biased = or_weights(torch.zeros(1, 2), 1.0, torch.tensor([math.log(0.8), math.log(0.2)]))
    torch.testing.assert_close(biased, torch.tensor([[0.8, 0.2]]))
    sharp = or_weights(torch.tensor([[0.0, 0.1]]), temperature=100.0)
    assert float(sharp[0, 1]) > 0.9999


@pytest.mark.parametrize("m", [2, 3, 5])
def test_and_weights_equalise_the_increments(m):
    g = torch.Generator().manual_seed(m)
    e = torch.randn(7, m, 10, generator=g, dtype=torch.float64)
    a = e @ e.transpose(1, 2) + torch.randn(7, m, m, generator=g, dtype=torch.float64) * 0.1
    b = torch.randn(7, m, generator=g, dtype=torch.float64) * 5
    target = torch.randn(7, m, generator=g, dtype=torch.float64)
    kappa = and_weights(a, b, target)
    increments = (a @ kappa[..., None])[..., 0] + b - target
    torch.testing.assert_close(kappa.sum(-1), torch.ones(7, dtype=torch.float64))
    spread = increments.max(-1).values - increments.min(-1).values
    assert float(spread.max()) < 1e-9


@pytest.mark.parametrize("m", [2, 3])
def test_and_weights_do_not_depend_on_the_scale_of_the_system(m):
    g = torch.Generator().manual_seed(10 + m)
    e = torch.randn(3, m, 8, generator=g, dtype=torch.float64)
    a, b = e @ e.transpose(1, 2), torch.randn(3, m, generator=g, dtype=torch.float64)
    kappa = and_weights(a, b)
    assert float((kappa - 1 / m).abs().max()) > 1e-3  # a system with a non-trivial answer
    for factor in (1e-30, 1e30):
        torch.testing.assert_close(and_weights(a * factor, b * factor), kappa)


@pytest.mark.parametrize("m", [3, 5])
def test_and_weights_are_the_pseudo_inverse_solution(m):
    """For M > 2 (solved without a device sync) κ is pinv(KKT) @ rhs, singular systems included."""
    g = torch.Generator().manual_seed(20 + m)
    e = torch.randn(6, m, 9, generator=g, dtype=torch.float64)
    e[:3, 1] = e[:3, 0]  # half the batch has two indistinguishable models
    a, b = e @ e.transpose(1, 2), torch.randn(6, m, generator=g, dtype=torch.float64)
    b[:3, 1] = b[:3, 0]
    kkt = torch.zeros(6, m + 1, m + 1, dtype=torch.float64)
    kkt[:, :m, :m], kkt[:, :m, m], kkt[:, m, :m] = a, -1.0, 1.0
    rhs = torch.cat([-b, torch.ones(6, 1, dtype=torch.float64)], dim=1)[..., None]
    expected = (torch.linalg.pinv(kkt, rtol=1e-10) @ rhs)[:, :m, 0]
    torch.testing.assert_close(and_weights(a, b), expected, rtol=0, atol=1e-7)


def test_and_with_identical_models_splits_evenly_and_never_nans():
    e = torch.randn(4, 1, 6, dtype=torch.float64).expand(4, 3, 6)
    a = e @ e.transpose(1, 2)
    b = torch.randn(4, 1, dtype=torch.float64).expand(4, 3)
    kappa = and_weights(a, b)
    torch.testing.assert_close(kappa, torch.full((4, 3), 1 / 3, dtype=torch.float64))
    torch.testing.assert_close(and_weights(a[:, :2, :2], b[:, :2]), torch.full((4, 2), 0.5, dtype=torch.float64))
    # two identical, one different: the identical pair shares its weight equally
    e2 = torch.randn(4, 3, 6, dtype=torch.float64)
    e2[:, 1] = e2[:, 0]
    a2 = e2 @ e2.transpose(1, 2)
    b2 = torch.randn(4, 3, dtype=torch.float64)
    b2[:, 1] = b2[:, 0]
    k2 = and_weights(a2, b2)
    torch.testing.assert_close(k2[:, 0], k2[:, 1])
    # all-zero and non-finite systems fall back to finite weights
    assert bool(torch.isfinite(and_weights(torch.zeros(2, 2, 2), torch.zeros(2, 2))).all())
    assert bool(torch.isfinite(and_weights(torch.full((2, 2, 2), float("nan")), torch.zeros(2, 2))).all())


@pytest.mark.parametrize("m", [2, 3, 5])
def test_and_weights_of_offset_columns_are_linear_along_them(m):
    """Offsets given as columns of one system: each column is that offset's κ, and a combination of the
    columns is the κ of the combined offset (what the sampler reads κ(t) = κ₀ + t κ₁ from), for regular
    systems and for two indistinguishable models alike; a sample whose columns would take different
    kinds of solution (exact for one, damped for the other) is NaN in every column, never a mixture."""
    g = torch.Generator().manual_seed(30 + m)
    e = torch.randn(8, m, 9, generator=g, dtype=torch.float64)
    e[:3, 1] = e[:3, 0]  # three samples with two indistinguishable models
    a = e @ e.transpose(1, 2) + 0.1 * torch.randn(8, m, m, generator=g, dtype=torch.float64)
    a[:3, 1], a[:3, :, 1] = a[:3, 0], a[:3, :, 0]
    b, r = torch.randn(8, m, generator=g, dtype=torch.float64), torch.randn(8, m, generator=g, dtype=torch.float64)
    b[:3, 1], r[:3, 1] = b[:3, 0], r[:3, 0]
    target = torch.randn(8, m, generator=g, dtype=torch.float64)
    columns = and_weights(a, torch.stack([b, b + r], -1), target)
    assert columns.shape == (8, m, 2)
    for j, offset in enumerate((b, b + r)):
        torch.testing.assert_close(columns[..., j], and_weights(a, offset, target), rtol=1e-9, atol=1e-9)
    for t in (-0.7, 0.4, 2.5):
        along = columns[..., 0] + t * (columns[..., 1] - columns[..., 0])
        torch.testing.assert_close(along, and_weights(a, b + t * r, target), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(columns[:3, 0], columns[:3, 1])  # the pair shares its weight in every column
    if m == 2:
        return
    # Nearly indistinguishable models (1e-13 apart): an offset they agree on is solved damped (the pair splits its
    # weight evenly), one they disagree on only exactly (κ of order 1e12).
    e = torch.randn(2, m, 9, generator=g, dtype=torch.float64)
    e[:, 1] = e[:, 0] + 1e-13 * torch.randn(2, 9, generator=g, dtype=torch.float64)
    a = e @ e.transpose(1, 2)
    agreed = torch.randn(2, m, generator=g, dtype=torch.float64)
    agreed[:, 1] = agreed[:, 0]
    apart = agreed.clone()
    apart[:, 1] += 1.0
    damped, exact = and_weights(a, agreed), and_weights(a, apart)
    assert float((damped[:, 0] - damped[:, 1]).abs().max()) < 1e-6 and float(damped.abs().max()) < 1e3
    assert bool(torch.isfinite(exact).all()) and float(exact[:, :2].abs().amin()) > 1e6
    assert bool(torch.isnan(and_weights(a, torch.stack([agreed, apart], -1))).all())
    assert bool(torch.isfinite(and_weights(a, torch.stack([apart, 2 * apart], -1))).all())


def test_and_combiner_spreads_offsets_over_steps():
    a = torch.tensor([[[2.0, 0.5], [0.5, 1.0]]], dtype=torch.float64)
    b = torch.tensor([[0.3, -0.2]], dtype=torch.float64)
    kappa = And(log_weights=(1.0, 0.0))(CombineInputs(torch.zeros(1, 2), a, b, step_fraction=0.25))
    inc = (a @ kappa.double()[..., None])[..., 0] + b
    assert abs(float(inc[0, 0] - inc[0, 1]) - 0.25) < 1e-9


def test_make_combiner_validates():
    with pytest.raises(ValueError, match="mode"):
        make_combiner("xor", 2)
    with pytest.raises(ValueError, match="at least 2"):
        make_combiner("and", 1)
    with pytest.raises(ValueError, match="temperature"):
        make_combiner("or", 2, temperature=0.0)
    with pytest.raises(ValueError, match="log_weights"):
        make_combiner("or", 3, log_weights=[0.0, 1.0])
    with pytest.raises(ValueError, match="^log_weights=.*not 'average'"):
        make_combiner("average", 2, log_weights=[0.0, 1.0])
    with pytest.raises(ValueError, match="temperature"):
        Or(temperature=-1.0)
    assert make_combiner("sum", 3).weights == (1.0, 1.0, 1.0)
    assert make_combiner("average", 4).affine and not make_combiner("sum", 2).affine


def test_one_vocabulary_flat_combiners_are_trees():
    """Mode names and flat combiners build expression trees: one And, one Or, Fixed a plain product."""
    from superdiff import combine, expressions
    from superdiff.expressions import Leaf, Product

    assert combine.And is expressions.And and combine.Or is expressions.Or
    assert combine.Fixed((0.7, 0.3)) == Product(exponents=(0.7, 0.3), correct=False)
    assert make_combiner("or", 2, temperature=2.0) == expressions.Or(temperature=2.0)
    leaves = (Leaf(0), Leaf(1), Leaf(2))
    assert And(log_weights=(1.0, 0.0, 0.0)).bind(3).expression == expressions.And(leaves, (1.0, 0.0, 0.0))
    assert make_combiner("average", 3).bind(3).expression == Product(leaves, (1 / 3,) * 3, correct=False)


@pytest.mark.parametrize("m", [2, 3])
def test_and_with_feedback_takes_its_share_off_the_tracked_gap_of_a_linear_system(m):
    """One step of a linear system solved by And(feedback=ρ): the gap of log q − ℓ about its mean shrinks
    by exactly 1 − ρ (with the offsets ℓ of Eq. 18 as the point the densities are pulled to)."""
    g = torch.Generator().manual_seed(m)
    e = torch.randn(5, m, 6, generator=g, dtype=torch.float64)
    a, b = e @ e.mT, torch.randn(5, m, generator=g, dtype=torch.float64)
    log_q = 3 * torch.randn(5, m, generator=g, dtype=torch.float64)
    for log_weights in (None, tuple(float(v) for v in torch.linspace(-1, 1, m))):
        combiner = And(log_weights=log_weights, feedback=0.3)
        assert combiner.expected_system
        kappa = combiner(CombineInputs(log_q, a, b, 0.01))
        after = log_q + (a @ kappa[..., None])[..., 0] + b
        shift = torch.zeros(m, dtype=torch.float64) if log_weights is None else torch.tensor(log_weights)
        gap = lambda lq: (lq - shift) - (lq - shift).mean(-1, keepdim=True)  # noqa: E731
        torch.testing.assert_close(gap(after), 0.7 * gap(log_q), rtol=0, atol=1e-9)
    assert not And().expected_system


@pytest.mark.parametrize("feedback", [0.0, 1.5, True, float("nan"), "0.5"])
def test_and_feedback_outside_its_range_is_refused(feedback):
    with pytest.raises(ValueError, match="feedback"):
        And(feedback=feedback)
