"""Run the performance benchmarks one after another and print the README's table.

    python bench/run_all.py --quick              # CPU: tiny SD-shaped UNet, under 2 minutes on 2 quiet cores
    python bench/run_all.py --out results.json   # full sizes (a random SD-shaped UNet on CUDA)

Each benchmark runs with ``--json``; its last output line is its result. At full size each runs in its
own process (so peak-memory figures and thread settings do not leak between them); with ``--quick`` they
run one after another in this process, which imports torch and diffusers once instead of once per script
(the imports were about a quarter of a quick run), its thread count restored after each (CPU memory is
measured in fresh worker processes either way). Every ratio is measured inside one benchmark run, as a
median over repeats.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent

# (script, key in the JSON, goal as text)
ROWS = [
    ("overhead.py", "ratio", "AND sampling / fixed-κ sampling, same network calls", "≤ 1.05"),
    ("overhead.py", "ratio_or", "OR sampling / fixed-κ sampling, same network calls", "≤ 1.05"),
    (
        "overhead.py",
        "ratio_from_parts",
        "the AND ratio from its parts: fixed-κ run + AND's extra work timed without the network",
        "≤ 1.05",
    ),
    ("overhead.py", "ratio_or_from_parts", "the OR ratio from its parts, likewise", "≤ 1.05"),
    (
        "batching.py",
        "speedup_vs_reference_loop",
        "authors' loop (one call per prompt + uncond.) / our batched step",
        "≥ 1.5",
    ),
    (
        "batching.py",
        "network_speedup",
        "the network calls alone, M + 1 single calls / one batched call: what batching can give at most here",
        "—",
    ),
    ("ito_vs_hutchinson.py", "speedup", "ODE + Hutchinson (jvp) / SDE + Itô, same steps", "paper: 5.2 on SD"),
    (
        "vs_diffusers.py",
        "ratio_and2_vs_cfg",
        "AND of 2 prompts / diffusers StableDiffusionPipeline CFG, per image",
        "≤ 1.6 (bound 1.5)",
    ),
    ("vs_diffusers.py", "peak_memory_ratio", "peak memory, AND of 2 prompts / diffusers CFG", "—"),
    (
        "flux_speed.py",
        "ratio_distilled",
        "FLUX.1 guidance-distilled: AND of 2 prompts / diffusers FluxPipeline with 1 prompt, per image",
        "≤ 2.1 (bound 2)",
    ),
    (
        "flux_speed.py",
        "ratio_true_cfg",
        "FLUX.1 true CFG (true_cfg_scale 4, negative prompt): AND of 2 prompts / diffusers FluxPipeline, per image",
        "≤ 1.6 (bound 1.5)",
    ),
    (
        "qwen_zimage_speed.py",
        "ratio_qwenimage_true_cfg",
        "Qwen-Image true CFG (true_cfg_scale 4, negative prompt): AND of 2 prompts / diffusers QwenImagePipeline with "
        "1 prompt, per image",
        "≤ 1.6 (bound 1.5)",
    ),
    (
        "qwen_zimage_speed.py",
        "ratio_qwenimage_unguided",
        "Qwen-Image without a negative prompt: AND of 2 prompts / diffusers QwenImagePipeline, per image",
        "≤ 2.1 (bound 2)",
    ),
    (
        "qwen_zimage_speed.py",
        "ratio_zimage_cfg",
        "Z-Image guided (guidance_scale 5): AND of 2 prompts / diffusers ZImagePipeline with 1 prompt, per image",
        "≤ 1.6 (bound 1.5)",
    ),
    (
        "qwen_zimage_speed.py",
        "ratio_zimage_turbo",
        "Z-Image-Turbo (guidance_scale 0): AND of 2 prompts / diffusers ZImagePipeline, per image",
        "≤ 2.1 (bound 2)",
    ),
    (
        "flux2_speed.py",
        "ratio_dev",
        "FLUX.2 dev (guidance-distilled): AND of 2 prompts / diffusers Flux2Pipeline with 1 prompt, per image",
        "≤ 2.1 (bound 2)",
    ),
    (
        "flux2_speed.py",
        "ratio_klein",
        "FLUX.2 klein (CFG 4 from the empty prompt): AND of 2 prompts / diffusers Flux2KleinPipeline, per image",
        "≤ 1.6 (bound 1.5)",
    ),
    (
        "scaling.py",
        "combiner_fraction",
        "share of a step spent in SuperDiff's own work (κ, densities), measured between the network calls of real "
        "runs, worst of M = 2, 4, 8",
        "< 0.02",
    ),
    (
        "scaling.py",
        "combiner_fraction_isolated",
        "the same work timed without the network (cached output), worst of M = 2, 4, 8",
        "< 0.02",
    ),
    ("scaling.py", "combiner_fraction_by_m", "the share between network calls by number of prompts M", "< 0.02"),
    (
        "scaling.py",
        "combiner_fraction_forward_by_m",
        "the same with density_variance=\"forward\", the least work an AND step does (its system stays linear)",
        "—",
    ),
    (
        "scaling.py",
        "combiner_fraction_isolated_forward_by_m",
        "the isolated share with density_variance=\"forward\", by M",
        "—",
    ),
    (
        "scaling.py",
        "bare_loop_fraction_by_m",
        "the share between network calls of a loop that only guides and takes a DDIM step (no density), same "
        "network and timer: what the measurement costs any sampler here",
        "—",
    ),
    ("scaling.py", "time_per_step", "seconds per step by number of prompts M", "grows with M + 1"),
    (
        "scaling.py",
        "combiner_time_per_step",
        "SuperDiff's own work per step without the network, by M (a run of 2N steps less one of N)",
        "—",
    ),
    (
        "scaling.py",
        "operations_per_step",
        "tensor operations per step outside the network (views excluded; GPU kernel launches), AND, by M",
        "—",
    ),
    (
        "scaling.py",
        "operations_per_step_forward",
        "the same with density_variance=\"forward\" (one variance for all models: AND's system stays linear)",
        "—",
    ),
    (
        "scaling.py",
        "operations_per_step_bare_loop",
        "the same for the guide-and-DDIM loop",
        "—",
    ),
]


def run(script: str, extra: list[str], limit: float | None = None) -> dict:
    """``script``'s result (the last line it prints with ``--json``), run in a process of its own; past
    ``limit`` seconds it is stopped, with every process it started (those would hold the GPU through the next
    benchmark), and its result says so (the table then shows it as not measured)."""
    cmd = [sys.executable, str(HERE / script), "--json", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"stopped": f"after {limit:g} s (--script-limit)"}
    if proc.returncode != 0:
        raise SystemExit(f"{script} failed ({proc.returncode}):\n{stderr[-2000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


def run_here(script: str, extra: list[str]) -> dict:
    """``script``'s result, run as ``__main__`` in this process with its command line, its output captured
    and, afterwards, this process's thread count restored and its garbage collected."""
    import torch

    argv, threads, cwd, printed = sys.argv, torch.get_num_threads(), os.getcwd(), io.StringIO()
    sys.argv = [str(HERE / script), "--json", *extra]
    try:
        os.chdir(HERE)
        with contextlib.redirect_stdout(printed):
            runpy.run_path(str(HERE / script), run_name="__main__")
    except SystemExit as exc:
        if exc.code not in (None, 0):
            raise SystemExit(f"{script} failed ({exc.code})") from exc
    finally:
        sys.argv = argv
        os.chdir(cwd)
        torch.set_num_threads(threads)
        gc.collect()
    return json.loads(printed.getvalue().strip().splitlines()[-1])


def _shown(key: str, value: float) -> str:
    """One entry of a by-M result: times in milliseconds (two decimals under 10 ms), the rest as they are."""
    if key.endswith("time_per_step"):
        return f"{value * 1000:.{1 if value > 1e-2 else 2}f} ms"
    return f"{value:g}"


def main() -> None:
    from common import add_markdown_option

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--out", type=Path, default=None, help="also write all results as one JSON file")
    p.add_argument("--script-limit", type=float, default=None, metavar="SECONDS",
                   help="stop a benchmark that runs longer (full sizes only) and go on: its rows say so")
    add_markdown_option(p)
    args = p.parse_args()
    extra = (["--quick"] if args.quick else []) + (["--device", args.device] if args.device else [])
    results, start = {}, time.perf_counter()
    for script in dict.fromkeys(row[0] for row in ROWS):
        results[script] = run_here(script, extra) if args.quick else run(script, extra, args.script_limit)
        print(f"{script}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        if args.out:  # after each script, so a run cut short keeps what it measured
            args.out.write_text(json.dumps(results, indent=2) + "\n")
    machine = next((r["machine"] for r in results.values() if "machine" in r), "(no benchmark finished)")
    print(f"Measured on {machine}; command: python bench/run_all.py {' '.join(extra)}".rstrip() + "\n")
    print("| benchmark | measures | result | goal |\n|---|---|---|---|")
    for script, key, what, goal in ROWS:
        stopped = results[script].get("stopped")
        value = f"not measured: stopped {stopped}" if stopped else results[script].get(key)
        if isinstance(value, dict):
            value = ", ".join(f"M={m}: {_shown(key, v)}" for m, v in value.items())
        print(f"| `{script}` `{key}` | {what} | {value} | {goal} |")


if __name__ == "__main__":
    from common import markdown_output

    with markdown_output("run_all"):
        main()
