"""Scores of generated images: the CLIP score of prompt compositions (the paper's Table 3), the
attribute checker for the embedded shapes model (Table 2) and the digit classifier for the embedded
digit models (Table 1), with the group summaries the paper reports.

Plain functions on tensors, and one object (:class:`CLIPScorer`) holding a CLIP model. Nothing here
knows how images are stored on disk.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from .zoo.experiments import class_entropy
from .zoo.shapes import COLOURS, SHAPES, read_attributes

__all__ = ["clip_score", "CLIPScorer", "pil_to_pixels", "mean_std", "prompt_attributes", "read_prompt_attributes",
           "attribute_rates", "classify_digits", "digit_summary"]


def clip_score(image_embeds: Tensor, text_embeds: Tensor, clamp: bool = True) -> Tensor:
    """CLIP score (N, P) of N images against P texts: ``100 · cos(E_I, E_T)``.

    ``image_embeds`` (N, D) and ``text_embeds`` (P, D) are CLIP's projected embeddings (normalised
    here). With ``clamp`` (the default) a negative cosine scores 0, as in torchmetrics'
    ``CLIPScore`` (``max(100 · cos, 0)``, Hessel et al. 2021 with w = 100), which the SuperDiff
    paper's CLIP numbers follow; a random image rarely scores below 0 on a real CLIP model, so the
    clamp matters only for degenerate images.
    """
    e_i = torch.nn.functional.normalize(image_embeds.float(), dim=-1)
    e_t = torch.nn.functional.normalize(text_embeds.float(), dim=-1)
    score = 100.0 * e_i @ e_t.T
    return score.clamp_min(0.0) if clamp else score


class CLIPScorer:
    """A CLIP model with its tokenizer and image processor: embeds prompts and PIL images.

    The embeddings are those of ``CLIPModel.get_text_features`` / ``get_image_features`` (pooled
    output through the projection), computed from the submodules so that every transformers
    version gives tensors.
    """

    def __init__(self, model, tokenizer, image_processor) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        device: str | torch.device = "cpu",
        torch_dtype: torch.dtype = torch.float32,
        use_safetensors: bool | None = True,
        local_files_only: bool = False,
    ) -> "CLIPScorer":
        """Load ``CLIPModel``, ``CLIPTokenizer`` and ``CLIPImageProcessor`` from a folder or hub id.
        ``use_safetensors`` as in transformers: True reads only safetensors weights, None prefers
        them and falls back to pickled ones, False reads only pickled ones."""
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        model = CLIPModel.from_pretrained(
            name_or_path, use_safetensors=use_safetensors, local_files_only=local_files_only
        )
        tokenizer = CLIPTokenizer.from_pretrained(name_or_path, local_files_only=local_files_only)
        image_processor = CLIPImageProcessor.from_pretrained(name_or_path, local_files_only=local_files_only)
        return cls(model.to(device=device, dtype=torch_dtype), tokenizer, image_processor)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> Tensor:
        """Projected text embeddings (P, D), float32 on the CPU; texts longer than CLIP's context are truncated."""
        max_length = self.model.config.text_config.max_position_embeddings
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out = self.model.text_model(input_ids=tokens["input_ids"].to(self.device),
                                    attention_mask=tokens["attention_mask"].to(self.device))
        return self.model.text_projection(out.pooler_output).float().cpu()

    @torch.no_grad()
    def embed_images(self, images: Sequence) -> Tensor:
        """Projected image embeddings (N, D), float32 on the CPU, of PIL images (any size and mode)."""
        rgb = [im.convert("RGB") for im in images]
        pixels = self.image_processor(images=rgb, return_tensors="pt")["pixel_values"]
        dtype = next(self.model.parameters()).dtype
        out = self.model.vision_model(pixel_values=pixels.to(self.device, dtype))
        return self.model.visual_projection(out.pooler_output).float().cpu()


def pil_to_pixels(images: Sequence) -> Tensor:
    """PIL images of one size and mode ("L" or "RGB") → (N, C, H, W) float32 in [-1, 1], as
    the pipelines' ``output_type="pt"`` images mapped from [0, 1] (C = 1 for "L")."""
    arrays = [np.asarray(im, dtype=np.float32) for im in images]
    x = torch.from_numpy(np.stack(arrays))
    x = x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)
    return x / 127.5 - 1.0


def mean_std(values: Sequence[float]) -> dict:
    """``{"mean", "std"}`` of ``values``; std is the sample standard deviation (n − 1), None for n < 2."""
    v = [float(x) for x in values]
    if not v:
        return {"mean": None, "std": None}
    mean = sum(v) / len(v)
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else None
    return {"mean": mean, "std": std}


def prompt_attributes(prompts: Sequence[str]) -> tuple[list[str], list[str]]:
    """(colour and shape words named by ``prompts``, other words), lower-cased, in order, no repeats.
    E.g. ``["red", "circle"]`` and ``["red circle"]`` both name ``["red", "circle"]``."""
    named: list[str] = []
    other: list[str] = []
    for prompt in prompts:
        for word in prompt.lower().split():
            target = named if word in COLOURS or word in SHAPES else other
            if word not in target:
                target.append(word)
    return named, other


def read_prompt_attributes(images: Tensor, attributes: Sequence[str]) -> list[dict]:
    """Read colour and shape of images (N, 3, H, W) in [-1, 1] with the attribute checker and say,
    per image, which of ``attributes`` (colour or shape words) it shows:
    ``{"colour", "shape", "present": {word: bool}}``. Where the checker reads no colour or no shape
    (None: noise, a blank frame, two objects, ...) the words of that kind are not present."""
    unknown = [a for a in attributes if a not in COLOURS and a not in SHAPES]
    if unknown:
        raise ValueError(
            f"attributes must be colour words {list(COLOURS)} or shape words {list(SHAPES)}, got {unknown}; "
            f"pass only those (prompt_attributes picks them out of prompts)"
        )
    colours, shapes = read_attributes(images)
    return [
        {"colour": c, "shape": s, "present": {a: (a == c if a in COLOURS else a == s) for a in attributes}}
        for c, s in zip(colours, shapes)
    ]


def attribute_rates(present: Sequence[Mapping[str, bool]]) -> dict:
    """Group rates of :func:`read_prompt_attributes`' ``present`` maps: ``both_rate`` (every named
    attribute shown), ``neither_rate`` (none shown) and the rate of each attribute; for a colour–shape
    pair exactly the both/neither rates of :func:`superdiff.zoo.experiments.shapes_and`. An image the
    checker cannot read counts as showing nothing, so pure noise has both rate 0; with no attribute
    named the rates are None (``all`` of nothing is not "both")."""
    n = len(present)
    names = list(present[0]) if n else []
    if not names:  # nothing read, or nothing named: no rate of "every named attribute" to give
        return {"both_rate": None, "neither_rate": None, "rates": {}, "n": n}
    return {
        "both_rate": sum(all(p.values()) for p in present) / n,
        "neither_rate": sum(not any(p.values()) for p in present) / n,
        "rates": {a: sum(p[a] for p in present) / n for a in names},
        "n": n,
    }


@torch.no_grad()
def classify_digits(images: Tensor, classifier: torch.nn.Module) -> tuple[Tensor, Tensor]:
    """Predicted digit (N,) and its softmax probability (N,) of images (N, 1, 8, 8) in [-1, 1]."""
    device = next(classifier.parameters()).device
    probs = torch.softmax(classifier(images.to(device).float()), dim=-1).cpu()
    confidence, labels = probs.max(dim=-1)
    return labels, confidence


def digit_summary(
    labels: Sequence[int] | Tensor, confidences: Sequence[float] | Tensor, num_classes: int = 10
) -> dict:
    """Class fractions, their entropy (nats; log 10 ≈ 2.30 when every digit is equally frequent) and
    the mean confidence, as :func:`superdiff.zoo.experiments.digits_or` reports them."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    n = labels.numel()
    fractions = (torch.bincount(labels, minlength=num_classes).double() / max(n, 1)).tolist()
    confidence = float(torch.as_tensor(confidences, dtype=torch.float64).mean()) if n else None
    return {"class_fractions": fractions, "class_entropy": class_entropy(fractions), "confidence": confidence, "n": n}
