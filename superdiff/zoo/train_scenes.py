"""Train the embedded latent scene model (``embedded-scenes``) with fixed seeds, CPU or CUDA.

    python -m superdiff.zoo.train scenes --out superdiff/zoo/weights               # every stage
    python -m superdiff.zoo.train scenes --stage vae|decoder|diffusion            # one stage

Stages, each logged to ``scenes/training_log.json`` (a stage reads what the one before saved, so
running them one by one gives the weights of one run of all):

1. ``vae``: an ``AutoencoderKL`` (32×32×3 ↔ 8×8×4) on fresh procedural scenes of every pair (it
   reads no captions, so nothing is held out of it but the blue triangle), as Stable
   Diffusion's VAE (L1 + a small KL term), with the objects' pixels and a band around their
   outlines weighted up (:func:`reconstruction_loss`): the black background otherwise outweighs
   the objects, and a blurred outline fattens the shapes and rounds the corners that tell squares
   from circles; the ``scaling_factor`` is 1 / std of the latents;
2. ``decoder``: the decoder alone, outlines weighted up further (the encoder, hence the latents
   and the scaling factor, stay fixed);
3. ``diffusion``: a fixed set of scenes (two objects only as ``TRAIN_PAIRS``) encoded once to
   latents (posterior means), then a small
   ``CLIPTextModel`` and a cross-attention ``UNet2DConditionModel`` on those latents, trained
   jointly (as the shapes model) on incomplete captions, redrawn at every step, with 10% empty
   ones for classifier-free guidance.

Each VAE stage logs how the scene checker reads held-out round trips (:func:`reconstruction_read_rate`).
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

from .scenes import (
    BOTH_NAMED,
    CAPTION_WORDS,
    HELD_OUT_BINDING,
    HELD_OUT_PAIRS,
    MAX_LENGTH,
    PAIRS,
    TRAINING_CYCLE,
    sample_scenes,
    scene_captions,
)
from .tokenizer import build_tokenizer
from .train import SD_BETAS, TextToImageTraining, TrainConfig, _log, _lr_at, _machine

__all__ = ["ScenesConfig", "vae_config", "scenes_unet_config", "train_vae", "encode_scenes", "train_scenes"]


@dataclass(frozen=True)
class ScenesConfig:
    """The stages' sizes: VAE width, steps, batch and loss weights, scenes encoded for the diffusion
    stage, text width."""

    vae_width: int = 32
    vae_steps: int = 1200
    vae_batch_size: int = 32
    vae_lr: float = 1e-3
    foreground_weight: float = 1.0
    edge_weight: float = 2.0
    decoder_steps: int = 400
    decoder_lr: float = 5e-4
    decoder_foreground_weight: float = 2.0
    decoder_edge_weight: float = 4.0
    kl_weight: float = 1e-6
    encoded_scenes: int = 20_000
    text_hidden: int = 64


def vae_config(width: int = 32) -> dict:
    """``AutoencoderKL`` arguments: 32×32×3 images, two downsamplings to 8×8×4 latents, channels
    ``width``, 2·``width``, 2·``width``."""
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=32, layers_per_block=1,
        block_out_channels=(width, 2 * width, 2 * width), down_block_types=("DownEncoderBlock2D",) * 3,
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


def reconstruction_loss(decoded: torch.Tensor, images: torch.Tensor, foreground_weight: float,
                        edge_weight: float) -> torch.Tensor:
    """L1 over the image, plus ``foreground_weight`` × the L1 over the objects' pixels (which the
    black background otherwise outweighs) and ``edge_weight`` × the L1 over a band one pixel
    either side of the objects' outlines (where a blurred decoder fattens the shapes and rounds
    the corners that tell squares from circles). ``decoded``, ``images``: (B, 3, H, W) in [-1, 1]."""
    error = (decoded - images).abs()
    foreground = (images > -1).any(1, keepdim=True).float()
    edge = (torch.nn.functional.max_pool2d(foreground, 3, stride=1, padding=1)
            + torch.nn.functional.max_pool2d(-foreground, 3, stride=1, padding=1))  # dilated − eroded
    weighted = lambda mask: (error * mask).sum() / (3 * mask.sum()).clamp_min(1)  # noqa: E731
    return error.mean() + foreground_weight * weighted(foreground) + edge_weight * weighted(edge)


def _vae_phase(vae, cfg: ScenesConfig, steps: int, lr: float, weights: tuple[float, float], seed: int, device: str,
               phase: int, decoder_only: bool = False) -> list:
    """Optimise ``vae`` for ``steps`` on fresh scenes: :func:`reconstruction_loss` with ``weights``
    (foreground, edge) + a small KL term. ``decoder_only`` keeps the encoder (so the latents, and
    a UNet trained on them) unchanged."""
    trained = (list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters()) if decoder_only
               else list(vae.parameters()))
    opt = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
    schedule = TrainConfig(steps=steps, batch_size=cfg.vae_batch_size, lr=lr, warmup=100)
    g = torch.Generator().manual_seed(seed + phase)
    losses, start = [], time.perf_counter()
    vae.train()
    for step in range(steps):
        x = sample_scenes(cfg.vae_batch_size, seed=10_000_019 * (seed + 1) + 1_000_000 * phase + step,
                          pairs=PAIRS).images
        x = x.to(device)
        with torch.set_grad_enabled(not decoder_only):
            posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g).to(device)
        loss = reconstruction_loss(vae.decode(z).sample, x, *weights) + cfg.kl_weight * posterior.kl().mean()
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


def reconstruction_read_rate(vae, n: int = 512, seed: int = 999, device: str = "cpu") -> dict:
    """How the scene checker reads ``n`` held-out scenes' (of every pair) round trips (posterior means): the
    fraction read exactly as drawn, with the right colours, with the right count, and the mean and
    max absolute pixel error."""
    from .scenes import OBJECTS, read_objects

    scenes = sample_scenes(n, seed=seed, pairs=PAIRS)
    with torch.no_grad():
        images = scenes.images.to(device)
        decoded = vae.decode(vae.encode(images).latent_dist.mean).sample.clamp(-1, 1)
    error = (decoded - images).abs()
    truth = [sorted(OBJECTS[k] for k in row if k >= 0) for row in scenes.objects.tolist()]
    read = [sorted(r, key=str) if r is not None else None for r in read_objects(decoded.cpu())]
    colours = lambda objs: None if objs is None else sorted((c for c, _ in objs), key=str)  # noqa: E731
    return {"read_exactly": round(sum(r == t for r, t in zip(read, truth)) / n, 4),
            "colours_read": round(sum(colours(r) == colours(t) for r, t in zip(read, truth)) / n, 4),
            "count_read": round(sum(r is not None and len(r) == len(t) for r, t in zip(read, truth)) / n, 4),
            "mean_abs_error": round(float(error.mean()), 5), "max_abs_error": round(float(error.max()), 4)}


def train_vae(cfg: ScenesConfig, seed: int, device: str, log: dict):
    """Phase 1: the autoencoder on fresh scenes (``cfg.vae_steps``). Returns it in eval mode with
    its scaling factor (1 / std of held-out latents) set."""
    from diffusers import AutoencoderKL

    start = time.perf_counter()
    torch.manual_seed(seed)
    vae = AutoencoderKL(**vae_config(cfg.vae_width)).to(device)
    log["vae"] = {"steps": cfg.vae_steps, "batch_size": cfg.vae_batch_size, "lr": cfg.vae_lr,
                  "kl_weight": cfg.kl_weight, "parameters": sum(p.numel() for p in vae.parameters()),
                  "foreground_weight": cfg.foreground_weight, "edge_weight": cfg.edge_weight,
                  "loss_curve": _vae_phase(vae, cfg, cfg.vae_steps, cfg.vae_lr,
                                           (cfg.foreground_weight, cfg.edge_weight), seed, device, 1)}
    vae.eval()
    with torch.no_grad():
        latents = vae.encode(sample_scenes(512, seed=999, pairs=PAIRS).images.to(device)).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    log["vae"] |= {"seconds": round(time.perf_counter() - start, 1), "scaling_factor": vae.config.scaling_factor,
                   "held_out": reconstruction_read_rate(vae, device=device)}
    return vae


def refine_decoder(vae, cfg: ScenesConfig, seed: int, device: str, log: dict):
    """Phase 2: the decoder alone (the encoder, its latents and the scaling factor stay as they
    are), with the objects and their outlines weighted up further."""
    start = time.perf_counter()
    log["vae"] |= {"decoder_steps": cfg.decoder_steps, "decoder_lr": cfg.decoder_lr,
                   "decoder_foreground_weight": cfg.decoder_foreground_weight,
                   "decoder_edge_weight": cfg.decoder_edge_weight,
                   "decoder_loss_curve": _vae_phase(vae, cfg, cfg.decoder_steps, cfg.decoder_lr,
                                                    (cfg.decoder_foreground_weight, cfg.decoder_edge_weight),
                                                    seed, device, 2, True)}
    vae.eval()
    log["vae"] |= {"decoder_seconds": round(time.perf_counter() - start, 1),
                   "held_out_after_decoder": reconstruction_read_rate(vae, device=device)}
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
    """The stages into ``out/scenes``: "vae" (stage 1, saved to ``out/scenes/vae``), "decoder"
    (stage 2 on that saved VAE), "diffusion" (stage 3 on the saved VAE) or "all"; checkpoints every
    ``cfg.checkpoint_every`` UNet steps. The VAE is stored in float16 and reloaded by the next
    stage, so one run of "all" and the three stages run one by one give the same weights."""
    from diffusers import AutoencoderKL

    folder = out / "scenes"
    folder.mkdir(parents=True, exist_ok=True)
    total = time.perf_counter()
    if stage in ("all", "vae"):
        log: dict = {"model": "scenes", "machine": _machine(device),
                     "held_out_binding": " ".join(HELD_OUT_BINDING),
                     "held_out_pairs": [f"{' '.join(a)} + {' '.join(b)}" for a, b in HELD_OUT_PAIRS],
                     "training_cycle": [" ".join(obj) for obj in TRAINING_CYCLE],
                     "caption_dropout": 0.1, "both_named": BOTH_NAMED}
        vae = train_vae(scenes_cfg, cfg.seed, device, log)
        _save_vae(vae, folder / "vae")
        _log(folder / "training_log.json", log | {"stages": asdict(scenes_cfg)})
        if stage != "all":
            return
    if stage in ("all", "decoder"):
        log = json.loads((folder / "training_log.json").read_text())
        vae = AutoencoderKL.from_pretrained(folder / "vae", dtype=torch.float32).to(device)
        vae = refine_decoder(vae, scenes_cfg, cfg.seed, device, log)
        _save_vae(vae, folder / "vae")
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
    _without_local_path(folder)


def _save_vae(vae, path: Path) -> None:
    """The VAE in float16 safetensors, its config naming no local path."""
    copy.deepcopy(vae).to(torch.float16).save_pretrained(path, safe_serialization=True)
    _without_local_path(path)


def _without_local_path(folder: Path) -> None:
    """Drop ``_name_or_path`` from every ``config.json`` under ``folder``: a module loaded from
    disk (the VAE, between stages) records the path it came from, which would ship the training
    machine's folder layout inside the weights."""
    for config in folder.rglob("config.json"):
        data = json.loads(config.read_text())
        if data.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

