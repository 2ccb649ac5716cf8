"""Train the embedded default models with fixed seeds (CPU or CUDA), logging loss and wall time.

    python -m superdiff.zoo.train digits --out superdiff/zoo/weights
    python -m superdiff.zoo.train classifier --out superdiff/zoo/weights
    python -m superdiff.zoo.train shapes --out superdiff/zoo/weights
    python -m superdiff.zoo.train scenes --out superdiff/zoo/weights   # see superdiff.zoo.train_scenes

The defaults (3000 digit steps, 2500 shapes steps, 3000 scenes UNet steps) are those of the shipped weights. The digits
a and b weights were written by an earlier, uncommitted revision of this script (their logs lack
the ``checkpoint_every`` setting), so retraining them with this one is not guaranteed to give
identical weights.

Digits: three unconditional ``UNet2DModel``s (A: 0–4, B: 5–9, all) with a DDPM schedule.
Shapes: a pixel-space, Stable-Diffusion-shaped model: a small ``CLIPTextModel`` feeding a
cross-attention ``UNet2DConditionModel``, trained jointly with 10% empty captions for
classifier-free guidance and shipped with an ``EulerDiscreteScheduler`` like SD. Weights are saved
in diffusers layout as float16 safetensors (loaded back as float32 on the CPU).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .digits import DigitClassifier, load_digits_split, subset
from .shapes import captions_of, sample_shapes
from .tokenizer import CAPTION_WORDS, MAX_LENGTH, build_tokenizer

DDPM_BETAS = dict(beta_start=1e-4, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000)
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by the diffusion models (AdamW, warm-up then cosine to 10% lr)."""

    steps: int
    batch_size: int
    lr: float
    seed: int = 0
    ema_decay: float = 0.999
    warmup: int = 200
    log_every: int = 50
    checkpoint_every: int = 250


def digit_unet_config() -> dict:
    """``UNet2DModel`` arguments of the digit models (8×8×1, about 0.65M parameters)."""
    return dict(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )


def shapes_unet_config(cross_attention_dim: int) -> dict:
    """``UNet2DConditionModel`` arguments of the shapes model (16×16×3, cross-attention at 8×8,
    about 1M parameters)."""
    return dict(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=8,
    )


def _lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of ``cfg.lr``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """Exponential moving average of the weights, in place."""
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1.0 - decay)


def _noised(
    x0: torch.Tensor, alphas_cumprod: torch.Tensor, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DDPM forward noising at uniform random timesteps: (x_t, t, ε)."""
    t = torch.randint(0, alphas_cumprod.numel(), (x0.shape[0],), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    abar = alphas_cumprod[t].view(-1, *([1] * (x0.dim() - 1)))
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise, t, noise


class TextToImageTraining:
    """A cross-attention UNet and its CLIP text encoder trained jointly on DDPM's ε loss, with EMA copies
    (the embedded shapes and scenes models): built once, then one :meth:`step` per batch of images or
    latents (B, C, H, W) and their captions."""

    def __init__(self, tokenizer, unet_config: dict, hidden: int, max_length: int, cfg: TrainConfig, device: str):
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        text_config = CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=max_length, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=hidden,
        )
        self.tokenizer, self.max_length, self.cfg, self.device = tokenizer, max_length, cfg, device
        self.text_encoder = CLIPTextModel(text_config).to(device)
        self.unet = UNet2DConditionModel(**unet_config).to(device)
        self.ema_unet, self.ema_text = copy.deepcopy(self.unet).eval(), copy.deepcopy(self.text_encoder).eval()
        self.params = list(self.unet.parameters()) + list(self.text_encoder.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=0.0)
        self.abar = DDPMScheduler(**SD_BETAS).alphas_cumprod
        self.g = torch.Generator().manual_seed(cfg.seed)

    def step(self, step: int, x0: torch.Tensor, captions: list[str]) -> float:
        """One AdamW step on the ε loss at uniform timesteps (clipped gradients, the step's learning
        rate), then the EMA updates; returns the loss."""
        ids = self.tokenizer(
            captions, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        ).input_ids
        xt, t, noise = _noised(x0, self.abar, self.g)
        emb = self.text_encoder(ids.to(self.device))[0]
        pred = self.unet(xt.to(self.device), t.to(self.device), encoder_hidden_states=emb).sample
        loss = torch.mean((pred - noise.to(self.device)) ** 2)
        for group in self.opt.param_groups:
            group["lr"] = _lr_at(step, self.cfg)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        _ema_update(self.ema_unet, self.unet, self.cfg.ema_decay)
        _ema_update(self.ema_text, self.text_encoder, self.cfg.ema_decay)
        return round(float(loss.detach()), 5)


def _log(path: Path, record: dict) -> None:
    """Write a training log as indented JSON."""
    path.write_text(json.dumps(record, indent=1) + "\n")


def _machine(device: str) -> str:
    """A short description of where training ran."""
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def train_digit_model(name: str, out: Path, cfg: TrainConfig, device: str) -> None:
    """Train model ``name`` ("a", "b", "all") and save ``out/digits-<name>/{unet,scheduler}``."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(cfg.seed)
    data = subset(load_digits_split(), name).to(device)
    scheduler = DDPMScheduler(**DDPM_BETAS)
    model = UNet2DModel(**digit_unet_config()).to(device)
    ema = copy.deepcopy(model).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    abar = scheduler.alphas_cumprod.to(device)
    g = torch.Generator().manual_seed(cfg.seed)
    folder = out / f"digits-{name}"
    losses, start = [], time.perf_counter()
    for step in range(cfg.steps):
        idx = torch.randint(0, data.shape[0], (cfg.batch_size,), generator=g)
        x0 = data[idx.to(device)]
        xt, t, noise = _noised(x0.cpu(), abar.cpu(), g)
        pred = model(xt.to(device), t.to(device)).sample
        loss = torch.mean((pred - noise.to(device)) ** 2)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        _ema_update(ema, model, cfg.ema_decay)
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            losses.append((step, round(float(loss.detach()), 5)))
    seconds = time.perf_counter() - start
    ema.to(torch.float16).save_pretrained(folder / "unet", safe_serialization=True)
    scheduler.save_pretrained(folder / "scheduler")
    _log(folder / "training_log.json", {
        "model": f"digits-{name}", "config": asdict(cfg), "parameters": sum(p.numel() for p in model.parameters()),
        "train_images": int(data.shape[0]), "seconds": round(seconds, 1), "machine": _machine(device),
        "final_loss_mean_last_10": float(sum(loss for _, loss in losses[-10:]) / len(losses[-10:])),
        "loss_curve": losses,
    })


def train_classifier(out: Path, device: str, epochs: int = 40, seed: int = 0) -> float:
    """Train the digit classifier on the training split; returns and logs its test accuracy."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    split = load_digits_split()
    model = DigitClassifier().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    x, y = split.train_images.to(device), split.train_labels.to(device)
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=g).to(device)
        for i in range(0, x.shape[0], 64):
            idx = perm[i : i + 64]
            # light augmentation: 1-pixel shifts
            xb = torch.roll(
                x[idx],
                shifts=(int(torch.randint(-1, 2, (1,), generator=g)), int(torch.randint(-1, 2, (1,), generator=g))),
                dims=(2, 3),
            )
            loss = nn.functional.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(split.test_images.to(device)).argmax(1).cpu() == split.test_labels).double().mean())
    folder = out / "digit-classifier"
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors")
    )
    _log(folder / "training_log.json", {"epochs": epochs, "seed": seed, "test_accuracy": acc,
                                        "seconds": round(time.perf_counter() - start, 1), "machine": _machine(device)})
    return acc


def train_shapes(out: Path, cfg: TrainConfig, device: str, text_hidden: int = 64) -> None:
    """Train the text encoder and the cross-attention UNet jointly; save ``out/shapes``."""
    torch.manual_seed(cfg.seed)
    folder = out / "shapes"
    tokenizer = build_tokenizer(folder / "tokenizer", CAPTION_WORDS, MAX_LENGTH)
    training = TextToImageTraining(tokenizer, shapes_unet_config(text_hidden), text_hidden, MAX_LENGTH, cfg, device)
    losses, start = [], time.perf_counter()
    for step in range(cfg.steps):
        batch = sample_shapes(cfg.batch_size, seed=cfg.seed * 1_000_003 + step)
        captions = captions_of(batch, seed=step)
        loss = training.step(step, batch.images, captions)
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            losses.append((step, loss))
        if (step + 1) % cfg.checkpoint_every == 0 or step == cfg.steps - 1:
            print(
                f"shapes step {step + 1}/{cfg.steps} loss {losses[-1][1]:.4f} {time.perf_counter() - start:.0f}s",
                flush=True,
            )
            _save_shapes(
                folder, training.ema_unet, training.ema_text, tokenizer, cfg, losses, time.perf_counter() - start,
                device, step + 1,
            )


def _save_shapes(folder, unet, text_encoder, tokenizer, cfg, losses, seconds, device, steps_done) -> None:
    """Checkpoint (so a usable model exists early) in diffusers layout, float16 safetensors."""
    from diffusers import EulerDiscreteScheduler

    half_unet = copy.deepcopy(unet).to(torch.float16)
    half_unet.save_pretrained(folder / "unet", safe_serialization=True)
    copy.deepcopy(text_encoder).to(torch.float16).save_pretrained(folder / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(folder / "tokenizer")
    EulerDiscreteScheduler(**SD_BETAS, steps_offset=1, timestep_spacing="trailing").save_pretrained(
        folder / "scheduler"
    )
    _write_model_index(folder)
    _log(folder / "training_log.json", {
        "model": "shapes", "config": asdict(cfg), "steps_done": steps_done, "seconds": round(seconds, 1),
        "machine": _machine(device), "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "text_encoder_parameters": sum(p.numel() for p in text_encoder.parameters()),
        "held_out": "blue triangle", "caption_dropout": 0.1,
        "final_loss_mean_last_10": float(sum(loss for _, loss in losses[-10:]) / len(losses[-10:])),
        "loss_curve": losses,
    })


def _write_model_index(folder: Path) -> None:
    """A diffusers ``model_index.json`` listing the components (pixel space: no VAE), as
    ``SuperDiffPipeline.save_pretrained`` writes it: diffusers' ``StableDiffusionPipeline`` needs a
    VAE, so the index names the superdiff pipeline that loads the folder."""
    from diffusers import __version__

    index = {
        "_class_name": "SuperDiffPipeline",
        "_diffusers_version": __version__,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": [None, None],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["digits", "classifier", "shapes", "scenes"])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "weights")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--models", default="a,b,all", help="digits: which of a, b, all")
    p.add_argument("--stage", choices=["all", "vae", "decoder", "diffusion"], default="all",
                   help="scenes: train the VAE (decoder: its phase 2, the decoder alone, on the saved VAE), "
                        "the text encoder and UNet on a saved VAE, or all")
    p.add_argument("--vae-steps", type=int, default=None, help="scenes: VAE phase-1 steps")
    p.add_argument("--decoder-steps", type=int, default=None, help="scenes: VAE phase-2 (decoder) steps")
    p.add_argument("--encoded-scenes", type=int, default=None, help="scenes: scenes encoded for the UNet")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.what == "classifier":
        print(f"test accuracy {train_classifier(args.out, args.device):.4f}")
    elif args.what == "digits":
        cfg = TrainConfig(steps=args.steps or 3000, batch_size=args.batch_size or 128, lr=args.lr or 2e-3)
        for name in args.models.split(","):
            train_digit_model(name, args.out, cfg, args.device)
            print(f"digits-{name} done", flush=True)
    elif args.what == "scenes":
        from dataclasses import replace

        from .train_scenes import ScenesConfig, train_scenes

        cfg = TrainConfig(steps=args.steps or 3000, batch_size=args.batch_size or 64, lr=args.lr or 1e-3,
                          ema_decay=0.995, log_every=50, checkpoint_every=200)
        sizes = {k: v for k, v in (("vae_steps", args.vae_steps), ("decoder_steps", args.decoder_steps),
                                   ("encoded_scenes", args.encoded_scenes)) if v is not None}
        train_scenes(args.out, cfg, replace(ScenesConfig(), **sizes), args.device, args.stage)
        print(f"scenes ({args.stage}) done", flush=True)
    else:
        cfg = TrainConfig(
            steps=args.steps or 2500, batch_size=args.batch_size or 64, lr=args.lr or 1e-3, log_every=100
        )
        train_shapes(args.out, cfg, args.device)
        print("shapes done", flush=True)


if __name__ == "__main__":
    main()
