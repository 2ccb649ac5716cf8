"""Denoiser adapters: the conditions they cache follow what the user does to them."""

import pytest
import torch

from superdiff import NetworkDenoiser, VPLinear
from superdiff.pipelines import DiffusersDenoiser


def _network(x, t, cond):  # each row scaled by its condition's mean
    return x * cond.mean(dim=tuple(range(1, cond.dim())))[:, None, None]


def _diffusers_network(x, timestep, return_dict, encoder_hidden_states):
    return (_network(x, timestep, encoder_hidden_states),)


def _denoiser(kind, conditions):
    if kind == "network":
        return NetworkDenoiser(_network, VPLinear(), "sample", conditions=conditions)
    return DiffusersDenoiser(_diffusers_network, VPLinear(), "sample", lambda t: t,
                             conditions={"encoder_hidden_states": conditions}, num_outputs=conditions.shape[0])


@pytest.mark.parametrize("kind", ["network", "diffusers"])
def test_conditions_edited_in_place_are_seen_by_the_next_call(kind):
    conditions = torch.ones(2, 3, 4)
    denoiser = _denoiser(kind, conditions)
    x, t = torch.randn(5, 2, 2), torch.tensor(0.5)
    before = denoiser(x, t)
    torch.testing.assert_close(before, x[None].expand(2, -1, -1, -1))
    conditions[1] = 3.0
    after = denoiser(x, t)
    torch.testing.assert_close(after, _denoiser(kind, conditions.clone())(x, t))
    torch.testing.assert_close(after[1], 3 * x)


def test_network_denoiser_names_what_is_wrong_with_a_network_or_its_conditions():
    x, t = torch.randn(5, 2, 2), torch.tensor(0.5)
    with pytest.raises(ValueError, match="torch.stack"):
        NetworkDenoiser(_network, VPLinear(), "sample", conditions=[torch.ones(3), torch.ones(3)])
    learned_variance = NetworkDenoiser(lambda x, t: torch.cat([x, x], dim=1), VPLinear(), "epsilon")
    with pytest.raises(ValueError, match=r"shape \(5, 4, 2\) for inputs of shape \(5, 2, 2\)"):
        learned_variance(x, t)
    output_object = NetworkDenoiser(lambda x, t: (x,), VPLinear(), "epsilon")
    with pytest.raises(ValueError, match="tuple, not a tensor"):
        output_object(x, t)


def test_both_network_adapters_check_the_output_the_same_way():
    """NetworkDenoiser and the diffusers adapter share one batched call and one output check: a
    learned variance in extra channels is refused by both (the diffusers one used to slice it off)."""
    from superdiff.pipelines.denoisers import DiffusersDenoiser

    x, t = torch.randn(5, 2, 2), torch.tensor(0.5)
    learned = DiffusersDenoiser(lambda x, timestep, return_dict: (torch.cat([x, x], dim=1),), VPLinear(), "epsilon",
                                timestep=lambda t: t * 999)
    with pytest.raises(ValueError, match=r"shape \(5, 4, 2\) for inputs of shape \(5, 2, 2\)"):
        learned(x, t)
    fine = DiffusersDenoiser(lambda x, timestep, return_dict: (torch.zeros_like(x),), VPLinear(), "epsilon",
                             timestep=lambda t: t * 999)
    torch.testing.assert_close(fine(x, t)[0], x / VPLinear().alpha(t).float())


def test_the_unconditional_output_is_declared_not_assumed():
    """Guidance needs a denoiser that says its last output is the unconditional one, and such a
    denoiser needs guidance: the sampler refuses either mismatch before any network call."""
    from superdiff import GaussianMixture, MixtureDenoiser, Or, prior_sample, sample_sde, stack_denoisers

    a, b, null = (GaussianMixture.create([[float(k), 0.0]], 0.5) for k in (-1, 1, 0))
    plain = MixtureDenoiser((a, b), VPLinear())
    guided = MixtureDenoiser((a, b, null), VPLinear(), unconditional=True)
    x = prior_sample(plain, 8, plain.sample_shape, dtype=torch.float64)
    times = VPLinear().time_grid(5)
    with pytest.raises(
        ValueError, match=r"guidance_scale=3.0 steers from an unconditional prediction.*unconditional=True"
    ):
        sample_sde(plain, x, times, Or(), guidance_scale=3.0)
    with pytest.raises(ValueError, match=r"last output is unconditional.*pass a guidance_scale"):
        sample_sde(guided, x, times, Or())
    out = sample_sde(guided, x, times, Or(), guidance_scale=3.0)
    assert out.kappa_trace.shape[-1] == 2  # the null mixture guides; it is not a third model
    with pytest.raises(ValueError, match="leaves no model to guide"):
        NetworkDenoiser(_network, VPLinear(), "sample", conditions=torch.ones(1, 3), unconditional=True)
    with pytest.raises(ValueError, match="only the last denoiser of a stack"):
        stack_denoisers([guided, plain])
    assert stack_denoisers([plain, guided]).unconditional
