"""The scenes data set keeps its held-out pairs and binding out of training, and the scene checker
reads the renders' objects from pixels while reading nothing from noise, blank, washed-out, blurred
or blended frames; the GenEval-style scores follow GenEval's include/exclude rule."""

from __future__ import annotations

import pytest
import torch

from superdiff.zoo.scenes import (
    BOTH_NAMED,
    HELD_OUT_BINDING,
    HELD_OUT_PAIRS,
    OBJECTS,
    SIZE,
    TRAINING_CYCLE,
    geneval_correct,
    read_objects,
    render_scenes,
    sample_scenes,
    scene_captions,
)
from superdiff.zoo.shapes import COLOURS


def _truth(objects: torch.Tensor) -> list[list[tuple[str, str]]]:
    return [sorted(OBJECTS[k] for k in row if k >= 0) for row in objects.tolist()]


def _read_sorted(images: torch.Tensor) -> list:
    return [None if objs is None else sorted(objs, key=str) for objs in read_objects(images)]


def _named(objs) -> list[tuple[str, str]]:
    """The objects read with both a colour and a shape."""
    return [] if objs is None else [o for o in objs if None not in o]


def test_held_out_pairs_never_co_occur_and_the_held_out_binding_never_appears():
    """Read from the pixels (not from the sampler's labels): 2000 training scenes."""
    scenes = sample_scenes(2000, seed=11)
    read = read_objects(scenes.images)
    held = {frozenset(pair) for pair in HELD_OUT_PAIRS}
    assert all(objs is not None for objs in read)
    assert not any(HELD_OUT_BINDING in objs for objs in read)
    assert not any(frozenset(objs) in held for objs in read if len(objs) == 2)
    assert sum(len(objs) == 2 for objs in read) > 1000  # two-object scenes are the majority
    # each object is seen with exactly its two neighbours on the training cycle
    partners: dict = {}
    for objs in read:
        if len(objs) == 2:
            partners.setdefault(objs[0], set()).add(objs[1])
            partners.setdefault(objs[1], set()).add(objs[0])
    n = len(TRAINING_CYCLE)
    assert partners == {o: {TRAINING_CYCLE[(i - 1) % n], TRAINING_CYCLE[(i + 1) % n]}
                        for i, o in enumerate(TRAINING_CYCLE)}
    # and the captions never name them either
    captions = scene_captions(scenes.objects, seed=3)
    assert not any(" ".join(HELD_OUT_BINDING) in c for c in captions)
    for (c1, s1), (c2, s2) in HELD_OUT_PAIRS:
        assert not any(f"{c1} {s1}" in c and f"{c2} {s2}" in c for c in captions)


def test_captions_are_incomplete_and_name_only_drawn_objects():
    scenes = sample_scenes(2000, seed=5)
    captions = scene_captions(scenes.objects, seed=5)
    two = [(c, t) for c, t in zip(captions, _truth(scenes.objects)) if len(t) == 2 and c]
    both = sum(" and " in c for c, _ in two) / len(two)
    assert abs(both - BOTH_NAMED) < 0.06  # most two-object scenes name only one of their objects (s.e. 0.013)
    for caption, truth in zip(captions, _truth(scenes.objects)):
        for part in caption.split(" and ") if caption else []:
            assert tuple(part.split(" ")[1:]) in truth, (caption, truth)
    assert 0.05 < captions.count("") / len(captions) < 0.15


def test_renders_are_read_exactly_even_with_model_like_noise():
    scenes = sample_scenes(300, seed=21)
    noisy = scenes.images + 0.08 * torch.randn(scenes.images.shape, generator=torch.Generator().manual_seed(1))
    for images in (scenes.images, noisy):
        read = _read_sorted(images)
        assert sum(r == t for r, t in zip(read, _truth(scenes.objects))) >= 0.99 * 300


def test_three_objects_are_all_read():
    """Scenes of three objects (more than training ever shows) read as their three objects."""
    n = 60
    g = torch.Generator().manual_seed(2)
    objects = torch.stack([torch.randperm(len(OBJECTS), generator=g)[:3] for _ in range(n)])
    centres = torch.tensor([[6.5, 7.0], [25.0, 8.0], [16.0, 24.0]]).expand(n, 3, 2)
    images = render_scenes(objects, centres, torch.full((n, 3), 4.5))
    assert _read_sorted(images) == [sorted(t, key=str) for t in _truth(objects)]


@pytest.mark.parametrize("kind", ["uniform", "gaussian", "saturated", "dim gaussian"])
def test_noise_shows_no_object(kind):
    g = torch.Generator().manual_seed(0)
    shape = (100, 3, SIZE, SIZE)
    images = {
        "uniform": lambda: torch.rand(shape, generator=g) * 2 - 1,
        "gaussian": lambda: torch.randn(shape, generator=g).clamp(-1, 1),
        "saturated": lambda: torch.randint(2, shape, generator=g).float() * 2 - 1,
        "dim gaussian": lambda: (0.3 * torch.randn(shape, generator=g)).clamp(-1, 1),
    }[kind]()
    assert all(_named(objs) == [] for objs in read_objects(images))


def test_blank_grey_and_single_colour_frames_show_no_object():
    greys = torch.linspace(-1, 1, 21)[:, None, None, None].expand(21, 3, SIZE, SIZE)
    palette = (torch.tensor(list(COLOURS.values())) * 2 - 1)[:, :, None, None].expand(4, 3, SIZE, SIZE)
    read = read_objects(torch.cat([greys, palette, torch.full((1, 3, SIZE, SIZE), float("nan"))]))
    assert read[0] == []  # black: a scene with nothing in it
    assert all(_named(objs) == [] for objs in read)
    assert all(objs is None for objs in read[8:])  # greys from 0.4 up, palette colours and NaN: no scene


def test_overlapping_objects_are_not_read_as_both():
    """Two objects of different colours painted over each other form one blob of mixed colour."""
    pairs = [(i, j) for i in range(len(OBJECTS)) for j in range(len(OBJECTS)) if OBJECTS[i][0] != OBJECTS[j][0]]
    objects = torch.tensor(pairs)
    n = len(pairs)
    centres = torch.tensor([[13.0, 16.0], [19.0, 16.0]]).expand(n, 2, 2)
    read = read_objects(render_scenes(objects, centres, torch.full((n, 2), 5.0)))
    assert not any(OBJECTS[i] in _named(r) and OBJECTS[j] in _named(r) for (i, j), r in zip(pairs, read))


def test_blurred_and_blended_scenes_show_no_named_object():
    scenes = sample_scenes(200, seed=9)
    kernel = torch.exp(-torch.arange(-4, 5.0) ** 2 / (2 * 2.0**2))
    kernel = (kernel[:, None] * kernel[None]) / kernel.sum() ** 2
    x = (scenes.images + 1) / 2
    blurred = torch.nn.functional.conv2d(x, kernel.expand(3, 1, 9, 9), padding=4, groups=3) * 2 - 1
    other = sample_scenes(200, seed=10)
    # two scenes at half brightness each (scenes sharing an object could stack it at full colour)
    disjoint = [not set(a) & set(b) - {-1} for a, b in zip(scenes.objects.tolist(), other.objects.tolist())]
    blended = ((scenes.images + other.images) / 2)[disjoint]
    assert all(_named(objs) == [] for objs in read_objects(blurred))
    assert all(_named(objs) == [] for objs in read_objects(blended))


def test_an_off_palette_colour_is_not_read_but_the_shape_is():
    scenes = sample_scenes(100, seed=8)
    painted = torch.where((scenes.images > -1).any(1, keepdim=True), torch.tensor([0.2, 0.9, 0.9])[:, None, None],
                          scenes.images)  # cyan
    for objs, truth in zip(read_objects(painted), _truth(scenes.objects)):
        assert sorted(objs, key=str) == sorted(((None, s) for _, s in truth), key=str)


def test_geneval_scores_follow_include_and_exclude():
    objs = [("red", "circle"), ("blue", "square")]
    two = {"tag": "two_object", "include": [{"class": "circle", "count": 1}, {"class": "square", "count": 1}]}
    attr = {"tag": "color_attr", "include": [{"class": "circle", "count": 1, "color": "blue"},
                                             {"class": "square", "count": 1, "color": "red"}]}
    neg = {"tag": "not", "include": [{"class": "circle", "count": 1, "color": "red"}],
           "exclude": [{"class": "square", "count": 1, "color": "blue"}]}
    either = {"tag": "or", "include": [{"class": "triangle", "count": 1, "color": "green"},
                                       {"class": "square", "count": 1, "color": "blue"}]}
    assert geneval_correct(objs, two) and not geneval_correct(objs, attr)
    assert not geneval_correct(objs, neg) and geneval_correct(objs[:1], neg)
    assert geneval_correct(objs, either) and not geneval_correct(objs[:1], either)
    assert not geneval_correct(None, two) and not geneval_correct([], either)
    square = {"class": "square", "count": 1}
    assert geneval_correct([(None, "square")], {"include": [square]})  # a shape without a colour still counts
    assert not geneval_correct([(None, "square")], {"include": [square | {"color": "blue"}]})
    assert not geneval_correct([("blue", "square")], {"include": [square | {"count": 2}]})


def test_scene_methods_compose_the_pair_and_the_scores_follow_the_tasks():
    from superdiff.zoo.scene_experiments import pair_metadata, scene_methods, scene_scores

    a, b = ("red", "circle"), ("yellow", "square")
    methods = scene_methods(4)
    assert methods["and: superdiff AND"].compose(a, b) == {"expression": '"a red circle" & "a yellow square"',
                                                           "particles": 1}
    assert methods["and: joint prompt"].compose(a, b) == {"prompts": ["a red circle and a yellow square"],
                                                          "mode": "average", "particles": 1}
    assert methods["and: product, corrected, K=4"].compose(a, b)["particles"] == 4
    read = [[("red", "circle"), ("yellow", "square")], [("blue", "circle"), ("green", "square")], None,
            [("red", "circle")]]
    assert scene_scores(read, pair_metadata(a, b, "and")) == {"two_objects": 0.5, "colour_attribution": 0.25}
    assert scene_scores(read, pair_metadata(a, b, "not")) == {"not": 0.25}
    assert scene_scores(read, pair_metadata(a, b, "or")) == {"or": 0.5, "both": 0.25}


def test_the_vae_loss_weights_the_objects_and_a_band_around_their_outlines():
    """``reconstruction_loss`` against a loop over pixels: an error on one background pixel next to a
    square counts in the plain mean and in the outline band (pixels within one step, 8-neighbours,
    of both an object pixel and a background pixel), an error far from it in the plain mean only."""
    from superdiff.zoo.train_scenes import reconstruction_loss

    index = torch.tensor([[OBJECTS.index(("red", "square")), -1]])
    image = render_scenes(index, torch.tensor([[[15.5, 15.5], [0.0, 0.0]]]), torch.tensor([[5.0, 0.0]]))
    fg = (image[0] > -1).any(0)
    rows, cols = fg.nonzero().T
    near = lambda y, x, want: any(  # noqa: E731
        0 <= y + dy < SIZE and 0 <= x + dx < SIZE and bool(fg[y + dy, x + dx]) == want
        for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    band = sum(near(y, x, True) and near(y, x, False) for y in range(SIZE) for x in range(SIZE))
    for (y, x), on_band in (((int(rows.min()) - 1, int(cols.min())), True), ((1, 1), False)):
        decoded = image.clone()
        decoded[0, :, y, x] += 0.5
        plain = 3 * 0.5 / (3 * SIZE * SIZE)
        expected = plain + (4.0 * 3 * 0.5 / (3 * band) if on_band else 0.0)
        torch.testing.assert_close(reconstruction_loss(decoded, image, 0.7, 4.0), torch.tensor(expected))
    decoded = image.clone()
    decoded[0, :, 15, 15] -= 0.5  # inside the square: the plain mean and the foreground mean
    torch.testing.assert_close(reconstruction_loss(decoded, image, 0.7, 4.0),
                               torch.tensor(1.5 / (3 * SIZE * SIZE) + 0.7 * 1.5 / (3 * int(fg.sum()))))
