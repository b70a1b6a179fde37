"""The persistent tuning database: round trips, keys, bad arguments, corrupt files, and
several processes writing at once."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import triton

import sparseforge
from sparseforge import envvars
from sparseforge.autotune import db as dbmod
from sparseforge.autotune.db import TuningDatabaseWarning, TuningDB, TuningKey, TuningRecord, default_db_path

ROOT = Path(sparseforge.__file__).resolve().parent.parent

BASE_KEY = dict(pattern_fingerprint="fp0", problem="Problem(grid=(8,), heads=2, head_dim=16)", batch="1",
                dtype="torch.float16", device_name="NVIDIA H100 80GB HBM3", target="sm_90",
                sparseforge_version="0.1.0", triton_version="3.9.0", torch_version="2.5.0",
                fp_fusion="1")
KEY_FIELDS = tuple(BASE_KEY)


def key(fingerprint: str = "fp0", **changes) -> TuningKey:
    return TuningKey(**{**BASE_KEY, "pattern_fingerprint": fingerprint, **changes})


def record(**changes) -> TuningRecord:
    fields = dict(config={"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
                  measured=True, metric=0.125, kernel_name="fwd_neighborhood")
    return TuningRecord(**{**fields, **changes})


@pytest.fixture
def db(tmp_path) -> TuningDB:
    return TuningDB(tmp_path / "tuning.sqlite3")


# ------------------------------------------------------------------------------------
# paths
# ------------------------------------------------------------------------------------
def test_default_path_follows_cache_dir_env_at_call_time(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEFORGE_CACHE_DIR", str(tmp_path / "one"))
    assert default_db_path() == tmp_path / "one" / "tuning.sqlite3"
    monkeypatch.setenv("SPARSEFORGE_CACHE_DIR", str(tmp_path / "two" / "deeper"))
    assert default_db_path() == envvars.cache_dir() / "tuning.sqlite3"
    tdb = TuningDB()
    assert tdb.path == tmp_path / "two" / "deeper" / "tuning.sqlite3"
    assert not tdb.path.parent.exists()  # nothing is created before first use
    tdb.put(key(), record())
    assert tdb.path.is_file()
    assert TuningDB().get(key()) == tdb.get(key())


@pytest.mark.parametrize("as_str", [False, True])
def test_explicit_path_creates_parents_and_is_absolute(tmp_path, monkeypatch, as_str):
    monkeypatch.chdir(tmp_path)
    path = Path("a") / "b" / "t.db"
    tdb = TuningDB(str(path) if as_str else path)
    assert tdb.path == tmp_path / "a" / "b" / "t.db"
    assert tdb.path.is_absolute()
    assert repr(tdb) == f"TuningDB({str(tmp_path / 'a' / 'b' / 't.db')!r})"
    assert len(tdb) == 0
    assert tdb.path.is_file()


def test_uses_wal_journal(db):
    db.put(key(), record())
    with sqlite3.connect(db.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone() == (
            str(dbmod.SCHEMA_VERSION),)


# ------------------------------------------------------------------------------------
# round trips
# ------------------------------------------------------------------------------------
def test_put_get_round_trip_sets_created(db):
    assert db.get(key()) is None
    before = time.time()
    db.put(key(), record(notes="timed with 100 reps"))
    after = time.time()
    got = db.get(key())
    assert before <= got.created <= after
    assert got == dataclasses.replace(record(notes="timed with 100 reps"), created=got.created)
    assert TuningDB(db.path).get(key()) == got  # persists, visible to a new instance


def test_explicit_created_is_kept_and_config_is_canonical(db):
    rec = record(config={"tile": (64, (16, 16)), "num_warps": 8, "flag": True, "x": None,
                         "ratio": 0.5, "name": "a"}, measured=False, metric=3, created=12.5)
    assert rec.config["tile"] == [64, [16, 16]]  # tuples become lists up front
    assert rec.metric == 3.0 and isinstance(rec.metric, float)
    db.put(key(), rec)
    assert db.get(key()) == rec
    assert db.get(key()).config == {"tile": [64, [16, 16]], "num_warps": 8, "flag": True,
                                    "x": None, "ratio": 0.5, "name": "a"}


def test_config_is_copied(db):
    config = {"BLOCK_M": 64, "tile": [1, 2]}
    rec = record(config=config)
    config["BLOCK_M"] = 128
    config["tile"].append(3)
    assert rec.config == {"BLOCK_M": 64, "tile": [1, 2]}


def test_put_replaces(db):
    db.put(key(), record(metric=2.0))
    db.put(key(), record(metric=1.0, kernel_name="better"))
    assert len(db) == 1
    assert db.get(key()).metric == 1.0
    assert db.get(key()).kernel_name == "better"


@pytest.mark.parametrize("field", KEY_FIELDS)
def test_every_key_field_distinguishes_entries(db, field):
    other = key(**{field: "2" if field == "batch" else BASE_KEY[field] + "-other"})
    db.put(key(), record(metric=1.0))
    db.put(other, record(metric=2.0))
    assert len(db) == 2
    assert db.get(key()).metric == 1.0
    assert db.get(other).metric == 2.0


def test_entries_ordered_by_created(db):
    db.put(key("b"), record(created=20.0))
    db.put(key("a"), record(created=30.0))
    db.put(key("c"), record(created=10.0))
    assert [(k.pattern_fingerprint, r.created) for k, r in db.entries()] == [
        ("c", 10.0), ("b", 20.0), ("a", 30.0)]
    assert db.entries()[0] == (key("c"), record(created=10.0))


def test_remove_clear_len(db):
    assert db.clear() == 0
    for i in range(5):
        db.put(key(f"fp{i}"), record())
    assert len(db) == 5
    assert db.remove(key("fp3")) is True
    assert db.remove(key("fp3")) is False
    assert db.get(key("fp3")) is None
    assert len(db) == 4
    assert db.clear() == 4
    assert len(db) == 0
    assert db.entries() == []


def test_key_current_reads_installed_versions_and_fp_fusion(monkeypatch):
    monkeypatch.delenv("TRITON_DEFAULT_FP_FUSION", raising=False)
    problem = sparseforge.Problem(grid=(8,), heads=2, head_dim=16)
    k = TuningKey.current("abc", problem, torch.float16, "cpu-model", "sm_90")
    assert k == TuningKey(pattern_fingerprint="abc", problem=repr(problem), batch="1", dtype="torch.float16",
                          device_name="cpu-model", target="sm_90",
                          sparseforge_version=sparseforge.__version__,
                          triton_version=triton.__version__, torch_version=torch.__version__,
                          fp_fusion="1")
    assert os.environ["TRITON_DEFAULT_FP_FUSION"] == "1"  # pinned as a side effect
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "0")
    assert TuningKey.current("abc", "P", "f16", "d", "sm_80").fp_fusion == "0"
    assert TuningKey.current("abc", "P", "f16", "d", "sm_80", batch=6).batch == "8"


@pytest.mark.parametrize("batch, bucket", [(1, 1), (2, 2), (3, 4), (8, 8), (9, 16), (33, 64), (64, 64), (10 ** 6, 64)])
def test_batch_bucket(batch, bucket):
    assert dbmod.batch_bucket(batch) == bucket


@pytest.mark.parametrize("batch, exc, message", [
    (0, ValueError, r"^batch must be >= 1, got 0$"), (True, TypeError, r"^batch must be an int, got True \(bool\)$"),
    (2.0, TypeError, r"^batch must be an int, got 2\.0 \(float\)$")])
def test_batch_bucket_errors(batch, exc, message):
    with pytest.raises(exc, match=message):
        dbmod.batch_bucket(batch)


@pytest.mark.parametrize("value", ["", "0", "b4", "-1", "1.5", "\u0663"])
def test_key_batch_must_be_a_bucket(value):
    with pytest.raises(ValueError, match=r"^TuningKey\.batch must be a batch bucket written in decimal"):
        key(batch=value)


def test_records_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        record().metric = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        key().dtype = "x"


# ------------------------------------------------------------------------------------
# bad arguments
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("field", KEY_FIELDS)
def test_key_fields_must_be_str(field):
    with pytest.raises(TypeError, match=rf"^TuningKey\.{field} must be a str, got 3 \(int\)$"):
        key(**{field: 3})


RECORD_ERRORS = [
    (dict(config=[("a", 1)]), TypeError, r"^config must be a dict, got \[\('a', 1\)\] \(list\)$"),
    (dict(config={"a": object()}), ValueError, r"^config\['a'\] must be JSON-serialisable, got <object"),
    (dict(config={"a": [1, {2, 3}]}), ValueError, r"^config\['a'\]\[1\] must be JSON-serialisable, got \{2, 3\} \(set\)$"),
    (dict(config={"a": math.nan}), ValueError, r"^config\['a'\] must be JSON-serialisable, got the non-finite float nan$"),
    (dict(config={"a": {1: 2}}), ValueError, r"^config\['a'\] must be JSON-serialisable, got the non-str key 1 \(int\)$"),
    (dict(config={"w": torch.tensor(4)}), ValueError, r"^config\['w'\] must be JSON-serialisable, got tensor\(4\) \(Tensor\)$"),
    (dict(measured=1), TypeError, r"^measured must be a bool, got 1 \(int\)$"),
    (dict(metric="1.0"), TypeError, r"^metric must be a float, got '1\.0' \(str\)$"),
    (dict(metric=True), TypeError, r"^metric must be a float, got True \(bool\)$"),
    (dict(metric=math.inf), ValueError, r"^metric must be finite and >= 0, got inf$"),
    (dict(metric=-0.5), ValueError, r"^metric must be finite and >= 0, got -0\.5$"),
    (dict(kernel_name=None), TypeError, r"^kernel_name must be a str, got None \(NoneType\)$"),
    (dict(created="now"), TypeError, r"^created must be a float \(unix time\) or None, got 'now' \(str\)$"),
    (dict(created=math.nan), ValueError, r"^created must be finite, got nan$"),
    (dict(notes=b"x"), TypeError, r"^notes must be a str, got b'x' \(bytes\)$"),
]


@pytest.mark.parametrize("changes, exc, message", RECORD_ERRORS)
def test_record_errors(changes, exc, message):
    with pytest.raises(exc, match=message):
        record(**changes)


DB_ERRORS = [
    (lambda d: d.put("fp0", record()), TypeError, r"^key must be a TuningKey, got 'fp0' \(str\)$"),
    (lambda d: d.put(key(), {"config": {}}), TypeError, r"^record must be a TuningRecord, got \{'config': \{\}\} \(dict\)$"),
    (lambda d: d.put(BASE_KEY, record()), TypeError, r"^key must be a TuningKey, got \{"),
    (lambda d: d.get(None), TypeError, r"^key must be a TuningKey, got None \(NoneType\)$"),
    (lambda d: d.remove(("fp0",)), TypeError, r"^key must be a TuningKey, got \('fp0',\) \(tuple\)$"),
]


@pytest.mark.parametrize("call, exc, message", DB_ERRORS)
def test_db_errors(db, call, exc, message):
    with pytest.raises(exc, match=message):
        call(db)
    assert not db.path.exists()  # argument checks come before touching the file


def test_path_type_error():
    with pytest.raises(TypeError, match=r"^path must be a str, an os\.PathLike or None, got 3 \(int\)$"):
        TuningDB(3)


def test_unopenable_path_is_an_error_not_a_corruption(tmp_path):
    path = tmp_path / "is_a_dir"
    path.mkdir()
    with pytest.raises(sqlite3.OperationalError, match="unable to open database file"):
        len(TuningDB(path))
    assert path.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["is_a_dir"]


# ------------------------------------------------------------------------------------
# corrupt files
# ------------------------------------------------------------------------------------
def _real_db_bytes(path: Path, n: int = 8) -> bytes:
    tdb = TuningDB(path)
    for i in range(n):
        tdb.put(key(f"fp{i}"), record(notes="x" * 5000))  # a few pages each
    data = path.read_bytes()
    path.unlink()
    assert len(data) > 8 * 4096
    return data


def _garbage(path: Path) -> bytes:
    return b"this is not an SQLite file, just some bytes\n" * 100


def _truncated(path: Path) -> bytes:
    return _real_db_bytes(path)[: 3 * 4096 + 100]


def _foreign_schema(path: Path) -> bytes:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE results (name TEXT, value REAL)")
        conn.execute("INSERT INTO results VALUES ('a', 1.0)")
    conn.close()
    data = path.read_bytes()
    path.unlink()
    return data


def _meta_edit(sql: str):
    def make(path: Path) -> bytes:
        TuningDB(path).put(key(), record())
        with sqlite3.connect(path) as conn:
            conn.execute("PRAGMA journal_mode=DELETE")
            conn.execute(sql)
        conn.close()
        data = path.read_bytes()
        path.unlink()
        return data
    return make


CORRUPTIONS = [
    (_garbage, r"SQLite reported: file is not a database"),
    (_truncated, r"SQLite reported: database disk image is malformed"),
    (_foreign_schema, r"it holds no sparseforge schema \(tables: results\)"),
    (_meta_edit("UPDATE meta SET value = '99' WHERE name = 'schema_version'"),
     r"unknown schema \(application 'sparseforge\.tuning', schema_version '99'; this sparseforge reads 2 and "
     r"upgrades 1\)"),
    (_meta_edit("UPDATE meta SET value = 'other' WHERE name = 'application'"),
     r"unknown schema \(application 'other', schema_version '2'"),
    (_meta_edit("UPDATE meta SET value = '1' WHERE name = 'schema_version'"),
     r"table 'tuning' has columns \(.*'batch'.*\), expected \('pattern_fingerprint', 'problem', 'dtype'"),
    (_meta_edit("ALTER TABLE tuning ADD COLUMN extra TEXT"), r"table 'tuning' has columns \("),
]


def _aside_files(path: Path) -> list[Path]:
    """The moved-aside databases next to ``path``, without their -wal/-shm siblings."""
    return sorted(p for p in path.parent.glob(path.name + ".corrupt-*")
                  if not p.name.endswith(dbmod._SIBLINGS))


@pytest.mark.parametrize("make, reason", CORRUPTIONS, ids=[
    "garbage", "truncated", "foreign-schema", "unknown-version", "other-application", "v1-with-v2-columns",
    "extra-column"])
def test_corrupt_file_is_moved_aside_and_rebuilt(tmp_path, make, reason):
    path = tmp_path / "cache" / "tuning.sqlite3"
    path.parent.mkdir()
    original = make(path)
    path.write_bytes(original)
    tdb = TuningDB(path)
    with pytest.warns(TuningDatabaseWarning) as caught:
        assert tdb.get(key()) is None
    assert len(caught) == 1
    assert caught[0].filename == __file__  # points at the caller
    [aside] = _aside_files(path)
    message = str(caught[0].message)
    assert str(path) in message and str(aside) in message
    assert re.search(reason, message), message
    assert aside.name.startswith("tuning.sqlite3.corrupt-") and aside.name.endswith("Z")
    assert aside.read_bytes() == original
    tdb.put(key(), record())
    assert tdb.get(key()) == dataclasses.replace(record(), created=tdb.get(key()).created)
    assert len(TuningDB(path)) == 1  # a new instance finds it healthy: no second warning


def test_siblings_move_too_and_nothing_is_overwritten(tmp_path, monkeypatch):
    monkeypatch.setattr(dbmod, "_utc_stamp", lambda: "20240102T030405Z")
    path = tmp_path / "tuning.sqlite3"
    base = tmp_path / "tuning.sqlite3.corrupt-20240102T030405Z"
    base.write_bytes(b"earlier")
    Path(f"{base}-1-wal").write_bytes(b"earlier wal")  # a sibling alone also blocks the name
    path.write_bytes(b"junk" * 100)
    Path(f"{path}-wal").write_bytes(b"stale wal")
    with pytest.warns(TuningDatabaseWarning, match=r"moved it aside to .*corrupt-20240102T030405Z-2 "):
        TuningDB(path).put(key(), record())
    assert base.read_bytes() == b"earlier"
    assert Path(f"{base}-1-wal").read_bytes() == b"earlier wal"
    assert Path(f"{base}-2").read_bytes() == b"junk" * 100
    assert Path(f"{base}-2-wal").read_bytes() == b"stale wal"
    assert not Path(f"{path}-wal").exists() or Path(f"{path}-wal").read_bytes() != b"stale wal"
    assert len(TuningDB(path)) == 1


def test_corruption_after_first_use_is_repaired_and_the_write_kept(db):
    db.put(key("before"), record())
    db.path.write_bytes(b"\0garbage" * 600)
    with pytest.warns(TuningDatabaseWarning, match=r"file is not a database"):
        db.put(key("after"), record())
    assert [k.pattern_fingerprint for k, _ in db.entries()] == ["after"]
    assert len(_aside_files(db.path)) == 1


@pytest.mark.parametrize("content", [None, b""])
def test_missing_or_empty_file_is_not_corrupt(tmp_path, recwarn, content):
    path = tmp_path / "tuning.sqlite3"
    if content is not None:
        path.write_bytes(content)
    tdb = TuningDB(path)
    assert len(tdb) == 0
    tdb.put(key(), record())
    assert len(tdb) == 1
    assert not [w for w in recwarn if issubclass(w.category, TuningDatabaseWarning)]
    assert _aside_files(path) == []


def test_hot_journal_is_rolled_back_not_moved_aside(tmp_path, recwarn):
    # A crash mid-transaction in rollback-journal mode leaves a hot journal, which the
    # read-only check cannot roll back: that is recovery, not corruption.
    src, path = TuningDB(tmp_path / "src.sqlite3"), tmp_path / "tuning.sqlite3"
    for i in range(8):
        src.put(key(f"fp{i}"), record(notes="x" * 2000))
    conn = sqlite3.connect(src.path, isolation_level=None)
    assert conn.execute("PRAGMA journal_mode=DELETE").fetchone() == ("delete",)
    conn.execute("PRAGMA cache_size=1")  # spill changed pages into the file before commit
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("UPDATE tuning SET notes = hex(randomblob(300))")
    path.write_bytes(src.path.read_bytes())  # the file as a crash would leave it
    Path(f"{path}-journal").write_bytes(Path(f"{src.path}-journal").read_bytes())
    conn.execute("ROLLBACK")
    conn.close()
    with pytest.raises(sqlite3.OperationalError, match="attempt to write a readonly database"):
        with contextlib.closing(sqlite3.connect(path.as_uri() + "?mode=ro", uri=True)) as ro:
            ro.execute("SELECT COUNT(*) FROM tuning").fetchall()  # the hot journal is real
    tdb = TuningDB(path)
    assert {r.notes for _, r in tdb.entries()} == {"x" * 2000}
    assert len(tdb) == 8
    assert not [w for w in recwarn if issubclass(w.category, TuningDatabaseWarning)]
    assert _aside_files(path) == []
    assert not Path(f"{path}-journal").exists()


def test_fork_uses_its_own_connection(db):
    if not hasattr(os, "fork"):
        pytest.skip("needs os.fork")
    db.put(key("parent"), record())
    pid = os.fork()
    if pid == 0:  # child: no pytest machinery, just report through the exit code
        code = 1
        try:
            db.put(key("child"), record(metric=7.0))
            code = 0 if db.get(key("parent")) is not None else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert db.get(key("child")).metric == 7.0
    assert len(db) == 2


# ------------------------------------------------------------------------------------
# several processes at once
# ------------------------------------------------------------------------------------
# Each worker loads sparseforge/autotune/db.py without running sparseforge/__init__.py,
# whose torch import costs seconds per process; db.py itself needs only envvars and the
# stdlib. Workers say they are ready, wait for "go", then put their (key, record) jobs.
WORKER = r"""
import json, os, sys, time, types, warnings
root, path, jobs_file, ready, go = sys.argv[1:6]
for name in ("sparseforge", "sparseforge.autotune"):
    module = types.ModuleType(name)
    module.__path__ = [os.path.join(root, *name.split("."))]
    sys.modules[name] = module
from sparseforge.autotune.db import TuningDB, TuningKey, TuningRecord, TuningDatabaseWarning
with open(jobs_file) as f:
    jobs = json.load(f)
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.002)
db = TuningDB(path)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for k, r in jobs:
        db.put(TuningKey(**k), TuningRecord(**r))
        assert db.get(TuningKey(**k)) is not None
print(json.dumps([str(w.message) for w in caught if issubclass(w.category, TuningDatabaseWarning)]))
"""


def run_workers(tmp_path: Path, path: Path, jobs_per_worker: list[list]) -> list[list[str]]:
    """Run one process per job list, all released at once; returns each one's warnings."""
    go = tmp_path / "go"
    procs, ready = [], []
    for i, jobs in enumerate(jobs_per_worker):
        jobs_file = tmp_path / f"jobs{i}.json"
        jobs_file.write_text(json.dumps(jobs))
        ready.append(tmp_path / f"ready{i}")
        procs.append(subprocess.Popen(
            [sys.executable, "-c", WORKER, str(ROOT), str(path), str(jobs_file), str(ready[-1]), str(go)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + 60
    while not all(r.exists() for r in ready) and time.monotonic() < deadline:
        if any(p.poll() not in (None, 0) for p in procs):
            break
        time.sleep(0.005)
    go.touch()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out))
    return results


def _job(k: TuningKey, r: TuningRecord) -> list:
    return [dataclasses.asdict(k), dataclasses.asdict(r)]


N_WORKERS, N_KEYS, N_SAME = 4, 40, 10


def _worker_record(i: int, j: int) -> TuningRecord:
    return record(config={"BLOCK_M": 16 * (j + 1), "worker": i, "j": j, "tile": [i, j]},
                  measured=bool(j % 2), metric=i + j / 1000, kernel_name=f"k{i}_{j}",
                  notes=f"worker {i}")


def test_concurrent_writers_lose_nothing(tmp_path):
    path = tmp_path / "shared" / "tuning.sqlite3"  # does not exist yet: created concurrently
    jobs = [[_job(key(f"w{i}-{j}"), _worker_record(i, j)) for j in range(N_KEYS)]
            for i in range(N_WORKERS)]
    assert run_workers(tmp_path, path, jobs) == [[]] * N_WORKERS
    tdb = TuningDB(path)
    assert len(tdb) == N_WORKERS * N_KEYS
    for i in range(N_WORKERS):
        for j in range(N_KEYS):
            got = tdb.get(key(f"w{i}-{j}"))
            assert got == dataclasses.replace(_worker_record(i, j), created=got.created)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    conn.close()


def test_concurrent_writers_to_one_key_leave_one_whole_record(tmp_path):
    path = tmp_path / "tuning.sqlite3"
    jobs = [[_job(key("same"), _worker_record(i, j)) for j in range(N_SAME)]
            for i in range(N_WORKERS)]
    assert run_workers(tmp_path, path, jobs) == [[]] * N_WORKERS
    tdb = TuningDB(path)
    [(k, got)] = tdb.entries()
    assert k == key("same")
    candidates = {(i, j): _worker_record(i, j) for i in range(N_WORKERS) for j in range(N_SAME)}
    i, j = got.config["worker"], got.config["j"]
    assert got == dataclasses.replace(candidates[i, j], created=got.created)  # never a mix
    assert j == N_SAME - 1  # the survivor is some worker's last write


def test_concurrent_openers_of_a_corrupt_file_move_it_aside_once(tmp_path):
    path = tmp_path / "tuning.sqlite3"
    original = b"definitely not sqlite" * 200
    path.write_bytes(original)
    jobs = [[_job(key(f"w{i}"), _worker_record(i, 0))] for i in range(N_WORKERS)]
    warned = [w for ws in run_workers(tmp_path, path, jobs) for w in ws]
    [aside] = _aside_files(path)
    assert aside.read_bytes() == original
    assert len(warned) == 1 and str(aside) in warned[0]
    assert sorted(k.pattern_fingerprint for k, _ in TuningDB(path).entries()) == [
        f"w{i}" for i in range(N_WORKERS)]


# ------------------------------------------------------------------------------------
# unusable records in a sound file: dropped on read, with one warning each
# ------------------------------------------------------------------------------------
def _edit_row(path: Path, fingerprint: str, **columns) -> None:
    """Overwrite columns of the stored row of ``key(fingerprint)`` with raw SQL values."""
    sets = ", ".join(f"{c} = ?" for c in columns)
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        n = conn.execute(f"UPDATE tuning SET {sets} WHERE pattern_fingerprint = ?",
                         (*columns.values(), fingerprint)).rowcount
    assert n == 1


BAD_ROWS = {
    "config_not_json": (dict(config="{not json"), r"JSONDecodeError"),
    "config_not_object": (dict(config="[64, 32]"), r"TypeError: config must be a dict, got \[64, 32\]"),
    "config_a_number": (dict(config=7), r"TypeError"),
    "negative_metric": (dict(metric=-1.0), r"ValueError: metric must be finite and >= 0, got -1\.0"),
    "metric_text": (dict(metric="fast"), r"TypeError: metric must be a float, got 'fast'"),
    "kernel_name_blob": (dict(kernel_name=b"\x00"), r"TypeError: kernel_name must be a str"),
}


@pytest.mark.parametrize("bad", list(BAD_ROWS))
def test_unusable_row_is_dropped_with_one_warning(db, bad):
    columns, reason = BAD_ROWS[bad]
    db.put(key("good"), record())
    db.put(key("bad"), record())
    _edit_row(db.path, "bad", **columns)
    with pytest.warns(TuningDatabaseWarning) as caught:
        assert db.get(key("bad")) is None
    assert len(caught) == 1 and caught[0].filename == __file__
    message = str(caught[0].message)
    assert "\n" not in message and str(db.path) in message and "pattern bad," in message
    assert re.search(reason, message) and message.endswith("removed it (it is tuned again when next needed)")
    assert len(db) == 1 and db.get(key("good")) is not None  # only the bad row went
    db.put(key("bad"), record(metric=2.0))  # tuned again: stored and read back
    assert db.get(key("bad")).metric == 2.0


def test_entries_drop_unusable_rows(db, recwarn):
    for name in ("a", "b", "c"):
        db.put(key(name), record(created=float(ord(name))))
    _edit_row(db.path, "b", config="{not json")
    assert [k.pattern_fingerprint for k, _ in db.entries()] == ["a", "c"]
    assert len([w for w in recwarn if w.category is TuningDatabaseWarning]) == 1
    assert len(db) == 2 and [k.pattern_fingerprint for k, _ in db.entries()] == ["a", "c"]
    assert len(recwarn) == 1  # gone: no second warning


def test_check_refuses_a_record(db):
    db.put(key(), record(config={"q_tile": [0, 0]}))

    def check(rec):
        if 0 in rec.config["q_tile"]:
            raise ValueError(f"q_tile must be positive, got {rec.config['q_tile']}")
    assert db.get(key(), check=lambda rec: None) is not None  # accepted: kept
    with pytest.warns(TuningDatabaseWarning, match=r"unusable \(ValueError: q_tile must be positive, got \[0, 0\]\)"):
        assert db.get(key(), check=check) is None
    assert len(db) == 0
    db.put(key(), record())
    with pytest.raises(KeyError):  # anything but ValueError/TypeError is the checker's own bug: raised
        db.get(key(), check=lambda rec: {}["x"])
    assert len(db) == 1


def test_a_record_replaced_meanwhile_is_not_dropped(db):
    """The bad row is deleted only if unchanged: a writer's fresh record survives."""
    db.put(key(), record(config={"q_tile": [0, 0]}))

    def check(rec):
        db.put(key(), record(metric=3.0))  # another writer stores a good record meanwhile
        raise ValueError("impossible tile")
    with pytest.warns(TuningDatabaseWarning, match="impossible tile"):
        assert db.get(key(), check=check) is None
    assert db.get(key()).metric == 3.0


def test_a_bad_record_that_cannot_be_deleted_is_skipped(db, monkeypatch):
    """A database the user may only read: the bad record is skipped all the same."""
    db.put(key(), record())
    _edit_row(db.path, "fp0", metric=-5.0)
    real = TuningDB._run

    def read_only(self, op, *, write):
        if write:
            raise sqlite3.OperationalError("attempt to write a readonly database")
        return real(self, op, write=write)
    monkeypatch.setattr(TuningDB, "_run", read_only)
    with pytest.warns(TuningDatabaseWarning, match=r"ignored it \(could not remove it: attempt to write a readonly"):
        assert db.get(key()) is None
    monkeypatch.undo()
    assert len(db) == 1


def test_tune_drops_an_impossible_record_instead_of_failing(tmp_path):
    """A tile of 0, a tile of the wrong rank, a launch missing, a routed tile that does not
    divide the padded region: each is dropped with a warning and tuning runs again (here
    with no candidates, so it ends in TuningError), never raised on every compile."""
    from sparseforge import Neighborhood, Problem, Routed
    from sparseforge.autotune.tuner import TuningError, check_record, tune, tuning_key
    from sparseforge.codegen.config import KernelConfig, Launch

    tdb = TuningDB(tmp_path / "t.sqlite3")
    launch = Launch(4, 1)
    good = KernelConfig((4, 4), (4, 4), True, fwd=launch, bwd_dq=launch, bwd_dkdv=launch).as_dict()
    cases = [
        (Neighborhood(3), good, None),
        (Neighborhood(3), {**good, "q_tile": [0, 0]}, r"q_tile must be >= 1, got 0"),
        (Neighborhood(3), {**good, "k_tile": [8]}, r"k_tile=\(8,\) must have one positive entry per grid dimension"),
        (Neighborhood(3), {**good, "bwd_dq": None}, r"leaves a tile or a launch unset"),
        (Routed((4, 4), 2), {**good, "q_tile": [4, 3]}, r"must have power-of-two extents dividing the padded region"),
        (Routed((4, 4), 2), {**good, "dkdv_q_tile": [2, 4], "dkdv_k_tile": [4, 4]},
         r"routed attention runs every kernel on one tiling"),
        (Neighborhood(3), {**good, "dkdv_q_tile": [4, 4]}, r"sets one of dkdv_q_tile/dkdv_k_tile but not the other"),
        (Neighborhood(3), {**good, "dkdv_q_tile": [4, 4], "dkdv_k_tile": [0, 4]}, r"dkdv_k_tile must be >= 1, got 0"),
        (Neighborhood(3), {**good, "dkdv_q_tile": [4, 4], "dkdv_k_tile": [8]},
         r"k_tile=\(8,\) must have one positive entry per grid dimension"),
    ]
    problem = Problem(grid=(8, 8), heads=2, head_dim=16, dtype=torch.float16)
    for pattern, config, reason in cases:
        k = tuning_key(pattern, problem, 90, "cost-model sm_90")
        tdb.put(k, TuningRecord(config=config, measured=False, metric=1.0, kernel_name="x"))
        if reason is None:
            check_record(tdb.get(k), pattern, problem)
            hit = tune(pattern, problem, target="sm_90", db=tdb, measure=False, tiles=[])
            assert hit.cached and hit.config == KernelConfig.from_dict(good)
            continue
        with pytest.warns(TuningDatabaseWarning, match=reason), pytest.raises(TuningError, match="survived"):
            tune(pattern, problem, target="sm_90", db=tdb, measure=False, tiles=[])
        assert tdb.get(k) is None, reason


# ------------------------------------------------------------------------------------
# schema 1 (no batch in the key): upgraded in place
# ------------------------------------------------------------------------------------
_V1_KEY = ("pattern_fingerprint", "problem", "dtype", "device_name", "target", "fp_fusion",
           "sparseforge_version", "triton_version", "torch_version")


def _v1_database(path: Path, rows: list[tuple[dict, TuningRecord]]) -> None:
    """A tuning database as sparseforge wrote it before the batch bucket was in the key."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.executescript(f"""
            CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
            CREATE TABLE tuning ({", ".join(f"{c} TEXT NOT NULL" for c in _V1_KEY)},
                config TEXT NOT NULL, measured INTEGER NOT NULL CHECK (measured IN (0, 1)),
                metric REAL NOT NULL, kernel_name TEXT NOT NULL, created REAL NOT NULL, notes TEXT NOT NULL,
                PRIMARY KEY ({", ".join(_V1_KEY)}));
            CREATE INDEX tuning_created ON tuning (created);
            INSERT INTO meta VALUES ('schema_version', '1'), ('application', 'sparseforge.tuning');
        """)
        for k, r in rows:
            values = tuple(k[c] for c in _V1_KEY) + (json.dumps(r.config), int(r.measured), r.metric,
                                                      r.kernel_name, r.created, r.notes)
            conn.execute(f"INSERT INTO tuning VALUES ({', '.join('?' * len(values))})", values)
        conn.commit()


def test_schema_1_is_upgraded_and_its_records_keyed_to_batch_1(tmp_path, recwarn):
    path = tmp_path / "tuning.sqlite3"
    old = {k: v for k, v in BASE_KEY.items() if k != "batch"}
    _v1_database(path, [(old, record(created=5.0)), ({**old, "pattern_fingerprint": "fp1"}, record(created=6.0))])
    tdb = TuningDB(path)
    assert tdb.get(key()) == record(created=5.0)
    assert tdb.get(key(batch="2")) is None
    assert [(k.pattern_fingerprint, k.batch) for k, _ in tdb.entries()] == [("fp0", "1"), ("fp1", "1")]
    tdb.put(key(batch="8"), record(metric=3.0))
    assert len(TuningDB(path)) == 3 and TuningDB(path).get(key(batch="8")).metric == 3.0
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone() == ("2",)
        assert {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")} == {"meta", "tuning"}
    assert not [w for w in recwarn if issubclass(w.category, TuningDatabaseWarning)]
    assert not _aside_files(path)


def test_old_records_stay_usable_by_tune(tmp_path, monkeypatch):
    """A record the earlier tuner stored (schema 1, no dK/dV tiles in its config) is returned
    for batch 1 without compiling; batch 2 is another key."""
    from sparseforge import Neighborhood, Problem
    from sparseforge.autotune.tuner import TuningError, tune, tuning_key
    from sparseforge.backends.triton import TritonKernels
    from sparseforge.codegen.config import KernelConfig, Launch

    problem = Problem(grid=(8, 8), heads=2, head_dim=16, dtype=torch.float16)
    launch = Launch(4, 1)
    config = {"q_tile": [4, 4], "k_tile": [4, 4], "closed_form": True,
              **{k: {"num_warps": 4, "num_stages": 1} for k in ("fwd", "bwd_dq", "bwd_dkdv")}}
    k = dataclasses.asdict(tuning_key(Neighborhood(3), problem, 90, "cost-model sm_90"))
    path = tmp_path / "t.sqlite3"
    _v1_database(path, [(k, TuningRecord(config=config, measured=False, metric=2.5, kernel_name="x", created=1.0))])
    compiled = []

    def no_compile(*args, **kwargs):
        compiled.append(args)
        raise AssertionError("compiled")
    monkeypatch.setattr(TritonKernels, "aot", no_compile)
    hit = tune(Neighborhood(3), problem, target="sm_90", db=TuningDB(path))
    assert hit.cached and hit.metric == 2.5 and not compiled
    assert hit.config == KernelConfig((4, 4), (4, 4), True, fwd=launch, bwd_dq=launch, bwd_dkdv=launch)
    with pytest.raises(TuningError, match="does not compile: AssertionError: compiled"):
        tune(Neighborhood(3), problem, target="sm_90", db=TuningDB(path), batch=2, tiles=[((4, 4), (4, 4))],
             dkdv_tiles=[], closed_form=(True,), launches=[launch])
    assert compiled


def test_a_schema_1_file_that_cannot_be_upgraded_says_so(tmp_path, monkeypatch):
    path = tmp_path / "tuning.sqlite3"
    _v1_database(path, [({k: v for k, v in BASE_KEY.items() if k != "batch"}, record(created=1.0))])
    original = path.read_bytes()

    def read_only(conn, op):
        raise sqlite3.OperationalError("attempt to write a readonly database")
    monkeypatch.setattr(dbmod, "_transaction", read_only)
    with pytest.raises(sqlite3.OperationalError,
                       match=r"has schema version 1 \(no batch in its key\) and could not be upgraded to version 2 "
                             r"\(attempt to write a readonly database\)"):
        TuningDB(path).get(key())
    assert path.read_bytes() == original and not _aside_files(path)
