"""The embedded models' data, evaluators, tokenizer, training script and (when trained) shipped
weights: the shapes checker, the held-out pair, the digits split, Fréchet distance, the classifier."""

from __future__ import annotations

import json

import pytest
import torch

from superdiff.zoo.digits import frechet_distance, load_digits_split, split_indices, subset
from superdiff.zoo.registry import WEIGHTS
from superdiff.zoo.shapes import COLOURS, HELD_OUT, SHAPES, captions_of, read_attributes, sample_shapes
from superdiff.zoo.tokenizer import CAPTION_WORDS, MAX_LENGTH, bpe_merges, build_tokenizer

PAIRS = {(c, s) for c in COLOURS for s in SHAPES}


def _truth(batch) -> list[tuple[str, str]]:
    names = list(COLOURS)
    return [(names[c], SHAPES[s]) for c, s in zip(batch.colours.tolist(), batch.shapes.tolist())]


def _needs(*names: str) -> None:
    missing = [n for n in names if not (WEIGHTS / n).is_dir()]
    if missing:
        pytest.skip(f"embedded weights not trained yet: {missing}")


# --------------------------------------------------------------------------------------------
# Shapes data and the attribute checker
# --------------------------------------------------------------------------------------------


def test_checker_reads_clean_images_of_every_pair():
    batch = sample_shapes(1000, seed=7, include_held_out=True)
    truth = _truth(batch)
    assert set(truth) == PAIRS  # all 12 pairs, blue triangles included
    colours, shapes = read_attributes(batch.images)
    correct = sum((c, s) == t for c, s, t in zip(colours, shapes, truth))
    assert correct / len(truth) >= 0.99
    held = [i for i, t in enumerate(truth) if t == HELD_OUT]
    assert sum((colours[i], shapes[i]) == HELD_OUT for i in held) >= 0.99 * len(held)


def test_checker_is_robust_to_mild_noise_and_says_none_on_blank_images():
    batch = sample_shapes(300, seed=11, include_held_out=True)
    noisy = batch.images + 0.2 * torch.randn(batch.images.shape, generator=torch.Generator().manual_seed(0))
    colours, shapes = read_attributes(noisy)
    assert sum((c, s) == t for c, s, t in zip(colours, shapes, _truth(batch))) >= 0.95 * 300
    blank = -torch.ones(2, 3, 16, 16)
    assert read_attributes(blank) == ([None, None], [None, None])
    assert read_attributes(blank[:0]) == ([], [])


def test_training_data_never_shows_the_held_out_pair():
    batch = sample_shapes(5000, seed=3)
    assert HELD_OUT not in set(_truth(batch))
    assert set(_truth(batch)) == PAIRS - {HELD_OUT}
    blue = torch.tensor(COLOURS["blue"])[:, None, None] * 2 - 1
    is_blue = ((batch.images - blue).abs() < 1e-6).all(1).flatten(1).any(1)
    _, shapes = read_attributes(batch.images[is_blue])
    assert "triangle" not in shapes  # read from pixels too, not just from the labels
    captions = set(captions_of(batch, seed=0))
    assert "" in captions and " ".join(HELD_OUT) not in captions
    assert captions - {""} == {*COLOURS, *SHAPES, *(f"{c} {s}" for c, s in PAIRS - {HELD_OUT})}


def test_shapes_generation_is_deterministic_for_a_seed():
    a, b, c = sample_shapes(2000, seed=3), sample_shapes(2000, seed=3), sample_shapes(2000, seed=4)
    assert torch.equal(a.images, b.images) and torch.equal(a.colours, b.colours)
    assert captions_of(a, seed=1) == captions_of(b, seed=1)
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (2000, 3, 16, 16) and a.images.min() >= -1 and a.images.max() <= 1


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def _assert_one_token_per_word(tok) -> None:
    for word in CAPTION_WORDS:
        ids = tok(word).input_ids
        assert len(ids) == 3 and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id, (word, ids)
        assert tok.decode(ids[1:-1]).strip() == word
    pair = tok("blue triangle", padding="max_length", max_length=MAX_LENGTH).input_ids
    assert len(pair) == MAX_LENGTH and pair[:4] == [
        tok.bos_token_id,
        tok(["blue"]).input_ids[0][1],
        tok("triangle").input_ids[1],
        tok.eos_token_id,
    ]


def test_caption_words_are_single_tokens_and_the_tokenizer_loads_offline(tmp_path):
    from transformers import CLIPTokenizer

    tok = build_tokenizer(tmp_path)
    _assert_one_token_per_word(tok)
    assert (tmp_path / "vocab.json").exists() and (tmp_path / "merges.txt").exists()
    again = CLIPTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert again("red circle").input_ids == tok("red circle").input_ids
    assert tok.convert_ids_to_tokens([0, 1]) == ["<|startoftext|>", "<|endoftext|>"]
    assert (
        len(tok)
        == len(json.loads((tmp_path / "vocab.json").read_text()))
        == 2 + 2 * 256 + len(bpe_merges(CAPTION_WORDS))
    )


# --------------------------------------------------------------------------------------------
# Digits, classifier, Fréchet distance
# --------------------------------------------------------------------------------------------


def test_digit_split_follows_the_paper_protocol():
    split = load_digits_split()
    assert split.train_images.shape[1:] == (1, 8, 8)
    assert float(split.train_images.min()) == -1.0 and float(split.train_images.max()) == 1.0
    assert subset(split, "a").shape[0] == int((split.train_labels < 5).sum())
    assert subset(split, "b").shape[0] == int((split.train_labels >= 5).sum())
    assert subset(split, "all").shape[0] == split.train_labels.numel()
    with pytest.raises(ValueError):
        subset(split, "c")
    from sklearn.datasets import load_digits

    labels = torch.tensor(load_digits().target)
    train, test = split_indices(labels)
    assert len(set(train.tolist()) & set(test.tolist())) == 0 and len(train) + len(test) == 1797
    for digit in range(10):  # stratified: 20% of every digit is held out
        frac = float((labels[test] == digit).sum()) / float((labels == digit).sum())
        assert abs(frac - 0.2) < 0.01
    assert torch.equal(split_indices(labels)[1], test)  # fixed seed


def test_digit_models_see_only_their_digits():
    split = load_digits_split()
    a_labels = split.train_labels[split.train_labels < 5]
    b_labels = split.train_labels[split.train_labels >= 5]
    assert set(a_labels.tolist()) == {0, 1, 2, 3, 4} and set(b_labels.tolist()) == {5, 6, 7, 8, 9}
    assert torch.equal(subset(split, "a"), split.train_images[split.train_labels < 5])
    assert torch.equal(subset(split, "b"), split.train_images[split.train_labels >= 5])


def test_frechet_distance_is_exact_for_gaussians():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 4, generator=g, dtype=torch.float64)
    y = torch.randn(20000, 4, generator=g, dtype=torch.float64)
    assert abs(frechet_distance(x, x)) < 1e-6
    shifts = [0.5, 1.0, 2.0]
    distances = [frechet_distance(x, y + torch.tensor([s, 0.0, s, 0.0], dtype=torch.float64)) for s in shifts]
    assert distances == sorted(distances)
    for s, d in zip(shifts, distances):
        assert abs(d - 2 * s**2) < 0.05 + 0.02 * 2 * s**2  # ‖m‖² for N(0, I) vs N(m, I)


def test_shipped_classifier_is_accurate():
    _needs("digit-classifier")
    from superdiff.zoo.registry import load_digit_classifier

    split = load_digits_split()
    model = load_digit_classifier()
    with torch.no_grad():
        acc = float((model(split.test_images).argmax(1) == split.test_labels).double().mean())
        assert model.features(split.test_images[:5]).shape == (5, 64)
    assert acc >= 0.95


# --------------------------------------------------------------------------------------------
# Shipped weights and the training script
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "b", "all"])
def test_shipped_digit_models_load_as_float32(name):
    _needs(f"digits-{name}")
    from diffusers import DDPMScheduler, UNet2DModel

    from superdiff.zoo.registry import embedded_path, load_digit_model

    unet, scheduler = load_digit_model(name)
    assert isinstance(unet, UNet2DModel) and isinstance(scheduler, DDPMScheduler)
    assert unet.dtype == torch.float32 and scheduler.config.beta_schedule == "linear"
    assert scheduler.config.num_train_timesteps == 1000 and scheduler.config.prediction_type == "epsilon"
    with torch.no_grad():
        assert unet(torch.zeros(2, 1, 8, 8), 500).sample.shape == (2, 1, 8, 8)
    log = json.loads((WEIGHTS / f"digits-{name}" / "training_log.json").read_text())
    assert log["loss_curve"] and log["seconds"] > 0
    assert embedded_path(name).endswith(f"digits-{name}")


def test_shipped_shapes_model_is_consistent():
    _needs("shapes")
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = WEIGHTS / "shapes"
    tok = CLIPTokenizer.from_pretrained(str(path / "tokenizer"), local_files_only=True)
    _assert_one_token_per_word(tok)
    text = CLIPTextModel.from_pretrained(str(path / "text_encoder"), torch_dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(str(path / "unet"), torch_dtype=torch.float32)
    scheduler = EulerDiscreteScheduler.from_pretrained(str(path / "scheduler"))
    assert len(tok) <= text.config.vocab_size and tok.model_max_length <= text.config.max_position_embeddings
    assert unet.config.cross_attention_dim == text.config.hidden_size and unet.config.sample_size == 16
    assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.steps_offset == 1
    index = json.loads((path / "model_index.json").read_text())
    assert {"unet", "text_encoder", "tokenizer", "scheduler"} <= set(index)
    ids = tok(["", "red circle"], padding="max_length", max_length=MAX_LENGTH, return_tensors="pt").input_ids
    with torch.no_grad():
        emb = text(ids)[0]
        assert unet(torch.zeros(2, 3, 16, 16), 10, encoder_hidden_states=emb).sample.shape == (2, 3, 16, 16)


def test_shipped_weights_fit_the_budget():
    if not WEIGHTS.is_dir():
        pytest.skip("no embedded weights yet")
    total = sum(f.stat().st_size for f in WEIGHTS.rglob("*") if f.is_file())
    assert total <= 25 * 2**20
    assert not list(WEIGHTS.rglob("*.bin")) and not list(WEIGHTS.rglob("*.pt"))  # safetensors only


def test_training_script_runs_and_logs(tmp_path):
    from superdiff.zoo.train import main

    main(["digits", "--out", str(tmp_path), "--steps", "2", "--batch-size", "8", "--models", "a"])
    log = json.loads((tmp_path / "digits-a" / "training_log.json").read_text())
    assert log["config"]["steps"] == 2 and len(log["loss_curve"]) == 2 and log["seconds"] >= 0
    assert (tmp_path / "digits-a" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert (
        json.loads((tmp_path / "digits-a" / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
        == "DDPMScheduler"
    )
    main(["shapes", "--out", str(tmp_path), "--steps", "2", "--batch-size", "4"])
    folder = tmp_path / "shapes"
    assert {p.name for p in folder.iterdir()} >= {
        "unet",
        "text_encoder",
        "tokenizer",
        "scheduler",
        "model_index.json",
        "training_log.json",
    }
    assert json.loads((folder / "training_log.json").read_text())["steps_done"] == 2


def test_scenes_training_writes_a_folder_that_names_no_local_path(tmp_path, monkeypatch):
    """Every stage of a (tiny) scenes run, the VAE reloaded between them: no config in the saved
    folder records the machine's path it was loaded from, and the folder loads as a diffusers pipeline.
    The VAE stages, which read no captions, draw scenes of held-out pairs too; the UNet's scenes hold
    only training pairs (read from what each stage drew)."""
    import inspect

    from diffusers import StableDiffusionPipeline

    import superdiff.zoo.train_scenes as train_scenes
    from superdiff.zoo.scenes import HELD_OUT_PAIRS, OBJECTS, TRAIN_PAIRS
    from superdiff.zoo.train import main

    drawn: dict[str, set] = {}
    real = train_scenes.sample_scenes

    def recording(*args, **kwargs):
        scenes = real(*args, **kwargs)
        pairs = {tuple(sorted(p)) for p in scenes.objects.tolist() if -1 not in p}
        drawn.setdefault(inspect.stack()[1].function, set()).update(pairs)
        return scenes

    monkeypatch.setattr(train_scenes, "sample_scenes", recording)
    main(["scenes", "--out", str(tmp_path), "--steps", "2", "--batch-size", "4", "--vae-steps", "2",
          "--decoder-steps", "2", "--encoded-scenes", "64"])
    held_out = {tuple(sorted(OBJECTS.index(o) for o in pair)) for pair in HELD_OUT_PAIRS}
    trained = set(TRAIN_PAIRS)
    assert set(drawn) == {"_vae_phase", "train_vae", "reconstruction_read_rate", "encode_scenes"}, drawn
    for stage in ("_vae_phase", "train_vae", "reconstruction_read_rate"):
        assert drawn[stage] & held_out, stage
    assert drawn["encode_scenes"] and drawn["encode_scenes"] <= trained
    folder = tmp_path / "scenes"
    configs = list(folder.rglob("config.json"))
    assert {c.parent.name for c in configs} >= {"vae", "unet", "text_encoder"}
    for config in configs:
        assert str(tmp_path) not in config.read_text(), config
        assert "_name_or_path" not in json.loads(config.read_text()), config
    StableDiffusionPipeline.from_pretrained(folder)
