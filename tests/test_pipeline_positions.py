"""The flow transformers' position inputs on a non-square image (height 8, width 24 pixels) are the ones
diffusers' own pipeline hands the same transformer: a transposed token grid has the same number of tokens
and runs, so only the inputs themselves tell it apart."""

from __future__ import annotations

import pytest
import torch

from test_flux2 import pipes as flux2_pipes
from test_pipelines_flux import flux_pipes
from test_pipelines_qwenimage_zimage import QWEN

PROMPTS = ["a red circle", "a blue square"]


def transformer_inputs(transformer, call) -> dict:
    """The keyword inputs of ``transformer``'s first call during ``call()``."""
    seen = []
    hook = transformer.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs), with_kwargs=True)
    try:
        call()
    finally:
        hook.remove()
    return seen[0]


@pytest.mark.parametrize("family, name", [("flux", "img_ids"), ("qwenimage", "img_shapes"), ("dev", "img_ids"),
                                          ("klein", "img_ids")])
def test_a_non_square_image_gets_diffusers_position_inputs(family, name, tmp_path):
    if family == "flux":
        (ours, theirs), length = flux_pipes(tmp_path), 8
    elif family == "qwenimage":
        (ours, theirs), length = QWEN.pipes(tmp_path), QWEN.max_sequence_length
    else:
        (ours, theirs), length = flux2_pipes(family), 48
    theirs.set_progress_bar_config(disable=True)
    kw = dict(height=8, width=24, num_inference_steps=2, output_type="latent", max_sequence_length=length)
    expected = transformer_inputs(theirs.transformer, lambda: theirs(prompt=PROMPTS[0], **kw))[name]
    got = transformer_inputs(ours.transformer, lambda: ours(PROMPTS, progress=False, **kw))[name]
    if isinstance(expected, torch.Tensor):  # position ids: FLUX.2's carry a batch dimension of their own
        torch.testing.assert_close(got.reshape(-1, got.shape[-1]), expected.reshape(-1, expected.shape[-1])[
            : got.reshape(-1, got.shape[-1]).shape[0]], rtol=0, atol=0)
    else:  # Qwen-Image: one (frames, height, width) in tokens per image
        assert got[0] == expected[0]
