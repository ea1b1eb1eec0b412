"""Checks of output paths, shared by the command line and the Python functions that write files
(:func:`equifast.report.build_report`, :func:`equifast.survey.export_store`): a folder that is an
existing file, or that cannot be created or written, is one clear error naming the path, before
any work is done."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

__all__ = ["check_folder", "is_dir", "os_reason", "shown_path"]


def shown_path(path: str | os.PathLike, most: int = 80) -> str:
    """``path`` for a message: a very long one (a name past the file system's limit) is cut in
    the middle, keeping its end, with its length."""
    path = str(path)
    if len(path) <= most:
        return path
    return f"{path[:most // 2]}...{path[-most // 4:]} ({len(path)} characters)"


def os_reason(error: OSError) -> str:
    """What an OSError says, without repeating the (possibly very long) path."""
    reason = error.strerror or str(error)
    if error.errno == errno.ENAMETOOLONG:
        reason += " (a name in the path is longer than the file system allows, 255 bytes on most)"
    return reason


def is_dir(path: Path, option: str, expected: str) -> bool:
    """Whether ``path`` is a folder; a path that cannot even be looked at is a ValueError naming
    ``option`` and what was ``expected``."""
    try:
        return path.is_dir()
    except OSError as error:  # a name too long, no permission to look inside a parent ...
        raise ValueError(f"{option} {shown_path(path)}: unusable path: {os_reason(error)}; "
                         f"{expected}") from None


def check_folder(folder: str | os.PathLike, option: str, given: str | os.PathLike | None = None,
                 expected: str = "expected a folder", create: bool = True) -> None:
    """Refuse an output folder that is an existing file or an unusable path, with a message
    naming ``option`` (the command-line option or the argument) as ``given`` (default
    ``folder``) and what was ``expected``. ``create`` makes the folder now and checks that a file
    can be written in it, so that one that cannot be made or written fails before any work.

    Raises:
        ValueError: the folder (or a parent) is an existing file, or it cannot be looked at,
            created or written in; the message says which and why.
    """
    folder = Path(folder)
    given = str(folder if given is None else given)
    if not is_dir(folder, option, expected):
        # the folder, or the nearest of its parents that exists, is a file
        existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():
            found = ("is an existing file" if existing == Path(given)
                     else f"cannot create the folder {shown_path(folder)!r}: "
                     + ("it" if existing == folder else repr(shown_path(existing)))
                     + " is an existing file")
            raise ValueError(f"{option} {shown_path(given)}: {found}; {expected}")
    if not create:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{option} {shown_path(given)}: cannot create the folder "
                         f"{shown_path(folder)!r}: {os_reason(error)}; {expected}") from None
    try:  # a folder that exists but takes no file (read-only folder or file system)
        handle, probe = tempfile.mkstemp(prefix=".equifast-write-check-", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise ValueError(f"{option} {shown_path(given)}: cannot write in the folder "
                         f"{shown_path(folder)!r}: {os_reason(error)}; {expected}") from None
