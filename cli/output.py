"""Output folders and atomic writes shared by the commands.

Files and folders are made with the modes the user's umask allows (files 0666 & ~umask, folders
0777 & ~umask), as ``open`` and ``mkdir`` make them, although each is first written under a
temporary name (``tempfile`` would make them 0600 / 0700).
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path

from .errors import BadInput, CommandFailed


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back: POSIX has no other way)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file."""
    return 0o666 & ~current_umask()


def folder_mode() -> int:
    """The mode ``os.mkdir`` would give a new folder."""
    return 0o777 & ~current_umask()


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """A new, uniquely named folder in ``parent`` with the umask's folder mode (not mkdtemp's 0700)."""
    path = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    os.chmod(path, folder_mode())
    return path


def ensure_writable_dir(path: Path, option: str) -> Path:
    """Create ``path`` if needed and check we can write into it, before any work starts."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".superdiff-write-test", delete=True)
        probe.close()
    except OSError as exc:
        raise BadInput(
            f"{option} {str(path)!r} is not a writable folder ({exc.strerror}); choose another path"
        ) from exc
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
        raise BadInput(
            f"{option} {str(out_dir)!r} already holds {len(found)} file(s) of an earlier run (e.g. {found[0].name}); "
            f"pass --overwrite to replace them, or choose another {option}"
        )
    return found


def remove_files(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def _write_all(f: "io.BufferedWriter", data: bytes) -> None:
    """Write ``data`` to the open file ``f`` (the one place an output's bytes reach the disk)."""
    f.write(data)


def atomic_write_bytes(path: Path, data: bytes, shown: Path | None = None) -> None:
    """Write to a temporary file beside ``path``, then rename: readers never see half a file.

    The file gets the umask's mode. Raises CommandFailed naming ``path`` (or ``shown``, the file it
    is staged for) where the system refuses the write (a full disk, a read-only folder); the
    temporary file is removed either way.
    """
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), file_mode())
            _write_all(f, data)
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise CommandFailed(f"could not write {shown or path} ({exc.strerror or exc})") from exc
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_generation(out_dir: Path, result: "object", settings: dict, plot: bool = False, prefix: str = "image",
                    replacing: list[Path] | tuple[Path, ...] = ()) -> list[Path]:
    """Write each image as PNG (settings in its text metadata) with a JSON sidecar, plus grid.png
    (and traces.png with ``plot``). Every file is written atomically. Returns the files written.

    All or nothing: where a write fails (a full disk) or Ctrl-C comes, the files this call had
    already written are removed, so no partial set is left, and the error names the failed file.
    ``replacing``: an earlier run's files (``--overwrite``). The new set is then written into a
    hidden folder in ``out_dir`` first and renamed into place only once complete (renames need no
    space), and the earlier files it does not replace are removed last; so a failed write leaves
    the earlier run's files as they were.
    """
    staging = make_temp_dir(out_dir, ".superdiff-generate-") if replacing else None
    written: list[Path] = []
    try:
        _write_generation(staging or out_dir, out_dir, result, settings, plot, prefix, written)
    except CommandFailed as exc:
        remove_files(written)
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
            raise CommandFailed(f"{exc}; nothing in {out_dir} was changed (the earlier run's files are kept)") from exc
        raise CommandFailed(f"{exc}; removed the {len(written)} file(s) this run had written to {out_dir}, so no "
                            f"partial set is left") from exc
    except BaseException:
        remove_files(written)
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if staging is None:
        return written
    placed = []
    for path in written:
        os.replace(path, out_dir / path.name)
        placed.append(out_dir / path.name)
    staging.rmdir()
    remove_files([p for p in replacing if p not in set(placed)])
    return placed


def _write_generation(target: Path, out_dir: Path, result: "object", settings: dict, plot: bool, prefix: str,
                      written: list[Path]) -> None:
    """The writes of save_generation into ``target`` (``out_dir`` or a folder staging for it); each
    file is appended to ``written`` once it is in place."""
    import json

    from PIL.PngImagePlugin import PngInfo

    from superdiff.plotting import image_grid, trace_plot

    def put(path: Path, data: bytes) -> None:
        staged = target / path.name
        atomic_write_bytes(staged, data, shown=path)
        written.append(staged)

    def png_bytes(image, **kwargs) -> bytes:
        buf = io.BytesIO()
        image.save(buf, format="PNG", **kwargs)
        return buf.getvalue()

    images = list(result.images)
    for i, image in enumerate(images):
        meta = {
            **settings,
            "index": i,
            "log_densities": result.log_densities[i].tolist(),
            "kappa_trace": result.kappa_trace[:, i].tolist(),
            "log_density_trace": result.log_density_trace[:, i].tolist(),
        }
        # An expression's per-node weights and, with particles, the image's weight and its group's ESS.
        if getattr(result, "log_weights", None) is not None:
            meta["log_weight"] = float(result.log_weights[i])
        if getattr(result, "ess_trace", None) is not None:
            meta["ess_trace"] = result.ess_trace[:, i].tolist()
            meta["resample_count"] = int(result.resample_counts[i])
        nodes = getattr(result, "node_weight_trace", None)
        if nodes is not None:
            meta["node_weight_trace"] = [w[:, i].tolist() for w in nodes]
        info = PngInfo()
        info.add_text("superdiff", json.dumps(settings | {"index": i}))
        put(out_dir / f"{prefix}_{i:03d}.png", png_bytes(image, pnginfo=info))
        put(out_dir / f"{prefix}_{i:03d}.json", (json.dumps(meta) + "\n").encode("utf-8"))
    grid = image_grid(
        [(settings.get("mode", ""), images)], cell=max(64, images[0].width) if images else 64, label_width=60
    )
    put(out_dir / "grid.png", png_bytes(grid))
    if plot:
        fig = trace_plot(result.kappa_trace, result.log_density_trace, [str(n) for n in settings.get("prompts", [])])
        put(out_dir / "traces.png", png_bytes(fig))
