"""The paper's Figure 2 with exact models (``superdiff toy``) as a Markdown table.

    python bench/figure2.py --markdown     # 2000 samples, 1000 steps, writes docs/benchmarks/figure2.md

Two exact 2-D Gaussian mixtures under VP linear β 0.1 → 20: each model alone, averaging, SuperDiff
OR and AND. Every figure is measured against the exact log-densities.
"""

from __future__ import annotations

import json
import tempfile

from common import machine, parser
from superdiff.toy import ToyConfig, run_toy


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--samples", type=int, default=None, help="samples per method (default 2000; --quick 500)")
    args = p.parse_args()
    config = ToyConfig(num_samples=args.samples or (500 if args.quick else 2000),
                       steps=args.steps or (200 if args.quick else 1000))
    with tempfile.TemporaryDirectory() as out:
        metrics = run_toy(out, config)
    print(f"{config.num_samples} samples, {config.steps} steps, seed {config.seed}, variance "
          f"{config.variance!r}, density_variance {config.density_variance!r}; {metrics['seconds']} s of sampling")
    print("\n| method | fraction nearer A | median \\|log q_A − log q_B\\| (exact) | median \\|tracked − exact\\| |\n"
          "|---|---|---|---|")
    names = {"model_a": "model A", "model_b": "model B", "average": "averaging (κ = ½)", "or": "SuperDiff OR",
             "and": "SuperDiff AND"}
    for key, name in names.items():
        m = metrics[key]
        print(f"| {name} | {m['fraction_a']:.3f} | {m['exact_logq_gap_median']:.3f} | "
              f"{m['estimator_abs_error_median']:.3f} |")
    errors = metrics["estimator"]["median_abs_error"]
    print("\nOR's estimator, median |tracked − exact| by steps\n| steps | " + " | ".join(errors) + " |\n|---|"
          + "---|" * len(errors) + "\n| error | " + " | ".join(f"{v:.3f}" for v in errors.values()) + " |")
    if args.json:
        print(json.dumps({"benchmark": "figure2", "machine": machine(), **metrics}))


if __name__ == "__main__":
    from common import markdown_output

    with markdown_output("figure2"):
        main()
