"""The shapes attribute checker answers None where an image shows no clean shape or colour (noise,
blank, washed-out, off-palette, crowded or shapeless frames) while still reading the renders,
and the rates built on it (metrics, `superdiff eval`, the sweep's both rate) count None as absent."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from superdiff.metrics import attribute_rates, read_prompt_attributes
from superdiff.zoo.shapes import COLOURS, SHAPES, read_attributes, render_shapes, sample_shapes

N = 200


def _noise(kind: str, n: int = N, seed: int = 0) -> torch.Tensor:
    """(n, 3, 16, 16) noise images in [-1, 1] (Gaussian ones clamped as the pipelines clamp)."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, 3, 16, 16)
    if kind == "uniform":
        return torch.rand(shape, generator=g) * 2 - 1
    if kind == "gaussian":
        return torch.randn(shape, generator=g).clamp(-1, 1)
    if kind == "dim gaussian":  # a noisy frame around mid-grey
        return (0.3 * torch.randn(shape, generator=g)).clamp(-1, 1)
    if kind == "saturated":  # every channel at -1 or +1
        return torch.randint(2, shape, generator=g).float() * 2 - 1
    raise AssertionError(kind)


def _unread(images: torch.Tensor) -> bool:
    colours, shapes = read_attributes(images)
    return all(c is None for c in colours) and all(s is None for s in shapes)


def _truth(batch) -> list[tuple[str, str]]:
    return [(list(COLOURS)[c], SHAPES[s]) for c, s in zip(batch.colours.tolist(), batch.shapes.tolist())]


def _pil(x: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] → an RGB PIL image, as the pipelines save images."""
    return Image.fromarray(((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())


@pytest.mark.parametrize("std", [0.05, 0.1])
def test_renders_with_model_like_noise_are_still_read(std):
    batch = sample_shapes(600, seed=21, include_held_out=True)
    noisy = batch.images + std * torch.randn(batch.images.shape, generator=torch.Generator().manual_seed(1))
    colours, shapes = read_attributes(noisy)
    assert sum((c, s) == t for c, s, t in zip(colours, shapes, _truth(batch))) >= 0.99 * 600
    assert colours.count(None) + shapes.count(None) <= 6


@pytest.mark.parametrize("kind", ["uniform", "gaussian", "dim gaussian", "saturated"])
def test_noise_reads_as_nothing(kind):
    assert _unread(_noise(kind))


def test_blank_and_single_colour_frames_read_as_nothing():
    greys = torch.linspace(-1, 1, 21)[:, None, None, None].expand(21, 3, 16, 16)  # black, greys, white
    palette = (torch.tensor(list(COLOURS.values())) * 2 - 1)[:, :, None, None].expand(
        4, 3, 16, 16
    )  # a frame of red, ...
    assert _unread(greys) and _unread(palette) and _unread(torch.ones(1, 3, 16, 16))


def test_a_shape_without_a_clean_background_reads_as_nothing():
    batch = sample_shapes(100, seed=4, include_held_out=True)
    shape = (batch.images > -1).any(1, keepdim=True)
    on_white = torch.where(shape, batch.images, torch.ones_like(batch.images))
    on_noise = torch.where(shape, batch.images, _noise("uniform", 100))
    assert _unread(on_white) and _unread(on_noise)


def _two_shapes(touching: bool) -> torch.Tensor:
    """Every pair of different colours × every pair of shapes, half-size shapes side by side;
    touching: the right one painted over the left one's edge, else 2 px apart."""
    pairs = [(a, b, s, t) for a in range(4) for b in range(4) if a != b for s in range(3) for t in range(3)]
    a, b, s, t = (torch.tensor(v) for v in zip(*pairs))
    n, r = len(pairs), 4.0 if touching else 3.0
    left = render_shapes(a, s, torch.tensor([[4.5, 8.0]]).expand(n, 2), torch.full((n,), r))
    right = render_shapes(b, t, torch.tensor([[11.5, 8.0]]).expand(n, 2), torch.full((n,), r))
    return torch.where((right > -1).any(1, keepdim=True), right, left)


@pytest.mark.parametrize("touching", [False, True])
def test_two_shapes_at_once_read_as_nothing(touching):
    assert _unread(_two_shapes(touching))


def test_an_off_palette_colour_is_not_read_but_its_shape_is():
    batch = sample_shapes(150, seed=8, include_held_out=True)
    shape = (batch.images > -1).any(1, keepdim=True)
    for rgb in [(1.0, 1.0, 1.0), (0.6, 0.6, 0.6), (0.1, 0.9, 0.9), (0.7, 0.1, 0.8)]:  # white, grey, cyan, purple
        painted = torch.where(shape, torch.tensor(rgb)[:, None, None] * 2 - 1, batch.images)
        colours, shapes = read_attributes(painted)
        assert colours == [None] * 150, rgb
        assert sum(s == t for s, (_, t) in zip(shapes, _truth(batch))) >= 0.99 * 150, rgb


def test_a_blob_no_template_fits_has_a_colour_but_no_shape():
    masks = torch.zeros(4, 16, 16, dtype=torch.bool)
    masks[0, 7:9, 2:14] = masks[0, 2:14, 7:9] = True  # a plus sign
    masks[1, 8, 2:14] = True  # a line
    masks[2, 2:14, 3:6] = masks[2, 11:14, 3:13] = True  # an L
    for i in range(12):  # an X
        masks[3, 2 + i, 2 + i] = masks[3, 2 + i, 13 - i] = True
    images = (torch.tensor(COLOURS["green"])[None, :, None, None] * masks[:, None]) * 2 - 1
    assert read_attributes(images) == (["green"] * 4, [None] * 4)


def test_rates_count_unreadable_images_as_showing_nothing():
    batch = sample_shapes(400, seed=5, include_held_out=True)
    red_circles = batch.images[[t == ("red", "circle") for t in _truth(batch)]][:4]
    images = torch.cat([red_circles, _noise("uniform", 4), _noise("gaussian", 4)])
    read = read_prompt_attributes(images, ["red", "circle"])
    assert [r["present"] for r in read[4:]] == [{"red": False, "circle": False}] * 8
    assert all(r["colour"] is None and r["shape"] is None for r in read[4:])
    rates = attribute_rates([r["present"] for r in read])
    assert (rates["both_rate"], rates["neither_rate"], rates["rates"]) == (
        4 / 12,
        8 / 12,
        {"red": 4 / 12, "circle": 4 / 12},
    )
    noise_only = attribute_rates([r["present"] for r in read_prompt_attributes(_noise("uniform"), ["red", "circle"])])
    assert (noise_only["both_rate"], noise_only["neither_rate"]) == (0.0, 1.0)


def test_rates_refuse_words_the_checker_cannot_read_and_name_nothing_for_no_words():
    with pytest.raises(ValueError, match="purple"):
        read_prompt_attributes(_noise("uniform", 2), ["red", "purple"])
    assert attribute_rates([{}, {}]) == {"both_rate": None, "neither_rate": None, "rates": {}, "n": 2}


def test_sweep_and_eval_both_rates_are_zero_for_pure_noise(tmp_path):
    from superdiff_cli.main import cli
    from superdiff_cli.sweep import shapes_both_rate

    pil = [_pil(x) for x in _noise("uniform", 8)] + [_pil(x) for x in _noise("gaussian", 8, seed=1)]
    assert shapes_both_rate(pil, ("red", "circle")) == 0.0
    for i, im in enumerate(pil):
        im.save(tmp_path / f"image_{i:03d}.png")
        (tmp_path / f"image_{i:03d}.json").write_text(json.dumps(
            {"index": i, "seed": 0, "model": "embedded-shapes", "prompts": ["red", "circle"], "mode": "and"}))
    r = CliRunner().invoke(cli, ["eval", str(tmp_path), "--quiet"])
    assert r.exit_code == 0, r.output
    out = json.loads((tmp_path / "eval.json").read_text())
    assert all(im["attributes"]["colour"] is None and im["attributes"]["shape"] is None for im in out["images"])
    (group,) = out["groups"]
    assert group["n"] == 16 and group["attributes"]["both_rate"] == 0.0 and group["attributes"]["neither_rate"] == 1.0
    assert group["attributes"]["rates"] == {"red": 0.0, "circle": 0.0}


def test_a_shape_on_a_dim_noisy_background_reads_as_nothing():
    """Background noise kept below the foreground threshold (so no pixel of it is bright) still
    leaves no clean background."""
    batch = sample_shapes(100, seed=6, include_held_out=True)
    shape = (batch.images > -1).any(1, keepdim=True)
    dim = torch.rand(batch.images.shape, generator=torch.Generator().manual_seed(2)) * 0.3  # brightness in [0, 0.3)
    assert _unread(torch.where(shape, batch.images, dim * 2 - 1))


def test_a_shape_speckled_with_a_second_colour_has_no_colour_but_its_shape():
    """A third of the shape's pixels in the next palette colour, as specks of two pixels one pixel
    apart (each too small to be a second object)."""
    batch = sample_shapes(150, seed=12, include_held_out=True)
    palette = torch.tensor(list(COLOURS.values())) * 2 - 1
    other = palette[(batch.colours + 1) % len(COLOURS)][:, :, None, None]
    grid = torch.zeros(16, 16, dtype=torch.bool)
    grid[::2] = torch.arange(16) % 3 < 2  # every other row: two on, one off
    speckled = torch.where((batch.images > -1).any(1, keepdim=True) & grid, other, batch.images)
    colours, shapes = read_attributes(speckled)
    assert colours == [None] * 150
    assert sum(s == t for s, (_, t) in zip(shapes, _truth(batch))) >= 0.99 * 150


def test_a_small_shape_painted_inside_a_large_one_reads_as_nothing():
    """Two objects though one blob: a half-size shape of another colour over the large one's edge
    (most of the blob is still the large shape's colour, and the blob still has its outline)."""
    pairs = [(a, b, s, t) for a in range(4) for b in range(4) if a != b for s in range(3) for t in range(3)]
    a, b, s, t = (torch.tensor(v) for v in zip(*pairs))
    n = len(pairs)
    large = render_shapes(a, s, torch.tensor([[8.0, 8.0]]).expand(n, 2), torch.full((n,), 6.0))
    small = render_shapes(b, t, torch.tensor([[12.0, 8.0]]).expand(n, 2), torch.full((n,), 2.5))
    assert _unread(torch.where((small > -1).any(1, keepdim=True), small, large))
