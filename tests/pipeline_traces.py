"""Recorded outputs of every pipeline family in every mode, for tests/test_pipeline_traces.py.

``CASES`` names one call per (family, mode, option) on tiny seeded float64 models; :func:`run_case`
makes it and :func:`summary` keeps what the fixture stores: the κ and log-density traces, the
timesteps and the particles' Feynman–Kac log-weights whole (a few numbers each), and the samples
(latents or decoded images) as a fixed seeded random projection onto 8 numbers (any change moves it).

Run as a script at a commit whose pipelines are the reference, to write tests/data/pipeline_traces.safetensors:

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python tests/pipeline_traces.py

The stored file was written from the library as it stood at 9541c97 (before the family adapters
of superdiff/pipelines/base.py), so the test checks that moving them onto one loop changed nothing:

    git archive 9541c97 superdiff | tar -x -C /tmp/base
    PYTHONPATH=/tmp/base OMP_NUM_THREADS=1 .venv/bin/python tests/pipeline_traces.py
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "data", "pipeline_traces.safetensors")
STEPS = 3
TWO = ["a red circle", "a blue square"]
#: Compositions with Feynman–Kac corrections (particles weigh them): a product, and a geometric mean (degree 1).
PRODUCT = '"a red circle" * "a blue square"'
GEOMETRIC = '"a red circle" ^ 0.5 * "a blue square" ^ 0.5'

#: name → (family, call arguments). Each call samples from generator seed 7.
CASES: dict[str, tuple[str, dict]] = {
    "sd-and": ("sd", dict(prompts=TWO, mode="and")),
    "sd-or": ("sd", dict(prompts=TWO, mode="or", temperature=2.0, log_weights=[0.5, 0.0])),
    "sd-average": ("sd", dict(prompts=TWO, mode="average")),
    "sd-sum": ("sd", dict(prompts=TWO, mode="sum", guidance_scale=3.0)),
    "sd-unguided-or": ("sd", dict(prompts=TWO, mode="or", guidance_scale=None)),
    "sd-negative": ("sd", dict(prompt=TWO, mode="and", negative_prompt="a cat")),
    "sd-expression": ("sd", dict(expression='("a red circle" & "a blue square") | "a cat"')),
    "sd-particles": ("sd", dict(expression=PRODUCT, particles=3, resample_threshold=1.0, num_images_per_prompt=2)),
    "sd-forward-and": ("sd", dict(prompts=TWO, mode="and", density_variance="forward")),
    "sd-batch-generators": ("sd", dict(prompts=TWO, mode="or", num_images_per_prompt=2, generator="list")),
    "sd-latents": ("sd", dict(prompts=TWO, mode="and", latents="draw")),
    "sd-pt": ("sd", dict(prompts=TWO, mode="or", output_type="pt")),
    "sd-ddim-v-pixels": ("sd-ddim-v", dict(prompts=TWO, mode="and", output_type="pt")),
    "sdxl-and": ("sdxl", dict(prompts=TWO, mode="and")),
    "sdxl-or-negative-pt": ("sdxl", dict(prompts=TWO, mode="or", negative_prompt="a cat", output_type="pt")),
    "sdxl-unguided": ("sdxl", dict(prompts=TWO, mode="average", guidance_scale=None)),
    "flow-and": ("flow", dict(prompts=TWO, mode="and", max_sequence_length=8)),
    "flow-or-pt": ("flow", dict(prompts=TWO, mode="or", max_sequence_length=8, output_type="pt")),
    "flow-unguided-average": ("flow", dict(prompts=TWO, mode="average", guidance_scale=None, max_sequence_length=8)),
    "flow-t5-particles": ("flow-t5", dict(expression=PRODUCT, max_sequence_length=8, particles=2,
                                          resample_threshold=1.0)),
    "flux-and": ("flux", dict(prompts=TWO, mode="and", height=16, width=16, max_sequence_length=8)),
    "flux-or-true-cfg-pt": ("flux", dict(prompts=TWO, mode="or", true_cfg_scale=4.0, negative_prompt="a cat",
                                         height=16, width=16, max_sequence_length=8, output_type="pt")),
    "flux-schnell-average": ("flux-schnell", dict(prompts=TWO, mode="average", height=16, width=16,
                                                  max_sequence_length=8, num_images_per_prompt=2)),
    "flux-particles": ("flux", dict(expression=GEOMETRIC, height=16, width=16, max_sequence_length=8,
                                    particles=2, resample_threshold=1.0)),
    "unconditional-or": ("unconditional", dict(mode="or", batch_size=2)),
    "unconditional-and": ("unconditional", dict(mode="and")),
    "unconditional-sum-pt": ("unconditional", dict(mode="sum", output_type="pt")),
    "unconditional-expression": ("unconditional", dict(expression="(0 & 1) | 0")),
    "unconditional-particles": ("unconditional", dict(expression="0 * 1", num_images_per_prompt=2, particles=2,
                                                      resample_threshold=1.0)),
}


def pipeline(family: str, tokenizer_dir: str):
    """The tiny float64 pipeline of ``family``, built from seeded configs."""
    import superdiff.testing as t
    from superdiff.pipelines import (
        SuperDiffFlowPipeline,
        SuperDiffFluxPipeline,
        SuperDiffPipeline,
        SuperDiffUnconditionalPipeline,
        SuperDiffXLPipeline,
    )

    if family == "sd":
        pipe = SuperDiffPipeline(**t.tiny_sd_components(tokenizer_dir=tokenizer_dir))
    elif family == "sd-ddim-v":
        pipe = SuperDiffPipeline(**t.tiny_sd_components("v_prediction", "ddim", vae=False,
                                                        tokenizer_dir=tokenizer_dir))
    elif family == "sdxl":
        pipe = SuperDiffXLPipeline(**t.tiny_sdxl_components(tokenizer_dir=tokenizer_dir))
    elif family in ("flow", "flow-t5"):
        pipe = SuperDiffFlowPipeline(**t.tiny_sd3_components(tokenizer_dir=tokenizer_dir, t5=family == "flow-t5"))
    elif family in ("flux", "flux-schnell"):
        sys.path.insert(0, HERE)
        from test_pipelines_flux import tiny_flux_components

        pipe = SuperDiffFluxPipeline(**tiny_flux_components(tokenizer_dir, distilled=family == "flux"))
    else:
        pipe = SuperDiffUnconditionalPipeline(**t.tiny_unconditional_components(num_models=2))
    return pipe.to(torch.float64)


def _generator(seed: int = 7) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def run_case(pipe, args: dict):
    """Call ``pipe`` with ``args`` (``generator="list"``: one generator per image; ``latents="draw"``:
    standard normal latents of the call's shape, drawn from seed 11), 3 steps, latents out by default."""
    args = dict(args)
    batch = args.get("num_images_per_prompt", args.get("batch_size", 1))
    generator = args.pop("generator", None)
    generator = [_generator(7 + i) for i in range(batch)] if generator == "list" else _generator()
    if args.get("latents") == "draw":
        probe = pipe(**{**args, "latents": None}, num_inference_steps=1, output_type="latent", progress=False,
                     generator=_generator())
        args["latents"] = torch.randn(probe.images.shape, generator=_generator(11), dtype=torch.float64)
    kwargs = dict(num_inference_steps=STEPS, output_type="latent", progress=False) | args
    return pipe(generator=generator, **kwargs)


def _projection(values: torch.Tensor | None) -> torch.Tensor | None:
    """``values`` flattened and projected onto 8 fixed seeded Gaussian directions (float64)."""
    if values is None:
        return None
    flat = values.detach().double().reshape(-1)
    directions = torch.randn(8, flat.numel(), generator=_generator(1234), dtype=torch.float64)
    return directions @ flat


def summary(out) -> dict[str, torch.Tensor]:
    """What the fixture keeps of one call's output."""
    record = {
        "log_density_trace": out.log_density_trace.double(),
        "kappa_trace": out.kappa_trace.double(),
        "timesteps": out.timesteps.double(),
        "images": _projection(torch.as_tensor(out.images)),
        "images_shape": torch.tensor(tuple(torch.as_tensor(out.images).shape)),
    }
    if out.log_weights is not None:
        record["log_weights"] = out.log_weights.double()
    return record


def flat(record: dict[str, torch.Tensor]) -> torch.Tensor:
    """A record as one float64 vector, its fields in name order (the fixture stores one per case)."""
    return torch.cat([record[field].double().reshape(-1) for field in sorted(record)])


def load_fixture() -> dict[str, torch.Tensor]:
    """The stored records, case name → :func:`flat` record."""
    from safetensors.torch import load_file

    return load_file(FIXTURE)


def record_all() -> dict[str, dict[str, torch.Tensor]]:
    torch.set_num_threads(1)
    pipes: dict = {}
    records = {}
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        for name, (family, args) in CASES.items():
            if family not in pipes:
                pipes[family] = pipeline(family, tokenizer_dir)
            records[name] = summary(run_case(pipes[family], args))
    return records


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.makedirs(os.path.dirname(FIXTURE), exist_ok=True)
    from safetensors.torch import save_file

    save_file({name: flat(record) for name, record in record_all().items()}, FIXTURE)
    print(f"wrote {FIXTURE} ({os.path.getsize(FIXTURE)} bytes, {len(CASES)} cases)")
