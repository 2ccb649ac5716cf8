"""Tiny, seeded, offline diffusers components for tests and demos (no hub, no downloads).

Every builder constructs its module from a config with a fixed seed, so two calls give identical
weights. The CLIP tokenizer is written from a local vocabulary (:func:`write_clip_tokenizer`):
two special tokens, the 256 byte characters and their ``</w>`` forms, and BPE merges for a small
list of words. Reused by the pipeline tests and the CLI tests.
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Sequence

import torch

__all__ = [
    "WORDS",
    "write_clip_tokenizer",
    "tiny_clip_tokenizer",
    "tiny_clip_text_model",
    "tiny_unet_condition",
    "tiny_vae",
    "tiny_unet2d",
    "tiny_sd_components",
    "tiny_sdxl_components",
    "tiny_sd3_components",
    "tiny_unconditional_components",
    "write_qwen_tokenizer",
    "tiny_qwen_tokenizer",
    "tiny_qwen3",
    "tiny_qwen25_vl",
    "tiny_qwenimage_components",
    "tiny_zimage_components",
]

#: Words that get whole-word tokens in the tiny vocabulary (others fall back to characters).
WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "on", "and", "photo", "picture", "red", "blue", "green", "yellow", "white",
    "black", "circle", "square", "triangle", "cross", "cat", "dog", "flamingo", "candy", "cane",
    "background", "small", "large", "left", "right", "top", "bottom",
)


def write_clip_tokenizer(
    directory: str | os.PathLike, words: Sequence[str] = WORDS, model_max_length: int = 16
) -> str:
    """Write ``vocab.json``, ``merges.txt`` and a tokenizer config for :class:`~transformers.CLIPTokenizer`
    in which every word of ``words`` is one token (the embedded shapes model's writer,
    :func:`superdiff.zoo.tokenizer.write_tokenizer`, over this list). Returns the directory."""
    from .zoo.tokenizer import write_tokenizer

    return str(write_tokenizer(directory, words, model_max_length))


def tiny_clip_tokenizer(directory: str | os.PathLike | None = None, model_max_length: int = 16):
    """A :class:`~transformers.CLIPTokenizer` over the tiny vocabulary (written to a temp dir by default)."""
    from transformers import CLIPTokenizer

    directory = write_clip_tokenizer(
        directory or tempfile.mkdtemp(prefix="superdiff-tok-"), model_max_length=model_max_length
    )
    return CLIPTokenizer.from_pretrained(directory, model_max_length=model_max_length)


def tiny_clip_text_model(
    tokenizer, hidden_size: int = 32, projection_dim: int | None = None, seed: int = 0, num_layers: int = 2
):
    """A seeded CLIP text encoder sized for ``tokenizer``; with ``projection_dim`` a
    :class:`~transformers.CLIPTextModelWithProjection` (pooled ``text_embeds``, as SDXL/SD3 use)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=projection_dim or hidden_size,
        layer_norm_eps=1e-5,
    )
    torch.manual_seed(seed)
    model = CLIPTextModelWithProjection(config) if projection_dim else CLIPTextModel(config)
    return model.eval()


def tiny_unet_condition(
    cross_attention_dim: int = 32,
    in_channels: int = 4,
    sample_size: int = 8,
    seed: int = 0,
    **overrides,
):
    """A seeded :class:`~diffusers.UNet2DConditionModel` with two levels (downsampling ×2)."""
    from diffusers import UNet2DConditionModel

    config = dict(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    config.update(overrides)
    torch.manual_seed(seed)
    return UNet2DConditionModel(**config).eval()


def tiny_vae(latent_channels: int = 4, seed: int = 0, **overrides):
    """A seeded two-level :class:`~diffusers.AutoencoderKL` (``vae_scale_factor`` 2)."""
    from diffusers import AutoencoderKL

    config = dict(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=16,
    )
    config.update(overrides)
    torch.manual_seed(seed)
    return AutoencoderKL(**config).eval()


def tiny_unet2d(seed: int = 0, sample_size: int = 8, channels: int = 3, **overrides):
    """A seeded unconditional :class:`~diffusers.UNet2DModel` (two levels)."""
    from diffusers import UNet2DModel

    config = dict(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=4,
    )
    config.update(overrides)
    torch.manual_seed(seed)
    return UNet2DModel(**config).eval()


def _euler(prediction_type: str = "epsilon", **kw):
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        prediction_type=prediction_type, **kw,
    )


def _scheduler(name: str, prediction_type: str):
    from diffusers import DDIMScheduler, DDPMScheduler

    if name == "euler":
        return _euler(prediction_type)
    if name == "ddim":
        return DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            prediction_type=prediction_type,
            set_alpha_to_one=False,
            steps_offset=1,
            clip_sample=False,
        )
    if name == "ddpm":
        return DDPMScheduler(beta_schedule="linear", prediction_type=prediction_type, clip_sample=False)
    raise ValueError(f"scheduler must be 'euler', 'ddim' or 'ddpm', got {name!r}")


def tiny_sd_components(
    prediction_type: str = "epsilon",
    scheduler: str = "euler",
    vae: bool = True,
    seed: int = 0,
    tokenizer_dir: str | os.PathLike | None = None,
) -> dict:
    """Components for :class:`~superdiff.pipelines.SuperDiffPipeline` (or diffusers'
    ``StableDiffusionPipeline`` with ``safety_checker=None``): 8×8 latents with a VAE (16×16 images),
    or an RGB pixel-space UNet (``vae=False`` → ``vae=None``, 8×8 images)."""
    tokenizer = tiny_clip_tokenizer(tokenizer_dir)
    return dict(
        vae=tiny_vae(seed=seed) if vae else None,
        text_encoder=tiny_clip_text_model(tokenizer, seed=seed),
        tokenizer=tokenizer,
        unet=tiny_unet_condition(in_channels=4 if vae else 3, seed=seed),
        scheduler=_scheduler(scheduler, prediction_type),
    )


def tiny_sdxl_components(seed: int = 0, tokenizer_dir: str | os.PathLike | None = None) -> dict:
    """SDXL-shaped components: two CLIP encoders (the second with projection), a UNet with
    ``text_time`` added conditioning, a tiny VAE and an Euler scheduler."""
    tokenizer = tiny_clip_tokenizer(tokenizer_dir)
    unet = tiny_unet_condition(
        cross_attention_dim=64,
        seed=seed,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
        use_linear_projection=True,
    )
    return dict(
        vae=tiny_vae(seed=seed),
        text_encoder=tiny_clip_text_model(tokenizer, hidden_size=32, seed=seed),
        text_encoder_2=tiny_clip_text_model(tokenizer, hidden_size=32, projection_dim=32, seed=seed + 1),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=_euler(),
    )


def tiny_t5(seed: int = 0, d_model: int = 32, words: Sequence[str] = WORDS):
    """A :class:`~transformers.T5TokenizerFast` (a unigram vocabulary of ``words`` plus single
    letters, built in memory: nothing is downloaded) and a seeded one-layer
    :class:`~transformers.T5EncoderModel` of width ``d_model``."""
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -1.0) for w in words] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    tokenizer = T5TokenizerFast(vocab=pieces, extra_ids=0)
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
                      relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)
    return tokenizer, T5EncoderModel(config).eval()


def tiny_sd3_components(
    seed: int = 0, vae: bool = True, tokenizer_dir: str | os.PathLike | None = None, t5: bool = False
) -> dict:
    """SD3-shaped components: two CLIP encoders with projection, a T5 encoder with ``t5=True``
    (else none: its branch is zeros, as in diffusers when ``text_encoder_3=None``), an
    :class:`~diffusers.SD3Transformer2DModel`, a VAE with a shift factor and a
    :class:`~diffusers.FlowMatchEulerDiscreteScheduler`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    tokenizer = tiny_clip_tokenizer(tokenizer_dir)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
    ).eval()
    t5_tokenizer, t5_encoder = tiny_t5(seed + 2, d_model=32) if t5 else (None, None)
    return dict(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(seed=seed, shift_factor=0.0609, scaling_factor=1.5035) if vae else None,
        text_encoder=tiny_clip_text_model(tokenizer, hidden_size=16, projection_dim=32, seed=seed),
        tokenizer=tokenizer,
        text_encoder_2=tiny_clip_text_model(tokenizer, hidden_size=16, projection_dim=32, seed=seed + 1),
        tokenizer_2=tokenizer,
        text_encoder_3=t5_encoder,
        tokenizer_3=t5_tokenizer,
    )


def tiny_unconditional_components(num_models: int = 2, seed: int = 0, scheduler: str = "ddpm") -> dict:
    """``num_models`` separately seeded :class:`~diffusers.UNet2DModel` (3×8×8) and a DDPM/DDIM scheduler."""
    from diffusers import DDIMScheduler, DDPMScheduler

    sched = DDPMScheduler(clip_sample=False) if scheduler == "ddpm" else DDIMScheduler(clip_sample=False)
    return dict(unets=[tiny_unet2d(seed=seed + i) for i in range(num_models)], scheduler=sched)


#: Qwen-Image's prompt template words (its 34-token prefix stays 34 tokens, as in Qwen's own vocabulary)
#: and the chat roles: whole tokens in :func:`tiny_qwen_tokenizer`, besides :data:`WORDS`.
QWEN_WORDS: tuple[str, ...] = (
    "system", "user", "assistant", "Describe", "image", "by", "detailing", "color", "shape", "size", "texture",
    "quantity", "text", "spatial", "relationships", "objects", "background",
)
#: The chat template Qwen3's renders for one user message with ``enable_thinking=True`` (ZImagePipeline's call).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_qwen_tokenizer(directory: str | os.PathLike, words: Sequence[str] = WORDS + QWEN_WORDS) -> str:
    """Write ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` of a byte-level BPE
    :class:`~transformers.Qwen2Tokenizer`: ``<|endoftext|>`` (id 0, also padding), the 256 byte
    characters, merges that make each word of ``words`` one token (alone and after a space), and the
    chat tokens ``<|im_start|>`` / ``<|im_end|>`` with :data:`QWEN_CHAT_TEMPLATE`. Returns the directory."""
    import json

    from .zoo.tokenizer import _bytes_to_unicode

    chars = _bytes_to_unicode()
    vocab, merges = {"<|endoftext|>": 0}, []
    for c in chars.values():
        vocab.setdefault(c, len(vocab))
    for piece in [w for word in words for w in (word, " " + word)]:
        symbols = [chars[b] for b in piece.encode()]
        ranks = {tuple(m.split(" ")): i for i, m in enumerate(merges)}
        while len(symbols) > 1:  # what the merges so far leave of the piece (lowest rank first, as BPE applies them)
            rank, i = min((ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(symbols, symbols[1:])))
            if rank == len(ranks):
                break
            symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
        for nxt in symbols[1:]:  # then joined left to right
            merges.append(f"{symbols[0]} {nxt}")
            symbols[0] += nxt
            vocab.setdefault(symbols[0], len(vocab))
    path = os.fspath(directory)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(path, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {"tokenizer_class": "Qwen2Tokenizer", "model_max_length": 4096, "chat_template": QWEN_CHAT_TEMPLATE,
              "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
    return path


def tiny_qwen_tokenizer(directory: str | os.PathLike | None = None):
    """A :class:`~transformers.Qwen2Tokenizer` written by :func:`write_qwen_tokenizer` (to a temp dir by
    default) and loaded from it offline."""
    from transformers import Qwen2Tokenizer

    folder = write_qwen_tokenizer(directory or tempfile.mkdtemp(prefix="superdiff-qwen-tok-"))
    return Qwen2Tokenizer.from_pretrained(folder, local_files_only=True)


def tiny_qwen3(tokenizer, hidden_size: int = 16, seed: int = 0):
    """A seeded two-layer :class:`~transformers.Qwen3Model` over ``tokenizer`` (Z-Image's text encoder)."""
    from transformers import Qwen3Config, Qwen3Model

    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                         max_position_embeddings=512, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(seed)
    return Qwen3Model(config).eval()


def tiny_qwen25_vl(tokenizer, hidden_size: int = 16, seed: int = 0):
    """A seeded :class:`~transformers.Qwen2_5_VLForConditionalGeneration` over ``tokenizer`` with a two-layer
    text model and a one-block vision tower (Qwen-Image's text encoder; the vision tower is never run)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vocab, quarter = len(tokenizer), hidden_size // 16  # two heads: mrope_section sums to half a head's width
    text = dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, vocab_size=vocab, rope_theta=1e6, bos_token_id=0, eos_token_id=0,
                rope_scaling={"mrope_section": [quarter, quarter, 2 * quarter], "rope_type": "default",
                              "type": "default"})
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=hidden_size)
    # The image tokens' ids: three ids past the vocabulary's words (never produced by the tokenizer).
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, vocab_size=vocab + 3, image_token_id=vocab,
                              vision_start_token_id=vocab + 1, vision_end_token_id=vocab + 2, video_token_id=vocab)
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_qwenimage_components(seed: int = 0, tokenizer_dir: str | os.PathLike | None = None) -> dict:
    """Components of diffusers' ``QwenImagePipeline``, as its own tests size them: a two-layer
    :class:`~diffusers.QwenImageTransformer2DModel` (4 latent channels packed 2×2), a one-level
    :class:`~diffusers.AutoencoderKLQwenImage` (VAE factor 2), a tiny Qwen2.5-VL text encoder and Qwen-Image's
    scheduler config (dynamic shift, exponential time shift, terminal σ 0.02)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    tokenizer = tiny_qwen_tokenizer(tokenizer_dir)
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(8, 4, 4),
    ).eval()
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                 latents_mean=[0.1, -0.2, 0.0, 0.3], latents_std=[1.5, 0.8, 1.0, 2.0]).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=math.log(3), max_image_seq_len=8192, max_shift=math.log(3), shift=1.0,
        shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True,
    )
    return dict(scheduler=scheduler, vae=vae, text_encoder=tiny_qwen25_vl(tokenizer, seed=seed), tokenizer=tokenizer,
                transformer=transformer)


def tiny_zimage_components(seed: int = 0, tokenizer_dir: str | os.PathLike | None = None) -> dict:
    """Components of diffusers' ``ZImagePipeline``, as its own tests size them: a
    :class:`~diffusers.ZImageTransformer2DModel` of width 32 (two layers, one refiner layer each side;
    its pad tokens set, which ``torch.empty`` leaves unset), a tiny 4-channel VAE with Z-Image's scaling and
    shift factors, a tiny Qwen3 text encoder and Z-Image-Turbo's scheduler config (static shift 3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel

    tokenizer = tiny_qwen_tokenizer(tokenizer_dir)
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2,
        n_kv_heads=2, cap_feat_dim=16, axes_dims=[8, 4, 4], axes_lens=[256, 32, 32],
    ).eval()
    with torch.no_grad():
        transformer.x_pad_token.copy_(torch.linspace(-1, 1, transformer.x_pad_token.numel()).view_as(
            transformer.x_pad_token))
        transformer.cap_pad_token.copy_(torch.linspace(1, -1, transformer.cap_pad_token.numel()).view_as(
            transformer.cap_pad_token))
    return dict(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False),
        vae=tiny_vae(latent_channels=4, seed=seed, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=tiny_qwen3(tokenizer, seed=seed), tokenizer=tokenizer, transformer=transformer,
    )
