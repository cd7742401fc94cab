"""Atomic output files: written to a temporary file in the same folder, then renamed into place,
so that an interrupted run never leaves a half-written trace, JSON or figure behind."""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from .errors import InputError


def atomic_write(path: str | os.PathLike[str], data: bytes, *, what: str = "the file") -> Path:
    """Write `data` to `path` atomically. Raises `InputError` (naming the fix) when it cannot."""
    path = Path(path)
    if not path.parent.is_dir():
        raise InputError(f"cannot save {what} to {path}: the folder {path.parent} does not exist; "
                         "create it first or choose another path")
    temporary = None
    try:
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        os.replace(temporary, path)
    except BaseException as exc:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise InputError(f"cannot save {what} to {path}: {exc.strerror or exc}; check free space "
                             "and permissions, or choose another path") from exc
        raise
    return path


def check_writable(folder: str | os.PathLike[str], option: str = "-o") -> None:
    """Raise `InputError` unless a file can be created in the existing `folder`, before any work: found
    by creating (and removing) an empty temporary file, which catches what permission bits do not
    (a read-only file system; root ignores the bits, but not that)."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".sparsetrace-write-check-", suffix=".tmp")
    except OSError as exc:
        raise InputError(f"cannot write to the folder {folder}: {exc.strerror or exc}; choose another {option} path "
                         "or make the folder writable") from exc
    os.close(fd)
    os.unlink(probe)


def write_json(path: str | os.PathLike[str], value: Any) -> Path:
    return atomic_write(path, (json.dumps(value, indent=1) + "\n").encode(), what="the JSON")


def save_figure(figure, path: str | os.PathLike[str], dpi: int = 130) -> Path:
    """Render a matplotlib Figure to PNG and write it atomically, without importing pyplot (`plots`
    builds figures no backend holds); a figure the caller made with pyplot is closed there."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close(figure)
    return atomic_write(path, buffer.getvalue(), what="the figure")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
