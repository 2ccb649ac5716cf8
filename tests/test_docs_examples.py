"""Every Python code block of the README and the documentation site runs, so an example that
breaks fails the suite.

Blocks of one page run in order in one namespace (a later block may use an earlier one's ``pipe``),
in a temporary working directory. Examples name real models; the test substitutes, in the block's
source before it runs:

* each hub id of ``TINY_MODELS`` by a folder holding a tiny random model of the same family, built
  here from :mod:`superdiff.testing`'s components and saved with ``save_pretrained`` (no download);
* ``"cuda"`` by ``"cpu"`` and ``torch.float16`` by ``torch.float32`` on a machine without a GPU;
* ``num_inference_steps=N`` by at most ``STEPS`` steps;
* and FLUX.1, Qwen-Image and Z-Image pipelines sample at 32×32 pixels by default instead of diffusers'
  1024×1024.

A block that cannot run here says so on the line before it with ``<!-- skip-example -->``.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SKIP = "<!-- skip-example -->"
#: Sampling steps of a pipeline call at most (the examples' own counts are for real models).
STEPS = 4
#: At most this many blocks may be marked as not runnable, across the README and the docs.
MAX_SKIPPED = 3
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[^\n]*$")


def code_blocks(text: str) -> list[tuple[int, str, str, bool]]:
    """(first line number, language, source, marked skip) of each fenced block, indentation removed."""
    lines, blocks, i = text.splitlines(), [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, start = opening["indent"], i
        i += 1
        body = []
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        previous = next((line.strip() for line in reversed(lines[:start]) if line.strip()), "")
        blocks.append((start + 1, opening["lang"], "\n".join(body) + "\n", previous == SKIP))
        i += 1
    return blocks


def python_blocks(page: Path) -> list[tuple[int, str, bool]]:
    return [(line, source, skip) for line, lang, source, skip in code_blocks(page.read_text()) if lang == "python"]


def _save_sd(folder: Path) -> None:
    from diffusers import StableDiffusionPipeline

    from superdiff.testing import tiny_sd_components

    StableDiffusionPipeline(
        **tiny_sd_components(), safety_checker=None, feature_extractor=None, requires_safety_checker=False
    ).save_pretrained(folder)


def _save_sdxl(folder: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    from superdiff.testing import tiny_sdxl_components

    StableDiffusionXLPipeline(**tiny_sdxl_components()).save_pretrained(folder)


def _save_sd3(folder: Path) -> None:
    from diffusers import StableDiffusion3Pipeline

    from superdiff.testing import tiny_sd3_components

    StableDiffusion3Pipeline(**tiny_sd3_components()).save_pretrained(folder)


def _save_flux(folder: Path) -> None:
    from diffusers import FluxPipeline

    from test_pipelines_flux import tiny_flux_components

    FluxPipeline(**tiny_flux_components(folder.parent / "flux-tokenizer")).save_pretrained(folder)


def _save_qwenimage(folder: Path) -> None:
    from diffusers import QwenImagePipeline

    from superdiff.testing import tiny_qwenimage_components

    components = tiny_qwenimage_components(tokenizer_dir=folder.parent / "qwen-tokenizer")
    QwenImagePipeline(**components).save_pretrained(folder)


def _save_zimage(folder: Path) -> None:
    from diffusers import ZImagePipeline

    from superdiff.testing import tiny_zimage_components

    ZImagePipeline(**tiny_zimage_components(tokenizer_dir=folder.parent / "z-tokenizer")).save_pretrained(folder)


#: Hub ids the examples use, and how the test builds a tiny folder of the same family in their place.
TINY_MODELS = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": _save_sd,
    "stabilityai/stable-diffusion-xl-base-1.0": _save_sdxl,
    "stabilityai/stable-diffusion-3.5-medium": _save_sd3,
    "black-forest-labs/FLUX.1-dev": _save_flux,
    "Qwen/Qwen-Image": _save_qwenimage,
    "Tongyi-MAI/Z-Image-Turbo": _save_zimage,
}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """The tiny folder of a hub id, built on first use."""
    root, built = tmp_path_factory.mktemp("tiny-models"), {}

    def folder(hub_id: str) -> str:
        if hub_id not in built:
            built[hub_id] = root / hub_id.replace("/", "--")
            TINY_MODELS[hub_id](built[hub_id])
        return str(built[hub_id])

    return folder


def substitute(source: str, tiny_models) -> str:
    for hub_id in TINY_MODELS:
        for quote in "\"'":
            if f"{quote}{hub_id}{quote}" in source:
                source = source.replace(f"{quote}{hub_id}{quote}", repr(tiny_models(hub_id)))
    if not torch.cuda.is_available():
        source = source.replace('"cuda"', '"cpu"').replace("torch.float16", "torch.float32")
    return re.sub(r"num_inference_steps=(\d+)", lambda m: f"num_inference_steps={min(int(m[1]), STEPS)}", source)


@pytest.fixture
def small_flux(monkeypatch):
    from superdiff.pipelines import SuperDiffQwenImagePipeline, SuperDiffZImagePipeline
    from superdiff.pipelines.flux import SuperDiffFluxPipeline

    init = SuperDiffFluxPipeline.__init__

    @functools.wraps(init)  # diffusers reads the components from __init__'s signature
    def small(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.default_sample_size = 32 // self.vae_scale_factor

    monkeypatch.setattr(SuperDiffFluxPipeline, "__init__", small)
    for family in (SuperDiffQwenImagePipeline, SuperDiffZImagePipeline):  # 1024² pixels by default, like FLUX.1
        monkeypatch.setattr(family, "default_sample_size", property(lambda self: 32 // self.vae_scale_factor))


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_python_example_runs(page, tiny_models, small_flux, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__example__"}
    for line, source, skip in python_blocks(page):
        if skip:
            continue
        code = compile(substitute(source, tiny_models), f"{page.relative_to(ROOT)}:{line}", "exec")
        exec(code, namespace)  # a failure's traceback names the page and the block's line


def test_examples_are_found_and_few_are_skipped():
    blocks = {page: python_blocks(page) for page in PAGES}
    assert len(blocks[ROOT / "README.md"]) >= 2
    skipped = [f"{page.relative_to(ROOT)}:{line}" for page, found in blocks.items() for line, _, skip in found if skip]
    assert len(skipped) <= MAX_SKIPPED, skipped
    unused = [hub_id for hub_id in TINY_MODELS
              if not any(hub_id in source for found in blocks.values() for _, source, _ in found)]
    assert not unused, f"substitutions no example uses: {unused}"


def test_code_blocks_are_parsed_with_their_skip_marker():
    text = "Text\n\n```python\nx = 1\n```\n\n<!-- skip-example -->\n```python\nraise SystemExit\n```\n" \
           "* item\n\n  ```python\n  y = 2\n  ```\n```bash\nls\n```\n"
    assert code_blocks(text) == [(3, "python", "x = 1\n", False), (8, "python", "raise SystemExit\n", True),
                                 (13, "python", "y = 2\n", False), (16, "bash", "ls\n", False)]

