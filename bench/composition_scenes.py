"""Composition on the embedded latent scene model (``embedded-scenes``), GenEval-style.

Pairs of objects seen together in training and pairs held out of it (never in one training image)
are composed with each method of :func:`superdiff.zoo.scene_experiments.scene_methods`: for AND
the joint prompt ("a red circle and a yellow square"), each single prompt, averaging, the score
sum, SuperDiff AND, the corrected product (K = 4) and the soft-min; NOT (A without B) and OR
(A or B) on their tasks. The scene checker reads every image (VAE-decoded, as users get them) and
scores it as GenEval does: *two objects* (both shapes), *colour attribution* (both with their
colours), and for NOT the named object absent.

The pairs and tasks come from a prompt file in GenEval's metadata format (``tag``, ``include`` with
``class``/``count``/``color``, ``exclude``; plus ``group``, ``task`` and ``parts``, the prompts
composed), so the same sweep can be scored by GenEval's evaluator on a real model. Each cell is the
mean over the group's pairs; tables give mean ± standard error over seeds, and the median time per
image. The issue's acceptance checks are reported, never asserted.

    python bench/composition_scenes.py --write-prompts   # (re)write samples/scenes_prompts.jsonl
    python bench/composition_scenes.py                   # 32 images x 3 seeds x 25 and 50 steps
    python bench/composition_scenes.py --quick           # a smoke run
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from common import emit, machine, parser
from superdiff.zoo.scene_experiments import pair_metadata, scene_methods, scenes_composition
from superdiff.zoo.scenes import HELD_OUT_PAIRS, OBJECTS, TRAIN_PAIRS, object_name

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "samples" / "scenes_prompts.jsonl"
TABLE = ROOT / "docs" / "benchmarks" / "composition_scenes.md"
TASKS = ("and", "not", "or")
#: Seen pairs benchmarked: four training pairs (neighbours on the training cycle) spread round it.
SEEN_PAIRS = tuple((OBJECTS[i], OBJECTS[j]) for i, j in TRAIN_PAIRS[::3])[:4]


def write_prompts(path: Path = PROMPTS) -> None:
    """One line per (group, pair, task): GenEval metadata plus the composed ``parts``. NOT and OR are
    asked on seen pairs only: a held-out pair never shares a training image, so "A without B" is
    met by A alone, and OR asks nothing of a pair that AND does not."""
    lines = []
    for group, pairs, tasks in (("seen", SEEN_PAIRS, TASKS), ("held-out", HELD_OUT_PAIRS, ("and",))):
        for a, b in pairs:
            for task in tasks:
                lines.append(json.dumps({"group": group, "task": task, "parts": [object_name(a), object_name(b)]}
                                        | pair_metadata(a, b, task)))
    path.write_text("\n".join(lines) + "\n")


def read_prompts(path: Path = PROMPTS) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _obj(name: str) -> tuple[str, str]:
    _, colour, shape = name.split(" ")
    return colour, shape


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error over seeds."""
    if len(values) < 2:
        return statistics.fmean(values), float("nan")
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def aggregate(rows: list[dict]) -> dict:
    """(steps, group, method) -> metric -> per-seed values (each the mean over the group's pairs)."""
    cells: dict = {}
    for r in rows:
        key = (r["steps"], r["group"], r["method"])
        for metric in ("two_objects", "colour_attribution", "not", "or", "both", "seconds_per_image"):
            if metric in r:
                cells.setdefault(key, {}).setdefault(metric, {}).setdefault(r["seed"], []).append(r[metric])
    return {k: {m: [statistics.fmean(v) for _, v in sorted(by_seed.items())] for m, by_seed in metrics.items()}
            for k, metrics in cells.items()}


def checks(table: dict, steps: list[int]) -> dict:
    """The issue's acceptance checks, with the numbers they compare."""
    out = {}
    for s in steps:
        joint = table.get((s, "held-out", "and: joint prompt"), {}).get("two_objects")
        if joint:
            out[f"held-out joint prompt two-objects < 0.5 at {s} steps"] = {
                "value": round(statistics.fmean(joint), 4), "pass": statistics.fmean(joint) < 0.5}
        separated = []
        for group in ("seen", "held-out"):
            names = sorted(m for (st, g, m) in table if st == s and g == group and m.startswith("and: ")
                           and m not in ("and: joint prompt", "and: single A", "and: single B"))  # composing two
            for i, m1 in enumerate(names):
                for m2 in names[i + 1:]:
                    for metric in ("two_objects", "colour_attribution"):
                        (a, sa), (b, sb) = (mean_se(table[(s, group, m)][metric]) for m in (m1, m2))
                        se = math.hypot(sa, sb)
                        if se > 0 and abs(a - b) > 3 * se:
                            separated.append(f"{group} {metric}: {m1[5:]} {a:.3f} vs {m2[5:]} {b:.3f}")
        out[f"composition methods > 3 s.e. apart at {s} steps"] = {"pairs": separated, "pass": bool(separated)}
    every = [statistics.fmean(v) for metrics in table.values() for m, v in metrics.items() if m != "seconds_per_image"]
    out["no metric at 1.000 on every row"] = {"pass": not all(v >= 0.9995 for v in every)}
    return out


def markdown(table: dict, steps: list[int], header: str, gates: dict) -> str:
    cell = lambda v: "–" if v is None else "{:.3f} ± {:.3f}".format(*mean_se(v))  # noqa: E731
    lines = [header, ""]
    for s in steps:
        for task, cols in (("and", ("two_objects", "colour_attribution")), ("not", ("not",)), ("or", ("or", "both"))):
            body = [f"| {group} | {method[len(task) + 2:]} | " + " | ".join(cell(metrics.get(c)) for c in cols)
                    + f" | {statistics.median(metrics['seconds_per_image']):.3f} |"
                    for (st, group, method), metrics in table.items() if st == s and method.startswith(f"{task}: ")]
            if body:
                lines += [f"### {task.upper()}, {s} steps", "",
                          "| group | method | " + " | ".join(c.replace("_", " ") for c in cols) + " | s / image |",
                          "|---|---|" + "---|" * (len(cols) + 1), *body, ""]
    lines += ["### Acceptance checks (issue 26)", ""]
    for name, result in gates.items():
        extra = "; ".join(result.get("pairs", [])[:8]) or (f"{result['value']}" if "value" in result else "")
        lines.append(f"- {'PASS' if result['pass'] else 'FAIL'}: {name}{': ' + extra if extra else ''}")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--samples", type=int, default=None, help="images per method, pair, seed (default 32; --quick 4)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; --quick 1)")
    p.add_argument("--first-seed", type=int, default=0,
                   help="seeds are first-seed, first-seed+1, ...; with --resume-dir, run seeds in parallel processes, "
                        "then once more over all of them to aggregate")
    p.add_argument("--step-counts", type=int, nargs="+", default=None,
                   help="step counts (default 25 50; --quick 4); all tasks at the first, then AND on held-out pairs "
                        "with --extra-methods only")
    p.add_argument("--extra-methods", default="joint prompt,superdiff AND,average",
                   help="the AND methods run at the further step counts (comma-separated)")
    p.add_argument("--pairs", type=int, default=None, help="pairs per group (default: all in the file; --quick 1)")
    p.add_argument("--held-out-pairs", type=int, default=None, help="pairs of the held-out group (default: --pairs)")
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--groups", nargs="+", default=["seen", "held-out"], choices=["seen", "held-out"])
    p.add_argument("--prompts", type=Path, default=PROMPTS)
    p.add_argument("--write-prompts", action="store_true", help="write the prompt file and stop")
    p.add_argument("--resume-dir", type=Path, default=None, help="keep each run's rows here and reuse them")
    p.add_argument("--table", type=Path, default=None, help=f"Markdown output (default {TABLE.relative_to(ROOT)}; "
                                                            "--quick: none)")
    args = p.parse_args()
    if args.write_prompts:
        write_prompts(args.prompts)
        print(f"wrote {args.prompts}")
        return
    samples = args.samples or (4 if args.quick else 32)
    seeds = list(range(args.first_seed, args.first_seed + (args.seeds or (1 if args.quick else 3))))
    step_counts = args.step_counts or ([4] if args.quick else [25, 50])
    pairs_per_group = args.pairs or (1 if args.quick else None)
    plan: dict = {}  # group -> {pair: [tasks]}, in file order
    for e in read_prompts(args.prompts):
        if e["group"] not in args.groups:
            continue
        pairs = plan.setdefault(e["group"], {})
        pair = tuple(e["parts"])
        limit = args.held_out_pairs if e["group"] == "held-out" and args.held_out_pairs else pairs_per_group
        if e["task"] in args.tasks and (pair in pairs or limit is None or len(pairs) < limit):
            pairs.setdefault(pair, []).append(e["task"])
    extra = [m.strip() for m in args.extra_methods.split(",")]
    from superdiff.zoo.registry import load_scenes_pipeline

    pipe = load_scenes_pipeline().to(args.device)
    start, rows = time.perf_counter(), []
    for i, steps in enumerate(step_counts):
        for seed in seeds:
            for group, pairs in plan.items():
                for pair, tasks in pairs.items():
                    methods = scene_methods(4, tuple(tasks))
                    if i > 0:  # more steps: the AND task on held-out pairs, for the --extra-methods only
                        methods = {k: m for k, m in methods.items()
                                   if group == "held-out" and m.task == "and" and k[5:] in extra}
                    if not methods:
                        continue
                    tag = f"{group}_{pair[0]}_{pair[1]}".replace(" ", "-")
                    saved = args.resume_dir / f"{tag}_n{samples}_s{steps}_g{args.guidance}_seed{seed}.json" \
                        if args.resume_dir else None
                    if saved is not None and saved.exists():
                        found = json.loads(saved.read_text())
                    else:
                        with torch.inference_mode():
                            found = [r.metrics for r in scenes_composition(
                                [(_obj(pair[0]), _obj(pair[1]))], methods, samples, steps, args.guidance, seed,
                                args.device, pipe=pipe)]
                        if saved is not None:
                            saved.parent.mkdir(parents=True, exist_ok=True)
                            saved.write_text(json.dumps(found))
                    rows += [r | {"group": group, "steps": steps, "seed": seed} for r in found]
                    print(f"{steps} steps, seed {seed}, {group} {' + '.join(pair)} done "
                          f"({time.perf_counter() - start:.0f} s)", flush=True)
    table = aggregate(rows)
    gates = checks(table, step_counts)
    reused = (f"rows kept in {args.resume_dir} (each computed by this command or an earlier run of it, "
              f"e.g. one per seed with --first-seed; {time.perf_counter() - start:.0f} s this run)"
              if args.resume_dir else f"{time.perf_counter() - start:.0f} s in all")
    header = (f"# Composition on embedded-scenes (GenEval-style)\n\n"
              f"`python bench/{Path(__file__).name} {' '.join(sys.argv[1:])}` on {machine()}: "
              f"{samples} images per method, pair and seed; seeds {seeds}; guidance {args.guidance:g}; pairs per "
              f"group: {', '.join(f'{g} {len(ps)}' for g, ps in plan.items())}; {reused}. Each cell: mean over the "
              f"group's pairs, ± standard error over seeds; time per image: median over seeds (a K-particle image "
              f"costs about K images).")
    text = markdown(table, step_counts, header, gates)
    if not args.json:
        print(text)
    table_path = args.table or (None if args.quick else TABLE)
    if table_path is not None:
        table_path.parent.mkdir(parents=True, exist_ok=True)
        table_path.write_text(text)
    emit({"benchmark": "composition_scenes", "machine": machine(), "samples_per_method_pair_and_seed": samples,
          "seeds": seeds, "steps": step_counts, "guidance_scale": args.guidance,
          "seconds": round(time.perf_counter() - start, 1),
          "table": {" | ".join(map(str, k)): v for k, v in table.items()}, "checks": gates}, args.json)


if __name__ == "__main__":
    main()
