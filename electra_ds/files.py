"""Writing files so that an interruption never leaves a half-written one: a temporary name, then a rename.

Data is flushed to disk (fsync) before the rename and the rename itself after, so a power loss cannot leave the new
name pointing at unwritten blocks either. Every temporary name here matches `TEMP_GLOB` (a dot, the target's name,
".tmp"), so what a killed process left behind can be found and removed (`remove_stale_temps`)."""
from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

TEMP_GLOB = ".*.tmp*"


@contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; on success it replaces `path` in one rename, on error it
    is removed and `path` keeps its previous content. The parent directory is created if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp{path.suffix}")
    try:
        yield tmp
        sync_tree(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, data: str | bytes | memoryview) -> None:
    """Write `data` (text as UTF-8) to `path` through a temporary file and a rename."""
    with replacing(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)


@contextmanager
def replacing_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory beside `path` to fill; on success it takes the place of `path` (an
    existing one is moved aside first and removed after), on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        move_into_place(tmp, path, path.with_name(f".{path.name}.{os.getpid()}.tmp.old"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def move_into_place(src: str | os.PathLike, dst: str | os.PathLike, aside: str | os.PathLike) -> None:
    """Rename the directory `src` to `dst`. An existing `dst` is renamed to `aside` first and removed after, so a
    kill in between leaves `src` complete and `dst` missing, never a mix of the two."""
    sync_tree(src)
    if os.path.exists(dst):
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(dst, aside)
        os.replace(src, dst)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(src, dst)
    _fsync(Path(dst).parent)


def _fsync(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not os.path.isdir(path):
            raise  # a file's data must reach the disk; some filesystems cannot sync a directory, which is fine
    finally:
        os.close(fd)


def sync_tree(path: str | os.PathLike) -> None:
    """Flush a file, or every file and directory under a directory, to disk."""
    path = Path(path)
    if path.is_dir():
        for sub in path.rglob("*"):
            if not sub.is_symlink():
                _fsync(sub)
    _fsync(path)


def remove_stale_temps(directory: str | os.PathLike) -> int:
    """Remove the temporary files and directories that interrupted writes left in `directory`; returns how many."""
    stale = list(Path(directory).glob(TEMP_GLOB))
    for path in stale:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return len(stale)
