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
