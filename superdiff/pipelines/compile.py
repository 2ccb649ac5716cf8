"""``torch.compile`` for the denoising networks of a superdiff pipeline, as an opt-in.

Only the network is compiled (the UNet or transformer that every step calls once, batched over all
conditions); the text encoders and the VAE run once per call and are left alone. The step loop
keeps the batch shape fixed, so the network compiles once per (batch, resolution) and later calls
reuse it; the first call pays the compilation (tens of seconds on a CPU, more for SD-sized models).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.utils.torch_utils import is_compiled_module

__all__ = ["compile_networks"]


def compile_networks(pipe: Any, **compile_kwargs: Any) -> Any:
    """Replace ``pipe``'s denoising network(s) by ``torch.compile(network, **compile_kwargs)``.

    Works on every superdiff pipeline: ``pipe.unet`` (SD, SDXL), ``pipe.transformer`` (flow) and each
    of ``pipe.unets`` (unconditional models). Networks already compiled are left as they are.
    Returns ``pipe``, so ``compile_networks(Pipeline.from_pretrained(path)).to("cuda")`` reads well.

    >>> pipe = compile_networks(SuperDiffPipeline.from_pretrained(path), mode="max-autotune")  # doctest: +SKIP
    """
    found = False
    for name in ("unet", "transformer"):
        network = getattr(pipe, name, None)
        if network is not None:
            found = True
            if not is_compiled_module(network):
                setattr(pipe, name, torch.compile(network, **compile_kwargs))
    unets = getattr(pipe, "unets", None)
    if isinstance(unets, list):
        found = True
        pipe.unets = [u if is_compiled_module(u) else torch.compile(u, **compile_kwargs) for u in unets]
    if not found:
        raise ValueError(f"{type(pipe).__name__} has no unet, transformer or unets to compile; pass a superdiff pipeline")
    return pipe
