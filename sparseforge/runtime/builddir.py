"""Build directories: write them atomically, read them back only if intact.

``sparseforge compile ... --out DIR`` produces a build directory::

    DIR/
      manifest.json          {"format": "sparseforge-build/1", "created": ISO-8601 UTC,
                              "meta": {...caller data...},
                              "files": {"kernels/fwd.py": {"sha256": hex, "bytes": n}, ...}}
      kernels/fwd.py         every other file is listed in the manifest, with its sha256
      aot/sm_90/fwd.cubin    (subdirectories allowed)

``read_build`` accepts a directory only if the manifest is ours and every file on disk is
listed, is a regular file and has the recorded hash: nothing missing, changed or extra.

Crash safety: ``DIR`` is a symbolic link to an immutable version directory beside it,
``.<name>.v-<32 hex>``. ``write_build`` writes (and fsyncs) everything into a fresh
``.<name>.staging-<pid>-<host>-<hex>``, then, holding the ``filelock`` ``.<name>.lock``,
renames it to a new version, points a temporary link ``.<name>.link-<hex>`` at that and
``os.replace``-s the link over ``DIR``. Replacing a link by rename is atomic, so ``DIR`` is at
every instant the old complete build or the new one, whatever step a kill interrupts; a
failure removes what it wrote and leaves ``DIR`` as it was.

Readers resolve ``DIR`` once and read only from the version it names, so a concurrent
replace never pulls files from under them; should that version go mid-read they resolve
again. A superseded version is kept ``RETAIN_S`` seconds for readers in flight (its mtime
says when it was superseded). The next ``write_build`` of the same name, under the lock,
deletes older versions and what killed writers left: staging directories of processes no
longer alive on this host (any older than ``STALE_S``), temporary links, versions that
never became current.

A build written by an older sparseforge (``DIR`` a real directory) is swapped with the link
in one ``renameat2(RENAME_EXCHANGE)`` where the system has it; elsewhere it is first renamed
to ``.<name>.old-<hex>``, and should a kill come before the link takes its place, the next
reader or writer puts it back (under the lock).
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime
import errno
import functools
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import stat
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

__all__ = ["MANIFEST", "FORMAT", "Build", "BuildIntegrityError", "write_build", "read_build"]

MANIFEST = "manifest.json"
FORMAT = "sparseforge-build/1"
_CHUNK = 1 << 20
_HEX = frozenset("0123456789abcdef")
#: Seconds a superseded version stays for readers that resolved it before the replace.
RETAIN_S = 300.0
#: Seconds after which a staging directory whose writer cannot be checked is abandoned.
STALE_S = 3600.0
#: How often a reader resolves the build again when it was replaced under it.
_READ_ATTEMPTS = 20
#: The hidden siblings of build ``name``: (kind, rest of the name).
_SIBLING = r"\.(v|staging|link|old)-([0-9a-f-]+)"


class BuildIntegrityError(ValueError):
    """A build directory is missing, incomplete, modified, or has a bad manifest."""


class _BuildNotFoundError(BuildIntegrityError, FileNotFoundError):
    """The build directory does not exist (both a FileNotFoundError and a BuildIntegrityError)."""


class _NotInBuildError(KeyError):
    def __str__(self) -> str:  # KeyError would show the repr of the message
        return str(self.args[0])


def _hint(path: Path) -> str:
    return f"rebuild it with 'sparseforge compile ... --out {path}'"


def _fail(path: Path, problems: list[str]) -> BuildIntegrityError:
    shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
    return BuildIntegrityError(f"build directory '{path}' failed verification: {shown}; {_hint(path)}")


def _check_rel(rel: object) -> str | None:
    """Return why ``rel`` is not an acceptable file name in a build, or None if it is."""
    if not isinstance(rel, str):
        return f"must be a str, got {type(rel).__name__}"
    if rel == "":
        return "is empty"
    if rel.startswith("/") or (len(rel) > 1 and rel[1] == ":"):
        return "is absolute"
    if "\\" in rel or "\0" in rel:
        return "contains a backslash or NUL"
    parts = rel.split("/")
    if any(p == "" for p in parts):
        return "has an empty component"
    if any(p in (".", "..") for p in parts):
        return "contains '.' or '..'"
    if rel == MANIFEST:
        return "is reserved for the manifest"
    return None


def _sha256_file(path: Path) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    """Create ``path`` (it must not exist) with ``data`` and fsync it."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _is_build(path: Path) -> bool:
    """Whether ``path`` is a real directory holding a manifest of our format."""
    m = path / MANIFEST
    try:
        if not stat.S_ISREG(os.lstat(m).st_mode):
            return False
        doc = json.loads(m.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("format") == FORMAT


# -- writing ---------------------------------------------------------------------------------
def write_build(out_dir: str | os.PathLike, files: Mapping[str, bytes | str], meta: Mapping) -> Path:
    """Atomically write a build of ``files`` (relative POSIX path -> content) and ``meta`` to ``out_dir``.

    ``out_dir`` becomes a link to a new version directory beside it (module docstring), switched
    atomically. Replaces an existing build (ours, or an older sparseforge's real directory);
    refuses (FileExistsError) to replace anything else except an empty directory, a link of
    the user's included. Returns the absolute ``out_dir``.
    """
    if not isinstance(files, Mapping):
        raise TypeError(f"files must be a mapping of relative path -> bytes | str, got {type(files).__name__}")
    blobs: dict[str, bytes] = {}
    for rel, content in files.items():
        why = _check_rel(rel)
        if why is not None:
            raise ValueError(f"files: path {rel!r} {why}; expected a relative POSIX path like 'kernels/fwd.py'")
        if isinstance(content, str):
            content = content.encode("utf-8")
        elif isinstance(content, (bytes, bytearray, memoryview)):
            content = bytes(content)
        else:
            raise TypeError(f"files: content of {rel!r} must be bytes or str, got {type(content).__name__}")
        blobs[rel] = content
    for rel in blobs:  # "a" and "a/b" cannot both be files
        parts = rel.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in blobs:
                raise ValueError(f"files: path {rel!r} needs {'/'.join(parts[:i])!r} to be a directory, "
                                 f"but it is also listed as a file")
    if not isinstance(meta, Mapping):
        raise TypeError(f"meta must be a mapping, got {type(meta).__name__}")
    try:
        meta_json = json.loads(json.dumps(dict(meta), allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"meta must be JSON-serialisable: {e}") from None

    out = Path(os.path.abspath(out_dir))
    if out.name in ("", ".", ".."):
        raise ValueError(f"out_dir {str(out_dir)!r} does not name a directory")
    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)

    manifest = {
        "format": FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "meta": meta_json,
        "files": {rel: {"sha256": hashlib.sha256(b).hexdigest(), "bytes": len(b)} for rel, b in sorted(blobs.items())},
    }
    staging = _make_staging(parent, out.name)
    try:
        dirs = {staging}
        for rel, data in sorted(blobs.items()):
            target = staging.joinpath(*rel.split("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            dirs.add(target.parent)
            _write_file(target, data)
        _write_file(staging / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8"))
        for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
            _fsync_dir(d)
        with _lock(out):
            _publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _make_staging(parent: Path, name: str) -> Path:
    """A fresh ``.<name>.staging-<pid>-<host>-<hex>``: the pid and host say whose it is, so a
    later write can tell one left by a killed process from one still being written."""
    while True:  # os.mkdir (not mkdtemp) so the published directory gets the usual umask permissions
        staging = parent / f".{name}.staging-{os.getpid()}-{_host_tag()}-{secrets.token_hex(8)}"
        try:
            os.mkdir(staging)
            return staging
        except FileExistsError:
            continue


@functools.lru_cache(maxsize=None)
def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode("utf-8", "surrogateescape")).hexdigest()[:8]


def _lock(out: Path) -> FileLock:
    return FileLock(str(out.parent / f".{out.name}.lock"))


def _siblings(out: Path) -> list[tuple[str, str, Path]]:
    """(kind, rest, path) of the hidden siblings of ``out`` that builds of its name make."""
    pattern = re.compile(r"\." + re.escape(out.name) + _SIBLING)
    found = []
    try:
        entries = list(os.scandir(out.parent))
    except OSError:
        return []
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m:
            found.append((m[1], m[2], Path(entry.path)))
    return found


def _is_version_name(name: str, target: str) -> bool:
    """Whether the link text ``target`` names a version of build ``name`` (one of our links)."""
    return re.fullmatch(rf"\.{re.escape(name)}\.v-[0-9a-f]{{32}}", target) is not None


def _current_version(out: Path) -> str | None:
    """The version ``out`` links to when it is one of our links, else None."""
    try:
        target = os.readlink(out)
    except OSError:
        return None
    return target if _is_version_name(out.name, target) else None


def _refuse(out: Path, why: str) -> FileExistsError:
    return FileExistsError(f"out_dir '{out}' {why}; refusing to replace it (remove it or choose another --out)")


def _publish(staging: Path, out: Path) -> None:
    """Make ``staging`` the build at ``out`` (caller holds the lock): ``out`` is at every
    instant the old build or the new one."""
    _recover(out)
    try:
        st = os.lstat(out)
    except FileNotFoundError:
        st = None
    current = None
    if st is None:
        kind = "absent"
    elif stat.S_ISLNK(st.st_mode):
        current = _current_version(out)
        if current is None:  # a link of the user's: never replaced
            raise _refuse(out, "exists and is not a sparseforge build directory")
        kind = "link"
    elif not stat.S_ISDIR(st.st_mode):
        raise _refuse(out, "exists and is not a sparseforge build directory")
    elif not any(out.iterdir()):
        kind = "empty"
    elif not _is_build(out):
        raise _refuse(out, f"is a non-empty directory without a {FORMAT!r} {MANIFEST}")
    else:
        kind = "legacy"  # a real directory holding a build of an older sparseforge

    version = out.parent / f".{out.name}.v-{secrets.token_hex(16)}"
    os.rename(staging, version)
    aside = None
    try:
        link = out.parent / f".{out.name}.link-{secrets.token_hex(8)}"
        os.symlink(version.name, link)
        try:
            if kind == "link":
                _touch(out.parent / current)  # superseded now: kept RETAIN_S for readers in flight
                os.replace(link, out)
            elif kind == "legacy":
                aside = _swap_legacy(link, out)
            else:
                if kind == "empty":
                    os.rmdir(out)
                os.replace(link, out)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(link)
            raise
    except BaseException:
        shutil.rmtree(version, ignore_errors=True)
        raise
    _fsync_dir(out.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    _prune(out)


def _swap_legacy(link: Path, out: Path) -> Path:
    """Put ``link`` in the place of the real directory ``out``; returns where the old
    directory went. Atomic where ``renameat2(RENAME_EXCHANGE)`` is; elsewhere a kill between
    the two renames leaves ``.<name>.old-<hex>``, which ``_recover`` puts back."""
    if _exchange(link, out):
        return link  # the old directory now has the link's name
    aside = out.parent / f".{out.name}.old-{secrets.token_hex(8)}"
    os.rename(out, aside)
    try:
        os.replace(link, out)
    except BaseException:
        os.rename(aside, out)
        raise
    return aside


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


@functools.lru_cache(maxsize=None)
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Swap the entries ``a`` and ``b`` atomically (Linux ``renameat2(RENAME_EXCHANGE)``);
    False, changing nothing, where the system or filesystem cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), os.fspath(b))


def _touch(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.utime(path)


def _recover(out: Path) -> None:
    """Caller holds the lock. Where a kill came between renaming an older sparseforge's
    build directory aside and linking ``out``, put the directory back."""
    if os.path.lexists(out):
        return
    olds = [p for kind, _, p in _siblings(out) if kind == "old" and _is_build(p)]
    if olds:
        newest = max(olds, key=lambda p: p.stat().st_mtime)
        os.rename(newest, out)
        _fsync_dir(out.parent)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def _prune(out: Path) -> None:
    """Caller holds the lock, ``out`` is in place. Delete versions superseded more than
    ``RETAIN_S`` ago (or never current), staging directories of dead writers, temporary links
    and directories renamed aside. Best effort: what cannot be deleted now is left for later."""
    now, current = time.time(), _current_version(out)
    for kind, rest, path in _siblings(out):
        try:
            age = now - os.lstat(path).st_mtime
            if kind == "v":
                if path.name == current or len(rest) != 32 or age <= RETAIN_S:
                    continue
            elif kind == "staging":
                owner = re.fullmatch(r"(\d+)-([0-9a-f]{8})-[0-9a-f]{16}", rest)
                dead = owner is not None and owner[2] == _host_tag() and not _pid_alive(int(owner[1]))
                if not dead and age <= STALE_S:
                    continue
            if path.is_symlink() or not path.is_dir():
                os.unlink(path)
            else:
                shutil.rmtree(path)
        except OSError:
            continue


# -- reading ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Build:
    """A verified build directory: ``files`` maps relative path -> sha256 (manifest excluded).

    ``path`` is the directory as given (what messages name); ``root`` the directory read, the
    version ``path`` linked to when it was read (``path`` itself when None is given)."""

    path: Path
    meta: dict
    files: dict[str, str]
    root: Path | None = None

    def __post_init__(self) -> None:
        if self.root is None:
            object.__setattr__(self, "root", self.path)

    def read_bytes(self, rel: str) -> bytes:
        """Content of the listed file ``rel``, re-checked against its recorded sha256."""
        if rel not in self.files:
            raise _NotInBuildError(f"{rel!r} is not a file of build '{self.path}'; "
                                   f"it has {sorted(self.files)}")
        parts = rel.split("/")
        try:
            data = self.root.joinpath(*parts).read_bytes()
        except FileNotFoundError:
            data = None
        if data is not None and hashlib.sha256(data).hexdigest() == self.files[rel]:
            return data
        root_now = Path(os.path.realpath(self.root))
        now = Path(os.path.realpath(self.path))
        if now != root_now or root_now != self.root:  # replaced since read (and the version read pruned)
            try:
                again = now.joinpath(*parts).read_bytes()
            except OSError:
                again = None
            if again is not None and hashlib.sha256(again).hexdigest() == self.files[rel]:
                return again  # the build there now has the very same file
            raise BuildIntegrityError(f"build directory '{self.path}' was replaced since it was read ({rel} "
                                      f"differs or is gone); read it again (sparseforge.load)")
        if data is None:
            raise _fail(self.path, [f"{rel}: missing since the build was read"])
        actual = hashlib.sha256(data).hexdigest()
        raise _fail(self.path, [f"{rel}: sha256 mismatch (expected {self.files[rel][:12]}, got {actual[:12]}) "
                                f"since the build was read"])

    def read_text(self, rel: str) -> str:
        """``read_bytes(rel)`` decoded as UTF-8."""
        return self.read_bytes(rel).decode("utf-8")


def _load_manifest(path: Path, root: Path) -> tuple[dict, dict[str, dict]]:
    m = root / MANIFEST
    try:
        st = os.lstat(m)
    except FileNotFoundError:
        raise _fail(path, [f"{MANIFEST} is missing"]) from None
    if not stat.S_ISREG(st.st_mode):
        raise _fail(path, [f"{MANIFEST} is not a regular file"])
    try:
        doc = json.loads(m.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(path, [f"{MANIFEST} is not valid JSON ({e})"]) from None
    if not isinstance(doc, dict):
        raise _fail(path, [f"{MANIFEST} is not a JSON object"])
    if doc.get("format") != FORMAT:
        raise _fail(path, [f"{MANIFEST} has unknown format {doc.get('format')!r} (expected {FORMAT!r})"])
    meta, listed = doc.get("meta"), doc.get("files")
    if not isinstance(meta, dict):
        raise _fail(path, [f"{MANIFEST}: 'meta' is not an object"])
    if not isinstance(listed, dict):
        raise _fail(path, [f"{MANIFEST}: 'files' is not an object"])
    for rel, entry in listed.items():
        why = _check_rel(rel)
        if why is not None:
            raise _fail(path, [f"{MANIFEST} lists an invalid path {rel!r} ({why})"])
        ok = (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and len(entry["sha256"]) == 64
              and set(entry["sha256"]) <= _HEX and type(entry.get("bytes")) is int and entry["bytes"] >= 0)
        if not ok:
            raise _fail(path, [f"{MANIFEST}: entry for {rel!r} is not {{'sha256': hex, 'bytes': int}}"])
    return meta, listed


def _verify(path: Path, root: Path) -> tuple[dict, dict[str, dict]]:
    """Verify the build in directory ``root`` (messages name ``path``)."""
    if not root.is_dir():
        raise _fail(path, ["it is not a directory"])
    meta, listed = _load_manifest(path, root)

    problems: list[str] = []
    needed_dirs = {"/".join(rel.split("/")[:i]) for rel in listed for i in range(1, rel.count("/") + 1)}
    for dirpath, dirnames, filenames in os.walk(root, onerror=_raise):
        base = Path(dirpath).relative_to(root).as_posix()
        prefix = "" if base == "." else base + "/"
        for d in dirnames:
            rel = prefix + d
            if rel not in needed_dirs or os.path.islink(os.path.join(dirpath, d)):
                problems.append(f"{rel}/: unexpected directory (not in {MANIFEST})")
        dirnames[:] = [d for d in dirnames if prefix + d in needed_dirs]
        for f in filenames:
            rel = prefix + f
            if rel != MANIFEST and rel not in listed:
                problems.append(f"{rel}: unexpected file (not in {MANIFEST})")

    for rel, entry in sorted(listed.items()):
        fp = root.joinpath(*rel.split("/"))
        try:
            st = os.lstat(fp)
        except (FileNotFoundError, NotADirectoryError):
            problems.append(f"{rel}: missing")
            continue
        if not stat.S_ISREG(st.st_mode):
            problems.append(f"{rel}: not a regular file")
            continue
        actual, n = _sha256_file(fp)
        if actual != entry["sha256"]:
            problems.append(f"{rel}: sha256 mismatch (expected {entry['sha256'][:12]}, got {actual[:12]}; "
                            f"{entry['bytes']} bytes recorded, {n} on disk)")
    if problems:
        raise _fail(path, problems)
    return meta, listed


def _raise(exc: OSError) -> None:
    raise exc


def _resolve(path: Path) -> Path:
    """The directory ``path`` names now (following links once, all the way), or
    ``_BuildNotFoundError``. A build an interrupted older-format replace left renamed
    aside is put back first (under the lock)."""
    if not os.path.lexists(path):
        out = Path(os.path.abspath(path))
        if any(kind == "old" for kind, _, _ in _siblings(out)):
            with contextlib.suppress(OSError), _lock(out):  # the writer holds it until done
                _recover(out)
        if not os.path.lexists(path):
            raise _BuildNotFoundError(f"build directory '{path}' does not exist; {_hint(path)}")
    return Path(os.path.realpath(path))


def read_build(path: str | os.PathLike) -> Build:
    """Read and verify the build directory at ``path``; raise BuildIntegrityError unless intact.

    Safe against a concurrent ``write_build`` to ``path``: the result is the old build or the
    new one, complete, never a mixture and never an error caused by the replace."""
    path = Path(path)
    for attempt in range(_READ_ATTEMPTS):
        root = _resolve(path)
        try:
            meta, listed = _verify(path, root)
        except (BuildIntegrityError, OSError) as exc:
            replaced = Path(os.path.realpath(path)) != root or not os.path.lexists(path)
            if replaced and attempt + 1 < _READ_ATTEMPTS:
                continue  # the version read was replaced and pruned under us: read the new one
            if isinstance(exc, BuildIntegrityError):
                raise
            raise _fail(path, [f"it could not be read ({exc})"]) from None
        return Build(path=path, meta=meta, files={rel: e["sha256"] for rel, e in sorted(listed.items())}, root=root)
    raise AssertionError("unreachable")  # pragma: no cover
