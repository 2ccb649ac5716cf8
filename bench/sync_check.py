"""Does a SuperDiff step ever wait for the GPU? One command to check it on a CUDA machine.

Runs ``SuperDiffPipeline`` (tiny random SD components in fp16) with AND of 2 and 3 prompts, OR with
log-weights and averaging, and a CPU generator as diffusers users pass one, under
``torch.cuda.set_sync_debug_mode("error")`` from the end of the first step to the end of the last:
torch then raises at any host–device synchronisation it makes (``.item()``, blocking copies,
``nonzero``, error checks of linalg routines). Key ``syncs``: how many cases synchronised (goal 0);
the script exits with status 1 when any did.

Without CUDA there is nothing to observe and it says so; on the CPU the same property is checked
by ``tests/test_sampling.py::test_the_step_loop_neither_waits_for_the_device_nor_copies_to_it``
and ``tests/test_pipelines_denoisers.py::test_a_step_copies_nothing_from_the_host_to_the_device``.
"""

from __future__ import annotations

import sys
import tempfile

import torch

from common import emit, machine, parser
from superdiff.pipelines import SuperDiffPipeline
from superdiff.testing import tiny_sd_components

PROMPTS = ("a red circle", "a blue square", "a green triangle")
CASES = {
    "and_2": dict(prompts=PROMPTS[:2], mode="and"),
    "and_3": dict(prompts=PROMPTS, mode="and"),
    "or_log_weights": dict(prompts=PROMPTS[:2], mode="or", log_weights=[0.3, -0.3]),
    "average_3": dict(prompts=PROMPTS, mode="average"),
}


def first_sync(pipe: SuperDiffPipeline, case: dict, steps: int) -> str | None:
    """The first synchronisation in steps 1 … steps−1 of one pipeline call, or None."""

    def on_step(pipe, step, timestep, kwargs):
        torch.cuda.set_sync_debug_mode("error" if step < steps - 1 else "default")
        return kwargs

    try:
        pipe(num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="latent",
             progress=False, callback_on_step_end=on_step, **case)
    except RuntimeError as error:
        return str(error).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return None


def main() -> None:
    args = parser(__doc__).parse_args()
    steps = args.steps or 6
    result = {"benchmark": "sync_check", "machine": machine(), "device": args.device, "steps": steps}
    if not args.device.startswith("cuda"):
        emit(
            result | {"syncs": None, "note": "needs a CUDA device; see the tests named in this script's docstring"},
            args.json,
        )
        return
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        pipe = SuperDiffPipeline(**tiny_sd_components(tokenizer_dir=tokenizer_dir)).to(args.device, torch.float16)
        pipe(PROMPTS[:2], num_inference_steps=2, output_type="latent", progress=False)  # lazy initialisation
        found = {name: first_sync(pipe, case, steps) for name, case in CASES.items()}
    result |= {"first_sync_by_case": found, "syncs": sum(v is not None for v in found.values())}
    emit(result, args.json)
    if result["syncs"]:
        sys.exit(1)


if __name__ == "__main__":
    from common import markdown_output

    with markdown_output("sync_check"):
        main()
