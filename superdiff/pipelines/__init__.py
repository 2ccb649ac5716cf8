"""diffusers pipelines built on the superdiff core: compose prompts of one text-to-image model
(Stable Diffusion 1.x/2.x, SDXL, SD3 / SD3.5 flow transformers, FLUX.1, Qwen-Image, Z-Image) or separately
trained unconditional UNets, with OR / AND / average / sum, in diffusers' conventions."""

from .base import SuperDiffBasePipeline, compose, superdiff_class_of
from .compile import compile_networks, to_channels_last
from .denoisers import DiffusersDenoiser, Schedule, schedule_from_scheduler
from .flow import SuperDiffFlowPipeline
from .flux import SuperDiffFluxPipeline
from .loading import pipeline_class_for
from .output import SuperDiffPipelineOutput
from .qwenimage import SuperDiffQwenImagePipeline
from .sdxl import SuperDiffXLPipeline
from .stable_diffusion import SuperDiffPipeline
from .unconditional import SuperDiffUnconditionalPipeline
from .zimage import SuperDiffZImagePipeline

__all__ = [
    "compose",
    "superdiff_class_of",
    "SuperDiffBasePipeline",
    "compile_networks",
    "pipeline_class_for",
    "to_channels_last",
    "SuperDiffFlowPipeline",
    "SuperDiffFluxPipeline",
    "SuperDiffQwenImagePipeline",
    "SuperDiffZImagePipeline",
    "DiffusersDenoiser",
    "Schedule",
    "schedule_from_scheduler",
    "SuperDiffPipelineOutput",
    "SuperDiffPipeline",
    "SuperDiffUnconditionalPipeline",
    "SuperDiffXLPipeline",
]
