"""Procedural two-object scenes with incomplete captions, for the embedded latent scene model.

Each 32×32 RGB image shows one or two non-overlapping filled shapes (circle, square, triangle) in
palette colours (red, green, blue, yellow) on black; the objects of a two-object scene differ in
colour and in shape. A two-object scene is captioned with both objects ("a red circle and a blue
square") only part of the time, otherwise with one of them, as real captions are incomplete: each
single-object prompt's distribution thus includes scenes that also hold another object.

Held out of training: the binding blue triangle never appears anywhere. The text-to-image model
sees two objects together only as neighbours on ``TRAINING_CYCLE`` (``TRAIN_PAIRS``); the other
pairs (``HELD_OUT_PAIRS``) never appear together in its training, though each of their objects
appears alone and with its two neighbours. The autoencoder, which reads no captions, sees every pair.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

from .shapes import COLOURS, SHAPES, _dilate, _nearest_hue, _propagate, shape_masks

__all__ = [
    "SIZE",
    "HELD_OUT_BINDING",
    "OBJECTS",
    "PAIRS",
    "TRAINING_CYCLE",
    "TRAIN_PAIRS",
    "HELD_OUT_PAIRS",
    "BOTH_NAMED",
    "CAPTION_WORDS",
    "MAX_LENGTH",
    "Scenes",
    "object_name",
    "pair_caption",
    "sample_scenes",
    "scene_captions",
    "render_scenes",
    "SceneCheckerConfig",
    "read_objects",
    "geneval_correct",
    "named_objects",
    "scene_presence",
    "scene_rates",
]

SIZE = 32
HELD_OUT_BINDING = ("blue", "triangle")
#: Every (colour, shape) object the training scenes draw.
OBJECTS: tuple[tuple[str, str], ...] = tuple(
    (c, s) for c in COLOURS for s in SHAPES if (c, s) != HELD_OUT_BINDING
)
#: Unordered pairs of objects with different colours and different shapes (indices into OBJECTS).
PAIRS: tuple[tuple[int, int], ...] = tuple(
    (i, j) for i, j in itertools.combinations(range(len(OBJECTS)), 2)
    if OBJECTS[i][0] != OBJECTS[j][0] and OBJECTS[i][1] != OBJECTS[j][1]
)
#: The text-to-image model's training pairs are the neighbours on this cycle of all 11 objects
#: (each object has exactly two training partners, and neighbours differ in colour and shape).
TRAINING_CYCLE: tuple[tuple[str, str], ...] = (
    ("red", "circle"), ("yellow", "triangle"), ("green", "circle"), ("red", "triangle"),
    ("blue", "square"), ("green", "triangle"), ("red", "square"), ("yellow", "circle"),
    ("green", "square"), ("blue", "circle"), ("yellow", "square"),
)
TRAIN_PAIRS: tuple[tuple[int, int], ...] = tuple(
    tuple(sorted((OBJECTS.index(a), OBJECTS.index(b))))
    for a, b in zip(TRAINING_CYCLE, TRAINING_CYCLE[1:] + TRAINING_CYCLE[:1])
)
_TRAIN = {frozenset(p) for p in TRAIN_PAIRS}


def _spread(pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``pairs`` reordered so that every prefix uses the objects as evenly as it can (greedy: next
    the first pair whose objects have been used least), so the first few held-out pairs a
    benchmark takes cover most objects instead of all holding red."""
    used = [0] * len(OBJECTS)
    left, out = list(pairs), []
    while left:
        best = min(left, key=lambda p: (used[p[0]] + used[p[1]], max(used[p[0]], used[p[1]])))
        left.remove(best)
        out.append(best)
        used[best[0]] += 1
        used[best[1]] += 1
    return out


#: Pairs never drawn together in the text-to-image model's training (19 of the 30): each object
#: appears alone and with its two cycle neighbours only, so no joint caption ever names them.
#: Ordered so that any first few cover the objects evenly (the first 8 hold 11 objects).
HELD_OUT_PAIRS: tuple[tuple[tuple[str, str], tuple[str, str]], ...] = tuple(
    (OBJECTS[i], OBJECTS[j]) for i, j in _spread([p for p in PAIRS if frozenset(p) not in _TRAIN])
)
#: The fraction of two-object training scenes captioned with both objects (the rest name one).
BOTH_NAMED = 0.25
CAPTION_WORDS: tuple[str, ...] = ("a", "and", *COLOURS, *SHAPES)
MAX_LENGTH = 10  # <|startoftext|> a red circle and a blue square <|endoftext|> <pad>


def object_name(obj: tuple[str, str]) -> str:
    """``("red", "circle")`` -> ``"a red circle"``."""
    return f"a {obj[0]} {obj[1]}"


def pair_caption(first: tuple[str, str], second: tuple[str, str]) -> str:
    """The caption naming both objects: ``"a red circle and a blue square"``."""
    return f"{object_name(first)} and {object_name(second)}"


@dataclass(frozen=True)
class Scenes:
    """Images and the objects drawn in them."""

    images: Tensor  # (N, 3, 32, 32) in [-1, 1]
    objects: Tensor  # (N, 2) indices into OBJECTS; -1 in the second column for a one-object scene


def render_scenes(objects: Tensor, centres: Tensor, radii: Tensor, size: int = SIZE) -> Tensor:
    """Draw scenes in [-1, 1]: ``objects`` (N, M) indices into OBJECTS (-1: absent), ``centres``
    (N, M, 2) in pixels (x, y), ``radii`` (N, M) half-sizes in pixels. Later objects paint over
    earlier ones where they overlap (the sampler never lets them)."""
    n, m = objects.shape
    palette = torch.tensor(list(COLOURS.values()))
    colour_of = torch.tensor([list(COLOURS).index(c) for c, _ in OBJECTS])
    shape_of = torch.tensor([SHAPES.index(s) for _, s in OBJECTS])
    rgb = torch.zeros(n, 3, size, size)
    for k in range(m):
        present = objects[:, k] >= 0
        idx = objects[:, k].clamp_min(0)
        masks = shape_masks(shape_of[idx], centres[:, k], radii[:, k], size) & present[:, None, None]
        rgb = torch.where(masks[:, None], palette[colour_of[idx]][:, :, None, None], rgb)
    return rgb * 2.0 - 1.0


def _reach(radii: Tensor) -> Tensor:
    """Distance from a shape's centre to its farthest pixel (a square's corner: 0.85·√2·r < 1.25·r)."""
    return 1.25 * radii


def sample_scenes(n: int, seed: int, two_fraction: float = 0.6, gap: float = 2.0,
                  pairs: tuple[tuple[int, int], ...] = TRAIN_PAIRS) -> Scenes:
    """``n`` random scenes: with probability ``two_fraction`` two objects (one of ``pairs``, in
    random order), otherwise one object of OBJECTS; radii 3.5–6 px, anywhere inside the frame,
    two objects at least ``gap`` pixels apart (so they are separate 8-connected components)."""
    g = torch.Generator().manual_seed(seed)
    two = torch.rand(n, generator=g) < two_fraction
    drawn = torch.tensor(pairs)[torch.randint(len(pairs), (n,), generator=g)]
    swap = torch.rand(n, generator=g) < 0.5
    drawn = torch.where(swap[:, None], drawn.flip(1), drawn)
    single = torch.randint(len(OBJECTS), (n,), generator=g)
    objects = torch.where(two[:, None], drawn, torch.stack([single, torch.full_like(single, -1)], 1))
    radii = 3.5 + 2.5 * torch.rand(n, 2, generator=g)
    reach = _reach(radii)
    centres = reach[..., None] + 0.5 + (SIZE - 1 - 2 * reach[..., None]) * torch.rand(n, 2, 2, generator=g)
    # rejection: redraw the second object's position (then size) until it clears the first
    for attempt in range(1000):
        distance = (centres[:, 0] - centres[:, 1]).norm(dim=1)
        bad = two & (distance < reach.sum(1) + gap)
        if not bool(bad.any()):
            break
        k = int(bad.sum())
        if attempt % 50 == 49:  # a large first object can leave no room: shrink the second one
            radii[bad, 1] = 3.5 + 0.5 * torch.rand(k, generator=g)
            reach = _reach(radii)
        r = reach[bad, 1, None]
        centres[bad, 1] = r + 0.5 + (SIZE - 1 - 2 * r) * torch.rand(k, 2, generator=g)
    else:
        raise RuntimeError("could not place two non-overlapping objects")
    return Scenes(render_scenes(objects, centres, radii), objects)


def scene_captions(objects: Tensor, seed: int, both: float = BOTH_NAMED, drop: float = 0.1) -> list[str]:
    """One caption per scene of ``objects`` (N, 2) (as in :class:`Scenes`): a one-object scene
    names its object; a two-object scene names both (in drawing order) with probability ``both``,
    otherwise one of them at random; any caption is "" (for classifier-free guidance) with
    probability ``drop``."""
    g = torch.Generator().manual_seed(seed + 1)
    n = objects.shape[0]
    name_both = (torch.rand(n, generator=g) < both).tolist()
    which = torch.randint(2, (n,), generator=g).tolist()
    dropped = (torch.rand(n, generator=g) < drop).tolist()
    out = []
    for (a, b), nb, w, d in zip(objects.tolist(), name_both, which, dropped):
        if d:
            out.append("")
        elif b < 0:
            out.append(object_name(OBJECTS[a]))
        elif nb:
            out.append(pair_caption(OBJECTS[a], OBJECTS[b]))
        else:
            out.append(object_name(OBJECTS[(a, b)[w]]))
    return out


# ----------------------------------------------------------------------------------------------
# The checker: objects from pixels, and GenEval-style per-image scores.


@dataclass(frozen=True)
class SceneCheckerConfig:
    """Thresholds of :func:`read_objects` (brightness and colour in [0, 1] per channel, sizes in pixels).

    A render is a few palette-coloured shapes on black, so an image is read only when it looks like
    one: a dark background, a few separate blobs; each blob is an object whose colour is read when
    it is one palette colour and whose shape is read when a template fits it.
    """

    threshold: float = 0.35  # a pixel is foreground when its brightest channel exceeds this
    min_pixels: int = 6  # blobs smaller than this are specks, not objects
    max_fill: float = 0.5  # foreground over this fraction of the frame: no scene (two large renders: ≤ 22%)
    max_background: float = 0.175  # mean brightest channel off the blobs above this: no clean background
    max_objects: int = 4  # more blobs than this: noise, not a scene
    min_hue_share: float = 0.8  # fewer of a blob's pixels sharing one palette hue: mixed colours, no colour
    max_colour_distance: float = 0.2  # median pixel farther from that hue's entry: no colour (blur, blends)
    min_iou: float = 0.7  # best template overlap below this: no shape
    radii: tuple[float, float, float] = (3.0, 7.0, 0.5)  # template half-sizes: start, stop, step
    search: float = 2.0  # template centres within ± this many pixels of the blob's box centre
    centre_step: float = 0.5
    window: int = 20  # side of the local window templates are matched in (holds a radius-7 square)


@functools.lru_cache(maxsize=4)
def _local_templates(window: int, radii: tuple[float, float, float], search: float, step: float):
    """Every shape at every radius and sub-pixel offset from the window's centre: masks (window², K)
    and the shape index of each (K,)."""
    rs = torch.arange(radii[0], radii[1] + 1e-6, radii[2])
    ds = torch.arange(-search, search + 1e-6, step)
    r, dy, dx = torch.meshgrid(rs, ds, ds, indexing="ij")
    centres = window / 2 + torch.stack([dx.flatten(), dy.flatten()], dim=1)
    banks, kinds = [], []
    for k in range(len(SHAPES)):
        banks.append(shape_masks(torch.full((r.numel(),), k), centres, r.flatten(), window).flatten(1))
        kinds.append(torch.full((r.numel(),), k))
    return torch.cat(banks).float().T.contiguous(), torch.cat(kinds)


def _components(bright: Tensor) -> Tensor:
    """8-connected component labels (N, H, W): 0 for background, else a positive id per blob."""
    n, h, w = bright.shape
    allowed = bright.float()
    ids = torch.arange(1, h * w + 1, dtype=torch.float32).view(1, h, w)
    return _propagate(ids * allowed, allowed).long()


def _fill_holes(masks: Tensor) -> Tensor:
    """Masks (M, H, W) with their holes (background not connected to the border) filled."""
    _, h, w = masks.shape
    background = (~masks).float()
    border = torch.zeros(h, w)
    border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = 1
    return ~(_propagate(border[None] * background, background) > 0)


def _read_shapes(masks: Tensor, cfg: SceneCheckerConfig) -> tuple[Tensor, Tensor]:
    """Best template shape (M,) and its IoU (M,) for blobs ``masks`` (M, H, W), each matched in a
    window centred on its bounding box (pixels outside the window count against the IoU)."""
    bank, kinds = _local_templates(cfg.window, cfg.radii, cfg.search, cfg.centre_step)
    m, h, w = masks.shape
    if m == 0:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0)
    half = cfg.window // 2
    padded = torch.nn.functional.pad(masks.float(), (half, half, half, half))
    rows, cols = masks.any(2), masks.any(1)
    grid_h, grid_w = torch.arange(h), torch.arange(w)
    top = torch.where(rows, grid_h, h).min(1).values
    bottom = torch.where(rows, grid_h, -1).max(1).values + 1
    left = torch.where(cols, grid_w, w).min(1).values
    right = torch.where(cols, grid_w, -1).max(1).values + 1
    cy, cx = torch.round((top + bottom) / 2).long(), torch.round((left + right) / 2).long()
    windows = torch.stack([padded[i, y : y + cfg.window, x : x + cfg.window]
                           for i, (y, x) in enumerate(zip(cy.tolist(), cx.tolist()))]).flatten(1)
    inter = windows @ bank
    iou = inter / (masks.flatten(1).sum(1, keepdim=True) + bank.sum(0) - inter)
    best, index = iou.max(1)
    return kinds[index], best


SceneObjects = list[tuple[str | None, str | None]]


def read_objects(images: Tensor, cfg: SceneCheckerConfig = SceneCheckerConfig()) -> list[SceneObjects | None]:
    """The objects in each image, read from its pixels: ``images`` (N, 3, H, W) in [-1, 1].

    Returns, per image, a list of (colour, shape) per object (either may be None: a blob of mixed
    or off-palette colour, or one no template fits), or None for an image that is no scene: non-finite
    pixels, foreground over ``cfg.max_fill`` of the frame (noise, washed-out frames), a background
    that is not dark (mean brightest channel off the blobs above ``cfg.max_background``), or more
    than ``cfg.max_objects`` blobs. Objects are the 8-connected blobs of ``cfg.min_pixels`` or more
    pixels whose brightest channel exceeds ``cfg.threshold``. Colour: the palette hue most of the
    blob's pixels have (each pixel scaled to a brightest channel of 1), read when at least
    ``cfg.min_hue_share`` of them have it and their median distance to that entry is at most
    ``cfg.max_colour_distance`` (renders are flat: blurred, dim or blended blobs are not). Shape:
    the best template (any shape, radius and sub-pixel centre near the blob's box centre) by IoU
    with the blob, holes filled, read when that IoU reaches ``cfg.min_iou``.
    """
    x = (images.detach().float().cpu() + 1) / 2
    if x.shape[0] == 0:
        return []
    finite = torch.isfinite(x).flatten(1).all(1)
    x = torch.nan_to_num(x, nan=1.0).clamp(0, 1)
    palette = torch.tensor(list(COLOURS.values()))
    brightness = x.max(dim=1).values
    bright = brightness > cfg.threshold
    labels = _components(bright)
    hue = _nearest_hue(x.permute(0, 2, 3, 1), palette)
    names = list(COLOURS)
    readable, blob_masks, owner = [], [], []
    for i in range(x.shape[0]):
        ids, counts = torch.unique(labels[i], return_counts=True)
        blobs = ids[(ids > 0) & (counts >= cfg.min_pixels)]
        masks = labels[i][None] == blobs[:, None, None]  # (M, H, W)
        off = ~_dilate(masks.any(0, keepdim=True))[0]
        background = float((brightness[i] * off).sum() / off.sum().clamp_min(1))
        readable.append(bool(finite[i]) and float(bright[i].float().mean()) <= cfg.max_fill
                        and background <= cfg.max_background and len(blobs) <= cfg.max_objects)
        if readable[-1]:
            blob_masks.append(masks)
            owner += [i] * len(blobs)
    masks = torch.cat(blob_masks) if blob_masks else torch.zeros(0, *bright.shape[1:], dtype=torch.bool)
    kinds, iou = _read_shapes(_fill_holes(masks), cfg)
    out: list[SceneObjects | None] = [[] if ok else None for ok in readable]
    for i, mask, kind, fit in zip(owner, masks, kinds.tolist(), iou.tolist()):
        votes = torch.bincount(hue[i][mask], minlength=len(palette))
        share, dominant = (votes.max() / mask.sum()).item(), int(votes.argmax())
        distance = float((x[i][:, mask] - palette[dominant][:, None]).norm(dim=0).median())
        coloured = share >= cfg.min_hue_share and distance <= cfg.max_colour_distance
        out[i].append((names[dominant] if coloured else None, SHAPES[kind] if fit >= cfg.min_iou else None))
    return out


def _count(objects: SceneObjects, req: dict) -> int:
    """How many of ``objects`` match a GenEval requirement ``{"class": shape, "color": colour?}``."""
    return sum(s == req["class"] and ("color" not in req or c == req["color"]) for c, s in objects)


def geneval_correct(objects: SceneObjects | None, metadata: dict) -> bool:
    """Whether one image's objects satisfy a GenEval-style prompt's metadata: every ``include``
    requirement at least ``count`` times, every ``exclude`` one fewer than ``count`` times (GenEval's
    rule; our ``exclude`` may also name a ``color``). With ``"tag": "or"`` any one ``include``
    requirement suffices (GenEval has no OR task). An unreadable image (None) satisfies nothing."""
    if objects is None:
        return False
    found = [_count(objects, req) >= req.get("count", 1) for req in metadata.get("include", [])]
    hit = any(found) if metadata.get("tag") == "or" else all(found)
    return hit and all(_count(objects, req) < req.get("count", 1) for req in metadata.get("exclude", []))


def named_objects(prompts: list[str] | tuple[str, ...]) -> list[tuple[str | None, str]]:
    """The objects ``prompts`` name, in order, without repeats: each shape word with the colour word
    just before it (None where there is none). ``["a red circle and a blue square"]`` and
    ``["a red circle", "a blue square"]`` both name ``[("red", "circle"), ("blue", "square")]``."""
    named: list[tuple[str | None, str]] = []
    for prompt in prompts:
        words = prompt.lower().split()
        for i, word in enumerate(words):
            if word in SHAPES:
                obj = (words[i - 1] if i and words[i - 1] in COLOURS else None, word)
                if obj not in named:
                    named.append(obj)
    return named


def scene_presence(objects: SceneObjects | None, named: list[tuple[str | None, str]]) -> dict:
    """Which ``named`` objects one image's ``objects`` (from :func:`read_objects`) hold: per object
    (keyed "red circle") with its colour, and per shape (keyed "circle") in any colour, as GenEval
    scores colour attribution and two objects. An unreadable image (None) holds nothing."""
    key = lambda obj: " ".join(w for w in obj if w)  # noqa: E731
    present = {key(o): geneval_correct(objects, {"include": [{"class": o[1]} | ({"color": o[0]} if o[0] else {})]})
               for o in named}
    shapes = {o[1]: geneval_correct(objects, {"include": [{"class": o[1]}]}) for o in named}
    return {"present": present, "shape_present": shapes}


def scene_rates(records: list[dict]) -> dict:
    """Group rates of :func:`scene_presence` records (each with ``objects`` added, None where the
    image is no scene): ``all_rate`` (every named object with its colour: GenEval's colour
    attribution), ``all_shapes_rate`` (every named shape: GenEval's two objects for a pair),
    ``none_rate`` (no named object), the rate of each named object, and ``unreadable_rate``; the
    all/none rates are None when nothing is named."""
    n = len(records)
    names = list(records[0]["present"]) if n else []
    rates: dict = {"rates": {a: sum(r["present"][a] for r in records) / n for a in names},
                   "unreadable_rate": sum(r["objects"] is None for r in records) / n if n else None, "n": n}
    if not names:
        return {"all_rate": None, "all_shapes_rate": None, "none_rate": None} | rates
    return {"all_rate": sum(all(r["present"].values()) for r in records) / n,
            "all_shapes_rate": sum(all(r["shape_present"].values()) for r in records) / n,
            "none_rate": sum(not any(r["present"].values()) for r in records) / n} | rates
