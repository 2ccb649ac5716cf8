"""The performance benchmarks run and report every key the README's table reads.

One repeat of 3 steps at the tiny size: this guards the scripts against breaking, not their figures
(those come from ``python bench/run_all.py`` and are quoted in the README with the machine).
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def table_rows():
    spec = importlib.util.spec_from_file_location("run_all", BENCH / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ROWS


KEYS: dict[str, list[str]] = {}
for script, key, *_ in table_rows():
    KEYS.setdefault(script, []).append(key)


@pytest.mark.parametrize("script", sorted(KEYS))
def test_benchmark_runs_and_reports_the_table_keys(script):
    cmd = [
        sys.executable,
        str(BENCH / script),
        "--quick",
        "--json",
        "--repeats",
        "1",
        "--steps",
        "3",
        "--device",
        "cpu",
    ]
    proc = subprocess.run(cmd, cwd=BENCH, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["machine"] and result["steps"] == 3
    for key in KEYS[script]:
        values = result[key].values() if isinstance(result[key], dict) else [result[key]]
        assert all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values), (key, result[key])


def test_network_call_timer_measures_the_share_between_network_calls(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_common", BENCH / "common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    clock = [0.0]
    monkeypatch.setattr(common.time, "perf_counter", lambda: clock[0])

    class Network:  # each call takes 8 s of the fake clock
        process, num_outputs = None, 3

        def __call__(self, x, t):
            clock[0] += 8.0
            return x

    timer = common.NetworkCallTimer(Network(), "cpu")
    for _ in range(4):  # a sampler: a call, then 2 s of its own work
        timer(None, None)
        clock[0] += 2.0
    assert timer.num_outputs == 3
    # 3 gaps of 2 s within the 30 s from the first call's start to the last's
    assert timer.outside_fraction() == pytest.approx(6.0 / 30.0)
    assert timer.marks == []


def test_few_steps_bench_runs_and_reports_every_variant():
    cmd = [sys.executable, str(BENCH / "few_steps.py"), "--quick", "--json", "--steps", "3"]
    proc = subprocess.run(cmd, cwd=BENCH, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["machine"] and result["steps"] == [3]
    for table in ("err", "ll"):
        values = [v for rows in result[table].values() for row in rows.values() for v in row.values()]
        assert len(values) == 6 * len(result[table]) and all(math.isfinite(v) for v in values), (table, result[table])
    assert "uniform, posterior/tweedie (default)" in result["err"]
    assert "uniform, euler/euler (bare S², the start)" in result["err"]  # the baseline the few-step work began at
    spread = result["err_spread"]  # median, mean, p90 of the error and of its difference between the models
    rows = [row for by_steps in spread.values() for variants in by_steps.values() for row in variants.values()]
    assert len(rows) == 6 * 3 and all(r["median"] <= r["p90"] and r["Δ median"] <= r["Δ p90"] for r in rows)
    assert set(result["bf16"]) == {"3"} and set(result["bf16"]["3"]) == {"float64", "bf16"}
    composition = result["composition"]  # --quick: AND's exact gap and OR's share at 25 steps, both variances
    assert len(composition) == 5 and all(set(row) == {"25"} for rows in composition.values() for row in rows.values())
    shares = [row["25"] for title, rows in composition.items() if "OR share" in title for row in rows.values()]
    gaps = [row["25"] for title, rows in composition.items() if "AND exact gap" in title for row in rows.values()]
    assert len(shares) == len(gaps) == 12 and all(0 < s < 1 for s in shares) and all(g >= 0 for g in gaps)
    assert all(0.9 <= v["25"] <= 1 for v in composition["AND quadratic condition solved, tweedie"].values())
    embedded = result["embedded"]  # --quick: the embedded models at 4 and 8 steps
    assert len(embedded) == 6 and all(set(row) == {"4", "8"} for row in embedded.values()), embedded
    assert all(0 <= v <= 1 for title, row in embedded.items() if "both-rate" in title for v in row.values())


def test_few_steps_bench_diagnoses_the_8d_remainder_with_exact_covariances():
    """The oracle rows: with each model's exact posterior covariance in the reverse kernel the 8-D error at
    20 steps falls well below the free isotropic estimate's (measured, 64 samples: 0.70 → 0.14 on VP,
    1.03 → 0.36 on VE), and the exact trace alone sits between them."""
    cmd = [sys.executable, str(BENCH / "few_steps.py"), "--step-counts", "20", "--quality-steps", "2",
           "--composition-steps", "2", "--embedded-steps", "0", "--samples", "64", "--oracle-samples", "64", "--json"]
    proc = subprocess.run(cmd, cwd=BENCH, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    oracle = result["oracle"]
    assert set(oracle) == {"8-D, VP linear", "8-D, VE"}
    moment_matched = result["oracle_ll"]  # every set-up, at the ll step count (2)
    assert len(moment_matched) == 6 and all(set(row["2"]) == {"exact trace", "exact"} and
                                            all(math.isfinite(v) for v in row["2"].values())
                                            for row in moment_matched.values())
    for row in oracle.values():
        estimate, trace, exact = row["20"].values()
        assert exact < 0.5 * estimate and exact < trace <= estimate * 1.05, row


def _common():
    spec = importlib.util.spec_from_file_location("bench_common", BENCH / "common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    return common


def test_markdown_option_writes_the_printed_tables_into_the_page_and_keeps_its_prose(tmp_path, monkeypatch, capsys):
    """``--markdown PAGE``: what the run prints lands between the script's markers, tables as tables,
    other lines verbatim, headed by the command; the page's own text stays, a rerun replaces the block."""
    common = _common()
    page = tmp_path / "demo.md"
    begin, end = common.generated_markers("demo")
    page.write_text(f"# Demo\n\nProse before.\n\n{begin}\nold figures\n{end}\n\nProse after.\n")
    monkeypatch.setattr(sys, "argv", ["demo.py", "--quick", "--markdown", str(page)])
    for value in ("1.5", "2.5"):
        with common.markdown_output("demo"):
            print(f"machine: a CPU; err = median |tracked − exact|\n\nerr, forward\n| set-up | 20 |\n|---|---|\n"
                  f"| 3-D | {value} |")
            print(json.dumps({"err": value}))
    assert "| 3-D | 2.5 |" in capsys.readouterr().out  # the output still reaches the terminal
    text = page.read_text()
    assert text.startswith("# Demo\n\nProse before.\n\n" + begin) and text.endswith(end + "\n\nProse after.\n")
    assert text.count(begin) == 1 and "old figures" not in text and "| 3-D | 1.5 |" not in text
    block = text.split(begin)[1].split(end)[0]
    assert f"Command: `python bench/demo.py --quick --markdown {page}`" in block
    assert "err, forward\n\n| set-up | 20 |\n|---|---|\n| 3-D | 2.5 |\n" in block
    assert "```text\nmachine: a CPU; err = median |tracked − exact|\n```" in block
    assert '"err"' not in block  # the --json line is not part of the page


def test_without_the_markdown_option_no_page_is_written(tmp_path, monkeypatch):
    common = _common()
    monkeypatch.setattr(common, "DOCS_BENCHMARKS", tmp_path)
    monkeypatch.setattr(sys, "argv", ["demo.py", "--quick"])
    with common.markdown_output("demo"):
        print("| a |\n|---|\n| 1 |")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(sys, "argv", ["demo.py", "--markdown"])  # no PAGE: docs/benchmarks/<script>.md
    with common.markdown_output("demo"):
        print("| a |\n|---|\n| 1 |")
    assert "| a |\n|---|\n| 1 |" in (tmp_path / "demo.md").read_text()


def test_a_quick_run_all_runs_each_script_here_and_leaves_this_process_as_it_found_it(tmp_path, monkeypatch):
    """``run_all.py --quick`` runs the scripts in its own process: each sees its own command line and
    working folder, its last printed line is its result, and the thread count it sets, the command line
    and the folder are restored after it; a script that fails stops the run, naming it."""
    import torch

    spec = importlib.util.spec_from_file_location("bench_run_all", BENCH / "run_all.py")
    run_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_all)
    monkeypatch.setattr(run_all, "HERE", tmp_path)
    (tmp_path / "ok.py").write_text(
        "import json, os, sys, torch\nprint('a table')\ntorch.set_num_threads(1)\n"
        "print(json.dumps({'argv': sys.argv[1:], 'cwd': os.getcwd(), 'threads': torch.get_num_threads()}))\n")
    (tmp_path / "fails.py").write_text("import sys\nsys.exit(3)\n")
    threads, argv, cwd = torch.get_num_threads(), list(sys.argv), os.getcwd()
    torch.set_num_threads(2)
    try:
        result = run_all.run_here("ok.py", ["--quick"])
        assert result == {"argv": ["--json", "--quick"], "cwd": str(tmp_path), "threads": 1}
        assert torch.get_num_threads() == 2 and sys.argv == argv and os.getcwd() == cwd
        with pytest.raises(SystemExit, match=r"^fails.py failed \(3\)$"):
            run_all.run_here("fails.py", [])
        assert torch.get_num_threads() == 2 and sys.argv == argv and os.getcwd() == cwd
    finally:
        torch.set_num_threads(threads)


def test_a_benchmark_past_its_limit_is_stopped_with_the_processes_it_started(tmp_path, monkeypatch):
    """``run_all.py --script-limit``: a script still running at the limit is stopped together with a child
    process it started (which would otherwise hold the GPU through the next benchmark), and its result says
    it was stopped; one that finishes in time gives its last printed line."""
    spec = importlib.util.spec_from_file_location("bench_run_all_limit", BENCH / "run_all.py")
    run_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_all)
    monkeypatch.setattr(run_all, "HERE", tmp_path)
    child_pid = tmp_path / "child.pid"
    (tmp_path / "slow.py").write_text(
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],\n"
        "                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        f"open({str(child_pid)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(60)\n")
    (tmp_path / "fast.py").write_text("import json\nprint(json.dumps({'done': 1}))\n")
    assert run_all.run("fast.py", [], limit=30) == {"done": 1}
    assert run_all.run("slow.py", [], limit=2) == {"stopped": "after 2 s (--script-limit)"}
    pid = int(child_pid.read_text())
    for _ in range(50):  # the killed child is reaped by init shortly after
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the benchmark's child process {pid} outlived the limit")
