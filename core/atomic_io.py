"""Writes that a reader, a failure or a kill never sees half done.

A file is written to a temporary beside it and renamed into place (``atomic_write_bytes``); a directory
of files that belong together (a model repository) is changed in a hard-linked copy that takes the
original's place in one rename (``staged_directory``). What a killed writer leaves behind (temporaries,
copies) carries its process id and is removed by the next writer once that process is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

AT_FDCWD, RENAME_EXCHANGE = -100, 2  # <fcntl.h>, <linux/fs.h>


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftovers(directory: Path, pattern: str) -> list[Path]:
    """Entries of ``directory`` matching ``pattern`` (whose last '-' or '.'-separated field before the
    suffix is a pid) left by a writer that is no longer running."""
    out = []
    for p in Path(directory).glob(pattern):
        pid = p.name.removesuffix(".tmp").rsplit("-", 1)[-1].rsplit(".", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            out.append(p)
    return out


def atomic_write_bytes(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp_path)`` then rename into place: readers never see a half-written file. On a failure
    (a full disk, an exception in ``write``) the temporary is removed and ``path`` keeps its old content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in _leftovers(path.parent, f".{glob_escape(path.name)}.*.tmp"):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".{os.getpid()}.tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; artifacts are read by other processes (the server)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete temporaries that a killed writer (SIGKILL, power loss) left behind in ``directory``."""
    stale = list(Path(directory).glob(".*.tmp")) if Path(directory).is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step (renameat2 RENAME_EXCHANGE); False where the file system cannot."""
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "renameat2"):
        return False
    if libc.renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


@contextlib.contextmanager
def staged_directory(out: Path) -> Iterator[Path]:
    """Yield a copy of ``out`` to change (hard links: write files there with atomic_write_bytes, which
    replaces a file rather than editing it, or delete them); when the body succeeds, the copy takes
    ``out``'s place in one rename. A reader, or a run killed at any point, sees the old directory or the
    new one, never a mix; on an exception the copy is removed and ``out`` is untouched."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in _leftovers(out.parent, f".{glob_escape(out.name)}.staging-*"):
        shutil.rmtree(stale, ignore_errors=True)
    stage = out.parent / f".{out.name}.staging-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        if out.is_dir():
            shutil.copytree(out, stage, symlinks=True, copy_function=_link_or_copy)
        else:
            stage.mkdir()
        yield stage
        if not out.exists():
            os.rename(stage, out)
            return
        if not _exchange(stage, out):
            # no atomic exchange here: a moment without ``out``, but the old copy is kept until the new is in place
            old = out.parent / f".{out.name}.staging-old-{os.getpid()}"
            os.rename(out, old)
            os.rename(stage, out)
            stage = old
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # after an exchange: the old directory
