"""`superdiff eval`: CLIP score against the model's own embeddings, attribute and digit metrics on
images of known content, real generate / sweep folders, and bad input (exit 2)."""

import json
import statistics

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from superdiff_cli.evaluate import find_generated
from superdiff_cli.main import cli

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIPModel (32×32 images, 8×8 patches), its tokenizer and image processor, saved locally."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from superdiff.testing import write_clip_tokenizer

    path = tmp_path_factory.mktemp("clip")
    write_clip_tokenizer(path, model_max_length=16)
    tok = CLIPTokenizer.from_pretrained(path)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=16, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    vision = dict(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def to_pil(x: torch.Tensor) -> Image.Image:
    """(C, H, W) in [-1, 1] → PIL, as the pipelines save images."""
    arr = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(arr[0].numpy(), "L") if arr.shape[0] == 1 else Image.fromarray(arr.permute(1, 2, 0).numpy())


def write_image(folder, index, image, **meta):
    """An image and its sidecar, named as `superdiff generate` names them."""
    folder.mkdir(parents=True, exist_ok=True)
    image.save(folder / f"image_{index:03d}.png")
    (folder / f"image_{index:03d}.json").write_text(json.dumps({"index": index, "seed": 0, **meta}))


def prompt_folder(path, count=4):
    """Images of a non-embedded model composing PROMPTS (solid colours of several sizes, noise), plus a
    grid and a trace plot (no sidecars). On the tiny CLIP they score both above and below 0."""
    rng = np.random.default_rng(0)
    images = [
        Image.new("RGB", (24, 24), (255, 0, 0)),
        Image.new("RGB", (32, 32), (0, 0, 255)),
        Image.new("RGB", (24, 24), (0, 255, 0)),
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)),
    ]
    for i, image in enumerate(images[:count]):
        write_image(path, i, image, model="someone/sd-model", prompts=PROMPTS, mode="and")
    Image.new("RGB", (64, 32)).save(path / "grid.png")
    Image.new("RGB", (64, 32)).save(path / "traces.png")
    return path


def report(path):
    return json.loads(path.read_text())


def test_clip_score_is_100_cosine_of_the_model_s_own_embeddings(clip_dir, tmp_path):
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    folder = prompt_folder(tmp_path / "out")
    r = invoke("eval", folder, "--clip", clip_dir, "--batch-size", 2)
    assert r.exit_code == 0, r.output
    out = report(folder / "eval.json")
    assert [im["file"] for im in out["images"]] == [f"image_{i:03d}.png" for i in range(4)]  # no grid, no traces
    # independently: CLIPModel's forward gives normalised embeddings; score = max(100 cos, 0)
    model = CLIPModel.from_pretrained(clip_dir).eval()
    tok, proc = CLIPTokenizer.from_pretrained(clip_dir), CLIPImageProcessor.from_pretrained(clip_dir)
    images = [Image.open(folder / im["file"]).convert("RGB") for im in out["images"]]
    with torch.no_grad():
        fwd = model(
            **tok(PROMPTS, padding=True, return_tensors="pt"),
            pixel_values=proc(images=images, return_tensors="pt")["pixel_values"],
        )
    raw = 100 * fwd.image_embeds @ fwd.text_embeds.T
    assert (raw > 1).any() and (raw < -1).any()  # both sides of the clamp are checked
    for im, expected in zip(out["images"], raw.clamp_min(0).tolist()):
        assert im["clip"]["scores"] == pytest.approx(expected, abs=1e-3)
        assert im["clip"]["min"] == pytest.approx(min(expected), abs=1e-3)
        assert im["clip"]["mean"] == pytest.approx(sum(expected) / 2, abs=1e-3)
        assert im["clip"]["min"] <= im["clip"]["mean"] and "attributes" not in im
    (group,) = out["groups"]
    mins, means = [im["clip"]["min"] for im in out["images"]], [im["clip"]["mean"] for im in out["images"]]
    assert group["n"] == group["clip_n"] == 4 and group["prompts"] == PROMPTS and group["mode"] == "and"
    assert group["clip_min"]["mean"] == pytest.approx(statistics.mean(mins))
    assert group["clip_min"]["std"] == pytest.approx(statistics.stdev(mins))
    assert group["clip_mean"]["mean"] == pytest.approx(statistics.mean(means))
    assert group["clip_mean"]["std"] == pytest.approx(statistics.stdev(means))
    assert f"{group['clip_min']['mean']:.2f}" in r.output and "wrote" in r.output
    # one image per forward pass gives the same scores; --json writes elsewhere; eval.json is not an image
    elsewhere = tmp_path / "other" / "scores.json"
    (tmp_path / "other").mkdir()
    r1 = invoke("eval", folder, "--clip", clip_dir, "--batch-size", 1, "--json", elsewhere, "--quiet")
    assert r1.exit_code == 0, r1.output
    single = report(elsewhere)
    for a, b in zip(out["images"], single["images"]):
        assert a["clip"]["scores"] == pytest.approx(b["clip"]["scores"], abs=1e-4)
    assert len(single["images"]) == 4 and "wrote" not in r1.output and "CLIP score:" not in r1.output


def test_pickled_clip_weights_need_allow_pickle(clip_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file

    pickled = tmp_path / "clip-bin"
    shutil.copytree(clip_dir, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    folder = prompt_folder(tmp_path / "out", count=1)
    refused = invoke("eval", folder, "--clip", pickled)
    assert refused.exit_code == 2 and "--allow-pickle" in refused.output and not (folder / "eval.json").exists()
    allowed = invoke("eval", folder, "--clip", pickled, "--allow-pickle", "--quiet")
    assert allowed.exit_code == 0, allowed.output
    assert report(folder / "eval.json")["images"][0]["clip"]["scores"][0] > 0  # the solid red image


def shapes_of_known_content():
    """Clean renders picked by label: 3 red circles, a red square, a blue circle, a green triangle;
    and a blue triangle, a blue circle, a yellow square."""
    from superdiff.zoo.shapes import COLOURS, SHAPES, sample_shapes

    batch = sample_shapes(400, seed=5, include_held_out=True)
    labels = [(list(COLOURS)[c], SHAPES[s]) for c, s in zip(batch.colours.tolist(), batch.shapes.tolist())]

    def pick(wanted):
        used, out = set(), []
        for w in wanted:
            i = next(i for i, lab in enumerate(labels) if lab == w and i not in used)
            used.add(i)
            out.append((to_pil(batch.images[i]), w))
        return out

    first = pick([("red", "circle")] * 3 + [("red", "square"), ("blue", "circle"), ("green", "triangle")])
    second = pick([("blue", "triangle"), ("blue", "circle"), ("yellow", "square")])
    return first, second


def test_attribute_rates_on_a_sweep_folder_of_known_shapes(tmp_path):
    first, second = shapes_of_known_content()
    root = tmp_path / "sweep"
    for i, (im, _) in enumerate(first):
        write_image(
            root / "items" / "0001-and-s0-aaaa", i, im, model="embedded-shapes", prompts=["red", "circle"], mode="and"
        )
    for i, (im, _) in enumerate(second):
        write_image(
            root / "items" / "0002-average-s0-bbbb",
            i,
            im,
            model="embedded-shapes",
            prompts=["blue triangle"],
            mode="average",
        )
    # an unfinished item (hidden temporary folder) is not evaluated
    write_image(
        root / "items" / ".0003-and-s0-cccc.tmp",
        0,
        first[0][0],
        model="embedded-shapes",
        prompts=["red", "circle"],
        mode="and",
    )
    (root / "manifest.jsonl").write_text("")
    r = invoke("eval", root, "--quiet")
    assert r.exit_code == 0, r.output
    out = report(root / "eval.json")
    assert len(out["images"]) == 9 and all(im["file"].startswith("items/000") for im in out["images"])
    for im, (_, (colour, shape)) in zip(out["images"], first + second):
        assert (im["attributes"]["colour"], im["attributes"]["shape"]) == (colour, shape)
        assert "clip" not in im
    a, b = out["groups"]
    assert (a["prompts"], a["n"], b["prompts"], b["n"]) == (["red", "circle"], 6, ["blue triangle"], 3)
    assert a["attributes"]["both_rate"] == 3 / 6 and a["attributes"]["neither_rate"] == 1 / 6
    assert a["attributes"]["rates"] == {"red": 4 / 6, "circle": 4 / 6}
    assert b["attributes"]["named"] == ["blue", "triangle"]
    assert b["attributes"]["both_rate"] == 1 / 3 and b["attributes"]["neither_rate"] == 1 / 3
    assert b["attributes"]["rates"] == {"blue": 2 / 3, "triangle": 1 / 3}
    # --quiet: the table only
    assert r.output.startswith("Attribute checker") and "0.500" in r.output and "wrote" not in r.output


def test_scene_rates_on_a_folder_of_known_scenes(tmp_path):
    """embedded-scenes images drawn with known objects (and one of noise): eval reads each image's
    objects and gives GenEval's colour attribution (every named object with its colour) and two
    objects (every named shape) as the counts over the drawn contents."""
    from superdiff.zoo.scenes import OBJECTS, render_scenes

    drawn = [[("red", "circle"), ("yellow", "square")], [("red", "circle"), ("green", "triangle")],
             [("yellow", "circle"), ("red", "square")], [("yellow", "square")], [("green", "triangle")]]
    index = torch.tensor([[OBJECTS.index(o) for o in objs] + [-1] * (2 - len(objs)) for objs in drawn])
    centres = torch.tensor([[9.0, 9.0], [22.0, 21.0]]).expand(len(drawn), 2, 2)
    images = render_scenes(index, centres, torch.full((len(drawn), 2), 5.0))
    folder = tmp_path / "gen"
    meta = dict(model="embedded-scenes", prompts=["a red circle", "a yellow square"], mode="and")
    for i, image in enumerate(images):
        write_image(folder, i, to_pil(image), **meta)
    noise = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    write_image(folder, len(drawn), to_pil(noise), **meta)
    r = invoke("eval", folder, "--quiet")
    assert r.exit_code == 0, r.output
    out = report(folder / "eval.json")
    read = [None if im["scene"]["objects"] is None else sorted(map(tuple, im["scene"]["objects"]))
            for im in out["images"]]
    assert read == [sorted(objs) for objs in drawn] + [None]
    (group,) = out["groups"]
    assert group["n"] == 6 and group["scenes"]["named"] == ["red circle", "yellow square"]
    assert group["scenes"]["all_rate"] == 1 / 6  # only the first image holds both, each with its colour
    assert group["scenes"]["all_shapes_rate"] == 2 / 6  # a circle and a square, whatever their colours
    assert group["scenes"]["none_rate"] == 3 / 6 and group["scenes"]["unreadable_rate"] == 1 / 6
    assert group["scenes"]["rates"] == {"red circle": 2 / 6, "yellow square": 2 / 6}
    assert r.output.startswith("Scene checker") and "0.167" in r.output


def test_digit_metrics_match_the_classifier_on_real_digits(tmp_path):
    from superdiff.metrics import pil_to_pixels
    from superdiff.zoo.digits import load_digits_split
    from superdiff.zoo.experiments import class_entropy
    from superdiff.zoo.registry import load_digit_classifier

    split = load_digits_split()
    idx = [int(torch.nonzero(split.test_labels == d)[k]) for d in range(10) for k in range(2)]
    for i, j in enumerate(idx):
        write_image(tmp_path, i, to_pil(split.test_images[j]), model="embedded-digits", prompts=["a", "b"], mode="or")
    r = invoke("eval", tmp_path)
    assert r.exit_code == 0, r.output
    (group,) = report(tmp_path / "eval.json")["groups"]
    saved = pil_to_pixels([Image.open(tmp_path / f"image_{i:03d}.png") for i in range(len(idx))])
    assert saved.shape == (20, 1, 8, 8)
    with torch.no_grad():
        probs = torch.softmax(load_digit_classifier()(saved), -1)
    fractions = (torch.bincount(probs.argmax(-1), minlength=10) / 20).tolist()
    assert group["digits"]["class_fractions"] == pytest.approx(fractions)
    assert group["digits"]["confidence"] == pytest.approx(float(probs.max(-1).values.mean()), abs=1e-6)
    assert group["digits"]["class_entropy"] == pytest.approx(class_entropy(fractions))
    assert sum((probs.argmax(-1) == split.test_labels[idx]).tolist()) >= 18  # real digits: read right
    assert "Digit classifier" in r.output


def test_eval_of_a_real_generate_folder(clip_dir, tmp_path):
    from superdiff.metrics import pil_to_pixels
    from superdiff.zoo.shapes import read_attributes

    out = tmp_path / "out"
    g = invoke("generate", "--model", "embedded-shapes", "--and", "blue", "--and", "triangle", "--steps", 4,
               "--num-images", 3, "--out", out, "--plot", "--quiet")
    assert g.exit_code == 0, g.output
    r = invoke("eval", out, "--clip", clip_dir)
    assert r.exit_code == 0, r.output
    res = report(out / "eval.json")
    assert [im["file"] for im in res["images"]] == [f"image_{i:03d}.png" for i in range(3)]
    colours, shapes = read_attributes(pil_to_pixels([Image.open(out / im["file"]) for im in res["images"]]))
    for im, c, s in zip(res["images"], colours, shapes):
        assert im["prompts"] == ["blue", "triangle"] and im["mode"] == "and" and im["model"] == "embedded-shapes"
        assert im["attributes"] == {
            "colour": c,
            "shape": s,
            "present": {"blue": c == "blue", "triangle": s == "triangle"},
        }
        assert len(im["clip"]["scores"]) == 2 and im["clip"]["min"] <= im["clip"]["mean"]
    (group,) = res["groups"]
    both = sum(c == "blue" and s == "triangle" for c, s in zip(colours, shapes)) / 3
    assert group["n"] == 3 and group["attributes"]["both_rate"] == both
    assert "CLIP score" in r.output and "Attribute checker" in r.output
    # without its sidecar an image is still found from the settings in its PNG text
    (out / "image_002.json").unlink()
    again = invoke("eval", out, "--quiet")
    assert again.exit_code == 0, again.output
    assert [im["attributes"] for im in report(out / "eval.json")["images"]] == [
        im["attributes"] for im in res["images"]
    ]


def test_eval_agrees_with_the_sweep_s_own_both_rate(tmp_path):
    spec = tmp_path / "spec.jsonl"
    spec.write_text(json.dumps({"prompts": ["red", "circle"], "modes": ["and", "average"]}) + "\n")
    out = tmp_path / "sweep"
    s = invoke("sweep", spec, "--out", out, "--model", "embedded-shapes", "--steps", 2, "--num-images", 2, "--quiet")
    assert s.exit_code == 0, s.output
    r = invoke("eval", out, "--quiet")
    assert r.exit_code == 0, r.output
    groups = {g["mode"]: g for g in report(out / "eval.json")["groups"]}
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert {m["settings"]["mode"] for m in manifest} == set(groups) == {"and", "average"}
    for m in manifest:
        group = groups[m["settings"]["mode"]]
        assert group["n"] == 2 and group["attributes"]["both_rate"] == m["metrics"]["both_rate"]


def test_expressions_sweep_and_eval_as_their_own_groups(tmp_path):
    """Two expressions over the same prompts are two groups; a conjunction gets the both-rate the
    sweep computed, a NOT none (its target is no "every named attribute")."""
    product, negation = '"red" * "circle"', '"red" * !"circle"'
    spec = tmp_path / "spec.jsonl"
    spec.write_text(json.dumps({"expression": product, "particles": 2}) + "\n" + json.dumps({"expression": negation})
                    + "\n" + json.dumps({"prompts": ["red", "circle"], "modes": ["and"]}) + "\n")
    out = tmp_path / "sweep"
    s = invoke("sweep", spec, "--out", out, "--model", "embedded-shapes", "--steps", 2, "--num-images", 2, "--quiet")
    assert s.exit_code == 0, s.output
    manifest = {m["settings"]["expression"] or m["settings"]["mode"]: m
                for m in (json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines())}
    assert set(manifest) == {'product("red", "circle")', 'product("red", not("circle", ""))', "and"}
    assert manifest['product("red", "circle")']["settings"]["particles"] == 2
    corrected = json.loads((out / manifest['product("red", "circle")']["files"][1]).read_text())
    assert corrected["particles"] == 2 and len(corrected["ess_trace"]) >= 1  # the weighted particles ran
    assert "both_rate" not in manifest['product("red", not("circle", ""))']["metrics"]
    header = (out / "metrics.csv").read_text().splitlines()[0]
    assert header.startswith("item_id,prompts,mode,expression,seed")
    r = invoke("eval", out, "--quiet")
    assert r.exit_code == 0, r.output
    groups = {g["mode"]: g for g in report(out / "eval.json")["groups"]}
    assert set(groups) == set(manifest)
    for name, m in manifest.items():
        assert groups[name]["n"] == 2
        assert groups[name]["attributes"]["both_rate"] == m["metrics"].get("both_rate")
    assert groups['product("red", not("circle", ""))']["attributes"]["rates"]  # per-attribute rates stay


def test_without_clip_prompt_models_are_skipped_with_a_note(tmp_path):
    first, _ = shapes_of_known_content()
    folder = prompt_folder(tmp_path / "mixed", count=1)
    write_image(folder, 1, first[0][0], model="embedded-shapes", prompts=["red", "circle"], mode="and")
    r = invoke("eval", folder)
    assert r.exit_code == 0, r.output
    assert "note: CLIP score skipped for 1 image(s) of someone/sd-model" in r.output and "--clip" in r.output
    out = report(folder / "eval.json")
    assert [sorted(k for k in im if k in ("clip", "attributes")) for im in out["images"]] == [[], ["attributes"]]
    assert out["notes"] and [g["n"] for g in out["groups"]] == [1, 1]


@pytest.mark.parametrize(
    "make, extra, needle",
    [
        (lambda p: p / "missing", [], "does not exist"),
        (lambda p: (p / "file.png").write_bytes(b"x") and p / "file.png", [], "not a folder"),
        (lambda p: p, [], "no generated images"),
        (lambda p: prompt_folder(p, count=0), [], "no generated images"),  # grid and traces only
        (lambda p: prompt_folder(p, count=1), [], "--clip"),  # nothing to score without CLIP
        (lambda p: prompt_folder(p, count=1), ["--clip", "./no-such-clip"], "no such folder"),
        (lambda p: prompt_folder(p, count=1), ["--clip", "someone/not-a-cached-clip"], "local CLIP folder"),
        (lambda p: prompt_folder(p, count=1), ["--clip", "x", "--batch-size", "0"], "--batch-size"),
        (
            lambda p: prompt_folder(p, count=1) and (p / "image_000.json").write_text("{oops") and p,
            [],
            "not valid JSON",
        ),
    ],
)
def test_bad_input_exits_2(tmp_path, monkeypatch, make, extra, needle):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "d"
    folder.mkdir()
    target = make(folder)
    r = invoke("eval", target, *extra)
    assert r.exit_code == 2, r.output
    assert needle in r.output and "Traceback" not in r.output


def test_help_has_an_example():
    r = invoke("eval", "--help")
    assert r.exit_code == 0 and "superdiff eval" in r.output and "--clip" in r.output


def with_zeroed_pixel_data(png: bytes) -> bytes:
    """``png`` with its compressed pixel data zeroed and the checksums recomputed: every chunk
    verifies, only decoding the pixels fails."""
    import struct
    import zlib

    out, i = bytearray(png[:8]), 8
    while i < len(png):
        n, kind = struct.unpack(">I4s", png[i:i + 8])
        data = png[i + 8:i + 8 + n]
        if kind == b"IDAT":
            data = data[:2] + bytes(n - 2)
        out += struct.pack(">I4s", n, kind) + data + struct.pack(">I", zlib.crc32(kind + data))
        i += 12 + n
    return bytes(out)


@pytest.mark.parametrize("damage, needle", [
    ("text", "not a readable image"),
    ("truncated", "not a readable image"),
    ("pixels", "not a readable image"),  # found while scoring, not by the up-front check
    ("bomb", "a decompression bomb?"),  # over 2x PIL's limit: PIL raises DecompressionBombError
    ("big", "a decompression bomb?"),  # over the limit only: PIL warns, eval refuses
])
def test_an_unreadable_image_is_named_before_any_scoring(tmp_path, monkeypatch, damage, needle):
    import superdiff_cli.evaluate as evaluate_module

    def no_clip(*args, **kwargs):
        raise AssertionError("CLIP was loaded before the images were checked")

    monkeypatch.setattr(evaluate_module, "load_clip", no_clip)
    folder = prompt_folder(tmp_path / "out", count=2)  # the other images have at most 64 x 32 pixels
    bad = folder / "image_001.png"
    if damage == "text":
        bad.write_text("not an image")
    elif damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:60])
    elif damage == "pixels":  # an embedded-shapes image, read by the attribute checker without --clip
        red = Image.new("RGB", (32, 32), (255, 0, 0))
        write_image(folder, 1, red, model="embedded-shapes", prompts=["red", "circle"], mode="and")
        bad.write_bytes(with_zeroed_pixel_data(bad.read_bytes()))
    else:
        Image.new("RGB", (100, 100), (0, 0, 255)).save(bad)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000 if damage == "bomb" else 6000)
    r = invoke("eval", folder, *([] if damage == "pixels" else ["--clip", tmp_path]))
    assert r.exit_code == 2, r.output
    assert f"{bad}: " in r.output and needle in r.output and "Traceback" not in r.output
    assert not (folder / "eval.json").exists()


SHAPES = dict(model="embedded-shapes", prompts=["red", "circle"], mode="and")


@pytest.mark.parametrize("sidecar, reason", [
    ([SHAPES], "it holds a list, where a generation's sidecar holds an object"),
    (SHAPES | {"prompts": None}, "its prompts are null, not a list of strings"),
    (SHAPES | {"prompts": ["red", 3]}, "its prompts are a list holding a non-string, not a list of strings"),
    ({"prompts": ["red", "circle"], "seed": 0}, "it has no model and no mode"),
    (SHAPES | {"model": None}, "its model is null, not a string"),
    (SHAPES | {"seed": "0"}, "its seed is a string, not a whole number"),
    (SHAPES | {"mode": "expression"}, "its mode is 'expression' but it has no expression"),
    (SHAPES | {"mode": "expression", "expression": ["red"]}, "its expression is a list, not a string"),
    (SHAPES | {"mode": "expression", "expression": 'product("red", "circle"'},
     "its expression 'product(\"red\", \"circle\"' does not parse (expected ',' or ')' to close product"),
])
def test_a_sidecar_that_describes_no_generation_is_named_with_the_reason(tmp_path, monkeypatch, sidecar, reason):
    """A sidecar beside a PNG claims the image; one eval cannot read is refused (exit 2) with its file
    and why, before any scoring, not dropped from the groups (nor reported without its file)."""
    import superdiff_cli.evaluate as evaluate_module

    def no_scoring(*args, **kwargs):
        raise AssertionError("images were scored before every sidecar was read")

    monkeypatch.setattr(evaluate_module, "score_shapes", no_scoring)
    folder = tmp_path / "out"
    write_image(folder, 0, Image.new("RGB", (32, 32), (255, 0, 0)), **SHAPES)  # a good image beside the bad one
    write_image(folder, 1, Image.new("RGB", (32, 32), (0, 0, 255)), **SHAPES)
    (folder / "image_001.json").write_text(json.dumps(sidecar))
    r = invoke("eval", folder)
    assert r.exit_code == 2, r.output
    message = " ".join(r.output.split())
    assert f"{folder / 'image_001.json'}: {reason}" in message, r.output
    assert "remove image_001.png and its sidecar" in message and "Traceback" not in r.output
    assert not (folder / "eval.json").exists()


def test_every_bad_sidecar_of_a_sweep_folder_is_named_at_once(tmp_path, monkeypatch):
    import superdiff_cli.evaluate as evaluate_module

    monkeypatch.setattr(evaluate_module, "MAX_LISTED", 2)
    for item, sidecar in [("a", [SHAPES]), ("b", SHAPES), ("c", SHAPES | {"prompts": None}), ("d", 3)]:
        write_image(tmp_path / "sweep" / "items" / item, 0, Image.new("RGB", (32, 32)), **SHAPES)
        (tmp_path / "sweep" / "items" / item / "image_000.json").write_text(json.dumps(sidecar))
    r = invoke("eval", tmp_path / "sweep")
    assert r.exit_code == 2, r.output
    lines = r.output.splitlines()
    assert "3 images in" in r.output and "have a record that describes no generation" in r.output
    items = tmp_path / "sweep" / "items"
    assert f"  {items / 'a' / 'image_000.json'}: it holds a list" in "\n".join(lines)
    assert f"  {items / 'c' / 'image_000.json'}: its prompts are null" in "\n".join(lines)
    assert "... and 1 more" in r.output and "items/d" not in r.output and "items/b" not in r.output


def test_superdiff_png_text_that_describes_no_generation_is_named(tmp_path):
    """Without a sidecar, a PNG's superdiff text is its record: read by the same rule, naming the PNG;
    a PNG with neither (a grid) is still no generation."""
    from PIL import PngImagePlugin

    folder = tmp_path / "out"
    write_image(folder, 0, Image.new("RGB", (32, 32), (255, 0, 0)), **SHAPES)
    Image.new("RGB", (64, 32)).save(folder / "grid.png")
    assert [g.file for g in find_generated(folder)] == ["image_000.png"]
    info = PngImagePlugin.PngInfo()
    info.add_text("superdiff", json.dumps(SHAPES | {"prompts": None}))
    Image.new("RGB", (32, 32), (0, 0, 255)).save(folder / "image_001.png", pnginfo=info)
    r = invoke("eval", folder)
    assert r.exit_code == 2, r.output
    assert (f"{folder / 'image_001.png'} (its superdiff PNG text): its prompts are null, not a list of strings"
            in " ".join(r.output.split())), r.output
