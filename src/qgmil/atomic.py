"""Atomic file writes: write a temporary file beside the target, then rename it over the target.

A crash or an error never leaves a half-written file that looks complete, and an existing file is only
replaced by a complete new one. A write that fails for the file system's reasons (no space left, read-only,
no permission) raises OSError naming the target (not the temporary file), also where the writing library
reported it in its own words (h5py, safetensors): `os_error`. Kept free of heavy imports (the slide and heatmap
modules use it).
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

# mkstemp makes 0600 files; finished files get the usual permissions (0666 less the umask), read once here
# because reading the umask means setting it.
_UMASK = os.umask(0)
os.umask(_UMASK)


# How libraries that do not raise OSError report one: h5py ("errno = 28, error message = ..."), Rust's std::io
# errors inside safetensors' SafetensorError ("... (os error 28)" as displayed, "Os { code: 28, ... }" as debugged).
_ERRNO_IN_TEXT = re.compile(r"errno = (\d+)|Os \{ code: (\d+)|\(os error (\d+)\)")


def os_error(err: BaseException, path: str | Path | None = None) -> OSError | None:
    """`err` as an OSError naming `path` (when given) if it is one, or wraps one in its message; else None."""
    code = getattr(err, "errno", None) if isinstance(err, OSError) else None
    if code is None:
        found = _ERRNO_IN_TEXT.search(str(err))
        code = int(next(g for g in found.groups() if g)) if found else None
    if code is None:
        return err if isinstance(err, OSError) and path is None else None
    filename = str(path) if path is not None else getattr(err, "filename", None)
    return OSError(code, os.strerror(code), filename) if filename else OSError(code, os.strerror(code))


def atomic_write(path: str | Path, write: Callable[[str], object]) -> Path:
    """Call `write(tmp_path)`, then rename the temporary file onto `path`; on any error remove it. A failure
    of the file system (ENOSPC, EROFS, ...) is raised as OSError naming `path`."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except Exception as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        # Named after the target when it is about the temporary file or its folder (or names no file); an error
        # about another file (an input the writer reads) keeps its own name.
        about = getattr(err, "filename", None)
        ours = about is None or Path(about) == path.parent or Path(about).parent == path.parent
        named = os_error(err, path) if ours else None
        if named is None or isinstance(err, FileNotFoundError):
            raise
        raise named from err
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_create_text(path: str | Path, text: str) -> bool:
    """Write `path` only if it does not exist yet, atomically: False (and nothing written) when it existed.

    Two processes creating the same file at once: exactly one succeeds. The complete temporary file is
    hard-linked into place (linking fails when the name is taken), so a reader never sees it half written;
    on a file system without hard links it is created exclusively and then written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_UMASK)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: exclusive creation, then the text
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(text)
        return True
    finally:
        Path(tmp).unlink(missing_ok=True)


def leftovers(path: str | Path) -> list[Path]:
    """Temporary files `atomic_write(path, ...)` left behind when its process was killed mid-write.

    Only the process that owns `path` (e.g. holds its lock) should remove them: another one may be writing.
    """
    path = Path(path)
    # mkstemp's random part has no dot, so `.a.h5.<x>.tmp` never matches the temporaries of `a.h5.h5`.
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[^.]+\.tmp")
    if not path.parent.is_dir():
        return []
    return sorted(p for p in path.parent.iterdir() if pattern.fullmatch(p.name))
