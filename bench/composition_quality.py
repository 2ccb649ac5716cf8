"""The paper's Table 1 and Table 2 protocols at the embedded models' scale, with the quality gates.

Table 1 (OR): digit models trained on disjoint halves (0–4, 5–9) composed with SuperDiff OR,
against each model alone, averaging their scores, and a model trained on all digits. Scored by the
class fractions (entropy; log 10 ≈ 2.30 is uniform), a Fréchet distance in the digit classifier's
feature space against the held-out real test digits, and the classifier's mean confidence.

Table 2 (AND): prompts of the shapes model composed with SuperDiff AND, against each single
prompt, the joint prompt, averaging and the sum of guidance (Composable Diffusion), for a pair
seen together in training ("red" + "circle") and the held-out pair ("blue" + "triangle"). Scored
by the attribute checker: the fraction of samples showing both attributes.

Every method runs ``--samples`` samples for each of ``--seeds`` seeds; the tables give mean ± std
over seeds. The gates (issue 4) are evaluated on the means and reported, never asserted here.

    python bench/composition_quality.py            # 500 samples x 3 seeds, the README's table
    python bench/composition_quality.py --quick    # a smoke run, under a minute
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from common import emit, machine, parser
from superdiff.zoo.experiments import digits_or, shapes_and

DIGIT_KEYS = ("class_entropy", "frechet", "confidence", "coverage")
SHAPE_KEYS = ("both_rate", "neither_rate", "colour_rate", "shape_rate")


def mean_std(values: list[float]) -> dict:
    return {
        "mean": round(statistics.fmean(values), 4),
        "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
    }


def aggregate(rows_by_seed: list[list[dict]], key_of, metric_keys) -> dict:
    """Group the per-seed metric rows by ``key_of(row)`` and reduce each metric to mean ± std."""
    groups: dict = {}
    for rows in rows_by_seed:
        for row in rows:
            groups.setdefault(key_of(row), []).append(row)
    return {k: {m: mean_std([r[m] for r in rs]) for m in metric_keys} | {"n": sum(r["n"] for r in rs)}
            for k, rs in groups.items()}


def quality_gates(digits: dict, shapes: dict, real_confidence: float, pair: str) -> dict:
    """The issue's gates, each with the numbers it compares."""
    m = lambda table, key, metric: table[key][metric]["mean"]  # noqa: E731
    colour, shape = pair.split("+")
    single_attr = min(
        m(shapes, f"{pair}|single:{colour}", "colour_rate"), m(shapes, f"{pair}|single:{shape}", "shape_rate")
    )
    singles_both = max(
        m(shapes, f"{pair}|single:{colour}", "both_rate"), m(shapes, f"{pair}|single:{shape}", "both_rate")
    )
    single_entropy = max(m(digits, "model_a", "class_entropy"), m(digits, "model_b", "class_entropy"))
    confidence = m(digits, "joint_model", "confidence")
    return {
        "digit_confidence_vs_real": {
            "samples": confidence,
            "real": round(real_confidence, 4),
            "pass": confidence >= real_confidence - 0.05,
        },
        "single_attribute_rate": {"min_over_single_prompts": single_attr, "pass": single_attr >= 0.9},
        "or_entropy_vs_single_models": {
            "superdiff": m(digits, "superdiff", "class_entropy"),
            "best_single": single_entropy,
            "pass": m(digits, "superdiff", "class_entropy") >= single_entropy + 0.5,
        },
        "and_both_rate_vs_single_prompts": {
            "superdiff": m(shapes, f"{pair}|superdiff", "both_rate"),
            "best_single": singles_both,
            "pass": m(shapes, f"{pair}|superdiff", "both_rate") >= singles_both + 0.15,
        },
    }


def markdown(digits: dict, shapes: dict) -> str:
    f = lambda d: f"{d['mean']:.3f} ± {d['std']:.3f}"  # noqa: E731
    lines = ["| OR (digits) | classes ≥2% | entropy | Fréchet | confidence |", "|---|---|---|---|---|"]
    for method, d in digits.items():
        lines.append(
            f"| {method} | {f(d['coverage'])} | {f(d['class_entropy'])} | {f(d['frechet'])} | {f(d['confidence'])} |"
        )
    lines += ["", "| AND (shapes) | method | both | neither | colour | shape |", "|---|---|---|---|---|---|"]
    for key, d in shapes.items():
        pair, method = key.split("|")
        lines.append(
            f"| {pair} | {method} | {f(d['both_rate'])} | {f(d['neither_rate'])} | {f(d['colour_rate'])} | "
            f"{f(d['shape_rate'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--samples", type=int, default=None, help="samples per method and seed (default 500; --quick 16)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; --quick 1)")
    p.add_argument("--first-seed", type=int, default=0,
                   help="seeds are first-seed, first-seed+1, ...; with --resume-dir, run seeds in parallel processes, "
                        "then once more over all of them to aggregate")
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument(
        "--resume-dir",
        type=Path,
        default=None,
        help="keep each seed's rows here and reuse those of an earlier, interrupted run with the same settings",
    )
    args = p.parse_args()
    samples = args.samples or (16 if args.quick else 500)
    seeds = list(range(args.first_seed, args.first_seed + (args.seeds or (1 if args.quick else 3))))
    steps = args.steps or (12 if args.quick else 40)
    pair, held_out = ("red", "circle"), ("blue", "triangle")

    start = time.perf_counter()
    digit_rows, shape_rows = [], []
    for seed in seeds:
        saved = (
            args.resume_dir / f"samples{samples}_steps{steps}_guidance{args.guidance}_seed{seed}.json"
            if args.resume_dir
            else None
        )
        if saved is not None and saved.exists():
            rows = json.loads(saved.read_text())
        else:
            with torch.inference_mode():
                rows = {
                    "digits": [
                        r.metrics | {"coverage": sum(f >= 0.02 for f in r.metrics["class_fractions"])}
                        for r in digits_or(samples, steps, seed, args.device)
                    ],
                    "shapes": [
                        r.metrics
                        for r in shapes_and((pair, held_out), samples, steps, args.guidance, seed, args.device)
                    ],
                }
            if saved is not None:
                saved.parent.mkdir(parents=True, exist_ok=True)
                saved.write_text(json.dumps(rows))
        digit_rows.append(rows["digits"])
        shape_rows.append(rows["shapes"])
        print(f"seed {seed} done ({time.perf_counter() - start:.0f} s)", flush=True)
    real_confidence = digit_rows[0][0]["real_confidence"]
    digits = aggregate(digit_rows, lambda r: r["method"], DIGIT_KEYS)
    shapes = aggregate(shape_rows, lambda r: f"{'+'.join(r['prompts'])}|{r['method']}", SHAPE_KEYS)
    if args.markdown is not None or not args.json:
        print(markdown(digits, shapes))
    emit(
        {
            "benchmark": "composition_quality",
            "machine": machine(),
            "samples_per_method_and_seed": samples,
            "seeds": seeds,
            "steps": steps,
            "guidance_scale": args.guidance,
            "seconds": round(time.perf_counter() - start, 1),
            "or": digits,
            "and": shapes,
            "gates": quality_gates(digits, shapes, real_confidence, "+".join(pair)),
        },
        args.json,
    )


if __name__ == "__main__":
    from common import markdown_output

    with markdown_output("composition_quality"):
        main()
