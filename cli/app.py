"""``superdiff app``: an interactive composition studio in the browser (gradio, the ``app`` extra).

The model is loaded once, when the command starts. Each Generate runs the pipeline in a worker
thread; its ``callback_on_step_end`` pushes every step's κ and log-densities into a queue, and the
gradio handler (a generator) drains that queue, yielding the κ / log-density figure as sampling
goes, then the images and the same PNG + JSON sidecar files ``superdiff generate`` writes
(:func:`~superdiff_cli.output.save_generation`). Runs queue one at a time (gradio's queue), so two
tabs never share the pipeline and never see each other's outputs. Stop, and a closed browser tab
(gradio then closes the generator), set the pipeline's interrupt through the step callback.
Where it serves, and for whom (the address checked before loading, ``--auth``, the warning for a
network host), is :mod:`~superdiff_cli.serving`.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import tempfile
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import click

from superdiff._text import escape_invisible
from superdiff.combine import MODES, Combiner, make_combiner
from superdiff.expression_syntax import parse_expression
from superdiff.expressions import compile_expression, describe
from superdiff.limits import guidance_problem
from superdiff.options import SamplerOptions

from .calls import pipeline_call_kwargs
from .composition import check_items, expression_items
from .errors import BadInput, handle_errors, recorded_warnings
from .generate import generation_settings, parse_log_weights
from .limits import images_problem, model_folder_problem, network_rows_problem, seed_problem, steps_problem
from .models import DEFAULT_ITEMS, EMBEDDED, LoadedModel, load_model, model_problem, resolve_device, resolve_dtype
from .options import app_fields, options_from_app
from .serving import Login, network_warning, parse_logins, serving_port

if TYPE_CHECKING:  # gradio and torch are imported when the app starts, not with the command group
    import torch
    from matplotlib.figure import Figure

__all__ = ["app", "Studio", "build_blocks", "launch"]

APP_INSTALL_HINT = "pip install superdiff[app]"
MAX_PROMPTS = 6  # prompt rows the form holds; Add / Remove show and hide them
MAX_FORM_IMAGES = 16  # the number-of-images slider's top (one batch; the pipeline's caps still apply)
LIVE_FRAMES = 20  # at most this many live figures per run: one every ceil(steps / LIVE_FRAMES) steps
DISPLAY_SIDE = 160  # gallery copies of small images are upscaled (nearest) to about this many pixels
logger = logging.getLogger("superdiff.app")


def require_gradio() -> Any:
    """Import gradio (the ``app`` extra), or raise BadInput (exit 2) saying how to install it."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline by default: no usage pings
    try:
        import gradio
    except ImportError as exc:
        raise BadInput(f"superdiff app needs gradio, which is not installed; install it with `{APP_INSTALL_HINT}`"
                       ) from exc
    return gradio


# --- the form's values, checked ------------------------------------------------------------------

@dataclass(frozen=True)
class Composition:
    """What to compose and how: the items (prompts, or model names for embedded-digits), the
    mode, and the combiner built from them (its temperature and log-weights checked by it).
    Filled from the prompt rows (:func:`composition_from_rows`) or from the expression box
    (:func:`composition_from_expression`: ``expression`` is then its canonical text, the items
    its leaves, the mode "expression" and the combiner the compiled expression)."""

    items: list[str]
    mode: str
    temperature: float
    log_weights: list[float] | None
    combiner: Combiner
    expression: str | None = None


@dataclass(frozen=True)
class RunRequest:
    """One Generate: a composition and the sampling options, all checked."""

    composition: Composition
    steps: int
    guidance: float | None
    seed: int
    num_images: int
    options: SamplerOptions = field(default_factory=SamplerOptions)

    @property
    def particles(self) -> int:
        return self.options.particles


def whole_number(value: Any, name: str) -> int:
    """A form number that must be whole (gradio's Number and Slider may hand over floats or None)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise BadInput(f"{name} is empty; enter a whole number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise BadInput(f"{name} {value!r} is not a number; enter a whole number") from None
    if not math.isfinite(number) or number != int(number):
        example = max(1, int(number)) if math.isfinite(number) else 1
        raise BadInput(f"{name} {value!r} is not a whole number; enter e.g. {example}")
    return int(number)


def parse_log_weights_field(text: str | None) -> list[float] | None:
    """The log-weights box: blank for none, else as ``generate --log-weights`` reads it."""
    return None if text is None or not text.strip() else parse_log_weights(text, option="log-weights")


def composition_from_rows(model: str, rows: Sequence[str], mode: str, temperature: Any,
                          log_weights: str | None) -> Composition:
    """The prompt rows as a composition, checked as ``generate`` checks its prompts: each one plain,
    non-empty text, then the combiner (mode, count, temperature, log-weights: the library's checks)."""
    what = "model name" if model == "embedded-digits" else "prompt"
    items = list(rows)
    check_items(items, what)
    weights = parse_log_weights_field(log_weights)
    if temperature is None:
        raise BadInput("temperature is empty; enter a number > 0, e.g. 1")
    combiner = make_combiner(mode, len(items), float(temperature), weights, what=f"{what}s")
    return Composition(items, mode, float(temperature), weights, combiner)


def composition_from_expression(model: str, text: str) -> Composition:
    """The expression box as a composition, checked as ``generate --expr`` checks it: the syntax
    (an error names the position), then each leaf as a prompt (the empty prompt "" allowed: the
    unconditional model) or, for embedded-digits, as a model name."""
    node = parse_expression(text)
    items = expression_items(node, model)
    return Composition(items, "expression", 1.0, None, compile_expression(node, items), describe(node))


def check_run_request(model: str, composition: Composition, steps: Any, guidance: Any, seed: Any,
                      num_images: Any, options: dict[str, Any] | None = None) -> RunRequest:
    """The sampling options against the model, read from its config files (as ``generate`` does).
    ``options``: the form's sampling option fields by name (:func:`~superdiff_cli.options.app_fields`),
    each checked by :class:`~superdiff.options.SamplerOptions`."""
    items = composition.items
    problem = model_problem(model, items)
    steps = whole_number(steps, "steps")
    seed = whole_number(seed, "seed")
    num_images = whole_number(num_images, "number of images")
    sampler = options_from_app(options or {})
    sampler = sampler.for_combiner(composition.combiner)
    particles = sampler.particles
    if steps < 1:
        problem = problem or f"steps {steps} must be at least 1"
    if num_images < 1:
        problem = problem or f"number of images {num_images} must be at least 1"
    problem = (problem or steps_problem(steps, model, items, option="steps") or seed_problem(seed, option="seed")
               or images_problem(num_images, None, None, model, items, options=("number of images", "height", "width"),
                                 particles=particles, particles_option="particles"))
    if problem:
        raise BadInput(problem)
    # embedded-digits composes unconditional models: no guidance (the form hides the slider).
    scale = None if model == "embedded-digits" or guidance is None else float(guidance)
    problem = guidance_problem(scale, float(getattr(composition.combiner, "gain", 1.0)), "guidance") or (
        network_rows_problem(model, num_images, particles, len(items), scale,
                             options=("number of images", "particles")))
    if problem:
        raise BadInput(problem)
    return RunRequest(composition, steps, scale, seed, num_images, sampler)


# --- what the worker thread tells the handler ---------------------------------------------------

@dataclass(frozen=True)
class StepFrame:
    """One finished step: κ (B, M) and the tracked log-densities (B, M) after it, on the CPU."""

    step: int
    kappa: "torch.Tensor"
    log_densities: "torch.Tensor"


@dataclass(frozen=True)
class RunFinished:
    result: Any  # SuperDiffPipelineOutput (fewer steps than asked after an interrupt)
    warnings: tuple[str, ...] = ()  # the library's warnings about the run's correctness (WeightCollapseWarning)


@dataclass(frozen=True)
class RunFailed:
    error: BaseException


@dataclass
class LiveTraces:
    """κ and log-density traces as the steps come in, shaped as the pipelines return them."""

    kappa: list["torch.Tensor"] = field(default_factory=list)
    log_densities: list["torch.Tensor"] = field(default_factory=list)

    def add(self, frame: StepFrame) -> None:
        self.kappa.append(frame.kappa)
        self.log_densities.append(frame.log_densities)

    def traces(self) -> tuple["torch.Tensor", "torch.Tensor"]:
        """κ (T, B, M) and log q (T + 1, B, M): the sampler starts every log-density at 0."""
        import torch

        kappa = torch.stack(self.kappa)
        return kappa, torch.cat([torch.zeros_like(kappa[:1]), torch.stack(self.log_densities)])


@dataclass(frozen=True)
class RunRecord:
    """How a run ended, kept by the studio (the server's own log of its runs)."""

    number: int
    session: str
    steps_asked: int
    steps_taken: int
    outcome: str  # "finished", "stopped" or "failed"


def trace_figure_for(kappa: "torch.Tensor", log_q: "torch.Tensor", items: Sequence[str], title: str) -> "Figure":
    from superdiff.plotting import trace_figure

    labels = [item if item else "(unconditional)" for item in items]  # an expression's empty prompt
    return trace_figure(kappa, log_q, labels, title=title, width=400, height=250)


def display_copy(image: Any) -> Any:
    """A gallery copy of a small image, upscaled (nearest, whole factors) so its pixels stay sharp."""
    from PIL import Image

    factor = max(1, DISPLAY_SIDE // max(image.width, image.height))
    return image if factor == 1 else image.resize((image.width * factor, image.height * factor), Image.NEAREST)


# --- the studio: one loaded model, its runs -------------------------------------------------------

class Studio:
    """The app's state: the model (loaded once), the folder runs write to, each session's stop
    signal, and a record of the runs. The gradio handlers are its methods."""

    def __init__(self, model: str, loaded: LoadedModel, dtype: "torch.dtype", device: str, out_root: Path,
                 allow_pickle: bool = False) -> None:
        self.model = model
        self.loaded = loaded
        self.dtype = dtype
        self.device = device
        self.out_root = out_root
        self.allow_pickle = allow_pickle
        self.what = "model name" if loaded.items == "models" else "prompt"
        self.runs: list[RunRecord] = []
        self._digit_stacks: dict[tuple[str, ...], LoadedModel] = {tuple(loaded.default_items): loaded}
        self._pipeline_lock = threading.Lock()  # one sampling at a time on the shared pipeline
        self._state_lock = threading.Lock()
        self._stops: dict[str, threading.Event] = {}
        self._run_count = 0

    @classmethod
    def load(cls, model: str, device: str = "auto", out_root: Path | None = None,
             allow_pickle: bool = False) -> "Studio":
        """Check ``model`` and load it (an embedded name, a diffusers folder or a cached hub id)."""
        dev = resolve_device(device)
        dtype = resolve_dtype("auto", dev)
        problem = model_folder_problem(model) or model_problem(model, None, allow_pickle)
        if problem:
            raise BadInput(problem)
        loaded = load_model(model, dtype, dev, allow_pickle, list(DEFAULT_ITEMS.get(model, ())) or None)
        root = Path(tempfile.mkdtemp(prefix="superdiff-app-")) if out_root is None else out_root
        root.mkdir(parents=True, exist_ok=True)
        return cls(model, loaded, dtype, dev, root, allow_pickle)

    # The embedded digit models are composed as a stack named by the items: one stack per set of names.
    def pipeline_for(self, items: Sequence[str]) -> LoadedModel:
        if self.loaded.items == "prompts":
            return self.loaded
        key = tuple(items)
        if key not in self._digit_stacks:
            self._digit_stacks[key] = load_model(self.model, self.dtype, self.device, self.allow_pickle, list(key))
        return self._digit_stacks[key]

    # -- Stop ------------------------------------------------------------------------------------

    def arm(self, request: Any) -> None:
        """Generate's first, unqueued handler: a fresh stop signal for this session's next run, so a
        Stop pressed while the run waits in the queue is seen when it starts."""
        with self._state_lock:
            self._stops[request.session_hash] = threading.Event()

    def stop(self, request: Any) -> None:
        """Stop this session's run after its current step (other sessions' runs go on)."""
        with self._state_lock:
            signal = self._stops.get(request.session_hash)
        if signal is not None:
            signal.set()

    def _claim_stop(self, session: str) -> tuple[threading.Event, int]:
        """This session's stop signal and the number of the run starting now."""
        with self._state_lock:
            signal = self._stops.get(session)
            if signal is None:  # a run started without arm() (e.g. through the API)
                signal = self._stops[session] = threading.Event()
            self._run_count += 1
            return signal, self._run_count

    # -- Generate --------------------------------------------------------------------------------

    def parse(self, rows: Sequence[str], mode: str, temperature: Any, log_weights: str | None, steps: Any,
              guidance: Any, seed: Any, num_images: Any, expression: str | None = None,
              options: dict[str, Any] | None = None) -> RunRequest:
        """The form as a checked request; BadInput or the library's ValueError on a mistake. A
        non-blank ``expression`` replaces the prompt rows, the mode, temperature and log-weights;
        ``options``: the sampling option fields by name."""
        if expression is not None and expression.strip():
            composition = composition_from_expression(self.model, expression)
        else:
            composition = composition_from_rows(self.model, rows, mode, temperature, log_weights)
        return check_run_request(self.model, composition, steps, guidance, seed, num_images, options)

    def run(self, rows: Sequence[str], mode: str, temperature: Any, log_weights: str | None, steps: Any,
            guidance: Any, seed: Any, num_images: Any, session: str,
            progress: Any = None, expression: str | None = None,
            options: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        """One Generate, as a generator of updates: ``status`` (text), ``plot`` (a Figure), and at
        the end ``images`` (PIL) and ``files`` (paths). ``progress(fraction, desc)``, if given, is
        told each step. Closing the generator (gradio does when the tab goes away) stops the run."""
        stop, number = self._claim_stop(session)
        try:
            try:
                request = self.parse(rows, mode, temperature, log_weights, steps, guidance, seed, num_images,
                                     expression, options)
            except click.UsageError as exc:
                yield {"status": f"Error: {exc.message}"}
                return
            except ValueError as exc:
                yield {"status": f"Error: {escape_invisible(str(exc), keep=chr(10))}"}
                return
            if stop.is_set():
                yield {"status": "Stopped before it started."}
                return
            yield from self._sample(request, session, number, stop, progress)
        finally:
            stop.set()  # a closed generator (tab gone) stops the worker at its next step

    def _sample(self, request: RunRequest, session: str, number: int, stop: threading.Event,
                progress: Any) -> Iterator[dict[str, Any]]:
        items, steps = request.composition.items, request.steps
        frames: queue.Queue = queue.Queue()
        worker = threading.Thread(target=self._work, args=(request, session, number, stop, frames),
                                  name=f"superdiff-run-{number}", daemon=True)
        yield {"status": f"Sampling {steps} steps…", "images": None, "files": None}
        worker.start()
        live = LiveTraces()
        every = max(1, math.ceil(steps / LIVE_FRAMES))
        title = request.composition.expression or request.composition.mode.upper()
        while True:
            message = frames.get()
            if not isinstance(message, StepFrame):
                break
            live.add(message)
            done = message.step + 1
            if progress is not None:
                progress(done / steps, desc=f"step {done} of {steps}")
            if not stop.is_set() and done % every == 0:
                kappa, log_q = live.traces()
                yield {"status": f"Sampling: step {done} of {steps}",
                       "plot": trace_figure_for(kappa, log_q, items, f"{title}, step {done}")}
        if isinstance(message, RunFailed):
            yield {"status": f"Error: {failure_text(message.error)}"}
            return
        result = message.result
        taken = int(result.kappa_trace.shape[0])
        figure = trace_figure_for(result.kappa_trace, result.log_density_trace, items, title)
        images = [(display_copy(image), f"image {i}") for i, image in enumerate(result.images)]
        if taken < steps:
            yield {"status": f"Stopped after {taken} of {steps} steps (the images are still noisy; nothing saved).",
                   "images": images, "plot": figure}
            return
        files = self._save(request, result, number)
        count = len(result.images)
        warned = "".join(f"\nWarning: {escape_invisible(text)}" for text in message.warnings)
        yield {"status": f"Done: {count} image{'' if count == 1 else 's'}, {steps} steps, seed {request.seed}; "
                         f"files in {files[-1].parent}{warned}",
               "images": images, "plot": figure, "files": [str(p) for p in files]}

    def _work(self, request: RunRequest, session: str, number: int, stop: threading.Event,
              frames: queue.Queue) -> None:
        """The worker thread: one pipeline call whose step callback feeds ``frames`` and turns the
        stop signal into the pipeline's interrupt; the result (or the error) goes last."""
        import torch

        def on_step(pipe: Any, step: int, timestep: Any, tensors: dict[str, torch.Tensor]) -> None:
            frames.put(StepFrame(step, tensors["kappa"].detach().to("cpu", torch.float64).clone(),
                                 tensors["log_densities"].detach().to("cpu", torch.float64).clone()))
            if stop.is_set():
                pipe._interrupt = True  # read through pipe.interrupt before the next step
            return None

        try:
            with self._pipeline_lock:  # a closed run's worker may still be finishing its step
                loaded = self.pipeline_for(request.composition.items)
                call, _ = pipeline_call_kwargs(loaded, request.composition.items, request.composition.combiner,
                                               request.steps, request.guidance, request.seed, request.num_images,
                                               options=request.options, progress=False)
                call |= dict(callback_on_step_end=on_step,
                             callback_on_step_end_tensor_inputs=["kappa", "log_densities"])
                with recorded_warnings() as warned:  # one run at a time (the lock): these are its warnings
                    result = loaded.pipeline(**call)
        except BaseException as exc:  # noqa: BLE001 - reported in the page, never a traceback there
            if not isinstance(exc, ValueError):
                logger.exception("superdiff app: run %d failed", number)
            self._record(RunRecord(number, session, request.steps, 0, "failed"))
            frames.put(RunFailed(exc))
            return
        taken = int(result.kappa_trace.shape[0])
        self._record(RunRecord(number, session, request.steps, taken, "finished" if taken == request.steps
                               else "stopped"))
        frames.put(RunFinished(result, tuple(warned)))

    def _record(self, record: RunRecord) -> None:
        with self._state_lock:
            self.runs.append(record)

    def _save(self, request: RunRequest, result: Any, number: int) -> list[Path]:
        """The run's files, as ``superdiff generate`` writes them (PNGs, JSON sidecars, grid.png,
        traces.png), in a folder of their own, and a zip of them first in the list."""
        from .output import save_generation

        composition = request.composition
        settings = generation_settings(
            model=self.model, pipeline=type(self.pipeline_for(composition.items).pipeline).__name__,
            prompts=composition.items, mode=composition.mode, expression=composition.expression,
            steps=request.steps,
            guidance=None if self.loaded.items != "prompts" else (
                self.loaded.default_guidance if request.guidance is None else request.guidance),
            temperature=composition.temperature, log_weights=composition.log_weights, seed=request.seed,
            dtype=str(self.dtype).replace("torch.", ""), device=self.device, negative_prompt=None, height=None,
            width=None, compile=None, channels_last=False, **request.options.record(),
        )
        folder = self.out_root / f"run-{number:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        files = save_generation(folder, result, settings, plot=True)
        archive = self.out_root / f"superdiff-run-{number:04d}.zip"
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
            for path in files:
                zf.write(path, f"run-{number:04d}/{path.name}")
        return [archive, *files]


def failure_text(error: BaseException) -> str:
    """A failure as one line for the page: the library's message for a ValueError (bad input),
    else the exception's type and first line (the server's log has the traceback)."""
    if isinstance(error, click.UsageError):
        return error.message
    if isinstance(error, ValueError):
        return escape_invisible(str(error), keep="\n")
    text = escape_invisible(str(error).strip().splitlines()[0]) if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


# --- the page -------------------------------------------------------------------------------------

INTRO = """# superdiff studio
Compose prompts with SuperDiff (AND / OR, or the average / sum baselines), or write an expression
(`("red" | "blue") & "circle"`, `"red" * !"circle"`), and watch **why** a composition goes where it does:
κ per prompt and each prompt's tracked log-density, for every image, as sampling runs."""


def build_blocks(studio: Studio) -> Any:
    """The gradio Blocks of the studio (not launched; see :func:`launch`)."""
    gr = require_gradio()
    loaded = studio.loaded
    unconditional = loaded.items == "models"
    what = "model" if unconditional else "prompt"
    defaults = list(loaded.default_items) or [""]
    with gr.Blocks(title="superdiff studio") as blocks:
        gr.Markdown(INTRO + f"\n\nModel: `{studio.model}`" + (
            " (unconditional digit models: compose a, b and all)" if unconditional else ""))
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                count = gr.State(len(defaults))
                rows = [
                    gr.Textbox(value=defaults[i] if i < len(defaults) else "", label=f"{what} {i + 1}",
                               visible=i < len(defaults), elem_id=f"prompt-{i + 1}", max_lines=1)
                    for i in range(MAX_PROMPTS)
                ]
                with gr.Row():
                    add = gr.Button(f"Add {what}", size="sm", elem_id="add-prompt")
                    remove = gr.Button(f"Remove {what}", size="sm", elem_id="remove-prompt")
                expression = gr.Textbox(value="", label="expression (replaces the prompts and mode when set)",
                                        placeholder='e.g. ("red" | "blue") & "circle"  or  "red" * !"circle"',
                                        elem_id="expression", max_lines=1)
                sampler = app_fields(gr)  # one field per sampling option, built from its declaration
                mode = gr.Radio(list(MODES), value="or" if unconditional else "and", label="mode", elem_id="mode")
                guidance = gr.Slider(0, 20, value=loaded.default_guidance, step=0.5, label="guidance",
                                     visible=not unconditional, elem_id="guidance")
                with gr.Row():
                    steps = gr.Number(value=50, precision=0, minimum=1, label="steps", elem_id="steps")
                    seed = gr.Number(value=0, precision=0, minimum=0, label="seed", elem_id="seed")
                num_images = gr.Slider(1, MAX_FORM_IMAGES, value=4, step=1, label="number of images",
                                       elem_id="num-images")
                with gr.Row():
                    temperature = gr.Number(value=1.0, label="temperature (OR)", elem_id="temperature")
                    log_weights = gr.Textbox(value="", label="log-weights (OR bias / AND offsets)",
                                             placeholder="e.g. 0, 1.5", elem_id="log-weights", max_lines=1)
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                status = gr.Textbox(label="status", interactive=False, elem_id="status", lines=2)
            with gr.Column(scale=2):
                gallery = gr.Gallery(label="images", columns=4, height=360, object_fit="contain", format="png",
                                     elem_id="gallery")
                plot = gr.Plot(label="κ and log-density per prompt", show_label=False, format="png",
                               elem_id="trace-plot")
                files = gr.File(label="PNGs with their JSON sidecars (and a zip of all)", file_count="multiple",
                                interactive=False, height=260, elem_id="files")

        def show_rows(n: int) -> list[Any]:
            return [n, *[gr.update(visible=i < n) for i in range(MAX_PROMPTS)]]

        add.click(lambda n: show_rows(min(n + 1, MAX_PROMPTS)), count, [count, *rows], queue=False)
        remove.click(lambda n: show_rows(max(n - 1, 1)), count, [count, *rows], queue=False)

        outputs = {"status": status, "images": gallery, "plot": plot, "files": files}

        # This module's annotations are strings (``from __future__``) naming the local ``gr``: gradio
        # finds its special arguments (the request) by their evaluated hints, so these are set here.
        def run(form: dict, request, progress=gr.Progress()):
            texts = [form[box] for box in rows[:form[count]]]
            updates = studio.run(texts, form[mode], form[temperature], form[log_weights], form[steps],
                                 form[guidance], form[seed], form[num_images], request.session_hash, progress,
                                 form[expression], {name: form[box] for name, box in sampler.items()})
            for update in updates:
                yield {outputs[k]: v for k, v in update.items()}

        def arm(request) -> str:
            studio.arm(request)
            return "Queued: waiting for the sampler"  # the last run's status goes at once

        def halt(request) -> None:
            studio.stop(request)

        for handler in (run, arm, halt):
            handler.__annotations__["request"] = gr.Request

        inputs = {count, *rows, mode, guidance, steps, seed, num_images, temperature, log_weights, expression,
                  *sampler.values()}
        generate.click(arm, None, status, queue=False).then(
            run, inputs, list(outputs.values()), show_progress_on=[gallery], concurrency_id="sample")
        stop.click(halt, None, None, queue=False)
    return blocks


def launch(blocks: Any, host: str = "127.0.0.1", port: int | None = None, block: bool = True,
           allowed: Sequence[Path] = (), auth: Sequence[Login] = ()) -> Any:
    """Serve ``blocks`` on ``host:port`` with one run at a time (gradio's queue); returns once the
    server stops, or at once with ``block=False`` (the server then runs in a thread: ``blocks.close()``).
    ``auth``: (user, password) logins gradio asks for before the page or its API answers; none, no login."""
    gr = require_gradio()
    blocks.queue(default_concurrency_limit=1)
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # no web fonts: works offline
    blocks.launch(server_name=host, server_port=port, prevent_thread_lock=not block, quiet=not block,
                  show_error=False, allowed_paths=[str(p) for p in allowed], theme=theme, footer_links=[],
                  auth=list(auth) or None)
    return blocks


@click.command()
@click.option("--model", default="embedded-shapes", show_default=True,
              help=f"A diffusers folder, a cached hub id, or one of {', '.join(EMBEDDED)}.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to serve on. Any but a loopback one (0.0.0.0: every interface) lets other machines "
                   "run jobs and download every run's files: a warning says so; see --auth.")
@click.option("--port", type=click.IntRange(1, 65535), default=None,
              help="Port to serve on [default: gradio's, 7860 or the next free one].")
@click.option("--auth", "logins", multiple=True, metavar="USER:PASSWORD",
              help="Ask for this login before the page or its API answers (repeat for more users; gradio's auth).")
@click.option("--auth-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Logins from a file, one USER:PASSWORD a line (# comments and blank lines skipped): keeps "
                   "passwords out of the shell's history and the process list.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep each run's files in DIR/run-NNNN [default: a new temporary folder].")
@click.option("--allow-pickle", is_flag=True, help="Also read non-safetensors weights (only for models you trust).")
@handle_errors
def app(model: str, host: str, port: int | None, logins: tuple[str, ...], auth_file: Path | None, device: str,
        out_dir: Path | None, allow_pickle: bool) -> None:
    """Open the composition studio in the browser: prompts, mode, guidance, steps, seed; images,
    live κ / log-density plots, and the PNG + JSON sidecar files `generate` writes.

    The model is loaded once; runs queue one at a time. Needs the app extra (`pip install superdiff[app]`).

    \b
    Examples:
      superdiff app
      superdiff app --model embedded-digits --port 7861
      superdiff app --host 0.0.0.0 --auth-file logins.txt
    """
    require_gradio()
    # The logins and the address are checked before the model loads (seconds to minutes).
    auth = parse_logins(logins, auth_file)
    from gradio.http_server import INITIAL_PORT_VALUE, TRY_NUM_PORTS

    port = serving_port(host, port, INITIAL_PORT_VALUE, TRY_NUM_PORTS)
    warning = network_warning(host, port, auth)
    if warning:
        click.echo(warning, err=True)
    studio = Studio.load(model, device, out_dir, allow_pickle)
    click.echo(f"superdiff app: {model} loaded; runs write to {studio.out_root}", err=True)
    launch(build_blocks(studio), host, port, block=True, allowed=[studio.out_root], auth=auth)
