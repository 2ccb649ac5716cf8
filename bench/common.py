"""Shared helpers for the benchmarks: a machine description, SD-shaped random UNets, timing, output."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

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
    add_markdown_option(p)
    return p


def add_model_arguments(p: argparse.ArgumentParser, sizes: Sequence[str], size_help: str, latent_help: str) -> None:
    """The network's size and the run's shape, as every speed benchmark against diffusers spells them:
    ``--size`` (one of ``sizes``), ``--batch``, ``--latent`` and ``--threads`` (CPU intra-op threads)."""
    p.add_argument("--size", choices=tuple(sizes), default=None, help=size_help)
    p.add_argument("--batch", type=int, default=None, help="images per call (default 1)")
    p.add_argument("--latent", type=int, default=None, help=latent_help)
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default 1, see vs_diffusers.py)")


def transformer_bench_parser(description: str, sizes: Sequence[str],
                             text_tokens: tuple[int, int] | None = None) -> argparse.ArgumentParser:
    """:func:`parser` with the arguments of the transformer speed benchmarks (``flux_speed.py``,
    ``flux2_speed.py``, ``qwen_zimage_speed.py``): :func:`add_model_arguments`, and ``--text-tokens``
    where the text length is a setting (``text_tokens``: its defaults on CUDA and on the CPU)."""
    p = parser(description)
    add_model_arguments(p, sizes, "transformer config (SIZES above): default small on CUDA, tiny on CPU",
                        "latent side before the 2×2 packing (default 64 on CUDA: 1024 image tokens; 32 on CPU: 256; "
                        "16 quick: 64)")
    if text_tokens is not None:
        p.add_argument("--text-tokens", type=int, default=None,
                       help=f"max_sequence_length (default {text_tokens[0]} on CUDA, {text_tokens[1]} on CPU)")
    return p


def transformer_bench_args(description: str, sizes: Sequence[str], steps: int,
                           text_tokens: tuple[int, int] | None = None) -> argparse.Namespace:
    """The parsed command line of a transformer speed benchmark (:func:`transformer_bench_parser`) with
    every default filled in for the device: ``size`` small on CUDA (tiny on the CPU or with ``--quick``),
    ``steps`` (4 with ``--quick``), ``batch`` 1, ``latent`` 64 on CUDA (32 on the CPU, 16 with ``--quick``),
    ``text_tokens``, ``repeats`` 5 (3 with ``--quick``) and ``dtype`` (bfloat16 on CUDA); on the CPU it sets
    the intra-op threads (default 1)."""
    args = transformer_bench_parser(description, sizes, text_tokens).parse_args()
    cuda = args.device.startswith("cuda")
    args.size = args.size or ("small" if cuda and not args.quick else "tiny")
    args.steps = args.steps or (4 if args.quick else steps)
    args.batch = args.batch or 1
    args.latent = args.latent or (64 if cuda else 16 if args.quick else 32)
    if text_tokens is not None:
        args.text_tokens = args.text_tokens or text_tokens[0 if cuda else 1]
    if not cuda:
        torch.set_num_threads(args.threads or 1)
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.dtype = torch.bfloat16 if cuda else torch.float32
    return args


#: The benchmark pages of the documentation site: ``--markdown`` writes into ``<script>.md`` here.
DOCS_BENCHMARKS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"


def add_markdown_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--markdown", nargs="?", const="", default=None, metavar="PAGE",
        help="also write what the run prints, as Markdown with the command, machine and date, into the generated "
             "block of docs/benchmarks/<script>.md (or PAGE); the page's other text is kept",
    )


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


def _escape(line: str) -> str:
    return "".join("\\" + c if c in "\\`*_|<[]" else c for c in line)


def output_as_markdown(text: str) -> str:
    """A script's printed output as Markdown: its Markdown tables stay tables (a one-line title
    above a table becomes a paragraph), any other lines go into a text block verbatim; a last line
    that is a JSON object (``--json``) is dropped."""
    lines = text.rstrip("\n").splitlines()
    if lines and lines[-1].startswith("{"):
        lines.pop()
    blocks, block = [], []
    for line in [*lines, ""]:
        if line.strip():
            block.append(line.rstrip())
        elif block:
            blocks.append(block)
            block = []
    out = []
    for block in blocks:
        first_table = next((i for i, line in enumerate(block) if line.startswith("|")), len(block))
        title, table = block[:first_table], block[first_table:]
        if table and all(line.startswith("|") for line in table) and len(title) <= 1:
            out += [_escape(line) for line in title] + ([""] if title else []) + table
        else:
            out += ["```text", *block, "```"]
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


def generated_markers(script: str) -> tuple[str, str]:
    return f"<!-- BEGIN generated by bench/{script}.py -->", f"<!-- END generated by bench/{script}.py -->"


def write_generated_block(page: Path, script: str, body: str) -> None:
    """Put ``body`` between ``script``'s markers in ``page``, replacing the block written before and
    keeping the rest of the page; a page without the markers gets the block at its end."""
    begin, end = generated_markers(script)
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = page.read_text() if page.exists() else f"# bench/{script}.py\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(text)


@contextlib.contextmanager
def markdown_output(script: str) -> Iterator[None]:
    """Run a benchmark's ``main()`` inside this: with ``--markdown [PAGE]`` on the command line, what
    it prints also goes, as Markdown headed by the command, the machine, the date and the run time,
    into the generated block of ``docs/benchmarks/<script>.md`` (or PAGE). Without it, nothing changes."""
    pre = argparse.ArgumentParser(add_help=False)
    add_markdown_option(pre)
    page = pre.parse_known_args()[0].markdown
    if page is None:
        yield
        return
    printed, start = io.StringIO(), time.perf_counter()
    with contextlib.redirect_stdout(_Tee(sys.stdout, printed)):
        yield
    seconds = time.perf_counter() - start
    command = shlex.join(["python", f"bench/{script}.py", *sys.argv[1:]])
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = (f"Command: `{command}`  \nMachine: {machine()}  \nDate: {date}, {seconds:.0f} s\n\n"
              "Written by the command; rerun it to replace this block.\n\n")
    write_generated_block(Path(page) if page else DOCS_BENCHMARKS / f"{script}.md", script,
                          header + output_as_markdown(printed.getvalue()))


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


def guided_ddim_run(denoiser, batch: int, latent: tuple, times: torch.Tensor, device: str,
                    guidance_scale: float = 7.5) -> Callable[[], None]:
    """A function that runs the least a guided sampler does between network calls: classifier-free guidance
    towards the prompts' mean x̂₀, then one deterministic DDIM step (η = 0): 10 tensor operations a step,
    no density. Timed in place, its share of a step is what the measurement itself costs here."""
    process = denoiser.process
    alphas, sigmas = process.alpha(times).tolist(), process.sigma(times).tolist()  # σ > 0 before the last time

    def run() -> None:
        x = prior_sample(denoiser, batch, latent, torch.Generator().manual_seed(0), device)
        for i in range(times.numel() - 1):
            out = denoiser(x, times[i])  # (M + 1, B, ...): the prompts' x̂₀ⁱ, then the unconditional's
            unconditional = out[-1]
            x0 = unconditional + guidance_scale * (out[:-1].mean(0) - unconditional)
            eps = (x - alphas[i] * x0) / sigmas[i]
            x = alphas[i + 1] * x0 + sigmas[i + 1] * eps

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
    ``combiner=None`` counts :func:`guided_ddim_run`'s loop; ``sample_kwargs`` go to ``sample_sde``."""
    counts = []
    for n in (steps, 2 * steps):
        times = denoiser.process.time_grid(n)
        with torch.inference_mode():
            cached = network_free(denoiser, batch, latent, times, device)
            run = (guided_ddim_run(cached, batch, latent, times, device) if combiner is None
                   else sampling_run(cached, combiner, batch, latent, times, device, **sample_kwargs))
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
