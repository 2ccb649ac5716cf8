"""The composition calculus on the embedded shapes model: corrected products, the Dombi AND, NOT and
an OR of ANDs against today's methods, with K weighted particles per image.

Each method runs ``--samples`` images for each of ``--seeds`` seeds at ``--steps`` (default 25)
through ``SuperDiffPipeline(expression=..., particles=K)``; the attribute checker reads every image.
The table gives each method's hit rate (both attributes for the AND-type methods; a red shape that is
no circle for NOT; a red circle or a blue triangle for the OR of ANDs) as mean ± std over seeds,
and its time per image (a K-particle image costs about K images). The goals of the calculus issue
are reported, never asserted.

    python bench/composition_calculus.py                 # 128 images x 2 seeds, guidance 5 and none
    python bench/composition_calculus.py --quick         # a smoke run, under a minute
"""

from __future__ import annotations

import statistics
import time

import torch

from common import emit, machine, parser
from superdiff.zoo.experiments import calculus_methods, shapes_calculus


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--samples", type=int, default=None, help="images per method and seed (default 128; --quick 8)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 2; --quick 1)")
    p.add_argument("--guidance", type=float, nargs="+", default=None,
                   help="guidance scales to run; 0 means unguided (default: 5 0)")
    args = p.parse_args()
    samples = args.samples or (8 if args.quick else 128)
    seeds = list(range(args.seeds or (1 if args.quick else 2)))
    steps = args.steps or (6 if args.quick else 25)
    scales = args.guidance or ([5.0] if args.quick else [5.0, 0.0])
    methods = calculus_methods((2,) if args.quick else (4, 8))
    start = time.perf_counter()
    table = {}
    for scale in scales:
        rows = {name: {"hit_rate": [], "seconds_per_image": []} for name in methods}
        for seed in seeds:
            with torch.inference_mode():
                for r in shapes_calculus(methods, samples, steps, scale if scale > 0 else None, seed, args.device):
                    rows[r.method]["hit_rate"].append(r.metrics["hit_rate"])
                    rows[r.method]["seconds_per_image"].append(r.metrics["seconds_per_image"])
            print(f"guidance {scale:g}, seed {seed} done ({time.perf_counter() - start:.0f} s)", flush=True)
        table[f"{scale:g}"] = {
            name: {
                "target": methods[name].target,
                "expression": methods[name].expression,
                "particles": methods[name].particles,
                "hit_rate": {"mean": round(statistics.fmean(v["hit_rate"]), 4),
                             "std": round(statistics.stdev(v["hit_rate"]), 4) if len(v["hit_rate"]) > 1 else 0.0},
                "seconds_per_image": round(statistics.median(v["seconds_per_image"]), 4),
            }
            for name, v in rows.items()
        }
        if not args.json:
            print(f"\n| guidance {scale:g} | target | K | hit rate | s / image |\n|---|---|---|---|---|")
            for name, v in rows.items():
                m = methods[name]
                print(f"| {name} | {m.target} | {m.particles} | {_mean_std(v['hit_rate'])} | "
                      f"{statistics.median(v['seconds_per_image']):.3f} |")
    emit(
        {
            "benchmark": "composition_calculus",
            "machine": machine(),
            "samples_per_method_and_seed": samples,
            "seeds": seeds,
            "steps": steps,
            "seconds": round(time.perf_counter() - start, 1),
            "table": table,
        },
        args.json,
    )


if __name__ == "__main__":
    from common import markdown_output

    with markdown_output("composition_calculus"):
        main()
