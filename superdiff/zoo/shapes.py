"""A procedural, captioned RGB data set of coloured shapes, and a deterministic attribute checker.

Each 16×16 image shows one filled shape (circle, square, triangle) in one colour (red, green,
blue, yellow) at a random position and size on black. Captions are a single attribute ("red",
"circle") or a pair ("red circle"). Blue triangles never appear in training: composing "blue" AND
"triangle" must build them from the parts.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "COLOURS",
    "SHAPES",
    "HELD_OUT",
    "ShapesBatch",
    "render_shapes",
    "sample_shapes",
    "captions_of",
    "read_attributes",
    "CheckerConfig",
    "clean_masks",
    "shape_masks",
]

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.1, 0.1),
    "green": (0.1, 0.9, 0.1),
    "blue": (0.15, 0.3, 1.0),
    "yellow": (1.0, 0.9, 0.1),
}
SHAPES = ("circle", "square", "triangle")
HELD_OUT = ("blue", "triangle")
SIZE = 16


@dataclass(frozen=True)
class ShapesBatch:
    """Images and the labels they were drawn from."""

    images: Tensor  # (N, 3, 16, 16) in [-1, 1]
    colours: Tensor  # (N,) index into COLOURS
    shapes: Tensor  # (N,) index into SHAPES


def shape_masks(shapes: Tensor, centres: Tensor, radii: Tensor, size: int = SIZE) -> Tensor:
    """Boolean masks (N, size, size) of filled shapes: ``shapes`` (N,) index into SHAPES,
    ``centres`` (N, 2) in pixels (x, y), ``radii`` (N,) half-sizes in pixels."""
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    dx = x[None] - centres[:, 0, None, None]
    dy = y[None] - centres[:, 1, None, None]
    r = radii[:, None, None]
    circle = dx**2 + dy**2 <= r**2
    square = (dx.abs() <= r * 0.85) & (dy.abs() <= r * 0.85)
    # upright isosceles triangle: apex at the top, base at the bottom
    top, bottom = -r, r * 0.8
    frac = ((dy - top) / (bottom - top)).clamp(0, 1)
    triangle = (dy >= top) & (dy <= bottom) & (dx.abs() <= frac * r * 1.05)
    return torch.stack([circle, square, triangle], dim=1)[torch.arange(shapes.shape[0]), shapes]


def render_shapes(colours: Tensor, shapes: Tensor, centres: Tensor, radii: Tensor, size: int = SIZE) -> Tensor:
    """Draw filled shapes in [-1, 1]: ``colours`` (N,) index into COLOURS, the rest as :func:`shape_masks`."""
    masks = shape_masks(shapes, centres, radii, size)
    palette = torch.tensor(list(COLOURS.values()))
    rgb = palette[colours][:, :, None, None] * masks[:, None].float()
    return rgb * 2.0 - 1.0


def sample_shapes(n: int, seed: int, include_held_out: bool = False) -> ShapesBatch:
    """``n`` random images; without ``include_held_out`` no blue triangle is ever drawn."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.randint(len(COLOURS), (n,), generator=g)
    shapes = torch.randint(len(SHAPES), (n,), generator=g)
    if not include_held_out:
        held = (colours == list(COLOURS).index(HELD_OUT[0])) & (shapes == SHAPES.index(HELD_OUT[1]))
        # redraw the shape of every held-out pair as circle or square, deterministically
        shapes = torch.where(held, torch.randint(2, (n,), generator=g), shapes)
    radii = 3.5 + 3.0 * torch.rand(n, generator=g)  # 7 to 13 px across
    centres = radii[:, None] + 0.5 + (SIZE - 1 - 2 * radii[:, None]) * torch.rand(n, 2, generator=g)
    return ShapesBatch(render_shapes(colours, shapes, centres, radii), colours, shapes)


def captions_of(batch: ShapesBatch, seed: int, drop: float = 0.1) -> list[str]:
    """One caption per image: colour, shape or both (⅓ each), or "" with probability ``drop``."""
    g = torch.Generator().manual_seed(seed + 1)
    kind = torch.randint(3, (len(batch.colours),), generator=g)
    dropped = torch.rand(len(batch.colours), generator=g) < drop
    names = list(COLOURS)
    out = []
    for c, s, k, d in zip(batch.colours.tolist(), batch.shapes.tolist(), kind.tolist(), dropped.tolist()):
        if d:
            out.append("")
        else:
            out.append([names[c], SHAPES[s], f"{names[c]} {SHAPES[s]}"][k])
    return out


@dataclass(frozen=True)
class CheckerConfig:
    """Thresholds of :func:`read_attributes` (brightness and colour in [0, 1] per channel, sizes in pixels).

    The renders are one palette-coloured shape on black, so an image is read only when it looks like
    one: a single blob on a dark background, in one palette colour, shaped like a template.
    """

    threshold: float = 0.35  # a pixel is foreground when its brightest channel exceeds this
    min_pixels: int = 6  # fewer foreground pixels than this: nothing readable; also the size of a "second object"
    max_fill: float = 2 / 3  # a blob over this fraction of the frame is no shape on a background (renders ≤ 53%)
    max_background: float = (
        0.175  # mean brightest channel outside the blob above this (half the threshold): no clean background
    )
    min_hue_share: float = 0.8  # fewer of the blob's bright pixels sharing one palette hue: mixed colours, no colour
    max_colour_distance: float = (
        0.4  # blob mean colour farther from that hue's entry: no colour (half the closest pair, red–yellow)
    )
    min_iou: float = 0.7  # best template overlap below this: the shape is unreadable (renders ≥ 0.88)
    radii: tuple[float, float, float] = (3.0, 7.0, 0.5)  # template half-sizes: start, stop, step
    centre_step: float = 0.5


def _propagate(labels: Tensor, allowed: Tensor) -> Tensor:
    """Spread the largest label over 8-connected ``allowed`` pixels until nothing changes."""
    while True:
        grown = torch.nn.functional.max_pool2d(labels[:, None], 3, stride=1, padding=1)[:, 0] * allowed
        if torch.equal(grown, labels):
            return labels
        labels = grown


def _largest_component(masks: Tensor) -> Tensor:
    """Each mask's largest 8-connected component (N, H, W) bool; empty where the mask is empty."""
    n, h, w = masks.shape
    allowed = masks.float()
    ids = torch.arange(1, h * w + 1, dtype=torch.float32).view(1, h, w)
    labels = _propagate(ids * allowed, allowed).long().view(n, -1)
    counts = torch.zeros(n, h * w + 1).scatter_add_(1, labels, torch.ones_like(labels, dtype=torch.float32))
    counts[:, 0] = 0
    largest = (labels == counts.argmax(1, keepdim=True)) & (labels > 0)
    return largest.view(n, h, w)


def clean_masks(masks: Tensor) -> Tensor:
    """Keep each mask's largest 8-connected component and fill its holes. ``masks`` (N, H, W) bool."""
    _, h, w = masks.shape
    largest = _largest_component(masks)
    # holes: background pixels not connected to the border through background
    background = (~largest).float()
    border = torch.zeros(h, w)
    border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = 1
    outside = _propagate(border[None] * background, background) > 0
    return ~outside


def _dilate(masks: Tensor) -> Tensor:
    """Masks (N, H, W) grown by one pixel in all 8 directions."""
    return torch.nn.functional.max_pool2d(masks[:, None].float(), 3, stride=1, padding=1)[:, 0] > 0


def _at_full_brightness(colours: Tensor) -> Tensor:
    """Colours (..., 3) scaled so that their brightest channel is 1 (black stays black)."""
    return colours / colours.max(-1, keepdim=True).values.clamp_min(1e-6)


def _nearest_hue(pixels: Tensor, palette: Tensor) -> Tensor:
    """Index (...,) of the palette entry nearest each pixel (..., 3), both at full brightness, so
    that a dimmed edge pixel keeps the colour of the shape it belongs to."""
    nearest = torch.cdist(_at_full_brightness(pixels).flatten(0, -2), _at_full_brightness(palette)).argmin(-1)
    return nearest.view(pixels.shape[:-1])


@functools.lru_cache(maxsize=4)
def _templates(size: int, radii: tuple[float, float, float], centre_step: float) -> tuple[Tensor, Tensor]:
    """Masks of every shape at every (centre, radius) of a grid, flattened: (P, K), and the shape of each (K,)."""
    rs = torch.arange(radii[0], radii[1] + 1e-6, radii[2])
    cs = torch.arange(1.0, size - 1.0 + 1e-6, centre_step)
    r, cy, cx = torch.meshgrid(rs, cs, cs, indexing="ij")
    r, centres = r.flatten(), torch.stack([cx.flatten(), cy.flatten()], dim=1)
    banks, kinds = [], []
    for k in range(len(SHAPES)):
        m = shape_masks(torch.full((r.numel(),), k), centres, r, size).flatten(1)
        keep = m.sum(1) > 0
        banks.append(m[keep])
        kinds.append(torch.full((int(keep.sum()),), k))
    return torch.cat(banks).float().T.contiguous(), torch.cat(kinds)


def _best_shapes(masks: Tensor, cfg: CheckerConfig) -> tuple[Tensor, Tensor]:
    """Index into SHAPES of the template with the highest IoU for each mask (N, H, W), and that IoU."""
    bank, kinds = _templates(masks.shape[-1], cfg.radii, cfg.centre_step)
    area = bank.sum(0)
    best, which = [], []
    for chunk in masks.flatten(1).float().split(256):
        inter = chunk @ bank
        iou = inter / (chunk.sum(1, keepdim=True) + area - inter)
        value, index = iou.max(1)
        best.append(value)
        which.append(kinds[index])
    return torch.cat(which), torch.cat(best)


def _hues(x: Tensor, lit: Tensor, palette: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Palette hue of every pixel (N, H, W), the hue most of each image's ``lit`` pixels (N, H, W)
    have (N,), and the fraction of them that have it (N,)."""
    hue = _nearest_hue(x.permute(0, 2, 3, 1), palette)
    votes = torch.stack([((hue == k) & lit).flatten(1).sum(1) for k in range(len(palette))], dim=1)
    top, dominant = votes.max(1)
    return hue, dominant, top / lit.flatten(1).sum(1).clamp_min(1)


def _one_object_on_background(x: Tensor, bright: Tensor, blob: Tensor, off_hue: Tensor, cfg: CheckerConfig) -> Tensor:
    """Per image (N,) bool: the blob is one shape on a clean background, as every render is. It
    leaves most of the frame free; the frame outside it (past a one-pixel ring for soft edges) is
    dark on average; and no second object, ``cfg.min_pixels`` or more connected bright pixels, lies
    outside it or inside it in another hue (``off_hue``, N, H, W: two shapes touching)."""
    n = x.shape[0]
    fill = blob.flatten(1).float().mean(1)
    outside = ~_dilate(blob)
    brightness = x.max(dim=1).values
    background = (brightness * outside).flatten(1).sum(1) / outside.flatten(1).sum(1).clamp_min(1)
    second = _largest_component((bright & outside) | off_hue).view(n, -1).sum(1)
    return (fill <= cfg.max_fill) & (background <= cfg.max_background) & (second < cfg.min_pixels)


def read_attributes(
    images: Tensor, cfg: CheckerConfig = CheckerConfig()
) -> tuple[list[str | None], list[str | None]]:
    """Read (colour, shape) of each image from its pixels. ``images`` (N, 3, H, W) in [-1, 1], H = W.

    Foreground = the largest 8-connected blob of pixels whose brightest channel exceeds
    ``cfg.threshold``, holes filled (robust to speckle). The image is read only if the blob has
    ``cfg.min_pixels`` or more pixels and is one shape on a clean background
    (:func:`_one_object_on_background`); otherwise colour and shape are both None: noise, blank,
    washed-out or crowded images show no attribute. Colour = the palette hue most of the blob's
    bright pixels have (each pixel scaled to a brightest channel of 1, so dim edges keep their
    hue); None when fewer than ``cfg.min_hue_share`` of them have it or their mean colour is
    farther than ``cfg.max_colour_distance`` from that palette entry (speckled, grey, white or
    off-palette blobs). Shape = the shape of the rendered template (any centre and size on a grid)
    that overlaps the blob best (IoU); None when that overlap is below ``cfg.min_iou``.
    """
    x = (images.detach().float().cpu().clamp(-1, 1) + 1) / 2
    if x.shape[0] == 0:
        return [], []
    palette = torch.tensor(list(COLOURS.values()))
    bright = x.max(dim=1).values > cfg.threshold
    blob = clean_masks(bright)
    lit = bright & blob  # the blob's own pixels: filled holes are not the shape's colour
    hue, dominant, hue_share = _hues(x, lit, palette)
    off_hue = lit & (hue != dominant[:, None, None])
    readable = ((blob.flatten(1).sum(1) >= cfg.min_pixels)
                & _one_object_on_background(x, bright, blob, off_hue, cfg))

    # colour: the dominant hue, if nearly all pixels have it and their mean colour is that entry's
    # (within half the closest palette pair, so no other entry is as near)
    means = (x * lit[:, None]).flatten(2).sum(2) / lit.flatten(1).sum(1).clamp_min(1)[:, None]
    distance = (means - palette[dominant]).norm(dim=1)
    coloured = readable & (hue_share >= cfg.min_hue_share) & (distance <= cfg.max_colour_distance)
    kinds, iou = _best_shapes(blob, cfg)
    shaped = readable & (iou >= cfg.min_iou)

    names = list(COLOURS)
    colours = [names[c] if ok else None for c, ok in zip(dominant.tolist(), coloured.tolist())]
    shapes = [SHAPES[k] if ok else None for k, ok in zip(kinds.tolist(), shaped.tolist())]
    return colours, shapes
