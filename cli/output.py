"""Output folders and atomic writes shared by the commands."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import BadInput


def ensure_writable_dir(path: Path, option: str) -> Path:
    """Create ``path`` if needed and check we can write into it, before any work starts."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".superdiff-write-test", delete=True)
        probe.close()
    except OSError as exc:
        raise BadInput(f"{option} {str(path)!r} is not a writable folder ({exc.strerror}); choose another path") from exc
    return path


GENERATE_OUTPUTS = ("image_*.png", "image_*.json", "grid.png", "traces.png", "eval.json")


def previous_outputs(out_dir: Path) -> list[Path]:
    """Files of an earlier ``superdiff generate`` run in ``out_dir`` (its images, sidecars, grid and
    trace plot, and the eval.json scoring them); nothing else in the folder counts."""
    if not out_dir.is_dir():
        return []
    return sorted({p for pattern in GENERATE_OUTPUTS for p in out_dir.glob(pattern) if p.is_file()})


def check_fresh_dir(out_dir: Path, overwrite: bool, option: str = "--out") -> list[Path]:
    """The earlier run's files that ``overwrite`` allows replacing; without it, a folder holding any
    is bad input (a smaller run would leave the earlier run's extra images beside its own)."""
    found = previous_outputs(out_dir)
    if found and not overwrite:
        raise BadInput(f"{option} {str(out_dir)!r} already holds {len(found)} file(s) of an earlier run (e.g. {found[0].name}); "
                       f"pass --overwrite to replace them, or choose another {option}")
    return found


def remove_files(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, then rename: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_generation(out_dir: Path, result: "object", settings: dict, plot: bool = False, prefix: str = "image") -> list[Path]:
    """Write each image as PNG (settings in its text metadata) with a JSON sidecar, plus grid.png
    (and traces.png with ``plot``). Every file is written atomically. Returns the files written."""
    import io
    import json

    from PIL.PngImagePlugin import PngInfo

    from superdiff.plotting import LineSeries, image_grid, line_panels

    images = list(result.images)
    files: list[Path] = []
    for i, image in enumerate(images):
        meta = {
            **settings,
            "index": i,
            "log_densities": result.log_densities[i].tolist(),
            "kappa_trace": result.kappa_trace[:, i].tolist(),
            "log_density_trace": result.log_density_trace[:, i].tolist(),
        }
        info = PngInfo()
        info.add_text("superdiff", json.dumps(settings | {"index": i}))
        buf = io.BytesIO()
        image.save(buf, format="PNG", pnginfo=info)
        png = out_dir / f"{prefix}_{i:03d}.png"
        atomic_write_bytes(png, buf.getvalue())
        sidecar = out_dir / f"{prefix}_{i:03d}.json"
        atomic_write_text(sidecar, json.dumps(meta) + "\n")
        files += [png, sidecar]
    grid = image_grid([(settings.get("mode", ""), images)], cell=max(64, images[0].width) if images else 64, label_width=60)
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    atomic_write_bytes(out_dir / "grid.png", buf.getvalue())
    files.append(out_dir / "grid.png")
    if plot:
        names = settings.get("prompts", [])
        kappa = [LineSeries(str(n), result.kappa_trace[..., j].float()) for j, n in enumerate(names)]
        logq = [LineSeries(str(n), result.log_density_trace[..., j].float()) for j, n in enumerate(names)]
        fig = line_panels([("kappa per step", kappa), ("tracked log q per step", logq)])
        buf = io.BytesIO()
        fig.save(buf, format="PNG")
        atomic_write_bytes(out_dir / "traces.png", buf.getvalue())
        files.append(out_dir / "traces.png")
    return files
