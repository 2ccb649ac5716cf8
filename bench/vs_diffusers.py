"""SuperDiff AND of 2 prompts against diffusers' ``StableDiffusionPipeline`` with CFG, same model, equal steps.

One diffusers pipeline is built from seeded random SD-shaped components; ``SuperDiffPipeline.from_pipe``
wraps the very same modules. Per step diffusers' CFG calls the UNet on 2·B rows (prompt and
unconditional), ours on (M+1)·B = 3·B rows (both prompts and the unconditional), so the ratio of
network evaluations is (1 + M)/2 = 1.5 (``evaluation_bound``). Goal: ratio_and2_vs_cfg ≤ 1.6, the
median of per-round ratios (the two pipelines run back to back in each round).

``peak_memory_ratio`` compares the working memory of one call, i.e. the peak above what is resident
right before it (the loaded modules, identical for both): ``torch.cuda.max_memory_allocated`` on
CUDA; on CPU each method runs in a fresh subprocess (fixed mmap threshold, so freed tensors leave
the RSS) that resets the kernel's peak-RSS mark after a warm-up and reads ``VmHWM − VmRSS``.
Absolute peaks are reported too. The ``unet_*`` keys time the UNet alone (forward hooks, in one
extra run per method, outside the timed repeats) to show where a gap above the bound comes from.

CPU runs use one intra-op thread unless ``--threads`` says otherwise: OpenMP spread over cores that
other work also uses stalls at its barriers and made the calls up to 100× slower and erratic.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from common import add_model_arguments, emit, interleaved_times, machine, median_ratio, parser, unet_config

M = 2  # prompts composed with AND
PROMPTS = ["a photo of a cat", "a photo of a dog"]
JOINT_PROMPT = "a photo of a cat and a dog"  # what a CFG user would type instead
GUIDANCE = 7.5


def build_pipe(size: str, device: str, dtype: torch.dtype, seed: int = 0):
    """A diffusers ``StableDiffusionPipeline`` of seeded random components: an SD-shaped UNet
    (:func:`common.unet_config`), a 2-layer CLIP text encoder of the UNet's width over the local
    tiny vocabulary (77 tokens, as SD), a 4-level tiny VAE (scale factor 8, unused with latent output)
    and SD's Euler scheduler."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import logging

    from superdiff.testing import tiny_clip_text_model, tiny_clip_tokenizer, tiny_vae

    logging.set_verbosity_error()  # no notes about casting random modules with .to(dtype)
    cfg = unet_config(size)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**cfg).eval()
    tokenizer = tiny_clip_tokenizer(model_max_length=77)
    text_encoder = tiny_clip_text_model(tokenizer, hidden_size=unet.config.cross_attention_dim, seed=seed)
    vae = tiny_vae(
        seed=seed, block_out_channels=(8,) * 4, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe = pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def runners(pipe, steps: int, batch: int, latent: int, device: str) -> dict:
    """The two calls, same model, steps, batch, size and starting seed; latents out (no VAE decode)."""
    from superdiff.pipelines import SuperDiffPipeline

    ours = SuperDiffPipeline.from_pipe(pipe)
    ours.set_progress_bar_config(disable=True)
    assert ours.unet is pipe.unet and ours.text_encoder is pipe.text_encoder
    pixels = latent * pipe.vae_scale_factor
    common = dict(
        num_inference_steps=steps, num_images_per_prompt=batch, height=pixels, width=pixels, output_type="latent"
    )

    def cfg(n: int = steps):
        return pipe(JOINT_PROMPT, guidance_scale=GUIDANCE, generator=torch.Generator(device).manual_seed(0),
                    **{**common, "num_inference_steps": n}).images

    def superdiff_and(n: int = steps):
        return ours(
            prompts=PROMPTS,
            mode="and",
            guidance_scale=GUIDANCE,
            generator=torch.Generator(device).manual_seed(0),
            progress=False,
            **{**common, "num_inference_steps": n},
        ).images

    return {"cfg": cfg, "and2": superdiff_and}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def unet_seconds(unet, fn, device: str) -> float:
    """Wall time spent inside ``unet.forward`` during one call of ``fn`` (synchronised on CUDA)."""
    spent, started = [0.0], [0.0]

    def before(module, args, kwargs):
        _sync(device)
        started[0] = time.perf_counter()

    def after(module, args, kwargs, output):
        _sync(device)
        spent[0] += time.perf_counter() - started[0]

    hooks = [
        unet.register_forward_pre_hook(before, with_kwargs=True),
        unet.register_forward_hook(after, with_kwargs=True),
    ]
    try:
        fn()
    finally:
        for h in hooks:
            h.remove()
    return spent[0]


# ---------------------------------------------------------------------------------------------
# Peak memory
# ---------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def cuda_memory(fn) -> dict:
    """Peak bytes allocated during ``fn`` (absolute, and above what was allocated right before)."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return {"peak_bytes": peak, "delta_bytes": peak - before}


def cpu_memory_here(fn) -> dict:
    """Peak RSS of this process during ``fn`` (after a warm-up by the caller): return freed memory
    to the OS, reset the kernel's high-water mark (``/proc/self/clear_refs`` 5), run, read VmHWM."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS") * 1024
    fn()
    peak = _status_kib("VmHWM") * 1024
    return {"peak_bytes": peak, "delta_bytes": peak - before}


def worker(args: argparse.Namespace) -> None:
    """Subprocess entry: build the pipeline, warm the method up, measure one call's peak RSS."""
    pipe = build_pipe(args.size, "cpu", torch.float32)
    fn = runners(pipe, args.steps, args.batch, args.latent, "cpu")[args.worker]
    with torch.inference_mode():
        fn(2)  # warm-up: lazy initialisation, kernel caches
        result = cpu_memory_here(fn)
    print(json.dumps(result))


def cpu_memory_subprocess(method: str, args: argparse.Namespace) -> dict:
    """Run :func:`worker` for ``method`` in a fresh interpreter; a fixed mmap threshold makes glibc
    hand large freed blocks back at once, so the RSS follows the live tensors."""
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        method,
        "--size",
        args.size,
        "--steps",
        str(args.steps),
        "--batch",
        str(args.batch),
        "--latent",
        str(args.latent),
        "--threads",
        str(args.threads),
        "--device",
        "cpu",
    ]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory worker for {method!r} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------


def main() -> None:
    p = parser(__doc__)
    add_model_arguments(p, ("tiny", "small", "sd"), "UNet config (bench/common.py): default sd (~860M) on CUDA, "
                        "tiny on CPU", "latent side (default 64 on CUDA, 32 on CPU)")
    p.add_argument("--worker", choices=("cfg", "and2"), default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    args.size = args.size or ("sd" if cuda and not args.quick else "tiny")
    args.steps = args.steps or (8 if args.quick else 50)
    args.batch = args.batch or 1
    args.latent = args.latent or (64 if cuda else 32)
    if not cuda:
        args.threads = args.threads or 1
        torch.set_num_threads(args.threads)
    if args.worker:
        return worker(args)
    repeats = args.repeats or (3 if args.quick else 5)
    dtype = torch.float16 if cuda else torch.float32

    pipe = build_pipe(args.size, args.device, dtype)
    params = sum(q.numel() for q in pipe.unet.parameters())
    fns = runners(pipe, args.steps, args.batch, args.latent, args.device)
    with torch.inference_mode():
        rounds = interleaved_times(fns, repeats, args.device)
        seconds = {name: statistics.median(times) for name, times in rounds.items()}
        in_unet = {name: unet_seconds(pipe.unet, fn, args.device) for name, fn in fns.items()}
        if cuda:
            memory = {name: cuda_memory(fn) for name, fn in fns.items()}
    if not cuda:
        del pipe, fns
        gc.collect()
        # Side by side: each worker reads its own process's peak, so neither sees the other (and the timed
        # rounds are over), and the two start-ups (imports, build, warm-up) overlap.
        with ThreadPoolExecutor(2) as pool:
            futures = {name: pool.submit(cpu_memory_subprocess, name, args) for name in ("cfg", "and2")}
        memory = {name: future.result() for name, future in futures.items()}
    ratio = median_ratio(rounds["and2"], rounds["cfg"])
    emit(
        {
            "benchmark": "vs_diffusers",
            "machine": machine(),
            "device": args.device,
            "dtype": str(dtype),
            "quick": args.quick,
            "size": args.size,
            "params": params,
            "latent": [4, args.latent, args.latent],
            "steps": args.steps,
            "batch": args.batch,
            "repeats": repeats,
            "guidance_scale": GUIDANCE,
            "seconds_per_image_diffusers_cfg": round(seconds["cfg"] / args.batch, 4),
            "seconds_per_image_superdiff_and2": round(seconds["and2"] / args.batch, 4),
            "ratio_and2_vs_cfg": round(ratio, 3),
            "evaluation_bound": (1 + M) / 2,
            "unet_seconds_per_image_diffusers_cfg": round(in_unet["cfg"] / args.batch, 4),
            "unet_seconds_per_image_superdiff_and2": round(in_unet["and2"] / args.batch, 4),
            "unet_ratio_and2_vs_cfg": round(in_unet["and2"] / in_unet["cfg"], 3),
            "peak_memory_method": "cuda_max_allocated" if cuda else "subprocess_maxrss_delta",
            "peak_memory_mib_diffusers_cfg": round(memory["cfg"]["delta_bytes"] / 2**20, 2),
            "peak_memory_mib_superdiff_and2": round(memory["and2"]["delta_bytes"] / 2**20, 2),
            "peak_memory_ratio": round(memory["and2"]["delta_bytes"] / max(memory["cfg"]["delta_bytes"], 1), 3),
            "peak_memory_absolute_mib_diffusers_cfg": round(memory["cfg"]["peak_bytes"] / 2**20, 2),
            "peak_memory_absolute_mib_superdiff_and2": round(memory["and2"]["peak_bytes"] / 2**20, 2),
            "peak_memory_ratio_absolute": round(memory["and2"]["peak_bytes"] / memory["cfg"]["peak_bytes"], 3),
        },
        args.json,
    )


if __name__ == "__main__":
    from common import markdown_output

    with markdown_output("vs_diffusers"):
        main()
