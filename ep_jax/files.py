"""Writing results safely: every file and folder appears whole or not at all (written beside
it under a temporary name, renamed into place), and destinations are checked before any work
starts. Folders (`staged_folder`: checkpoints, exports) are refused when they exist unless
overwriting, and an old folder is replaced only once the new one is complete."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from ep_jax.errors import EpJaxError, OutputPathError


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


# ------------------------------------------------------------------------------ whole folders
_FIX_OVERWRITE = "pass --overwrite (overwrite=True) to replace it, or choose another DST"
# Test hook only (tests/test_checkpoint_safety.py): seconds to wait once the output is complete
# in its temporary folder, before it is renamed into place, so that a test can interrupt there.
TEST_DELAY_ENV = "EP_JAX_TEST_WRITE_DELAY"


def check_destination(dst: Path, overwrite: bool, sources=()) -> Path:
    """Refuse a destination that cannot or must not be written, before anything is read:
    a regular file, a path under a regular file, an unwritable parent, a folder that holds a
    source, or an existing non-empty folder without `overwrite`. Returns it absolute."""
    dst = Path(dst)
    absolute = Path(os.path.abspath(dst))
    if absolute.parent == absolute:
        raise OutputPathError(f"{dst} is a filesystem root", fix="choose a folder for DST")
    for p in (absolute, *absolute.parents):
        if p.exists() and not p.is_dir():
            if p == absolute:
                raise OutputPathError(f"{dst} is a file, not a directory",
                                      fix="choose another DST (the file was left as it is)")
            raise OutputPathError(f"{dst} cannot be created: {p} is a file", fix="choose another DST")
        if p.is_dir():
            break
    for s in sources:
        if s is None:
            continue
        s = Path(os.path.abspath(s))
        if absolute in s.parents:
            raise OutputPathError(f"{dst} holds the source {s}: replacing it would delete the source",
                                  fix="choose another DST")
    if absolute.is_dir() and any(absolute.iterdir()) and not overwrite:
        raise OutputPathError(f"{dst} already exists and is not empty", fix=_FIX_OVERWRITE)
    existing = next(p for p in (absolute.parent, *absolute.parent.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputPathError(f"{dst} cannot be written: no write permission in {existing}",
                              fix="choose a DST in a folder you can write")
    return absolute


@contextlib.contextmanager
def staged_folder(dst: Path, overwrite: bool, sources=(), keep: tuple[str, ...] = ()):
    """Yield an empty temporary folder beside `dst` (`.NAME.tmp-PID`) to write the output into;
    when the block completes, rename it into place (an old `dst` is renamed aside first and
    deleted last). On any exception, Ctrl-C included, the temporary folder is removed and `dst`
    is left as it was; an OSError while writing becomes OutputPathError naming `dst`."""
    absolute = check_destination(dst, overwrite, sources)
    tmp = absolute.parent / f".{absolute.name}.tmp-{os.getpid()}"
    try:
        absolute.parent.mkdir(parents=True, exist_ok=True)
        _remove_tree(tmp)  # left by an earlier run that had this process id
        tmp.mkdir()
    except OSError as e:
        raise OutputPathError(f"{dst} cannot be written: {e.strerror or e} ({e.filename or tmp})",
                              fix="choose a DST in a folder you can write") from None
    try:
        yield tmp
        for name in keep:
            if (absolute / name).is_file() and not (tmp / name).exists():
                shutil.copyfile(absolute / name, tmp / name)
        if os.environ.get(TEST_DELAY_ENV):
            time.sleep(float(os.environ[TEST_DELAY_ENV]))
        _move_into_place(tmp, absolute)
    except BaseException as e:
        _remove_tree(tmp)
        if isinstance(e, OSError) and not isinstance(e, EpJaxError) and _is_write_error(e, tmp):
            raise OutputPathError(f"writing {dst} failed: {e.strerror or e} ({e.filename or tmp})",
                                  fix=f"{dst} was left as it was; check the free disk space") from e
        raise


def _is_write_error(e: OSError, tmp: Path) -> bool:
    return (e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)
            or str(e.filename or "").startswith(str(tmp)))


def _move_into_place(tmp: Path, dst: Path) -> None:
    """Rename the complete `tmp` to `dst`; an existing `dst` is renamed aside first and deleted
    once the new one is in place (restored if the second rename fails). Ctrl-C is held off
    meanwhile: these steps take milliseconds, and the write is complete."""
    old = dst.parent / f".{dst.name}.old-{os.getpid()}"
    with _sigint_held():
        if dst.exists() or dst.is_symlink():
            _remove_tree(old)
            os.rename(dst, old)
            try:
                os.rename(tmp, dst)
            except BaseException:
                os.rename(old, dst)
                raise
            _remove_tree(old)
        else:
            os.rename(tmp, dst)


@contextlib.contextmanager
def interrupts_after():
    """Hold a Ctrl-C (SIGINT) that arrives inside the block and raise KeyboardInterrupt when the
    block ends. For calls that wait on worker threads and turn an interrupt into something else
    (orbax: a KeyboardInterrupt in the middle of a restore comes out as a read error, or is lost
    and the program runs on). Main thread only; elsewhere signals do not arrive."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


@contextlib.contextmanager
def _sigint_held():
    """Ignore SIGINT inside the block (main thread only; elsewhere signals do not arrive)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _remove_tree(path: Path) -> None:
    """Delete a file or folder if it exists; retried briefly, as writer threads that an
    interrupt left running may still be adding files."""
    for _ in range(50):
        if path.is_symlink() or path.is_file():
            path.unlink(missing_ok=True)
        elif path.exists():
            shutil.rmtree(path, ignore_errors=True)
        if not (path.exists() or path.is_symlink()):
            return
        time.sleep(0.1)
