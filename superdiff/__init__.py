"""superdiff: compose pretrained diffusion models at inference time (SuperDiff, Skreta et al. 2025)."""

from .analytic import GaussianMixture, MixtureDenoiser
from .combine import And, Average, CombineInputs, Fixed, Or, Sum, and_weights, make_combiner, or_weights
from .models import Denoiser, NetworkDenoiser, stack_denoisers
from .processes import (
    EDM,
    DiscreteSigma,
    DiscreteVP,
    Process,
    RectifiedFlow,
    VarianceExploding,
    VPCosine,
    VPLinear,
    VPLinearSigmaT,
    from_denoised,
    to_denoised,
)
from .sampling import SamplerOutput, StepInfo, mix_denoised, prior_sample, sample_ode, sample_sde

__version__ = "0.1.0"
__all__ = [
    "GaussianMixture", "MixtureDenoiser", "And", "Average", "CombineInputs", "Fixed", "Or", "Sum",
    "and_weights", "make_combiner", "or_weights", "Denoiser", "NetworkDenoiser", "stack_denoisers",
    "EDM", "DiscreteSigma", "DiscreteVP", "Process", "RectifiedFlow", "VarianceExploding", "VPCosine",
    "VPLinear", "VPLinearSigmaT", "from_denoised", "to_denoised", "SamplerOutput", "StepInfo", "mix_denoised",
    "prior_sample", "sample_ode", "sample_sde",
]
