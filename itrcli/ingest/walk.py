"""Walking directories for images, and deciding what changed since the last run.

:func:`walk` lists image files with their size and mtime (one ``stat`` each, no reads);
:func:`plan` compares that listing with what the library knows, without touching files.
Both are pure enough to test without a model.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import stat
from bisect import bisect_left
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Iterable, Mapping, NamedTuple

from ..constants import DB_NAME, HEIF_EXTENSIONS, IMAGE_EXTENSIONS  # noqa: F401 (re-exported)
from ..gcpause import gc_paused
from ..paths import long_path, under as _under
from ..records import StoredFile


class Entry(NamedTuple):
    """A file found by the walk (a named tuple: a million are made in a walk)."""

    path: str  #: absolute, not resolved (symlinks keep the name the user sees)
    size: int
    mtime_ns: int


@dataclass
class WalkResult:
    files: dict[str, Entry] = field(default_factory=dict)
    #: directories that could not be listed: nothing under them is pruned
    unlisted: list[str] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)  #: (path, reason)
    #: files of the ``count`` extensions (media this run cannot read), by extension
    passed_over: dict[str, int] = field(default_factory=dict)
    #: directories skipped, with all under them, because they hold an itr library
    libraries: list[str] = field(default_factory=list)


def is_hidden(name: str) -> bool:
    return name.startswith(".")


def extension(name: str) -> str:
    """``os.path.splitext(name)[1].lower()`` for a bare file name, in about half the time
    (a walk asks it of every file): leading dots start no extension."""
    i = name.rfind(".")
    if i <= 0 or (name[0] == "." and not name[:i].lstrip(".")):
        return ""
    return name[i:].lower()


_new_entry = tuple.__new__  # Entry(...) without the keyword-handling __new__
#: directories are opened and listed by descriptor where scandir takes one (Linux, macOS)
_LIST_BY_FD = os.scandir in os.supports_fd
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
_by_name = attrgetter("name")


def _excluded(path: str, name: str, patterns: Iterable[str]) -> bool:
    for pat in patterns:
        if fnmatch.fnmatch(name, pat) or fnmatch.fnmatch(path, pat):
            return True
    return False


def walk(
    roots: Iterable[str],
    *,
    extensions: frozenset[str],
    include_hidden: bool = False,
    exclude: Iterable[str] = (),
    follow_symlinks: bool = False,
    count: frozenset[str] = frozenset(),
) -> WalkResult:
    """List image files under ``roots`` (directories, recursively, or single files).

    Symlinked files are listed; symlinked directories are followed only with
    ``follow_symlinks``, and a directory already visited (by device and inode) is never
    entered twice, so symlink loops end.  Broken links and unreadable directories go to
    ``errors``.  A directory holding an itr library (an ``itr.db``: its thumbnails, say)
    is skipped with everything under it.  Files with an extension in ``count`` (and not in
    ``extensions``) are not listed but counted, by extension, in ``passed_over``.
    """
    with gc_paused():  # a million entries: see itrcli.gcpause
        return _walk(roots, extensions, include_hidden, list(exclude), follow_symlinks,
                     count - extensions)


def _walk(roots: Iterable[str], extensions: frozenset[str], include_hidden: bool,
          patterns: list[str], follow_symlinks: bool, count: frozenset[str]) -> WalkResult:
    res = WalkResult()
    seen_dirs: set[tuple[int, int]] = set()

    files = res.files

    for root in roots:
        root = os.path.abspath(os.path.expanduser(root))
        try:
            st = os.stat(root)
        except OSError as e:
            reason = "does not exist" if isinstance(e, FileNotFoundError) and not os.path.islink(root) else _oserror(e)
            res.errors.append((root, f"{reason} (nothing indexed under it is removed)"))
            res.unlisted.append(root)
            continue
        if stat.S_ISREG(st.st_mode):
            # a file named explicitly is taken whatever its extension says
            files[root] = Entry(root, st.st_size, st.st_mtime_ns)
            continue
        if not stat.S_ISDIR(st.st_mode):
            res.errors.append((root, "not a regular file or directory"))
            continue
        stack = [root]
        seen_dirs.add((st.st_dev, st.st_ino))
        while stack:
            d = stack.pop()
            fd = entries = None
            try:
                # listed through a descriptor, each entry's stat is an fstatat of its bare
                # name: no lookup of the whole path again (a million files: 1 s less)
                fd = os.open(d, _DIR_FLAGS) if _LIST_BY_FD else None
                with os.scandir(long_path(d) if fd is None else fd) as it:
                    entries = list(it)
            except OSError as e:
                res.errors.append((d, _oserror(e)))
                res.unlisted.append(d)
            try:
                if entries is not None:
                    _list_dir(d, entries, files, res, stack, seen_dirs, extensions,
                              include_hidden, patterns, follow_symlinks, count)
            finally:
                if fd is not None:  # the entries' stat needed it open
                    os.close(fd)
    return res


def _list_dir(d: str, entries: list[os.DirEntry], files: dict[str, Entry], res: WalkResult,
              stack: list[str], seen_dirs: set[tuple[int, int]], extensions: frozenset[str],
              include_hidden: bool, patterns: list[str], follow_symlinks: bool,
              count: frozenset[str]) -> None:
    """The entries of directory ``d`` into ``files``, its subdirectories onto ``stack``."""
    prefix = d if d.endswith(os.sep) else d + os.sep
    entries.sort(key=_by_name)
    i = bisect_left(entries, DB_NAME, key=_by_name)  # the names only: no stat
    if i < len(entries) and entries[i].name == DB_NAME:
        res.libraries.append(d)  # a library: its thumbnails are not photos
        return
    passed = res.passed_over
    # the paths made together, before the entries' own objects: the paths that are kept
    # then share memory with each other, not with what the run frees (a million files:
    # 0.4 GB that would stay taken until the process ends)
    paths = [prefix + de.name for de in entries]  # os.path.join(d, name)
    for de, path in zip(entries, paths):  # a million times in a large library: kept lean
        name = de.name
        if not include_hidden and is_hidden(name):
            continue
        if patterns and _excluded(path, name, patterns):
            continue
        try:
            if de.is_dir(follow_symlinks=follow_symlinks):
                dst = de.stat(follow_symlinks=True)
                key = (dst.st_dev, dst.st_ino)
                if key in seen_dirs:
                    continue  # a loop or a second route to the same directory
                seen_dirs.add(key)
                stack.append(path)
                continue
            ext = extension(name)
            if ext not in extensions:
                if ext in count:
                    passed[ext] = passed.get(ext, 0) + 1
                continue
            if de.is_symlink() and de.is_dir(follow_symlinks=True):
                continue  # symlinked directory, not followed
            fst = de.stat(follow_symlinks=True)
        except OSError as e:
            if extension(name) in extensions or de.is_symlink():
                res.errors.append((path, _oserror(e)))
            continue
        if stat.S_ISREG(fst.st_mode):
            files[path] = _new_entry(Entry, (path, fst.st_size, fst.st_mtime_ns))


def _oserror(e: OSError) -> str:
    if e.errno == errno.ELOOP:
        return "symlink loop"
    if isinstance(e, FileNotFoundError):
        return "broken symlink or vanished file"
    if isinstance(e, PermissionError):
        return "permission denied"
    return e.strerror or type(e).__name__


@dataclass
class Plan:
    """What an index run must do; paths only, nothing read yet."""

    unchanged: list[str] = field(default_factory=list)
    #: the library's id of each ``unchanged`` path, in the same order
    unchanged_ids: list[int] = field(default_factory=list)
    #: path in the library, size or mtime differ: hash, then re-embed if the content changed
    changed: list[str] = field(default_factory=list)
    #: not in the library: hash, then reuse a known vector (move/copy) or embed
    new: list[str] = field(default_factory=list)
    #: in the library under an indexed root but not found: removed unless they moved
    missing: list[str] = field(default_factory=list)


def left_out(path: str, root: str, *, include_hidden: bool = False,
             exclude: Iterable[str] = ()) -> bool:
    """Whether a walk of ``root`` leaves ``path`` (under it) out: a hidden name on the way
    (unless ``include_hidden``), or one matching an ``exclude`` pattern (as the walk
    matches them: the name, or the whole path)."""
    patterns = list(exclude)
    rel = os.path.relpath(path, root)
    if rel == "." or rel.startswith(".." + os.sep) or rel == "..":
        return False
    at = root
    for name in rel.split(os.sep):
        at = os.path.join(at, name)
        if (not include_hidden and is_hidden(name)) or _excluded(at, name, patterns):
            return True
    return False


def under(path: str, roots: Iterable[str]) -> bool:
    """True if ``path`` is one of ``roots`` or inside one of them (:func:`itrcli.paths.under`:
    on Windows, whatever the case and slashes)."""
    if os.name != "nt":  # the common case, a million times a run: plain string tests
        for r in roots:
            if path == r or path.startswith(r.rstrip(os.sep) + os.sep):
                return True
        return False
    return _under(path, roots)


def plan(
    found: Mapping[str, Entry],
    known: Mapping[str, StoredFile],
    roots: Iterable[str],
    unlisted: Iterable[str] = (),
) -> Plan:
    """Compare a walk with the library.  Rows under ``unlisted`` directories (which could
    not be read this time) are never reported missing."""
    with gc_paused():
        return _plan(found, known, roots, unlisted)


def _plan(found: Mapping[str, Entry], known: Mapping[str, StoredFile], roots: Iterable[str],
          unlisted: Iterable[str]) -> Plan:
    p = Plan()
    for path, e in found.items():
        k = known.get(path)
        if k is None:
            p.new.append(path)
        elif k.size == e.size and k.mtime_ns == e.mtime_ns:
            p.unchanged.append(path)
            p.unchanged_ids.append(k.id)
        else:
            p.changed.append(path)
    roots = [os.path.abspath(os.path.expanduser(r)) for r in roots]
    unlisted = list(unlisted)
    for path in known:
        if path not in found and under(path, roots) and not under(path, unlisted):
            p.missing.append(path)
    p.new.sort()
    p.changed.sort()
    p.missing.sort()
    return p
