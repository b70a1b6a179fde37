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

Atomicity: ``write_build`` writes (and fsyncs) everything into a fresh sibling
``.<name>.staging-<random>`` directory, then publishes it with ``rename`` while holding a
``filelock`` on the sibling ``.<name>.lock``. ``rename`` within one directory is atomic,
so ``DIR`` is at any instant absent, the old complete build or the new complete build;
an old build is first renamed aside and deleted only after the new one is in place.
A failure removes the staging directory and leaves ``DIR`` as it was; a hard kill can at
worst leave a hidden staging/old sibling behind, never a half-written ``DIR``.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import secrets
import shutil
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

__all__ = ["MANIFEST", "FORMAT", "Build", "BuildIntegrityError", "write_build", "read_build"]

MANIFEST = "manifest.json"
FORMAT = "sparseforge-build/1"
_CHUNK = 1 << 20
_HEX = frozenset("0123456789abcdef")


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

    Replaces an existing build; refuses (FileExistsError) to replace anything else except an
    empty directory. Returns the absolute ``out_dir``.
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
        with FileLock(str(parent / f".{out.name}.lock")):
            _publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _make_staging(parent: Path, name: str) -> Path:
    while True:  # os.mkdir (not mkdtemp) so the published directory gets the usual umask permissions
        staging = parent / f".{name}.staging-{secrets.token_hex(8)}"
        try:
            os.mkdir(staging)
            return staging
        except FileExistsError:
            continue


def _publish(staging: Path, out: Path) -> None:
    """Move ``staging`` to ``out`` (caller holds the lock)."""
    if not os.path.lexists(out):
        os.rename(staging, out)
    elif out.is_symlink() or not out.is_dir():
        raise FileExistsError(f"out_dir '{out}' exists and is not a sparseforge build directory; "
                              f"refusing to replace it (remove it or choose another --out)")
    elif not any(out.iterdir()):
        os.rmdir(out)
        os.rename(staging, out)
    elif not _is_build(out):
        raise FileExistsError(f"out_dir '{out}' is a non-empty directory without a {FORMAT!r} {MANIFEST}; "
                              f"refusing to replace it (remove it or choose another --out)")
    else:
        old = out.parent / f".{out.name}.old-{secrets.token_hex(8)}"
        os.rename(out, old)
        try:
            os.rename(staging, out)
        except BaseException:
            os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(out.parent)


# -- reading ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Build:
    """A verified build directory: ``files`` maps relative path -> sha256 (manifest excluded)."""

    path: Path
    meta: dict
    files: dict[str, str]

    def read_bytes(self, rel: str) -> bytes:
        """Content of the listed file ``rel``, re-checked against its recorded sha256."""
        if rel not in self.files:
            raise _NotInBuildError(f"{rel!r} is not a file of build '{self.path}'; "
                                   f"it has {sorted(self.files)}")
        data = self.path.joinpath(*rel.split("/")).read_bytes()
        actual = hashlib.sha256(data).hexdigest()
        if actual != self.files[rel]:
            raise _fail(self.path, [f"{rel}: sha256 mismatch (expected {self.files[rel][:12]}, got {actual[:12]}) "
                                    f"since the build was read"])
        return data

    def read_text(self, rel: str) -> str:
        """``read_bytes(rel)`` decoded as UTF-8."""
        return self.read_bytes(rel).decode("utf-8")


def _load_manifest(path: Path) -> tuple[dict, dict[str, dict]]:
    m = path / MANIFEST
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


def read_build(path: str | os.PathLike) -> Build:
    """Read and verify the build directory at ``path``; raise BuildIntegrityError unless intact."""
    path = Path(path)
    if not os.path.lexists(path):
        raise _BuildNotFoundError(f"build directory '{path}' does not exist; {_hint(path)}")
    if not path.is_dir():
        raise _fail(path, ["it is not a directory"])
    meta, listed = _load_manifest(path)

    problems: list[str] = []
    needed_dirs = {"/".join(rel.split("/")[:i]) for rel in listed for i in range(1, rel.count("/") + 1)}
    for root, dirnames, filenames in os.walk(path):
        base = Path(root).relative_to(path).as_posix()
        prefix = "" if base == "." else base + "/"
        for d in dirnames:
            rel = prefix + d
            if rel not in needed_dirs or os.path.islink(os.path.join(root, d)):
                problems.append(f"{rel}/: unexpected directory (not in {MANIFEST})")
        dirnames[:] = [d for d in dirnames if prefix + d in needed_dirs]
        for f in filenames:
            rel = prefix + f
            if rel != MANIFEST and rel not in listed:
                problems.append(f"{rel}: unexpected file (not in {MANIFEST})")

    for rel, entry in sorted(listed.items()):
        fp = path.joinpath(*rel.split("/"))
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
    return Build(path=path, meta=meta, files={rel: e["sha256"] for rel, e in sorted(listed.items())})
