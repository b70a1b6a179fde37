"""The persistent tuning database: which kernel config won, for which problem, where.

One SQLite file (stdlib ``sqlite3``), by default ``cache_dir() / "tuning.sqlite3"``.

Schema (version ``SCHEMA_VERSION``)::

    meta(name TEXT PRIMARY KEY, value TEXT)       -- ('schema_version', '2'), ('application', ...)
    tuning(pattern_fingerprint, problem, batch, dtype, device_name, target, fp_fusion,
           sparseforge_version, triton_version, torch_version,   -- PRIMARY KEY: all ten
           config TEXT (canonical JSON), measured INTEGER (0/1), metric REAL,
           kernel_name TEXT, created REAL (unix time), notes TEXT)

``batch`` is the batch bucket (``batch_bucket``: the batch size rounded up to a power of two,
at most ``MAX_BATCH_BUCKET``): the best config changes with the number of programs
(tiles x heads x batch) against the number of SMs. Version 1 files (no batch column) are
upgraded in place on first use, their records keyed to batch bucket 1: what they were tuned
for (the tuner timed batch 1 and its cost model assumed it). A version 1 file that cannot be
written raises an error saying so; any other schema is moved aside as below.

Concurrency: every operation opens its own connection, does one thing and closes it, so a
``TuningDB`` survives ``fork`` and many processes may share the file. Connections wait up to
60 s for a lock, use WAL where the filesystem allows it, and writes run in ``BEGIN
IMMEDIATE`` transactions (one transaction per ``put``), so concurrent writers queue instead
of failing or interleaving. Writers also hold the lock file ``<db>.lock``, the lock that
repair takes, so no write can land in a file that is being moved aside.

Corruption: on first use (and whenever SQLite reports a corrupt file) the database is checked
through a read-only connection, which leaves a bad file's ``-wal`` as it found it: ``PRAGMA
quick_check``, our ``meta`` table and schema version, the ``tuning`` columns. A bad
file is moved aside, under the lock file and after checking again (so two processes that
find the same bad file move it only once), to ``<db>.corrupt-<UTC time>[-n]`` together with
its ``-wal``/``-shm``/``-journal`` siblings; a fresh database replaces it and a
``TuningDatabaseWarning`` names both paths. An earlier moved-aside file is never overwritten.

Bad records: a row of a sound file can still be unusable (a config that is not a JSON object,
a negative metric, or one the caller's ``check`` refuses, such as a tile of 0). ``get`` and
``entries`` drop such a row (delete it, if it is unchanged) with a ``TuningDatabaseWarning``
naming the record and why, so one bad record costs a re-tune, never every compile.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sqlite3
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import filelock

from .. import envvars

__all__ = ["MAX_BATCH_BUCKET", "TuningDB", "TuningKey", "TuningRecord", "TuningDatabaseWarning", "batch_bucket",
           "default_db_path"]

SCHEMA_VERSION = 2
#: The largest batch bucket: from here on every problem has many programs per SM.
MAX_BATCH_BUCKET = 64
_APPLICATION = "sparseforge.tuning"
_TIMEOUT_S = 60.0
_SIBLINGS = ("-wal", "-shm", "-journal")

_KEY_COLUMNS = ("pattern_fingerprint", "problem", "batch", "dtype", "device_name", "target", "fp_fusion",
                "sparseforge_version", "triton_version", "torch_version")
_RECORD_COLUMNS = ("config", "measured", "metric", "kernel_name", "created", "notes")
#: Schema version 1's key (no batch): upgraded in place (``TuningDB._upgrade_v1``).
_V1_KEY_COLUMNS = tuple(c for c in _KEY_COLUMNS if c != "batch")

_TUNING_TABLE = f"""
CREATE TABLE IF NOT EXISTS tuning (
    {", ".join(f"{c} TEXT NOT NULL" for c in _KEY_COLUMNS)},
    config      TEXT    NOT NULL,
    measured    INTEGER NOT NULL CHECK (measured IN (0, 1)),
    metric      REAL    NOT NULL,
    kernel_name TEXT    NOT NULL,
    created     REAL    NOT NULL,
    notes       TEXT    NOT NULL,
    PRIMARY KEY ({", ".join(_KEY_COLUMNS)})
);
CREATE INDEX IF NOT EXISTS tuning_created ON tuning (created);
"""
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
{_TUNING_TABLE}
INSERT OR IGNORE INTO meta (name, value) VALUES ('schema_version', '{SCHEMA_VERSION}');
INSERT OR IGNORE INTO meta (name, value) VALUES ('application', '{_APPLICATION}');
"""

T = TypeVar("T")


class TuningDatabaseWarning(UserWarning):
    """The tuning database was unreadable or of an unknown schema and has been rebuilt."""


def default_db_path() -> Path:
    """``sparseforge.envvars.cache_dir() / "tuning.sqlite3"`` (read at call time)."""
    return envvars.cache_dir() / "tuning.sqlite3"


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def batch_bucket(batch: int) -> int:
    """The batch bucket of ``batch`` in the tuning key: the next power of two, at most
    ``MAX_BATCH_BUCKET`` (1 -> 1, 3 -> 4, 5..8 -> 8, 1000 -> 64). Configs are tuned for the
    bucket, which stands for every batch size in it."""
    if isinstance(batch, bool) or not isinstance(batch, int):
        raise TypeError(f"batch must be an int, got {_describe(batch)}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    return min(MAX_BATCH_BUCKET, 1 << (batch - 1).bit_length())


@dataclass(frozen=True)
class TuningKey:
    """Everything that decides which config is best: the pattern, the problem, the batch
    bucket (``batch_bucket``, as a decimal string), the dtype, the device and its target, the
    tool versions and Triton's FP-fusion switch."""

    pattern_fingerprint: str
    problem: str
    batch: str
    dtype: str
    device_name: str
    target: str
    sparseforge_version: str
    triton_version: str
    torch_version: str
    fp_fusion: str

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, str):
                raise TypeError(f"TuningKey.{f.name} must be a str, got {_describe(value)}")
        if not (self.batch.isascii() and self.batch.isdigit() and int(self.batch) >= 1):
            raise ValueError(f"TuningKey.batch must be a batch bucket written in decimal (e.g. '1', '8'), "
                             f"got {self.batch!r}")

    @classmethod
    def current(cls, pattern_fingerprint: str, problem: Any, dtype: Any, device_name: str,
                target: str, batch: int = 1) -> TuningKey:
        """The key for this installation: versions of sparseforge, triton and torch as
        installed, and ``TRITON_DEFAULT_FP_FUSION`` as pinned by
        ``envvars.pin_triton_fp_fusion()``. ``problem`` may be given as the object (its
        ``repr`` is used) and ``dtype`` as a ``torch.dtype`` (its ``str``); ``batch`` is the
        batch size, keyed by its bucket (``batch_bucket``)."""
        import torch
        import triton

        import sparseforge

        return cls(pattern_fingerprint=pattern_fingerprint,
                   problem=problem if isinstance(problem, str) else repr(problem),
                   batch=str(batch_bucket(batch)),
                   dtype=dtype if isinstance(dtype, str) else str(dtype),
                   device_name=device_name, target=target,
                   sparseforge_version=sparseforge.__version__,
                   triton_version=triton.__version__, torch_version=torch.__version__,
                   fp_fusion=envvars.pin_triton_fp_fusion())

    def _row(self) -> tuple[str, ...]:
        return tuple(getattr(self, c) for c in _KEY_COLUMNS)


def _canonical_json(value: Any, where: str) -> Any:
    """``value`` as plain JSON data (tuples become lists), or ValueError naming ``where``."""
    if value is None:
        return None
    for kind in (str, bool, int):  # bool before int; subclasses (IntEnum, ...) become plain
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where} must be JSON-serialisable, got the non-finite float {value!r}")
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_canonical_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{where} must be JSON-serialisable, got the non-str key {_describe(k)}")
            out[k] = _canonical_json(v, f"{where}[{k!r}]")
        return out
    raise ValueError(f"{where} must be JSON-serialisable, got {_describe(value)}")


@dataclass(frozen=True)
class TuningRecord:
    """The chosen config for one key. ``measured``: timed on a GPU (``metric`` in ms) or
    predicted by a cost model (``metric`` is the predicted cost). ``created`` (unix time) is
    filled in by ``TuningDB.put`` when None. ``config`` is stored as canonical JSON: tuples
    become lists, so the record read back equals the one written."""

    config: dict
    measured: bool
    metric: float
    kernel_name: str
    created: float | None = None
    notes: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.config, dict):
            raise TypeError(f"config must be a dict, got {_describe(self.config)}")
        object.__setattr__(self, "config", _canonical_json(self.config, "config"))
        if not isinstance(self.measured, bool):
            raise TypeError(f"measured must be a bool, got {_describe(self.measured)}")
        if isinstance(self.metric, bool) or not isinstance(self.metric, (int, float)):
            raise TypeError(f"metric must be a float, got {_describe(self.metric)}")
        if not (math.isfinite(self.metric) and self.metric >= 0):
            raise ValueError(f"metric must be finite and >= 0, got {self.metric!r}")
        object.__setattr__(self, "metric", float(self.metric))
        if not isinstance(self.kernel_name, str):
            raise TypeError(f"kernel_name must be a str, got {_describe(self.kernel_name)}")
        if self.created is not None:
            if isinstance(self.created, bool) or not isinstance(self.created, (int, float)):
                raise TypeError(f"created must be a float (unix time) or None, got {_describe(self.created)}")
            if not math.isfinite(self.created):
                raise ValueError(f"created must be finite, got {self.created!r}")
            object.__setattr__(self, "created", float(self.created))
        if not isinstance(self.notes, str):
            raise TypeError(f"notes must be a str, got {_describe(self.notes)}")

    def _row(self) -> tuple:
        config = json.dumps(self.config, sort_keys=True, separators=(",", ":"), allow_nan=False)
        return (config, int(self.measured), self.metric, self.kernel_name, self.created, self.notes)

    @classmethod
    def _from_row(cls, row: tuple) -> TuningRecord:
        config, measured, metric, kernel_name, created, notes = row
        return cls(config=json.loads(config), measured=bool(measured), metric=metric,
                   kernel_name=kernel_name, created=created, notes=notes)


def _errorcode(exc: BaseException) -> int | None:
    """SQLite's primary result code (Python >= 3.11), or None."""
    code = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF


def _is_corruption(exc: BaseException) -> bool:
    """SQLITE_CORRUPT / SQLITE_NOTADB; not "locked", "cannot open", I/O errors and the like
    (``OperationalError``), which say nothing about the file's content."""
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    code = _errorcode(exc)
    if code is not None:
        return code in (11, 26)  # SQLITE_CORRUPT, SQLITE_NOTADB
    return type(exc) is sqlite3.DatabaseError


class TuningDB:
    """The tuning database in one SQLite file (default: ``default_db_path()``).

    Each method opens a connection, does its work and closes it again, so an instance may
    be used across ``fork`` and by many processes at once."""

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        if path is None:
            path = default_db_path()
        elif not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str, an os.PathLike or None, got {_describe(path)}")
        self._path = Path(os.path.abspath(Path(path).expanduser()))
        self._checked = False

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    def __repr__(self) -> str:
        return f"TuningDB({str(self._path)!r})"

    # -- public operations ---------------------------------------------------------------
    def get(self, key: TuningKey, *, check: Callable[[TuningRecord], object] | None = None) -> TuningRecord | None:
        """The record stored for ``key``, or None.

        A stored record that cannot be used is dropped: one that is not a valid
        ``TuningRecord`` (config not a JSON object, metric negative, ...) or that ``check``
        refuses (``check(record)`` raises ValueError or TypeError saying why, e.g. a tile of
        0) is deleted with a ``TuningDatabaseWarning`` and None is returned, so the caller
        tunes again instead of failing on it every time."""
        _check_key(key)
        where = " AND ".join(f"{c} = ?" for c in _KEY_COLUMNS)
        sql = f"SELECT rowid, {', '.join(_RECORD_COLUMNS)} FROM tuning WHERE {where}"
        row = self._run(lambda conn: conn.execute(sql, key._row()).fetchone(), write=False)
        if row is None:
            return None
        record, why = _usable(row[1:], check)
        if record is None:
            self._drop(row[0], key._row() + tuple(row[1:]), why, key)
        return record

    def put(self, key: TuningKey, record: TuningRecord) -> None:
        """Insert or replace the record for ``key`` in one transaction; ``record.created``
        is set to now when None."""
        _check_key(key)
        if not isinstance(record, TuningRecord):
            raise TypeError(f"record must be a TuningRecord, got {_describe(record)}")
        if record.created is None:
            record = dataclasses.replace(record, created=time.time())
        columns = _KEY_COLUMNS + _RECORD_COLUMNS
        sql = (f"INSERT OR REPLACE INTO tuning ({', '.join(columns)}) "
               f"VALUES ({', '.join('?' * len(columns))})")
        values = key._row() + record._row()
        self._run(lambda conn: conn.execute(sql, values), write=True)

    def entries(self, *, check: Callable[[TuningRecord], object] | None = None) -> list[tuple[TuningKey, TuningRecord]]:
        """Every (key, record), oldest ``created`` first; unusable records are dropped as in ``get``."""
        columns = _KEY_COLUMNS + _RECORD_COLUMNS
        sql = f"SELECT rowid, {', '.join(columns)} FROM tuning ORDER BY created, rowid"
        n = len(_KEY_COLUMNS)
        out = []
        for row in self._run(lambda conn: conn.execute(sql).fetchall(), write=False):
            rowid, values = row[0], tuple(row[1:])
            try:
                key = TuningKey(**dict(zip(_KEY_COLUMNS, values[:n])))
            except (TypeError, ValueError) as exc:
                key, record, why = None, None, f"its key is invalid ({exc})"
            else:
                record, why = _usable(values[n:], check)
            if record is None:
                self._drop(rowid, values, why, key)
            else:
                out.append((key, record))
        return out

    def remove(self, key: TuningKey) -> bool:
        """Delete the record for ``key``; True if there was one."""
        _check_key(key)
        sql = f"DELETE FROM tuning WHERE {' AND '.join(f'{c} = ?' for c in _KEY_COLUMNS)}"
        return self._run(lambda conn: conn.execute(sql, key._row()).rowcount > 0, write=True)

    def clear(self) -> int:
        """Delete every record; returns how many there were."""
        return self._run(lambda conn: conn.execute("DELETE FROM tuning").rowcount, write=True)

    def __len__(self) -> int:
        return self._run(lambda conn: conn.execute("SELECT COUNT(*) FROM tuning").fetchone()[0],
                         write=False)

    def _drop(self, rowid: int, values: tuple, why: str, key: TuningKey | None) -> None:
        """Delete the unusable row ``rowid`` if it still holds ``values`` (a writer may have
        replaced it meanwhile) and warn, in one line, which record went and why."""
        columns = _KEY_COLUMNS + _RECORD_COLUMNS
        sql = f"DELETE FROM tuning WHERE rowid = ? AND {' AND '.join(f'{c} IS ?' for c in columns)}"
        which = (f"the record for {key.problem} on {key.target} ({key.device_name}), pattern "
                 f"{key.pattern_fingerprint[:16]}," if key is not None else f"record {rowid}")
        try:
            self._run(lambda conn: conn.execute(sql, (rowid, *values)), write=True)
            done = "removed it (it is tuned again when next needed)"
        except (sqlite3.Error, OSError) as exc:  # e.g. a read-only database: skip it all the same
            done = f"ignored it (could not remove it: {exc})"
        warnings.warn(f"the tuning database {self._path}: {which} is unusable ({why}); {done}",
                      TuningDatabaseWarning, stacklevel=3)

    # -- machinery -----------------------------------------------------------------------
    def _run(self, op: Callable[[sqlite3.Connection], T], *, write: bool) -> T:
        """Check the file on first use, run ``op`` in one short-lived connection (one
        ``BEGIN IMMEDIATE`` transaction when ``write``), and on a corrupt file repair it and
        try once more. Repairs are reported as warnings at the caller of the public method."""
        messages: list[str] = []
        try:
            if not self._checked:
                self._path.parent.mkdir(parents=True, exist_ok=True)
                self._repair_if_bad(messages, self._locked_on_io_error(self._inspect))
            try:
                if not self._checked:
                    self._set_up()
                result = self._execute(op, write)
            except sqlite3.DatabaseError as exc:
                if not _is_corruption(exc):
                    raise
                self._repair_if_bad(messages, f"SQLite reported: {exc}")
                self._set_up()
                result = self._execute(op, write)
            self._checked = True
            return result
        finally:
            for message in messages:
                warnings.warn(message, TuningDatabaseWarning, stacklevel=3)

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: no implicit transactions; we issue BEGIN IMMEDIATE ourselves.
        return sqlite3.connect(self._path, timeout=_TIMEOUT_S, isolation_level=None)

    def _lock(self) -> filelock.FileLock:
        # A new lock object each time: nothing to go stale across fork. Held for a write's
        # few milliseconds, so poll often (filelock's default is every 50 ms).
        return filelock.FileLock(f"{self._path}.lock", timeout=_TIMEOUT_S, poll_interval=0.01)

    def _locked_on_io_error(self, fn: Callable[[], T]) -> T:
        """``fn()``; on SQLITE_IOERR once more under the lock file. Unlocked readers can meet
        the file (or its -wal/-shm) being moved aside by another process's repair, which
        holds the lock: afterwards the fresh database reads fine."""
        try:
            return fn()
        except sqlite3.OperationalError as exc:
            if _errorcode(exc) != 10:  # SQLITE_IOERR
                raise
            with self._lock():
                return fn()

    def _execute(self, op: Callable[[sqlite3.Connection], T], write: bool) -> T:
        if not write:
            def read() -> T:
                with contextlib.closing(self._connect()) as conn:
                    return op(conn)
            return self._locked_on_io_error(read)
        with self._lock(), contextlib.closing(self._connect()) as conn:
            return _transaction(conn, op)

    def _inspect(self, readonly: bool = True) -> str | None:
        """None when the file is missing, empty or a usable tuning database, else why not.
        Reads with ``mode=ro`` where it can, so a bad file and its ``-wal`` are moved aside
        as found (a read-write connection checkpoints or deletes the WAL when it closes);
        a hot rollback journal needs a read-write connection to be rolled back."""
        if not self._path.is_file() or self._path.stat().st_size == 0:
            return None  # missing or empty: _set_up creates it; not a file: _connect says why
        try:
            uri = self._path.as_uri() + ("?mode=ro" if readonly else "")
            with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=_TIMEOUT_S)) as conn:
                rows = conn.execute("PRAGMA quick_check").fetchall()
                if rows != [("ok",)]:
                    return "PRAGMA quick_check reported: " + "; ".join(str(r[0]) for r in rows[:5])
                tables = {r[0] for r in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")}
                if not tables:
                    return None
                if "meta" not in tables:
                    return f"it holds no sparseforge schema (tables: {', '.join(sorted(tables))})"
                meta = dict(conn.execute("SELECT name, value FROM meta").fetchall())
                version = meta.get("schema_version")
                if meta.get("application") != _APPLICATION or version not in (str(SCHEMA_VERSION), "1"):
                    return (f"unknown schema (application {meta.get('application')!r}, "
                            f"schema_version {version!r}; this sparseforge reads {SCHEMA_VERSION} "
                            f"and upgrades 1)")
                columns = tuple(r[1] for r in conn.execute("PRAGMA table_info(tuning)"))
                expected = (_V1_KEY_COLUMNS if version == "1" else _KEY_COLUMNS) + _RECORD_COLUMNS
                if columns != expected:
                    return f"table 'tuning' has columns {columns}, expected {expected}"
        except sqlite3.DatabaseError as exc:
            if readonly and _errorcode(exc) == 8:  # SQLITE_READONLY: e.g. a hot journal
                return self._inspect(readonly=False)
            if not _is_corruption(exc):
                raise
            return f"SQLite reported: {exc}"
        return None

    def _set_up(self) -> None:
        """Create the schema where it is missing and switch to WAL. Every statement is
        idempotent (IF NOT EXISTS / OR IGNORE), so processes doing this at once agree; a
        database that is already set up is only read (it may be read-only)."""
        with contextlib.closing(self._connect()) as conn:
            tables = {r[0] for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name IN ('meta', 'tuning')")}
            if tables != {"meta", "tuning"}:
                _transaction(conn, lambda c: [c.execute(statement)
                                              for statement in filter(str.strip, _SCHEMA.split(";"))])
            if _schema_version(conn) == "1":
                self._upgrade_v1(conn)
            # WAL is persistent in the file. Where the filesystem cannot do it the default
            # rollback journal stays: just as safe, only readers wait for writers.
            with contextlib.suppress(sqlite3.OperationalError):
                if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    conn.execute("PRAGMA journal_mode=WAL")

    def _upgrade_v1(self, conn: sqlite3.Connection) -> None:
        """Schema 1 -> 2 in one transaction under the lock file: the key gains ``batch``, every
        old record gets batch bucket 1 (what it was tuned for). Processes upgrading at once
        agree: the version is read again inside the transaction."""
        def upgrade(c: sqlite3.Connection) -> None:
            if _schema_version(c) != "1":
                return  # another process upgraded it meanwhile
            c.execute("ALTER TABLE tuning RENAME TO tuning_v1")
            c.execute("DROP INDEX IF EXISTS tuning_created")
            for statement in filter(str.strip, _TUNING_TABLE.split(";")):
                c.execute(statement)
            old = ", ".join("'1'" if col == "batch" else col for col in _KEY_COLUMNS + _RECORD_COLUMNS)
            c.execute(f"INSERT INTO tuning ({', '.join(_KEY_COLUMNS + _RECORD_COLUMNS)}) SELECT {old} FROM tuning_v1")
            c.execute("DROP TABLE tuning_v1")
            c.execute("UPDATE meta SET value = ? WHERE name = 'schema_version'", (str(SCHEMA_VERSION),))
        try:
            with self._lock():
                _transaction(conn, upgrade)
        except (sqlite3.OperationalError, OSError) as exc:  # read-only file or directory, lock timeout
            raise sqlite3.OperationalError(
                f"the tuning database {self._path} has schema version 1 (no batch in its key) and could not be "
                f"upgraded to version {SCHEMA_VERSION} ({exc}); make it writable, or point "
                f"SPARSEFORGE_CACHE_DIR at another directory") from exc

    def _repair_if_bad(self, messages: list[str], reason: str | None) -> None:
        """When ``reason`` says the file is bad: take the lock, look again (another process
        may have repaired it already), move the file and its siblings aside and start a
        fresh database. Appends the warning's message to ``messages``."""
        if reason is None:
            return
        with self._lock():
            reason = self._inspect()
            if reason is None:
                return
            aside = self._aside_path()
            for suffix in ("", *_SIBLINGS):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(f"{self._path}{suffix}", f"{aside}{suffix}")
            self._set_up()
        messages.append(f"the tuning database {self._path} was unusable ({reason}); moved it aside "
                        f"to {aside} and started a new, empty one")

    def _aside_path(self) -> Path:
        """``<db>.corrupt-<UTC time>[-n]``, a name no earlier file (or sibling) has."""
        base = f"{self._path}.corrupt-{_utc_stamp()}"
        for n in range(10_000):
            candidate = base if n == 0 else f"{base}-{n}"
            if not any(os.path.lexists(candidate + s) for s in ("", *_SIBLINGS)):
                return Path(candidate)
        raise RuntimeError(f"too many moved-aside tuning databases next to {self._path}")


def _schema_version(conn: sqlite3.Connection) -> str | None:
    row = conn.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
    return None if row is None else row[0]


def _transaction(conn: sqlite3.Connection, op: Callable[[sqlite3.Connection], T]) -> T:
    """``op(conn)`` in one ``BEGIN IMMEDIATE`` transaction: all of it or none of it."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = op(conn)
    except BaseException:
        if conn.in_transaction:  # SQLite may have rolled back already (e.g. on SQLITE_FULL)
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return result


def _usable(values: tuple, check: Callable[[TuningRecord], object] | None) -> tuple[TuningRecord | None, str]:
    """(record, "") for the record columns ``values`` if usable, else (None, why not)."""
    try:
        record = TuningRecord._from_row(values)
    except (TypeError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        return None, f"{type(exc).__name__}: {exc}"
    if check is not None:
        try:
            check(record)
        except (TypeError, ValueError) as exc:
            return None, f"{type(exc).__name__}: {exc}"
    return record, ""


def _utc_stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def _check_key(key: Any) -> None:
    if not isinstance(key, TuningKey):
        raise TypeError(f"key must be a TuningKey, got {_describe(key)}")
