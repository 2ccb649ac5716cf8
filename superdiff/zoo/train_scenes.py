"""Train the embedded latent scene model (``embedded-scenes``) with fixed seeds, CPU or CUDA.

    python -m superdiff.zoo.train scenes --out superdiff/zoo/weights              # every stage
    python -m superdiff.zoo.train scenes --stage vae|vae-refine|decoder|diffusion  # one stage

Stages, each logged to ``scenes/training_log.json``:

1. an ``AutoencoderKL`` (32×32×3 ↔ 8×8×4) on fresh procedural scenes, as Stable Diffusion's VAE
   (L1 + a small KL term): phase 1 plain L1, phase 2 with the objects' pixels weighted up (the
   black background otherwise outweighs them), phase 3 the decoder alone (the encoder, hence the
   latents and the ``scaling_factor`` = 1 / std of the latents, stay fixed, so phase 3 may run
   beside stage 2);
2. a fixed set of scenes encoded once to latents (posterior means), then a small ``CLIPTextModel``
   and a cross-attention ``UNet2DConditionModel`` on those latents, trained jointly (as the shapes
   model) on incomplete captions, redrawn at every step, with 10% empty ones for classifier-free
   guidance.

The result is a standard diffusers ``StableDiffusionPipeline`` folder (float16 safetensors, an
``EulerDiscreteScheduler``), loadable by ``diffusers.StableDiffusionPipeline.from_pretrained`` and
by ``SuperDiffPipeline.from_pretrained``.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .scenes import CAPTION_WORDS, HELD_OUT_BINDING, HELD_OUT_PAIRS, MAX_LENGTH, sample_scenes, scene_captions
from .tokenizer import build_tokenizer
from .train import SD_BETAS, TextToImageTraining, TrainConfig, _log, _lr_at, _machine

__all__ = ["ScenesConfig", "vae_config", "scenes_unet_config", "train_vae", "encode_scenes", "train_scenes"]


@dataclass(frozen=True)
class ScenesConfig:
    """The stages' sizes: VAE steps and batch, scenes encoded for the diffusion stage, text width."""

    vae_steps: int = 1000
    vae_batch_size: int = 32
    vae_lr: float = 1e-3
    vae_refine_steps: int = 500
    vae_refine_lr: float = 5e-4
    foreground_weight: float = 1.0
    decoder_steps: int = 600
    decoder_lr: float = 5e-4
    decoder_foreground_weight: float = 2.0
    kl_weight: float = 1e-6
    encoded_scenes: int = 30_000
    text_hidden: int = 64


def vae_config() -> dict:
    """``AutoencoderKL`` arguments: 32×32×3 images, two downsamplings to 8×8×4 latents."""
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=32, layers_per_block=1,
        block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8,
    )


def scenes_unet_config(cross_attention_dim: int) -> dict:
    """``UNet2DConditionModel`` arguments: 8×8×4 latents, cross-attention at 8×8 and 4×4."""
    return dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=8,
    )


def _vae_phase(vae, cfg: ScenesConfig, steps: int, lr: float, foreground_weight: float, seed: int, device: str,
               phase: int, decoder_only: bool = False) -> list:
    """Optimise ``vae`` for ``steps`` on fresh scenes: L1 (plus ``foreground_weight`` × the L1 over
    the objects' pixels, which the black background otherwise outweighs) + a small KL term.
    ``decoder_only`` keeps the encoder (so the latents, and a UNet trained on them) unchanged."""
    trained = (list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters()) if decoder_only
               else list(vae.parameters()))
    opt = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
    schedule = TrainConfig(steps=steps, batch_size=cfg.vae_batch_size, lr=lr, warmup=100)
    g = torch.Generator().manual_seed(seed + phase)
    losses, start = [], time.perf_counter()
    vae.train()
    for step in range(steps):
        x = sample_scenes(cfg.vae_batch_size, seed=10_000_019 * (seed + 1) + 1_000_000 * phase + step).images
        x = x.to(device)
        with torch.set_grad_enabled(not decoder_only):
            posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g).to(device)
        error = (vae.decode(z).sample - x).abs()
        foreground = (x > -1).any(1, keepdim=True).float()
        loss = (error.mean() + foreground_weight * (error * foreground).sum() / (3 * foreground.sum()).clamp_min(1)
                + cfg.kl_weight * posterior.kl().mean())
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, schedule)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            losses.append((step, round(float(loss.detach()), 5)))
            print(f"vae phase {phase} step {step + 1}/{steps} loss {losses[-1][1]:.4f} "
                  f"{time.perf_counter() - start:.0f}s", flush=True)
    return losses


def train_vae(cfg: ScenesConfig, seed: int, device: str, log: dict, vae=None):
    """Train the autoencoder on fresh scenes: phase 1 (``cfg.vae_steps``, plain L1), phase 2
    (``cfg.vae_refine_steps``, objects' pixels weighted up). With ``vae`` given (the saved phase-1
    model) only phase 2 runs. Returns it in eval mode with its scaling factor set."""
    from diffusers import AutoencoderKL

    start = time.perf_counter()
    if vae is None:
        torch.manual_seed(seed)
        vae = AutoencoderKL(**vae_config()).to(device)
        log["vae"] = {"steps": cfg.vae_steps, "batch_size": cfg.vae_batch_size, "lr": cfg.vae_lr,
                      "kl_weight": cfg.kl_weight, "parameters": sum(p.numel() for p in vae.parameters()),
                      "loss_curve": _vae_phase(vae, cfg, cfg.vae_steps, cfg.vae_lr, 0.0, seed, device, 1)}
    log["vae"] |= {"refine_steps": cfg.vae_refine_steps, "refine_lr": cfg.vae_refine_lr,
                   "refine_foreground_weight": cfg.foreground_weight,
                   "refine_loss_curve": _vae_phase(vae, cfg, cfg.vae_refine_steps, cfg.vae_refine_lr,
                                                   cfg.foreground_weight, seed, device, 2)}
    vae.eval()
    with torch.no_grad():
        held = sample_scenes(512, seed=999).images.to(device)
        latents = vae.encode(held).latent_dist.mean
        error = (vae.decode(latents).sample.clamp(-1, 1) - held).abs()
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    log["vae"] |= {"seconds": round(log["vae"].get("seconds", 0.0) + time.perf_counter() - start, 1),
                   "scaling_factor": vae.config.scaling_factor,
                   "held_out_mean_abs_error": round(float(error.mean()), 5),
                   "held_out_max_abs_error": round(float(error.max()), 4)}
    return vae


def refine_decoder(vae, cfg: ScenesConfig, seed: int, device: str, log: dict):
    """Phase 3: the decoder alone (the encoder, its latents and the scaling factor stay as they are)."""
    start = time.perf_counter()
    log["vae"] |= {"decoder_steps": cfg.decoder_steps, "decoder_lr": cfg.decoder_lr,
                   "decoder_foreground_weight": cfg.decoder_foreground_weight,
                   "decoder_loss_curve": _vae_phase(vae, cfg, cfg.decoder_steps, cfg.decoder_lr,
                                                    cfg.decoder_foreground_weight, seed, device, 3, True)}
    vae.eval()
    with torch.no_grad():
        held = sample_scenes(512, seed=999).images.to(device)
        error = (vae.decode(vae.encode(held).latent_dist.mean).sample.clamp(-1, 1) - held).abs()
    log["vae"] |= {"decoder_seconds": round(time.perf_counter() - start, 1),
                   "held_out_mean_abs_error": round(float(error.mean()), 5),
                   "held_out_max_abs_error": round(float(error.max()), 4)}
    return vae


def encode_scenes(vae, n: int, seed: int, device: str, chunk: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` scenes' scaled latents (n, 4, 8, 8) (posterior means × scaling factor) and objects (n, 2)."""
    scenes = sample_scenes(n, seed=seed)
    with torch.no_grad():
        latents = torch.cat([
            vae.encode(x.to(device)).latent_dist.mean.cpu() for x in scenes.images.split(chunk)
        ]) * vae.config.scaling_factor
    return latents, scenes.objects


def train_scenes(out: Path, cfg: TrainConfig, scenes_cfg: ScenesConfig, device: str, stage: str = "all") -> None:
    """The stages into ``out/scenes``: "vae" (stage 1, saved to ``out/scenes/vae``), "diffusion"
    (stages 2 and 3 on that saved VAE) or "all"; checkpoints every ``cfg.checkpoint_every`` UNet steps.
    The VAE is stored in float16 and reloaded before encoding, so both routes encode alike."""
    from diffusers import AutoencoderKL

    folder = out / "scenes"
    folder.mkdir(parents=True, exist_ok=True)
    total = time.perf_counter()
    if stage in ("all", "vae", "vae-refine"):
        log: dict = {"model": "scenes", "machine": _machine(device),
                     "held_out_binding": " ".join(HELD_OUT_BINDING),
                     "held_out_pairs": [f"{' '.join(a)} + {' '.join(b)}" for a, b in HELD_OUT_PAIRS],
                     "caption_dropout": 0.1, "both_named": 0.5}
        phase1 = None
        if stage == "vae-refine":  # phase 2 on the saved phase-1 VAE (float16-rounded)
            log = json.loads((folder / "training_log.json").read_text()) | {"vae_refined_from_saved_phase_1": True}
            phase1 = AutoencoderKL.from_pretrained(folder / "vae", dtype=torch.float32).to(device)
        vae = train_vae(scenes_cfg, cfg.seed, device, log, phase1)
        copy.deepcopy(vae).to(torch.float16).save_pretrained(folder / "vae", safe_serialization=True)
        _log(folder / "training_log.json", log | {"stages": asdict(scenes_cfg)})
        if stage != "all":
            return
    if stage in ("all", "decoder"):  # the encoder is frozen: this phase may run before or beside "diffusion"
        log = json.loads((folder / "training_log.json").read_text())
        vae = AutoencoderKL.from_pretrained(folder / "vae", dtype=torch.float32).to(device)
        vae = refine_decoder(vae, scenes_cfg, cfg.seed, device, log)
        copy.deepcopy(vae).to(torch.float16).save_pretrained(folder / "vae", safe_serialization=True)
        _log(folder / "training_log.json", log | {"stages": asdict(scenes_cfg)})
        if stage != "all":
            return
    log = json.loads((folder / "training_log.json").read_text()) | {"stages": asdict(scenes_cfg)}
    log["config"] = asdict(cfg)
    vae = AutoencoderKL.from_pretrained(folder / "vae", dtype=torch.float32).to(device).eval()
    start = time.perf_counter()
    latents, objects = encode_scenes(vae, scenes_cfg.encoded_scenes, seed=cfg.seed * 7 + 123, device=device)
    log["encoding_seconds"] = round(time.perf_counter() - start, 1)
    print(f"encoded {len(latents)} scenes in {log['encoding_seconds']}s; latent std {float(latents.std()):.3f}",
          flush=True)

    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer(folder / "tokenizer", CAPTION_WORDS, MAX_LENGTH)
    training = TextToImageTraining(tokenizer, scenes_unet_config(scenes_cfg.text_hidden), scenes_cfg.text_hidden,
                                   MAX_LENGTH, cfg, device)
    losses, start = [], time.perf_counter()
    log |= {"unet_parameters": sum(p.numel() for p in training.unet.parameters()),
            "text_encoder_parameters": sum(p.numel() for p in training.text_encoder.parameters())}
    for step in range(cfg.steps):
        idx = torch.randint(len(latents), (cfg.batch_size,), generator=training.g)
        captions = scene_captions(objects[idx], seed=cfg.seed * 1_000_003 + step)
        loss = training.step(step, latents[idx], captions)
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            losses.append((step, loss))
        if (step + 1) % cfg.checkpoint_every == 0 or step == cfg.steps - 1:
            seconds = time.perf_counter() - start
            print(f"scenes step {step + 1}/{cfg.steps} loss {losses[-1][1]:.4f} {seconds:.0f}s", flush=True)
            log |= {"steps_done": step + 1, "unet_seconds": round(seconds, 1),
                    "seconds_this_run": round(time.perf_counter() - total, 1),
                    "final_loss_mean_last_10": float(sum(v for _, v in losses[-10:]) / len(losses[-10:])),
                    "loss_curve": losses}
            save_scenes(folder, vae, training.ema_unet, training.ema_text, tokenizer)
            _log(folder / "training_log.json", log)


def save_scenes(folder: Path, vae, unet, text_encoder, tokenizer) -> None:
    """Save a ``StableDiffusionPipeline`` folder (float16 safetensors, Euler scheduler, no safety checker)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=copy.deepcopy(vae).to(torch.float16), text_encoder=copy.deepcopy(text_encoder).to(torch.float16),
        tokenizer=tokenizer, unet=copy.deepcopy(unet).to(torch.float16),
        scheduler=EulerDiscreteScheduler(**SD_BETAS, steps_offset=1, timestep_spacing="trailing"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)

