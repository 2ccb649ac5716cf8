"""The library's ranges and caps (superdiff.limits) in the pipelines: guidance (and FLUX's true CFG)
times the composition's gain, and the rows of one network call, refused before any network call
(the text encoders included); a run whose state goes non-finite raises NonFiniteError."""

from __future__ import annotations

import math

import pytest
import torch

from superdiff.limits import MAX_NETWORK_ROWS, NonFiniteError
from superdiff.options import DEFAULT_CORRECTING_PARTICLES as K
from superdiff.pipelines import SuperDiffPipeline, SuperDiffUnconditionalPipeline
from superdiff.testing import tiny_sd_components, tiny_unconditional_components

PROMPTS = ["a red circle", "a blue square"]
KW = dict(num_inference_steps=2, output_type="latent", progress=False)


def count_calls(module: torch.nn.Module) -> list:
    calls: list = []
    module.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return SuperDiffPipeline(**tiny_sd_components(tokenizer_dir=tmp_path_factory.mktemp("tok")))


@pytest.mark.parametrize(
    "call, needle",
    [(dict(prompts=PROMPTS, guidance_scale=1e300), "guidance_scale=1e+300 is not valid"),
     (dict(expression='"a red circle" * "a blue square"', guidance_scale=5e6),
      "use guidance_scale 4.1943e+06 or less"),
     (dict(expression='"a red circle" * "a blue square"', particles=10**6),
      f"1 image x 1000000 particles x (2 models + the unconditional row) = 3000000 rows in one network call, more "
      f"than the cap of {MAX_NETWORK_ROWS} (superdiff.limits.MAX_NETWORK_ROWS); lower particles to 5461 or fewer"),
     (dict(prompts=PROMPTS, num_images_per_prompt=6000), "lower num_images_per_prompt to 5461 or fewer")],
)
def test_sd_refuses_guidance_and_rows_beyond_the_caps_before_any_network_call(sd, call, needle):
    calls = [count_calls(n) for n in (sd.unet, sd.text_encoder)]
    with pytest.raises(ValueError) as error:
        sd(**call, **KW)
    assert needle in str(error.value)
    assert all(c == [] for c in calls)


def test_unconditional_stack_rows_name_its_batch_argument():
    pipe = SuperDiffUnconditionalPipeline(**tiny_unconditional_components(num_models=2))
    calls = [count_calls(u) for u in pipe.unets]
    with pytest.raises(ValueError, match=f"lower batch_size to {MAX_NETWORK_ROWS // (2 * K)} or fewer"):
        pipe(batch_size=MAX_NETWORK_ROWS, expression="0 * 1", **KW)  # a product: K particles of 2 rows each
    assert all(c == [] for c in calls)


def test_flux_true_cfg_beyond_the_cap_is_refused_by_name(tmp_path):
    from test_pipelines_flux import KW as FLUX_KW
    from test_pipelines_flux import PROMPTS3, flux_pipes

    ours, _ = flux_pipes(tmp_path)
    calls = [count_calls(n) for n in (ours.transformer, ours.text_encoder, ours.text_encoder_2)]
    with pytest.raises(ValueError, match=r"^true_cfg_scale=1e\+300 is not valid"):
        ours(prompts=PROMPTS3[:2], true_cfg_scale=1e300, negative_prompt="a cat", **FLUX_KW)
    assert all(c == [] for c in calls)


def test_a_pipeline_run_that_goes_non_finite_raises(sd):
    def poison(pipe, step, timestep, tensors):
        return {"latents": tensors["latents"] * math.nan} if step == 0 else tensors

    with pytest.raises(NonFiniteError, match="step 2 of 3 .*samples"):
        sd(PROMPTS, num_inference_steps=3, output_type="latent", progress=False, callback_on_step_end=poison)
