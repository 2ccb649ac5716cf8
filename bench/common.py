"""Shared helpers for the benchmarks: a machine description, SD-shaped random UNets, timing, output."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from superdiff import DiscreteSigma, prior_sample, sample_sde


def machine() -> str:
    """What the numbers were measured on."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"CPU {cpu}, {torch.get_num_threads()} threads of {os.cpu_count()} cores, torch {torch.__version__}"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small sizes, finishes in under a minute on 2 CPU cores")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per variant (the median is reported)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (each script's default otherwise)")
    return p


def unet_config(size: str) -> dict:
    """A UNet2DConditionModel config: "tiny" (~1M params, CPU tests) or "sd" (SD-1.x-shaped, ~860M)."""
    if size == "tiny":
        return dict(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        )
    if size == "small":  # ~100M+, SD layout with narrower channels
        return dict(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(192, 384, 576, 576),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8,
        )
    return dict(sample_size=64, cross_attention_dim=768)  # diffusers' defaults are SD 1.x


def sd_denoiser(size: str, num_prompts: int, device: str, dtype: torch.dtype, seed: int = 0):
    """A random SD-shaped UNet as a denoiser over M prompts + the unconditional, in one call.

    It is the library's own :class:`~superdiff.pipelines.DiffusersDenoiser` (what the pipelines
    run), with Stable Diffusion's Euler schedule and input scaling: nothing in a step reads the
    device back, so GPU timings are not those of a synchronising adapter.
    """
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

    from superdiff.pipelines import DiffusersDenoiser

    torch.manual_seed(seed)
    cfg = unet_config(size)
    unet = UNet2DConditionModel(**cfg).to(device=device, dtype=dtype).eval()
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )
    process = DiscreteSigma.from_scheduler(scheduler)
    embeds = torch.randn(num_prompts + 1, 8, cfg["cross_attention_dim"], generator=torch.Generator().manual_seed(seed))
    denoiser = DiffusersDenoiser(unet, process, "epsilon", process.timestep,
                                 conditions={"encoder_hidden_states": embeds.to(device=device, dtype=dtype)},
                                 num_outputs=num_prompts + 1, scale_input=True, dtype=dtype, unconditional=True)
    latent = (cfg["in_channels"] if "in_channels" in cfg else 4, cfg["sample_size"], cfg["sample_size"])
    return denoiser, unet, latent, sum(p.numel() for p in unet.parameters())


class CachedDenoiser:
    """Returns a fixed prediction: timing a sampler with it times everything in a step except the network."""

    def __init__(self, denoiser, output):
        self.process, self.num_outputs, self.output = denoiser.process, denoiser.num_outputs, output
        self.unconditional = getattr(denoiser, "unconditional", False)

    def __call__(self, x, t):
        return self.output


def clock_mark(cuda: bool):
    """A point in time: ``time.perf_counter()`` on the CPU, a recorded CUDA event on a GPU (no sync)."""
    if not cuda:
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


class NetworkCallTimer:
    """Wraps a denoiser and marks when each network call starts and ends, so the share of a real
    sampling run spent outside the network (κ, densities, mixing, noise, the loop itself) is measured
    in place: right after each network call, with the caches and threads as the network left them.

    On CUDA the marks are events recorded in the stream (no synchronisation during the run), so the
    gaps are the GPU's time between the network's kernels, waiting for launches included.
    """

    def __init__(self, denoiser, device: str):
        self.denoiser, self.process, self.num_outputs = denoiser, denoiser.process, denoiser.num_outputs
        self.unconditional = getattr(denoiser, "unconditional", False)
        self.cuda = device.startswith("cuda")
        self.marks: list[tuple] = []

    def _mark(self):
        return clock_mark(self.cuda)

    def __call__(self, x, t):
        start = self._mark()
        out = self.denoiser(x, t)
        self.marks.append((start, self._mark()))
        return out

    def outside_fraction(self) -> float:
        """Of the span from the first network call's start to the last one's, the share spent
        between calls; then forget the marks, ready for the next run."""
        if self.cuda:
            torch.cuda.synchronize()

        def seconds(a, b) -> float:
            return a.elapsed_time(b) / 1000 if self.cuda else b - a

        marks, self.marks = self.marks, []
        if len(marks) < 2:
            raise ValueError("outside_fraction needs a run of at least 2 network calls")
        between = sum(seconds(end, following) for (_, end), (following, _) in zip(marks, marks[1:]))
        return between / seconds(marks[0][0], marks[-1][0])


#: A network-free run is ~50x shorter than a full one: it is timed this many times over per round,
#: so both timings span comparable stretches of wall time and the machine's jitter weighs alike.
NETWORK_FREE_RUNS = 20


def network_free(denoiser, batch: int, latent: tuple, times: torch.Tensor, device: str) -> CachedDenoiser:
    """``denoiser`` replaced by its output at the first time (see :class:`CachedDenoiser`)."""
    x0 = prior_sample(denoiser, batch, latent, torch.Generator().manual_seed(0), device)
    return CachedDenoiser(denoiser, denoiser(x0, times[0]))


def sampling_run(denoiser, combiner, batch: int, latent: tuple, times: torch.Tensor, device: str,
                 times_over: int = 1, **sample_kwargs) -> Callable[[], None]:
    """A function that runs ``sample_sde`` (guidance 7.5, fixed seeds) ``times_over`` times."""

    def run() -> None:
        for _ in range(times_over):
            x = prior_sample(denoiser, batch, latent, torch.Generator().manual_seed(0), device)
            sample_sde(denoiser, x, times, combiner, guidance_scale=7.5, generator=torch.Generator().manual_seed(1),
                       **sample_kwargs)

    return run


class _OpCounter(TorchDispatchMode):
    """Counts the tensor operations that compute something (views excluded): on a GPU, kernel launches."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            self.count += 1
        elif func.overloadpacket is torch.ops.aten.to and out.data_ptr() != args[0].data_ptr():
            self.count += 1  # under inference_mode a converting .to() arrives as a view op, yet copies
        return out


def operations_per_step(denoiser, combiner, batch: int, latent: tuple, steps: int, device: str,
                        **sample_kwargs) -> float:
    """Computing tensor operations per sampling step outside the network: a run of 2N steps minus
    one of N (which cancels the per-run set-up), divided by N, with the network's output cached.
    ``sample_kwargs`` go to ``sample_sde``."""
    counts = []
    for n in (steps, 2 * steps):
        times = denoiser.process.time_grid(n)
        with torch.inference_mode():
            run = sampling_run(
                network_free(denoiser, batch, latent, times, device), combiner, batch, latent, times, device,
                **sample_kwargs,
            )
            with _OpCounter() as counter:
                run()
        counts.append(counter.count)
    return (counts[1] - counts[0]) / steps


def wall_time(fn: Callable[[], object], device: str) -> float:
    """Seconds one call of ``fn`` takes, waiting for the GPU's queued work on CUDA."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved_times(
    fns: dict[str, Callable[[], object]], repeats: int, device: str, warmup: int = 1
) -> dict[str, list[float]]:
    """Wall times of each of ``fns``, timed in interleaved rounds (a, b, c, then c, b, a, ...), so a
    slow drift of the machine (another tenant, clock changes) falls on all of them alike and no
    function always runs right after the same other one."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    for r in range(repeats):
        for name in order if r % 2 == 0 else reversed(order):
            times[name].append(wall_time(fns[name], device))
    return times


def median_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over rounds of the per-round ratio: each pair was timed back to back, so the ratio
    of a pair is not disturbed by what the machine did in other rounds."""
    return statistics.median(n / d for n, d in zip(numerator, denominator))


def emit(result: dict, as_json: bool) -> None:
    """Print a readable summary, and the JSON object as the last line with ``--json``."""
    for key, value in result.items():
        if not as_json:
            print(f"{key}: {value}")
    if as_json:
        print(json.dumps(result))
