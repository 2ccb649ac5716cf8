"""The matplotlib figures: built without pyplot, sized and drawn as asked, one legend entry and
colour per prompt; importing superdiff works without matplotlib; the demo's one bar per experiment."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageStat

from superdiff.plotting import (
    PALETTE,
    LinePanel,
    LineSeries,
    ScatterPanel,
    line_figure,
    line_panels,
    render_figure,
    scatter_figure,
    scatter_panels,
    trace_figure,
    trace_plot,
)

PROMPTS = ["red", "circle", "large"]


def recorded_trace(steps: int = 6, images: int = 2, prompts: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """A κ trace (T, N, M) and log-density trace (T + 1, N, M) with distinct, known values."""
    t = torch.arange(steps, dtype=torch.float64)[:, None, None]
    n = torch.arange(images, dtype=torch.float64)[None, :, None]
    m = torch.arange(prompts, dtype=torch.float64)[None, None, :]
    kappa = torch.softmax(torch.sin(t + 2 * n + 3 * m), dim=-1)
    log_q = torch.cat([torch.zeros(1, images, prompts), (10 * (t + 1) + n - m).cumsum(0)])
    return kappa, log_q


def hex_rgb(colour: str) -> tuple[int, int, int]:
    return tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))


def has_pixels_near(image: Image.Image, rgb: tuple[int, int, int], tolerance: int = 30) -> bool:
    """Whether some pixel of ``image`` is within ``tolerance`` of ``rgb`` in every channel."""
    pixels = torch.from_numpy(np.array(image.convert("RGB"))).reshape(-1, 3).to(torch.int32)
    return bool(((pixels - torch.tensor(rgb)).abs().max(dim=1).values <= tolerance).any())


def test_a_trace_figure_has_labelled_axes_a_legend_entry_per_prompt_and_the_trace_values():
    kappa, log_q = recorded_trace()
    fig = trace_figure(kappa, log_q, PROMPTS)
    kappa_ax, logq_ax = fig.axes
    for ax, trace in ((kappa_ax, kappa), (logq_ax, log_q)):
        assert ax.get_xlabel() == "step" and ax.get_ylabel()
        assert [t.get_text() for t in ax.get_legend().get_texts()] == PROMPTS
        lines = ax.get_lines()
        assert len(lines) == len(PROMPTS) * 2  # one line per prompt and image
        # Line j * images + s is prompt j's trace for image s, over the steps 0..T-1.
        for j in range(len(PROMPTS)):
            for s in range(2):
                line = lines[j * 2 + s]
                assert line.get_xdata().tolist() == list(range(trace.shape[0]))
                assert torch.allclose(torch.as_tensor(line.get_ydata()), trace[:, s, j])
        colours = [lines[j * 2].get_color() for j in range(len(PROMPTS))]
        assert len(set(colours)) == len(PROMPTS)  # a colour per prompt ...
        assert all(lines[j * 2 + 1].get_color() == colours[j] for j in range(len(PROMPTS)))  # ... shared by its images
        assert lines[0].get_linestyle() != lines[1].get_linestyle()  # images told apart by line style
    assert "κ" in kappa_ax.get_title() and "log" in logq_ax.get_title()
    # The figure legend names the images' line styles.
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["image 0", "image 1"]


def test_many_images_are_thin_lines_without_a_style_key_and_max_images_caps_them():
    kappa, log_q = recorded_trace(images=10)
    fig = trace_figure(kappa, log_q, PROMPTS, max_images=8)
    assert len(fig.axes[0].get_lines()) == len(PROMPTS) * 8
    assert {line.get_linestyle() for line in fig.axes[0].get_lines()} == {"-"}
    assert fig.legends == []


def test_trace_figure_rejects_prompts_that_do_not_match_the_traces():
    kappa, log_q = recorded_trace()
    with pytest.raises(ValueError, match="prompts must name each of the traces' 3 models, got 2"):
        trace_figure(kappa, log_q, PROMPTS[:2])


def test_rendered_figures_have_their_pixel_size_draw_each_colour_and_are_not_blank():
    kappa, log_q = recorded_trace()
    traces = trace_plot(kappa, log_q, PROMPTS, width=400, height=250)
    assert traces.size == (800, 250) and traces.mode == "RGB"
    assert ImageStat.Stat(traces.convert("L")).var[0] > 100
    for colour in PALETTE[:len(PROMPTS)]:
        assert has_pixels_near(traces, hex_rgb(colour))

    points = torch.tensor([[-1.0, -1.0], [1.0, 1.0], [1.5, -1.0]]).repeat_interleave(30, 0)
    groups = torch.tensor([0, 1, 2]).repeat_interleave(30)
    scatter = scatter_panels([ScatterPanel("A and B", points, groups), ScatterPanel("one colour", points)], size=200)
    assert scatter.size == (400, 224)
    assert ImageStat.Stat(scatter.convert("L")).var[0] > 100
    for colour in PALETTE[:3]:
        assert has_pixels_near(scatter, hex_rgb(colour))

    grid = line_panels(
        [(f"panel {k}", [LineSeries("x", torch.arange(5.0) * k)]) for k in range(5)], 300, 200, columns=2
    )
    assert grid.size == (600, 600)  # 5 panels, 2 columns: 3 rows, the sixth cell left empty


def test_scatter_figure_draws_each_panels_points_inside_its_limits():
    points = torch.tensor([[0.5, -0.5], [1.0, 2.0]])
    fig = scatter_figure([ScatterPanel("p", points, torch.tensor([0, 1]))], limit=3.0)
    (ax,) = fig.axes
    assert ax.get_title() == "p" and ax.get_xlim() == (-3.0, 3.0) and ax.get_ylim() == (-3.0, 3.0)
    assert torch.allclose(torch.as_tensor(ax.collections[0].get_offsets().data), points.double())


def test_line_panels_take_title_series_pairs_and_line_panels_with_axis_labels():
    series = [LineSeries("a", torch.tensor([1.0, float("nan"), 3.0])), LineSeries("b", torch.tensor([0.0, 1.0, 2.0]))]
    fig = line_figure([("pair", series), LinePanel("panel", series, ylabel="κ")])
    pair_ax, panel_ax = fig.axes
    assert pair_ax.get_title() == "pair" and pair_ax.get_xlabel() == "step"
    assert panel_ax.get_ylabel() == "κ"
    assert [t.get_text() for t in pair_ax.get_legend().get_texts()] == ["a", "b"]
    assert render_figure(fig).size == (840, 260)


def run_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_figures_render_without_importing_pyplot():
    out = run_python(
        "import sys, torch\n"
        "from superdiff.plotting import LineSeries, ScatterPanel, line_panels, scatter_panels, trace_plot\n"
        "k = torch.rand(4, 2, 2); q = torch.rand(5, 2, 2)\n"
        "images = [trace_plot(k, q, ['a', 'b']), line_panels([('t', [LineSeries('a', k[:, 0, 0])])]),\n"
        "          scatter_panels([ScatterPanel('s', torch.randn(20, 2))])]\n"
        "print([im.size for im in images], 'matplotlib.pyplot' in sys.modules, 'matplotlib.figure' in sys.modules)\n"
    )
    assert out.strip() == "[(840, 260), (420, 260), (300, 324)] False True"


def test_superdiff_imports_without_matplotlib_and_plotting_says_how_to_install_it():
    out = run_python(
        "import sys\n"
        "sys.modules['matplotlib'] = None  # as if not installed: importing it raises ImportError\n"
        "import torch, superdiff\n"
        "from superdiff.plotting import LineSeries, image_grid, line_panels, tensor_to_pil\n"
        "grid = image_grid([('row', tensor_to_pil(torch.zeros(2, 3, 8, 8)))], cell=16)  # grids stay PIL\n"
        "try:\n"
        "    line_panels([('t', [LineSeries('a', torch.zeros(3))])])\n"
        "except ImportError as exc:\n"
        "    print(grid.size, exc)\n"
    )
    assert out.startswith("(186, 18) plotting needs matplotlib") and "pip install superdiff[plot]" in out


def test_generate_plot_writes_a_matplotlib_traces_png(tmp_path):
    """The files `superdiff generate --plot` writes (cli/output.py's save_generation), from a recorded run;
    tests/test_cli_generate.py runs the command itself."""
    from types import SimpleNamespace

    from superdiff_cli.output import save_generation

    kappa, log_q = recorded_trace(steps=4, images=2, prompts=2)
    result = SimpleNamespace(images=[Image.new("RGB", (8, 8), "gray")] * 2, log_densities=log_q[-1],
                             kappa_trace=kappa, log_density_trace=log_q)
    written = save_generation(tmp_path, result, {"prompts": ["red", "circle"], "mode": "and"}, plot=True)
    assert tmp_path / "traces.png" in written
    traces = Image.open(tmp_path / "traces.png").convert("RGB")
    assert traces.size == (840, 260)  # two 420 × 260 panels: κ and log q per step
    assert ImageStat.Stat(traces.convert("L")).var[0] > 100
    assert has_pixels_near(traces, hex_rgb(PALETTE[0])) and has_pixels_near(traces, hex_rgb(PALETTE[1]))
    assert len(json.loads((tmp_path / "image_000.json").read_text())["kappa_trace"]) == 4


def test_an_experiment_bar_counts_every_step_of_every_method_and_is_off_when_quiet():
    from superdiff.zoo.experiments import experiment_bar, step_ticker

    bar = experiment_bar("AND shapes", methods=12, num_samples=300, chunk_size=125, steps=25, progress=True)
    assert bar.total == 12 * 3 * 25  # three chunks of at most 125 samples per method
    tick = step_ticker(bar)
    for step in range(5):
        assert tick(None, step, 0, {}) is None
    assert bar.n == 5
    bar.close()
    quiet = experiment_bar("OR digits", 5, 10, 250, 4, progress=False)
    assert quiet.disable and step_ticker(quiet) is None


def test_grid_labels_use_the_label_column_and_are_cut_to_fit_it():
    from PIL import Image, ImageDraw

    from superdiff.plotting import _font, image_grid

    cell, width = 40, 260
    label, long = "NOT, negative weight (uncorrected)", "a label far too long for its column, " * 3
    grid = image_grid([(label, [Image.new("RGB", (8, 8), "red")]), (long, [Image.new("RGB", (8, 8), "red")])],
                      cell=cell, label_width=width)

    def ink_right_edge(row: int) -> int:
        band = grid.crop((0, row * (cell + 2), width, row * (cell + 2) + cell)).convert("L")
        columns = [x for x in range(width) if min(band.getpixel((x, y)) for y in range(cell)) < 128]
        return max(columns)

    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    assert ink_right_edge(0) >= draw.textlength(label, font=_font())  # the whole label drawn, from x = 4
    assert ink_right_edge(1) <= width - 4  # the long one ends inside its column
