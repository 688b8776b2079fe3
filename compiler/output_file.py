"""Writing an output file the user named with ``-o`` (or ``--json``): checked first, written
under a hidden partial name beside it, renamed into place only when complete.

The checks come before any work, so a wrong ``-o`` is refused before a long compile or
profile: a folder, a symbolic link (a user's link to an artifact must not be replaced by
a file) and a path through a file are refused in one sentence. The system's refusals
while writing (a full disk, a read-only folder, no permission) become one sentence too
(``runtime.errors.cannot_write``), and the partial file is removed, so nothing
half-written is left.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import BinaryIO, Iterator

from runtime.errors import SparseccError, cannot_write


def check_output_file(path: str | os.PathLike) -> Path:
    """Refuses an output path that cannot become a plain file; returns it as a Path."""
    path = Path(path)
    if path.is_symlink():
        raise SparseccError(f"{path} is a symbolic link; give the file itself (nothing was written).")
    if path.is_dir():
        raise SparseccError(f"{path} is a folder; give a file name (nothing was written).")
    check_parent_folders(path)
    return path


def check_parent_folders(path: Path) -> None:
    """Refuses a path through a file (``-o notes.txt/x``), which no write could create."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise SparseccError(f"cannot write {path}: {parent} is a file, not a folder (nothing was written).")
            return


def create_partial(path: Path) -> tuple[Path, int]:
    """A new hidden file ``.NAME.PID.XXXXXXXX.partial`` beside ``path``, created exclusively
    (so no file planted under that name is written through) with mode 0666 less the umask."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        partial = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.partial")
        try:
            return partial, os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file handle whose content appears at ``path`` only if the block completes.

    Raises:
        SparseccError: for an output path ``check_output_file`` refuses, or when the system
            refuses the write.
    """
    path = check_output_file(path)
    partial = None
    try:
        partial, fd = create_partial(path)
        with os.fdopen(fd, "wb") as handle:
            yield handle
        os.replace(partial, path)
    except OSError as exc:
        raise cannot_write(path, exc) from None
    finally:
        if partial is not None:
            partial.unlink(missing_ok=True)
