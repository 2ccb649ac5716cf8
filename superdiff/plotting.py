"""Small PIL-only figures (scatter panels, line traces, image grids): no plotting dependency needed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

__all__ = ["ScatterPanel", "scatter_panels", "LineSeries", "line_panels", "image_grid", "tensor_to_pil"]

PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75)]


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


@dataclass
class ScatterPanel:
    title: str
    points: Tensor  # (N, 2)
    groups: Tensor | None = None  # (N,) integer colour index


def scatter_panels(panels: Sequence[ScatterPanel], limit: float = 3.5, size: int = 300) -> Image.Image:
    """One square scatter plot per panel, side by side, over ``[-limit, limit]²``."""
    header = 18
    image = Image.new("RGB", (size * len(panels), size + header), "white")
    draw = ImageDraw.Draw(image)
    for k, panel in enumerate(panels):
        x0 = k * size
        draw.rectangle([x0 + 2, header, x0 + size - 3, header + size - 3], outline=(180, 180, 180))
        draw.line([x0 + size // 2, header, x0 + size // 2, header + size - 3], fill=(230, 230, 230))
        draw.line([x0 + 2, header + size // 2, x0 + size - 3, header + size // 2], fill=(230, 230, 230))
        draw.text((x0 + 6, 3), panel.title, fill="black", font=_font())
        pts = panel.points.detach().to(torch.float64).cpu()
        groups = panel.groups.cpu() if panel.groups is not None else torch.zeros(len(pts), dtype=torch.long)
        scale = (size - 8) / (2 * limit)
        for (px, py), g in zip(pts.tolist(), groups.tolist()):
            if abs(px) > limit or abs(py) > limit:
                continue
            u = x0 + 4 + (px + limit) * scale
            v = header + 4 + (limit - py) * scale
            draw.ellipse([u - 1.2, v - 1.2, u + 1.2, v + 1.2], fill=PALETTE[int(g) % len(PALETTE)])
    return image


@dataclass
class LineSeries:
    label: str
    values: Tensor  # (T,) or (T, S) several sample trajectories drawn thin


def line_panels(panels: Sequence[tuple[str, Sequence[LineSeries]]], width: int = 420, height: int = 260) -> Image.Image:
    """Line plots side by side; each panel autoscales its y-axis and labels its range."""
    header, margin = 18, 34
    image = Image.new("RGB", (width * len(panels), height + header), "white")
    draw = ImageDraw.Draw(image)
    for k, (title, series) in enumerate(panels):
        x0 = k * width
        draw.text((x0 + 6, 3), title, fill="black", font=_font())
        vals = [s.values.detach().to(torch.float64).cpu() for s in series]
        finite = torch.cat([v.flatten()[torch.isfinite(v.flatten())] for v in vals]) if vals else torch.zeros(1)
        lo, hi = (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 1.0)
        if hi - lo < 1e-12:
            lo, hi = lo - 1.0, hi + 1.0
        left, top, right, bottom = x0 + margin, header + 4, x0 + width - 8, header + height - 16
        draw.rectangle([left, top, right, bottom], outline=(180, 180, 180))
        draw.text((x0 + 2, top), f"{hi:.3g}", fill="black", font=_font())
        draw.text((x0 + 2, bottom - 10), f"{lo:.3g}", fill="black", font=_font())
        for j, (s, v) in enumerate(zip(series, vals)):
            colour = PALETTE[j % len(PALETTE)]
            v2 = v if v.dim() == 2 else v[:, None]
            steps = v2.shape[0]
            for col in range(v2.shape[1]):
                pts = [
                    (left + (right - left) * i / max(steps - 1, 1), bottom - (bottom - top) * (float(v2[i, col]) - lo) / (hi - lo))
                    for i in range(steps)
                    if torch.isfinite(v2[i, col])
                ]
                if len(pts) > 1:
                    draw.line(pts, fill=colour, width=1 if v2.shape[1] > 1 else 2)
            draw.text((left + 6 + 90 * j, bottom + 3), s.label, fill=colour, font=_font())
    return image


def tensor_to_pil(images: Tensor) -> list[Image.Image]:
    """(N, C, H, W) in [-1, 1] -> PIL images (C = 1 or 3)."""
    arr = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    out = []
    for img in arr:
        if img.shape[0] == 1:
            out.append(Image.fromarray(img[0].numpy(), mode="L").convert("RGB"))
        else:
            out.append(Image.fromarray(img.permute(1, 2, 0).numpy(), mode="RGB"))
    return out


def image_grid(rows: Sequence[tuple[str, Sequence[Image.Image]]], cell: int = 48, label_width: int = 150) -> Image.Image:
    """Labelled rows of equally sized images, upscaled (nearest) to ``cell`` pixels."""
    cols = max((len(r[1]) for r in rows), default=1)
    image = Image.new("RGB", (label_width + cols * (cell + 2), len(rows) * (cell + 2)), "white")
    draw = ImageDraw.Draw(image)
    for r, (label, imgs) in enumerate(rows):
        y = r * (cell + 2)
        draw.text((4, y + cell // 2 - 5), label[:24], fill="black", font=_font())
        for c, img in enumerate(imgs):
            image.paste(img.resize((cell, cell), Image.NEAREST), (label_width + c * (cell + 2), y))
    return image
