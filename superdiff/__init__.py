"""superdiff: compose pretrained diffusion models at inference time (SuperDiff, Skreta et al. 2025).

The public surface: the samplers, the combiners, the denoiser adapters, exact Gaussian mixtures and
the noising processes; everything else is reachable from its module (``superdiff.combine``,
``superdiff.density``, ``superdiff.processes``, ...). The diffusers pipelines are attributes too,
imported on first use, so ``import superdiff`` does not import diffusers.
"""

from typing import Any

from .analytic import GaussianMixture, MixtureDenoiser
from .combine import And, Average, Fixed, Or, Sum, make_combiner
from .models import NetworkDenoiser, stack_denoisers
from .processes import EDM, DiscreteSigma, DiscreteVP, RectifiedFlow, VarianceExploding, VPCosine, VPLinear
from .sampling import SamplerOutput, prior_sample, sample_ode, sample_sde

__version__ = "0.1.0"

#: The diffusers pipelines, imported from :mod:`superdiff.pipelines` when first asked for.
PIPELINES = ("SuperDiffPipeline", "SuperDiffXLPipeline", "SuperDiffFlowPipeline", "SuperDiffFluxPipeline",
             "SuperDiffQwenImagePipeline", "SuperDiffZImagePipeline", "SuperDiffUnconditionalPipeline",
             "pipeline_class_for", "compose")

__all__ = [
    "sample_sde", "sample_ode", "prior_sample", "SamplerOutput",
    "And", "Or", "Average", "Sum", "Fixed", "make_combiner",
    "NetworkDenoiser", "stack_denoisers", "GaussianMixture", "MixtureDenoiser",
    "VPLinear", "VPCosine", "VarianceExploding", "EDM", "RectifiedFlow", "DiscreteSigma", "DiscreteVP",
    *PIPELINES,
]  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in PIPELINES:
        from . import pipelines

        return getattr(pipelines, name)
    raise AttributeError(f"module 'superdiff' has no attribute {name!r}")
