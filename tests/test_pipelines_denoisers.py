"""The diffusers and network denoiser adapters on a tiny UNet (CPU, offline): per-step host-to-device
traffic and conditions cached under inference_mode."""

from __future__ import annotations

import pytest
import torch
from torch.ops import aten
from torch.utils._python_dispatch import TorchDispatchMode

# ------------------------------------------------------------------------------------------------
# Per-step host-to-device traffic (the meta device plays the accelerator)
# ------------------------------------------------------------------------------------------------


class HostToDeviceCopies(TorchDispatchMode):
    """Records every copy of a tensor from the host to another device."""

    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._to_copy.default and kwargs.get("device") is not None:
            if args[0].device.type == "cpu" and torch.device(kwargs["device"]).type != "cpu":
                self.copies.append(f"{func} {tuple(args[0].shape)}")
        if func is aten.copy_.default and args[1].device.type == "cpu" and args[0].device.type != "cpu":
            self.copies.append(f"{func} {tuple(args[1].shape)}")
        return func(*args, **kwargs)


def unet_denoiser(kind, device, num_outputs):
    """A tiny conditional UNet on ``device`` as a DiffusersDenoiser or a NetworkDenoiser, its
    conditions (M+1, 5, 32) left on the host, as text encoders running on the CPU leave them."""
    from diffusers import EulerDiscreteScheduler

    from superdiff import NetworkDenoiser
    from superdiff.pipelines.denoisers import DiffusersDenoiser, schedule_from_scheduler
    from superdiff.testing import tiny_unet_condition

    unet = tiny_unet_condition().to(device)
    schedule = schedule_from_scheduler(EulerDiscreteScheduler(), 4)
    embeds = torch.randn(num_outputs, 5, 32)
    if kind == "diffusers":
        denoiser = DiffusersDenoiser(unet, schedule.process, schedule.prediction, schedule.timestep,
                                     conditions={"encoder_hidden_states": embeds}, num_outputs=num_outputs,
                                     scale_input=schedule.scale_input)
    else:
        denoiser = NetworkDenoiser(
            lambda x, t, c: unet(x, t, encoder_hidden_states=c).sample,
            schedule.process,
            "epsilon",
            conditions=embeds,
            time_input=schedule.process.timestep,
        )
    return denoiser, schedule.process.time_grid(4)


@pytest.mark.parametrize("kind", ["diffusers", "network"])
def test_a_step_copies_nothing_from_the_host_to_the_device(kind):
    """Conditions move to the device once; timesteps are filled there from a host float."""
    denoiser, t = unet_denoiser(kind, "meta", 3)
    x = torch.zeros(2, 4, 8, 8, device="meta")
    with HostToDeviceCopies() as first:
        assert denoiser(x, t[0]).shape == (3, 2, 4, 8, 8)
    with HostToDeviceCopies() as later:
        denoiser(x, t[1]), denoiser(x, t[2])
    assert first.copies != []  # the conditions, once: the check sees copies where there are some
    assert later.copies == []


@pytest.mark.parametrize("kind", ["diffusers", "network"])
def test_cached_conditions_made_under_inference_mode_do_not_reach_autograd(kind):
    """A denoiser first run under inference_mode (SDE sampling) can then be differentiated (ODE divergences)."""
    denoiser, times = unet_denoiser(kind, "cpu", 2)
    t = times[1]
    x = torch.randn(1, 4, 8, 8)
    with torch.inference_mode():
        denoiser(x, t)
    x.requires_grad_(True)
    denoiser(x, t).sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
