"""Writing results safely: every file appears whole or not at all (a temporary file beside it,
renamed into place), and destinations are checked before any work starts."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from ep_jax.errors import OutputPathError


def check_output_file(path: str | Path, flag: str) -> Path:
    """A file we will write: its folder exists and is writable, and it is not a folder."""
    p = Path(path)
    if p.is_dir():
        raise OutputPathError(f"{flag} {path} is a directory", fix="give a file name, e.g. kept.png")
    _check_parent(p, flag)
    return p


def check_output_dir(path: str | Path, flag: str) -> Path:
    """A folder we will write files into (created if missing): not a file, under a writable
    folder, writable itself when it exists."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputPathError(f"{flag} {path} is a file, not a folder", fix="give a folder name")
    if p.is_dir():
        if not os.access(p, os.W_OK):
            raise OutputPathError(f"{flag} {path} is not writable")
        return p
    _check_parent(p, flag)
    return p


def _check_parent(p: Path, flag: str) -> None:
    parent = p.parent if str(p.parent) else Path(".")
    ancestor = parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if ancestor.exists() and not ancestor.is_dir():
        raise OutputPathError(f"{flag} {p}: {ancestor} is a file, not a folder")
    if parent.exists() and not os.access(parent, os.W_OK):
        raise OutputPathError(f"{flag} {p}: the folder {parent} is not writable")
    if not parent.exists() and not os.access(ancestor, os.W_OK):
        raise OutputPathError(f"{flag} {p}: cannot create folders in {ancestor}")


@contextmanager
def atomic_path(path: str | Path):
    """Yields a temporary path beside `path`; renamed onto `path` when the block succeeds,
    removed when it fails (an error or Ctrl-C)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)
