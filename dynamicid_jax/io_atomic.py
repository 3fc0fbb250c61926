"""The one way this project writes files: atomically, with the modes a normal tool would give them.

Every output goes to a temporary name in the destination's folder, is flushed to disk (``fsync``) and then renamed
over the destination (``os.replace``, atomic on POSIX): a reader sees the old file or the new one, never half of
one, and an interrupted or failed write leaves nothing at the destination. ``tempfile`` creates its files 0600
and its folders 0700; before the rename the mode is set to what ``open()`` / ``mkdir`` would have given under the
current umask (``0o666 & ~umask`` for files, ``0o777 & ~umask`` for folders), so colleagues sharing a data folder
can read what we wrote.

    with atomic_path("out.png") as tmp:       # any writer that takes a path
        image.save(tmp, format="PNG")
    write_json({"a": 1}, "summary.json")      # or write_bytes / write_text
    with atomic_folder("converted") as tmp:   # a whole folder appears complete or not at all
        ...

:func:`check_writable` checks an output location before long work starts (issue: outputs checked only after
minutes of sampling).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Callable, Iterator

__all__ = ["atomic_folder", "atomic_path", "check_writable", "current_umask", "dir_mode", "file_mode",
           "fix_tree_modes", "write_bytes", "write_json", "write_text"]


def current_umask() -> int:
    """The process umask, read without changing it (``/proc/self/status`` on Linux; elsewhere the classic
    set-and-restore, which is not thread-safe but only runs where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: ``0o666 & ~umask``."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """The mode ``os.mkdir`` gives a new folder: ``0o777 & ~umask``."""
    return 0o777 & ~current_umask()


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: str) -> None:
    try:
        _fsync_path(folder)
    except OSError:  # some file systems do not allow fsync on folders; the rename is still atomic
        pass


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str | None = None, make_parents: bool = True,
                durable: bool = True) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on a clean exit it is fsynced, given :func:`file_mode` and renamed
    over ``path``; on any exception (Ctrl-C included) it is removed and ``path`` is untouched. ``durable=False``
    skips the fsyncs (the rename stays atomic for readers; only a power loss can lose the file): for data sets of
    many small files that a rerun regenerates, where an fsync per file costs ~10 ms each (SynthFace's 8,000 files:
    19 s → 100 s)."""
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    if make_parents:
        os.makedirs(folder, exist_ok=True)
    if suffix is None:
        suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, file_mode())
        if durable:
            _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    if durable:
        _fsync_dir(folder)


def write_bytes(data: bytes, path: str | os.PathLike, *, durable: bool = True) -> str:
    """Write ``data`` to ``path`` atomically; returns ``path`` (``durable``: see :func:`atomic_path`)."""
    with atomic_path(path, durable=durable) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return os.fspath(path)


def write_text(text: str, path: str | os.PathLike, encoding: str = "utf-8", *, durable: bool = True) -> str:
    return write_bytes(text.encode(encoding), path, durable=durable)


def write_json(obj: Any, path: str | os.PathLike, *, indent: int | None = 1, sort_keys: bool = False,
               default: Callable[[Any], Any] | None = None) -> str:
    """``json.dump`` to ``path`` atomically (``default`` as in :func:`json.dump`, e.g. ``float`` for NumPy
    scalars). The JSON is serialised before anything is written, so an unserialisable object leaves no file."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, default=default)
    return write_text(text, path)


def fix_tree_modes(folder: str) -> None:
    """Give ``folder`` and every folder / file under it the umask's modes (files keep their execute bits off)."""
    dmode, fmode = dir_mode(), file_mode()
    os.chmod(folder, dmode)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), dmode)
        for name in files:
            p = os.path.join(root, name)
            if not os.path.islink(p):
                os.chmod(p, fmode)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, *, replace: bool = False) -> Iterator[str]:
    """Yield a temporary folder beside ``path``; on a clean exit every mode under it follows the umask, it is
    fsynced and renamed to ``path``. ``path`` must not exist, unless ``replace=True``: then the old folder is moved
    aside only after the new one is complete, and removed after the rename (the caller decides whether the old
    folder may be replaced — see e.g. the converted-folder marker). On an exception the temporary folder is
    removed and ``path`` is untouched."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(path) and not replace:
        raise FileExistsError(f"{path} already exists")
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
    try:
        yield tmp
        fix_tree_modes(tmp)
        for root, _, files in os.walk(tmp):
            for name in files:
                _fsync_path(os.path.join(root, name))
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=".old-" + os.path.basename(path) + "-", dir=parent)
            os.replace(path, os.path.join(old, "x"))
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(parent)


def check_writable(path: str | os.PathLike, what: str = "output", *, folder: bool = False) -> str:
    """Check, before any long work, that ``path`` can be written: it is not an existing folder (for a file
    output) or file (for a folder output), and its nearest existing ancestor is a writable folder (no part of the
    path is a file). Creates nothing; returns the absolute path. Raises ``OutputPathError`` naming ``what``."""
    from dynamicid_jax.errors import OutputPathError

    p = os.path.abspath(os.fspath(path))
    if folder:
        if os.path.exists(p) and not os.path.isdir(p):
            raise OutputPathError(f"{what} {os.fspath(path)!r} is an existing file; expected a folder path")
    elif os.path.isdir(p):
        raise OutputPathError(f"{what} {os.fspath(path)!r} is a folder; expected a file path such as "
                              f"{os.path.join(os.fspath(path), 'out.png')!r}")
    ancestor = os.path.dirname(p) if not os.path.isdir(p) else p
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise OutputPathError(f"{what} {os.fspath(path)!r} lies under {ancestor!r}, which is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputPathError(f"{what} {os.fspath(path)!r}: the folder {ancestor!r} is not writable")
    return p


def check_readable(path: str | os.PathLike, what: str = "input") -> None:
    """Raise a ``PermissionError`` naming ``what`` when ``path`` (or a folder above it) exists but this user may
    not read it — so an unreadable folder is reported as unreadable, not as "missing" or "malformed"."""
    p = os.path.abspath(os.fspath(path))
    probe = p
    while probe and not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            return
        probe = parent
    if probe != p:  # the path is hidden: a folder above it cannot be searched, or it does not exist
        if os.path.isdir(probe) and not os.access(probe, os.R_OK | os.X_OK):
            raise PermissionError(13, f"{what} {os.fspath(path)!r} is unreadable: this user may not open the folder "
                                      f"{probe!r}")
        return
    need = os.R_OK | os.X_OK if os.path.isdir(p) else os.R_OK
    if not os.access(p, need):
        raise PermissionError(13, f"{what} {os.fspath(path)!r} is unreadable for this user (mode "
                                  f"{oct(os.stat(p).st_mode & 0o777)})")
