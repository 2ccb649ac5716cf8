"""Speed options for the denoising networks of a superdiff pipeline: ``torch.compile`` and the
channels-last memory format, both opt-in.

Only the network is touched (the UNet or transformer that every step calls once, batched over all
conditions); the text encoders and the VAE run once per call and are left alone. The step loop
keeps the batch shape fixed, so a compiled network compiles once per (batch, resolution) and later
calls reuse it; the first call pays the compilation (tens of seconds on a CPU, more for SD-sized
models). Channels-last lets cuDNN pick its faster NHWC convolution kernels for fp16/bf16 UNets; the
samples do not change (tested).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers.utils.torch_utils import is_compiled_module

__all__ = ["compile_networks", "to_channels_last"]


def _map_networks(pipe: Any, change: Callable[[Any], Any]) -> Any:
    """Replace each denoising network ``n`` of ``pipe`` by ``change(n)``: ``pipe.unet`` (SD, SDXL),
    ``pipe.transformer`` (flow) and each of ``pipe.unets`` (unconditional models)."""
    found = False
    for name in ("unet", "transformer"):
        network = getattr(pipe, name, None)
        if network is not None:
            found = True
            setattr(pipe, name, change(network))
    unets = getattr(pipe, "unets", None)
    if isinstance(unets, list):
        found = True
        pipe.unets = [change(u) for u in unets]
    if not found:
        raise ValueError(f"{type(pipe).__name__} has no unet, transformer or unets; pass a superdiff pipeline")
    return pipe


def compile_networks(pipe: Any, **compile_kwargs: Any) -> Any:
    """Replace ``pipe``'s denoising network(s) by ``torch.compile(network, **compile_kwargs)``.

    Networks already compiled are left as they are. Returns ``pipe``, so
    ``compile_networks(Pipeline.from_pretrained(path)).to("cuda")`` reads well.

    >>> pipe = compile_networks(SuperDiffPipeline.from_pretrained(path), mode="max-autotune")  # doctest: +SKIP
    """
    return _map_networks(pipe, lambda n: n if is_compiled_module(n) else torch.compile(n, **compile_kwargs))


def to_channels_last(pipe: Any) -> Any:
    """Store ``pipe``'s denoising network(s) in the channels-last memory format, in place.

    Call it before :func:`compile_networks`. Returns ``pipe``.
    """
    return _map_networks(pipe, lambda n: n.to(memory_format=torch.channels_last))
