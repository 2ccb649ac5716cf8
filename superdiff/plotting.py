"""Figures: matplotlib line and scatter plots (the ``plot`` extra) and PIL image grids.

Every plot is built as a :class:`matplotlib.figure.Figure` on its own Agg canvas (matplotlib's
object API, never ``pyplot``), so no global figure state is touched and figures can be drawn from
several threads at once (a web app's workers). ``*_figure`` functions return the Figure, for
inspection or further styling; the other functions render it to a PIL image. matplotlib is
imported only when a plot is drawn: ``import superdiff`` and the image grids work without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

if TYPE_CHECKING:  # matplotlib is optional: imported lazily by _matplotlib()
    from matplotlib.figure import Figure

__all__ = [
    "ScatterPanel", "scatter_figure", "scatter_panels",
    "LineSeries", "LinePanel", "line_figure", "line_panels",
    "trace_figure", "trace_plot",
    "render_figure", "require_matplotlib", "image_grid", "tensor_to_pil",
]

# matplotlib's tab10 blue, red, green, purple, orange, brown: index 0 is blue and 1 red, as the
# toy's panel titles ("models A (blue) and B (red)") say.
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f"]
IMAGE_STYLES = ["-", "--", ":", "-."]  # one line style per image when a panel shows at most four images
DPI = 100
SCATTER_HEADER = 24  # pixels above square scatter panels for their titles
PLOT_INSTALL_HINT = "pip install superdiff[plot]"


def require_matplotlib() -> Any:
    """Import matplotlib (the ``plot`` extra), or raise an ImportError that says how to install it.

    Callers that plot after long work (``generate --plot``) can call this first to fail early.
    """
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401 - checks the Agg backend
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            f"plotting needs matplotlib, which is not installed; install it with `{PLOT_INSTALL_HINT}` "
            "(or `pip install matplotlib`)"
        ) from exc
    return matplotlib


def _new_figure(width_px: int, height_px: int) -> "Figure":
    """An empty Figure of exactly ``width_px`` × ``height_px`` pixels on its own Agg canvas."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI, layout="constrained", facecolor="white")
    FigureCanvasAgg(fig)
    return fig


def render_figure(fig: "Figure") -> Image.Image:
    """Rasterise a Figure (on its Agg canvas) to an RGB PIL image of the figure's pixel size."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())).convert("RGB")


def _grid_shape(count: int, columns: int | None) -> tuple[int, int]:
    """(rows, columns) for ``count`` panels laid out ``columns`` wide (default: one row)."""
    if columns is not None and columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    cols = max(1, min(count, columns or count))
    return -(-max(count, 1) // cols), cols


# --- scatter plots ------------------------------------------------------------------------------

@dataclass
class ScatterPanel:
    """One scatter plot: 2-D ``points`` (N, 2), coloured by the integer ``groups`` (N,) through PALETTE."""

    title: str
    points: Tensor  # (N, 2)
    groups: Tensor | None = None  # (N,) integer colour index


def scatter_figure(panels: Sequence[ScatterPanel], limit: float = 3.5, size: int = 300) -> "Figure":
    """One square scatter plot per panel, side by side, over ``[-limit, limit]²``: ``size`` pixels
    wide each, plus SCATTER_HEADER pixels of height for the titles."""
    fig = _new_figure(size * max(len(panels), 1), size + SCATTER_HEADER)
    axes = fig.subplots(1, max(len(panels), 1), squeeze=False)[0]
    for ax, panel in zip(axes, panels):
        pts = panel.points.detach().to(torch.float64).cpu()
        groups = panel.groups.cpu().long() if panel.groups is not None else torch.zeros(len(pts), dtype=torch.long)
        colours = [PALETTE[int(g) % len(PALETTE)] for g in groups.tolist()]
        ax.scatter(pts[:, 0].numpy(), pts[:, 1].numpy(), c=colours, s=3, linewidths=0, alpha=0.7, rasterized=True)
        ax.set_xlim(-limit, limit)
        ax.set_ylim(-limit, limit)
        ax.set_box_aspect(1)  # square axes over equal limits (constrained layout keeps room for the title)
        ax.axhline(0, color="0.88", lw=0.8, zorder=0)
        ax.axvline(0, color="0.88", lw=0.8, zorder=0)
        ax.set_title(panel.title, fontsize=9)
        ax.set_xlabel("$x_1$", fontsize=8, labelpad=1)
        ax.set_ylabel("$x_2$", fontsize=8, labelpad=1)
        ax.tick_params(labelsize=7)
    return fig


def scatter_panels(panels: Sequence[ScatterPanel], limit: float = 3.5, size: int = 300) -> Image.Image:
    """:func:`scatter_figure` rendered to a PIL image (``size * len(panels)`` × ``size + SCATTER_HEADER`` pixels)."""
    return render_figure(scatter_figure(panels, limit, size))


# --- line plots over the sampling steps ---------------------------------------------------------

@dataclass
class LineSeries:
    """One named quantity over the steps: ``values`` (T,), or (T, S) for S images drawn as S lines."""

    label: str
    values: Tensor  # (T,) or (T, S) several sample trajectories


@dataclass
class LinePanel:
    """One axes of line plots: a title, its series (one colour each) and the y-axis label."""

    title: str
    series: Sequence[LineSeries]
    ylabel: str = ""
    xlabel: str = "step"


def _as_panel(panel: LinePanel | tuple[str, Sequence[LineSeries]]) -> LinePanel:
    return panel if isinstance(panel, LinePanel) else LinePanel(panel[0], panel[1])


def _columns(values: Tensor) -> Tensor:
    """(T, S) float64 with non-finite values as NaN (matplotlib leaves a gap there)."""
    v = values.detach().to(torch.float64).cpu()
    v = v[:, None] if v.dim() == 1 else v.reshape(v.shape[0], -1)
    return torch.where(torch.isfinite(v), v, torch.full_like(v, float("nan")))


def _draw_lines(ax: Any, panel: LinePanel) -> None:
    """Draw each series in its own colour, its images as line styles (≤ 4) or thin lines; legend per series."""
    from matplotlib.ticker import MaxNLocator

    count = len(panel.series)
    for j, series in enumerate(panel.series):
        v = _columns(series.values)
        steps, images = v.shape
        colour = PALETTE[j % len(PALETTE)]
        x = torch.arange(steps).numpy()
        # Earlier series are drawn wider, so a series that coincides with a later one (AND equalises
        # the log-densities) still shows as a coloured edge around it.
        widen = 1.0 + 0.6 * (count - 1 - j) / max(count - 1, 1)
        for s in range(images):
            styled = images <= len(IMAGE_STYLES)
            ax.plot(
                x, v[:, s].numpy(), color=colour,
                linestyle=IMAGE_STYLES[s] if styled else "-",
                linewidth=(1.4 if styled else 0.8) * widen, alpha=1.0 if styled else 0.5,
                marker="o" if steps <= 12 and styled else None, markersize=2.5,
                label=series.label if s == 0 else "_nolegend_",
            )
    ax.set_title(panel.title, fontsize=9)
    ax.set_xlabel(panel.xlabel, fontsize=8, labelpad=1)
    if panel.ylabel:
        ax.set_ylabel(panel.ylabel, fontsize=8, labelpad=1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.tick_params(labelsize=7)
    ax.grid(True, color="0.92", linewidth=0.6)
    if panel.series:
        ax.legend(fontsize=7, loc="best", framealpha=0.8, handlelength=1.8)


def _image_style_key(fig: "Figure", panels: Sequence[LinePanel]) -> None:
    """A figure legend naming the line style of each image, where images are told apart by style."""
    from matplotlib.lines import Line2D

    counts = {_columns(s.values).shape[1] for p in panels for s in p.series}
    images = max(counts, default=1)
    if 1 < images <= len(IMAGE_STYLES):
        handles = [Line2D([], [], color="0.35", linestyle=IMAGE_STYLES[i], linewidth=1.4) for i in range(images)]
        fig.legend(handles, [f"image {i}" for i in range(images)], loc="outside lower center", ncols=images,
                   fontsize=7, frameon=False, handlelength=2.4)


def line_figure(
    panels: Sequence[LinePanel | tuple[str, Sequence[LineSeries]]],
    width: int = 420,
    height: int = 260,
    columns: int | None = None,
) -> "Figure":
    """Line plots over the steps, ``width`` × ``height`` pixels each, ``columns`` wide (default one
    row). Each series has its own colour and legend entry; a series' images (the columns of its
    values) share that colour, told apart by line style when there are at most four."""
    items = [_as_panel(p) for p in panels]
    rows, cols = _grid_shape(len(items), columns)
    fig = _new_figure(width * cols, height * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, panel in zip(axes, items):
        _draw_lines(ax, panel)
    for ax in axes[len(items):]:
        ax.set_visible(False)
    _image_style_key(fig, items)
    return fig


def line_panels(
    panels: Sequence[LinePanel | tuple[str, Sequence[LineSeries]]],
    width: int = 420,
    height: int = 260,
    columns: int | None = None,
) -> Image.Image:
    """:func:`line_figure` rendered to a PIL image; panels are ``(title, series)`` pairs or LinePanels."""
    return render_figure(line_figure(panels, width, height, columns))


def trace_figure(
    kappa_trace: Tensor,
    log_density_trace: Tensor,
    prompts: Sequence[str],
    title: str = "",
    max_images: int = 8,
    width: int = 420,
    height: int = 260,
) -> "Figure":
    """A sampling run's traces: κ per prompt (left) and each prompt's tracked log-density (right)
    over the steps, one colour per prompt, the first ``max_images`` images as lines of that colour.

    ``kappa_trace`` is (T, N, M) and ``log_density_trace`` (T + 1, N, M), as the pipelines return them.
    """
    if kappa_trace.dim() != 3 or log_density_trace.dim() != 3:
        raise ValueError(f"kappa_trace and log_density_trace must be (steps, images, prompts); got shapes "
                         f"{tuple(kappa_trace.shape)} and {tuple(log_density_trace.shape)}")
    if not (kappa_trace.shape[-1] == log_density_trace.shape[-1] == len(prompts)):
        raise ValueError(f"prompts must name each of the traces' {kappa_trace.shape[-1]} models, got {len(prompts)}: "
                         f"{list(prompts)}")
    prefix = f"{title}: " if title else ""
    kappa = [LineSeries(str(p), kappa_trace[:, :max_images, j]) for j, p in enumerate(prompts)]
    logq = [LineSeries(str(p), log_density_trace[:, :max_images, j]) for j, p in enumerate(prompts)]
    return line_figure([
        LinePanel(f"{prefix}κ per prompt", kappa, ylabel="κ"),
        LinePanel(f"{prefix}log-density per prompt", logq, ylabel="tracked log q"),
    ], width, height)


def trace_plot(kappa_trace: Tensor, log_density_trace: Tensor, prompts: Sequence[str], **kwargs: Any) -> Image.Image:
    """:func:`trace_figure` rendered to a PIL image."""
    return render_figure(trace_figure(kappa_trace, log_density_trace, prompts, **kwargs))


# --- PIL images ---------------------------------------------------------------------------------

def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def tensor_to_pil(images: Tensor) -> list[Image.Image]:
    """(N, C, H, W) in [-1, 1] -> PIL images (C = 1 or 3)."""
    arr = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    out = []
    for img in arr:
        if img.shape[0] == 1:
            out.append(Image.fromarray(img[0].numpy(), mode="L").convert("RGB"))
        else:
            out.append(Image.fromarray(img.permute(1, 2, 0).numpy(), mode="RGB"))
    return out


def _fitted(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> str:
    """``text``, or its longest prefix + "…" that is at most ``width`` pixels wide in ``font``."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def image_grid(
    rows: Sequence[tuple[str, Sequence[Image.Image]]], cell: int = 48, label_width: int = 150
) -> Image.Image:
    """Labelled rows of equally sized images, upscaled (nearest) to ``cell`` pixels; a label longer
    than ``label_width`` is cut to fit, ending in "…"."""
    cols = max((len(r[1]) for r in rows), default=1)
    image = Image.new("RGB", (label_width + cols * (cell + 2), len(rows) * (cell + 2)), "white")
    draw = ImageDraw.Draw(image)
    font = _font()
    for r, (label, imgs) in enumerate(rows):
        y = r * (cell + 2)
        draw.text((4, y + cell // 2 - 5), _fitted(draw, label, font, label_width - 8), fill="black", font=font)
        for c, img in enumerate(imgs):
            image.paste(img.resize((cell, cell), Image.NEAREST), (label_width + c * (cell + 2), y))
    return image
