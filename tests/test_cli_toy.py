"""`superdiff toy` end to end (small), and its answers to bad input."""

import json

from click.testing import CliRunner

from superdiff_cli.main import cli


def test_toy_writes_figure_and_metrics(tmp_path):
    result = CliRunner().invoke(cli, ["toy", "--out", str(tmp_path), "--samples", "300", "--steps", "200"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["estimator"]["median_abs_error"]) == {"100", "200", "300"}
    assert 0.35 < metrics["or"]["fraction_a"] < 0.65
    assert metrics["and"]["exact_logq_gap_median"] < 0.1 < metrics["average"]["exact_logq_gap_median"]
    assert (tmp_path / "figure2.png").stat().st_size > 1000
    assert "estimator" in result.output


def test_toy_bad_input_exits_2_without_traceback(tmp_path):
    runner = CliRunner()
    bad = runner.invoke(cli, ["toy", "--steps", "0", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "--steps" in bad.output and "Traceback" not in bad.output
    blocker = tmp_path / "file"
    blocker.write_text("x")
    unwritable = runner.invoke(cli, ["toy", "--out", str(blocker / "sub")])
    assert unwritable.exit_code == 2 and "--out" in unwritable.output


def test_the_toy_config_holds_the_sampler_options_and_records_them(tmp_path):
    """ToyConfig carries a SamplerOptions (the bare sampler's, with the posterior step variance), which the runs
    use and metrics.json records field by field."""
    from superdiff.options import SamplerOptions
    from superdiff.sampling import SAMPLER_DEFAULTS
    from superdiff.toy import ToyConfig, run_toy

    assert ToyConfig().sampler == SAMPLER_DEFAULTS.replace(variance="posterior")
    config = ToyConfig(num_samples=50, steps=20, estimator_steps=(20,),
                       sampler=SamplerOptions(variance="forward", density_variance="forward", final_denoise=False))
    metrics = run_toy(tmp_path, config)
    assert {k: metrics["config"][k] for k in SamplerOptions.names()} == config.sampler.record()
    assert (config.variance, config.density_variance) == ("forward", "forward")
