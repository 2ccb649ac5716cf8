"""Composition on the embedded latent scene model, scored GenEval-style by the scene checker.

Tasks, for a pair of objects A = "a red circle", B = "a yellow square":

* ``and``: both in one image. Scored as GenEval's *two objects* (a circle and a square, any colour)
  and *colour attribution* (a red circle and a yellow square);
* ``not``: A without B (GenEval's ``exclude``);
* ``or``: A or B (tag ``or``, which GenEval lacks).

Every method runs through ``SuperDiffPipeline`` (prompts and a mode, or an expression with K
particles), VAE decoding included, as users call it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .experiments import Sampled, _guided_samples, _pixels, experiment_bar, step_ticker
from .scenes import geneval_correct, object_name, pair_caption, read_objects

__all__ = ["SceneMethod", "scene_methods", "pair_metadata", "scene_scores", "scenes_composition"]

Obj = tuple[str, str]


@dataclass(frozen=True)
class SceneMethod:
    """One method: the task it is scored on, an expression (or prompts and a mode), K particles.
    Prompts and expressions name the pair's objects as ``{a}`` and ``{b}``; ``{ab}`` is the joint prompt."""

    task: str  # "and", "not" or "or"
    expression: str | None = None
    prompts: tuple[str, ...] = ()
    mode: str | None = None
    particles: int = 1

    def compose(self, a: Obj, b: Obj) -> dict:
        """The pipeline arguments of this method for the pair (a, b)."""
        names = {"a": object_name(a), "b": object_name(b), "ab": pair_caption(a, b)}
        quoted = {k: f'"{v}"' for k, v in names.items()}
        out = (dict(expression=self.expression.format(**quoted)) if self.expression is not None
               else dict(prompts=[p.format(**names) for p in self.prompts], mode=self.mode))
        return out | {"particles": self.particles}  # K = 1 too: an expression that corrects would otherwise get 4


def scene_methods(particles: int = 4, tasks: tuple[str, ...] = ("and", "not", "or")) -> dict[str, SceneMethod]:
    """The benchmark's methods per task: for AND the joint prompt, each single prompt, averaging,
    the score sum (Composable Diffusion), SuperDiff AND, the corrected product (K ``particles``) and
    the soft-min; for NOT the single prompt, the negative weight and its corrected form; for OR each
    single prompt and SuperDiff OR."""
    methods = {
        "and": {
            "joint prompt": SceneMethod("and", prompts=("{ab}",), mode="average"),
            "single A": SceneMethod("and", prompts=("{a}",), mode="average"),
            "single B": SceneMethod("and", prompts=("{b}",), mode="average"),
            "average": SceneMethod("and", prompts=("{a}", "{b}"), mode="average"),
            "score sum": SceneMethod("and", prompts=("{a}", "{b}"), mode="sum"),
            "superdiff AND": SceneMethod("and", expression="{a} & {b}"),
            f"product, corrected, K={particles}": SceneMethod("and", expression="{a} * {b}", particles=particles),
            "soft-min": SceneMethod("and", expression="softmin({a}, {b})[sharpness=4, correct=false]"),
        },
        "not": {
            "single A": SceneMethod("not", prompts=("{a}",), mode="average"),
            "NOT, negative weight": SceneMethod("not", expression="{a} * not({b})[correct=false]"),
            f"NOT, corrected, K={particles}": SceneMethod("not", expression="{a} * not({b})", particles=particles),
        },
        "or": {
            "single A": SceneMethod("or", prompts=("{a}",), mode="average"),
            "single B": SceneMethod("or", prompts=("{b}",), mode="average"),
            "superdiff OR": SceneMethod("or", expression="{a} | {b}"),
        },
    }
    return {f"{task}: {name}": m for task in tasks for name, m in methods[task].items()}


def pair_metadata(a: Obj, b: Obj, task: str) -> dict:
    """GenEval-style metadata of a task on the pair: ``tag``, ``include`` (and ``exclude``) with
    ``class`` (shape), ``count`` and ``color``, and the prompt (the joint prompt for AND)."""
    req = lambda o: {"class": o[1], "count": 1, "color": o[0]}  # noqa: E731
    if task == "and":
        return {"tag": "color_attr", "include": [req(a), req(b)], "prompt": pair_caption(a, b)}
    if task == "not":
        return {"tag": "not", "include": [req(a)], "exclude": [req(b)],
                "prompt": f"{object_name(a)} without {object_name(b)}"}
    if task == "or":
        return {"tag": "or", "include": [req(a), req(b)], "prompt": f"{object_name(a)} or {object_name(b)}"}
    raise ValueError(f"task must be 'and', 'not' or 'or'; got {task!r}")


def scene_scores(objects: list, metadata: dict) -> dict[str, float]:
    """Per-task rates over images read by :func:`~superdiff.zoo.scenes.read_objects`. AND
    (``color_attr``): ``two_objects`` (both shapes, colours ignored: GenEval's two-object rule) and
    ``colour_attribution`` (both with their colours); NOT: ``not``; OR: ``or`` and ``both``."""
    n = max(len(objects), 1)
    rate = lambda meta: sum(geneval_correct(o, meta) for o in objects) / n  # noqa: E731
    if metadata["tag"] == "color_attr":
        shapes_only = {"tag": "two_object", "include": [{k: v for k, v in r.items() if k != "color"}
                                                        for r in metadata["include"]]}
        return {"two_objects": rate(shapes_only), "colour_attribution": rate(metadata)}
    if metadata["tag"] == "or":
        return {"or": rate(metadata), "both": rate(metadata | {"tag": "both"})}
    return {metadata["tag"]: rate(metadata)}


def scenes_composition(
    pairs: list[tuple[Obj, Obj]],
    methods: dict[str, SceneMethod],
    num_samples: int = 32,
    steps: int = 25,
    guidance_scale: float = 5.0,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = False,
    chunk_size: int = 64,
    pipe=None,
) -> list[Sampled]:
    """Each method on each pair: ``num_samples`` images (one generator seeded with ``seed`` per
    run), their GenEval-style scores (:func:`scene_scores`) and the time per image. Methods that
    compose alike (a single prompt listed under several tasks) share one run, scored per task."""
    from .registry import load_scenes_pipeline

    pipe = load_scenes_pipeline().to(device) if pipe is None else pipe
    results = []
    runs: dict = {}
    for a, b in pairs:
        for name, method in methods.items():
            compose = method.compose(a, b)
            runs.setdefault((a, b, repr(sorted(compose.items()))), (compose, []))[1].append((name, method))
    with experiment_bar("AND scenes", len(runs), num_samples, chunk_size, steps, progress) as bar:
        on_step = step_ticker(bar)
        for (a, b, _), (compose, named) in runs.items():
            bar.set_description(f"AND scenes {object_name(a)[2:]}+{object_name(b)[2:]}: "
                                + ", ".join(name.split(": ", 1)[-1] for name, _ in named))
            start = time.perf_counter()
            out = _guided_samples(pipe, compose, guidance_scale, steps, num_samples, chunk_size, seed, on_step)
            seconds = time.perf_counter() - start
            images = _pixels(out)
            objects = read_objects(images)
            for name, method in named:
                results.append(Sampled(
                    name,
                    images,
                    {"method": name, "task": method.task, "pair": [object_name(a), object_name(b)],
                     "particles": method.particles, "seconds_per_image": round(seconds / num_samples, 4),
                     "n": num_samples} | scene_scores(objects, pair_metadata(a, b, method.task)),
                    out.kappa_trace,
                    out.log_density_trace,
                    [object_name(a), object_name(b)],
                ))
        bar.set_description("AND scenes")
    return results
