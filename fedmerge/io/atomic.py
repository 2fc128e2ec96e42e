"""Atomic writes: a file or a directory is either complete or absent, never half-written.

Outputs are checked before any work (:func:`check_output`): a path that cannot be written is one
``ConfigError`` line before a run trains for minutes. What still fails at write time (a full disk)
is one ``OutputError`` line, and leaves nothing behind. Files and directories get the permissions
the umask gives any new file, whichever way they were made.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from fedmerge.errors import ConfigError, OutputError


def _umask() -> int:
    """The process's umask, read without setting it where the platform allows (setting it, even
    briefly, races with other threads creating files)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _as_new_file(path: Path) -> None:
    """``mkstemp`` makes 0600 files: give it the mode ``open`` would (0666 less the umask)."""
    os.chmod(path, 0o666 & ~_umask())


def _as_new_directory(path: Path) -> None:
    """``mkdtemp`` makes 0700 directories: give it the mode ``mkdir`` would (0777 less the umask)."""
    os.chmod(path, 0o777 & ~_umask())


@contextlib.contextmanager
def writing(target: str | os.PathLike) -> Iterator[None]:
    """An ``OSError`` in the block (disk full, permissions, a path that vanished) becomes one
    ``OutputError`` line naming ``target``."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise OutputError(f"could not write {target}: {reason}; nothing was written there") from None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; once the block succeeds it replaces ``path`` in one
    rename, and on any failure (or interrupt) it is removed. Parent directories are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        _as_new_file(Path(tmp))  # after writing: some writers replace the file they were given
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a text file through a temporary file and one rename."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def staged_directory(out: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yield a staging directory beside ``out``; on success it becomes ``out`` in one rename, on any
    failure it is removed, so ``out`` is either complete or as it was. ``out`` must be absent or
    empty, unless ``replace``: then an existing ``out`` is moved aside, the new one renamed into
    place, and the old one deleted. An ``OSError`` on the way is an ``OutputError`` naming ``out``."""
    out = Path(out)
    with writing(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            _as_new_directory(staging)
            yield staging
            old = None
            if out.exists() and replace and any(out.iterdir()):
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
                os.replace(out, old / out.name)
            elif out.exists():
                out.rmdir()  # empty: callers check before any work
            os.replace(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def check_output(path: str | os.PathLike, *, directory: bool, overwrite: bool = False, resume: bool = False,
                 option: str = "--out") -> None:
    """Refuse, before any work, an output ``path`` that cannot be written: under a file, a symbolic
    link, a file where a directory goes (or the reverse), an existing file without
    ``overwrite``, a non-empty directory unless ``resume``, a place this process cannot write to
    (permissions, a read-only filesystem). One ``ConfigError`` line naming ``option`` and the path."""
    path = Path(path)

    def refuse(why: str) -> ConfigError:
        return ConfigError(f"{option} {path}: {why}")

    if path.is_symlink():  # the output replaces what is at ``path``: a link would go, not its target
        raise refuse("is a symbolic link to nothing; remove it or choose another path" if not path.exists()
                     else "is a symbolic link; give the directory or file itself")
    if path.exists():
        if directory and not path.is_dir():
            raise refuse("exists and is not a directory")
        if not directory and path.is_dir():
            raise refuse("is a directory; give a file name")
        if directory and not resume and any(path.iterdir()):
            raise refuse("already exists and is not empty; choose a new directory")
        if not directory and not overwrite:
            raise refuse("already exists; choose a new file, or overwrite it with --force")
    parent = path.parent if not path.exists() or not directory else path
    while not parent.exists():
        if parent.is_symlink():
            raise refuse(f"{parent} is a symbolic link to nothing")
        parent = parent.parent
    if not parent.is_dir():
        raise refuse(f"{parent} is a file, not a directory")
    try:  # the only sure test of "can write here": write something, as the output itself will be
        probe = tempfile.mkdtemp(prefix=".fedmerge-probe-", dir=parent)
        os.rmdir(probe)
    except OSError as exc:
        raise refuse(f"cannot write in {parent}: {exc.strerror or exc}") from None
