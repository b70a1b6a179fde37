"""sparseforge.runtime.builddir: atomic build directories verified by a sha256 manifest."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from sparseforge.runtime import builddir
from sparseforge.runtime.builddir import FORMAT, MANIFEST, Build, BuildIntegrityError, read_build, write_build

FILES = {
    "kernels/fwd.py": "import triton\n\n@triton.jit\ndef fwd():\n    pass\n",
    "kernels/bwd.py": "# backward kernel\n",
    "aot/sm_90/fwd.cubin": bytes(range(256)) * 3,
    "configs.json": '{"BLOCK_M": 64}\n',
    "empty.bin": b"",
}
META = {"pattern": "Neighborhood(3)", "problem": {"grid": [6, 7], "heads": 2}, "versions": {"sparseforge": "0.1"}}


def sha(b):
    return hashlib.sha256(b if isinstance(b, bytes) else b.encode()).hexdigest()


def versions(parent, name="build"):
    """The version directories of build ``name`` (what ``name`` links to, and superseded ones)."""
    return sorted(p.name for p in parent.iterdir() if re.fullmatch(rf"\.{name}\.v-[0-9a-f]{{32}}", p.name))


def leftovers(parent, name="build"):
    """Hidden siblings write_build may create, except the lock file and complete versions
    (the one ``name`` links to, superseded ones kept for readers in flight)."""
    def complete_version(p):
        if p.name not in versions(parent, name):
            return False
        try:
            read_build(p)
        except BuildIntegrityError:
            return False
        return True
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}.") and p.name != f".{name}.lock"
                  and not complete_version(p))


@pytest.fixture
def out(tmp_path):
    return tmp_path / "build"


@pytest.fixture
def built(out):
    write_build(out, FILES, META)
    return out


def _manifest(out):
    return json.loads((out / MANIFEST).read_text())


# -- round trip ------------------------------------------------------------------------------
def test_round_trip(out):
    assert write_build(out, FILES, META) == out
    b = read_build(out)
    assert isinstance(b, Build) and b.path == out and b.meta == META
    assert b.files == {rel: sha(c) for rel, c in FILES.items()}
    for rel, content in FILES.items():
        if isinstance(content, str):
            assert b.read_text(rel) == content
        assert b.read_bytes(rel) == (content.encode() if isinstance(content, str) else content)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == sorted([*FILES, MANIFEST])
    assert leftovers(out.parent) == []


def test_manifest_layout(built):
    m = _manifest(built)
    assert set(m) == {"format", "meta", "files", "created"}
    assert m["format"] == FORMAT and m["meta"] == META
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", m["created"])
    assert m["files"]["aot/sm_90/fwd.cubin"] == {"sha256": sha(FILES["aot/sm_90/fwd.cubin"]), "bytes": 768}
    assert set(m["files"]) == set(FILES)


def test_relative_out_dir_and_missing_parents(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = write_build("a/b/build", {"x.py": "x"}, {})
    assert result == tmp_path / "a" / "b" / "build"
    assert read_build("a/b/build").read_text("x.py") == "x"


def test_read_unlisted_file_is_key_error(built):
    b = read_build(built)
    for rel in ("nope.py", MANIFEST):
        with pytest.raises(KeyError, match=f"'{re.escape(rel)}' is not a file of build '.*build'"):
            b.read_bytes(rel)


def test_read_bytes_rechecks_hash(built):
    b = read_build(built)
    (built / "kernels" / "fwd.py").write_text("evil = 1\n")
    with pytest.raises(BuildIntegrityError, match=r"kernels/fwd.py: sha256 mismatch .*since the build was read"):
        b.read_text("kernels/fwd.py")


# -- tamper detection ------------------------------------------------------------------------
def _flip_byte(out):
    p = out / "aot" / "sm_90" / "fwd.cubin"
    data = bytearray(p.read_bytes())
    data[100] ^= 1
    p.write_bytes(bytes(data))


def _edit_manifest(fn):
    def edit(out):
        m = _manifest(out)
        fn(m)
        (out / MANIFEST).write_text(json.dumps(m))
    return edit


TAMPER = {
    "byte_changed": (_flip_byte, r"aot/sm_90/fwd.cubin: sha256 mismatch \(expected [0-9a-f]{12}, got [0-9a-f]{12}; "
                                 r"768 bytes recorded, 768 on disk\)"),
    "text_edited": (lambda o: (o / "kernels" / "fwd.py").write_text("import os\n"), r"kernels/fwd.py: sha256 mismatch"),
    "file_deleted": (lambda o: (o / "kernels" / "bwd.py").unlink(), r"kernels/bwd.py: missing"),
    "dir_deleted": (lambda o: [p.unlink() for p in (o / "aot" / "sm_90").iterdir()] and (o / "aot" / "sm_90").rmdir(),
                    r"aot/sm_90/fwd.cubin: missing"),
    "extra_file": (lambda o: (o / "extra.py").write_text("x"), r"extra.py: unexpected file"),
    "extra_nested_file": (lambda o: (o / "kernels" / "extra.py").write_text("x"), r"kernels/extra.py: unexpected file"),
    "extra_dir": (lambda o: (o / "junk").mkdir(), r"junk/: unexpected directory"),
    "file_replaced_by_symlink": (lambda o: ((o / "kernels" / "bwd.py").unlink(),
                                            (o / "kernels" / "bwd.py").symlink_to(o / "configs.json")),
                                 r"kernels/bwd.py: not a regular file"),
    "manifest_entry_removed": (_edit_manifest(lambda m: m["files"].pop("configs.json")),
                               r"configs.json: unexpected file"),
    "manifest_entry_added": (_edit_manifest(lambda m: m["files"].__setitem__(
        "kernels/more.py", {"sha256": "0" * 64, "bytes": 0})), r"kernels/more.py: missing"),
    "manifest_hash_edited": (_edit_manifest(lambda m: m["files"]["configs.json"].__setitem__("sha256", "a" * 64)),
                             r"configs.json: sha256 mismatch \(expected aaaaaaaaaaaa"),
    "manifest_bad_entry": (_edit_manifest(lambda m: m["files"].__setitem__("configs.json", "abc")),
                           r"entry for 'configs.json' is not"),
    "manifest_escaping_path": (_edit_manifest(lambda m: m["files"].__setitem__(
        "../outside", {"sha256": "0" * 64, "bytes": 0})), r"lists an invalid path '../outside'"),
    "format_changed": (_edit_manifest(lambda m: m.__setitem__("format", "sparseforge-build/2")),
                       r"unknown format 'sparseforge-build/2' \(expected 'sparseforge-build/1'\)"),
    "format_removed": (_edit_manifest(lambda m: m.pop("format")), r"unknown format None"),
    "meta_not_object": (_edit_manifest(lambda m: m.__setitem__("meta", [])), r"'meta' is not an object"),
    "manifest_not_object": (lambda o: (o / MANIFEST).write_text("[]"), r"manifest.json is not a JSON object"),
    "manifest_invalid_json": (lambda o: (o / MANIFEST).write_text("{not json"), r"manifest.json is not valid JSON"),
    "manifest_deleted": (lambda o: (o / MANIFEST).unlink(), r"manifest.json is missing"),
}


@pytest.mark.parametrize("tamper", list(TAMPER))
def test_tamper_detected(built, tamper):
    fn, msg = TAMPER[tamper]
    fn(built)
    with pytest.raises(BuildIntegrityError, match=msg) as info:
        read_build(built)
    text = str(info.value)
    assert text.startswith(f"build directory '{built}' failed verification: ")
    assert text.endswith(f"rebuild it with 'sparseforge compile ... --out {built}'")


def test_all_problems_reported(built):
    (built / "kernels" / "bwd.py").unlink()
    (built / "extra.py").write_text("x")
    with pytest.raises(BuildIntegrityError, match=r"extra.py: unexpected file.*; kernels/bwd.py: missing"):
        read_build(built)


def test_missing_build_dir(tmp_path):
    for exc in (FileNotFoundError, BuildIntegrityError):
        with pytest.raises(exc, match=f"build directory '{re.escape(str(tmp_path / 'nope'))}' does not exist; "
                                      r"rebuild it with 'sparseforge compile \.\.\. --out"):
            read_build(tmp_path / "nope")


def test_build_path_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(BuildIntegrityError, match=r"build directory '.*f' failed verification: it is not a directory"):
        read_build(tmp_path / "f")


# -- interrupted writes ----------------------------------------------------------------------
def _fail_on_call(monkeypatch, n):
    real, calls = builddir._write_file, []

    def flaky(path, data):
        calls.append(path)
        if len(calls) == n:
            raise OSError("disk full (simulated)")
        real(path, data)
    monkeypatch.setattr(builddir, "_write_file", flaky)


@pytest.mark.parametrize("fail_at", [1, 3, len(FILES) + 1])  # first file, a middle file, the manifest
def test_interrupted_write_leaves_nothing(out, monkeypatch, fail_at):
    _fail_on_call(monkeypatch, fail_at)
    with pytest.raises(OSError, match="disk full"):
        write_build(out, FILES, META)
    assert not os.path.lexists(out)
    assert leftovers(out.parent) == [] and versions(out.parent) == []


@pytest.mark.parametrize("fail_at", [1, 2, 3])  # 3: the manifest
def test_interrupted_write_keeps_old_build(built, monkeypatch, fail_at):
    _fail_on_call(monkeypatch, fail_at)
    with pytest.raises(OSError, match="disk full"):
        write_build(built, {"new.py": "new", "kernels/fwd.py": "v2"}, {"v": 2})
    b = read_build(built)
    assert b.meta == META and b.read_bytes("aot/sm_90/fwd.cubin") == FILES["aot/sm_90/fwd.cubin"]
    assert leftovers(built.parent) == [] and versions(built.parent) == [os.readlink(built)]


def test_interrupted_publish_restores_old_build(built, monkeypatch):
    real = os.rename

    def rename(src, dst):
        if ".staging-" in os.fspath(src):
            raise OSError("rename failed (simulated)")
        real(src, dst)
    monkeypatch.setattr(builddir.os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        write_build(built, {"new.py": "new"}, {"v": 2})
    monkeypatch.undo()
    assert read_build(built).meta == META
    assert leftovers(built.parent) == [] and versions(built.parent) == [os.readlink(built)]


def test_keyboard_interrupt_cleans_up(out, monkeypatch):
    """Interrupted inside write_build, half-way through writing the staging directory."""
    real, seen = builddir._write_file, []

    def boom(path, data):
        if len(seen) == 2:
            seen.append(path.relative_to(out.parent).parts[0])
            assert leftovers(out.parent) == [seen[-1]]  # the staging directory, holding two files
            raise KeyboardInterrupt
        seen.append(path)
        real(path, data)
    monkeypatch.setattr(builddir, "_write_file", boom)
    with pytest.raises(KeyboardInterrupt):
        write_build(out, FILES, META)
    assert len(seen) == 3 and seen[-1].startswith(".build.staging-")
    assert not os.path.lexists(out) and leftovers(out.parent) == [] and versions(out.parent) == []


# -- replacing and refusing ------------------------------------------------------------------
def test_replace_existing_build(built):
    write_build(built, {"only.py": "v2"}, {"v": 2})
    b = read_build(built)
    assert b.meta == {"v": 2} and b.files == {"only.py": sha("v2")}
    assert sorted(p.name for p in built.iterdir()) == [MANIFEST, "only.py"]
    assert leftovers(built.parent) == []


def test_replace_empty_dir(out):
    out.mkdir()
    write_build(out, {"a.py": "a"}, {})
    assert read_build(out).read_text("a.py") == "a"


def _make_dir(out):
    out.mkdir()
    (out / "notes.txt").write_text("keep me")


def _make_foreign_manifest(out):
    out.mkdir()
    (out / MANIFEST).write_text(json.dumps({"format": "something-else/1"}))


def _make_file(out):
    out.write_text("keep me")


def _make_symlink(out):
    target = out.parent / "real"
    write_build(target, {"a.py": "a"}, {})
    out.symlink_to(target)


@pytest.mark.parametrize("make", [_make_dir, _make_foreign_manifest, _make_file, _make_symlink])
def test_refuse_to_replace_non_build(out, make):
    make(out)
    before = sorted((p.relative_to(out.parent).as_posix(), p.is_file() and p.read_bytes())
                    for p in out.parent.rglob("*"))
    with pytest.raises(FileExistsError, match=f"out_dir '{re.escape(str(out))}' .*refusing to replace it"):
        write_build(out, FILES, META)
    after = sorted((p.relative_to(out.parent).as_posix(), p.is_file() and p.read_bytes())
                   for p in out.parent.rglob("*") if p.name != ".build.lock")
    assert after == before
    assert leftovers(out.parent) == []


# -- bad arguments ---------------------------------------------------------------------------
@pytest.mark.parametrize("rel, why", [
    ("/etc/passwd", "is absolute"),
    ("C:/x.py", "is absolute"),
    ("../x.py", r"contains '\.' or '\.\.'"),
    ("kernels/../../x.py", r"contains '\.' or '\.\.'"),
    ("./x.py", r"contains '\.' or '\.\.'"),
    ("", "is empty"),
    ("kernels//x.py", "has an empty component"),
    ("kernels/", "has an empty component"),
    ("kernels\\x.py", "contains a backslash"),
    (MANIFEST, "is reserved for the manifest"),
    (3, "must be a str, got int"),
])
def test_bad_relative_paths(out, rel, why):
    with pytest.raises(ValueError, match=f"files: path {re.escape(repr(rel))} {why}"):
        write_build(out, {"ok.py": "x", rel: "y"}, {})
    assert not os.path.lexists(out) and leftovers(out.parent) == []


def test_file_and_directory_clash(out):
    with pytest.raises(ValueError, match=r"files: path 'a/b.py' needs 'a' to be a directory"):
        write_build(out, {"a": "x", "a/b.py": "y"}, {})


def test_bad_content_type(out):
    with pytest.raises(TypeError, match=r"files: content of 'a.py' must be bytes or str, got int"):
        write_build(out, {"a.py": 1}, {})


def test_files_not_a_mapping(out):
    with pytest.raises(TypeError, match=r"files must be a mapping"):
        write_build(out, [("a.py", "x")], {})


@pytest.mark.parametrize("meta", [{"x": object()}, {"x": float("nan")}, {"x": {1, 2}}])
def test_meta_not_json(out, meta):
    with pytest.raises(ValueError, match="meta must be JSON-serialisable"):
        write_build(out, {"a.py": "x"}, meta)
    assert not os.path.lexists(out)


def test_meta_not_a_mapping(out):
    with pytest.raises(TypeError, match="meta must be a mapping, got list"):
        write_build(out, {"a.py": "x"}, [])


# -- concurrent writers ----------------------------------------------------------------------
def _contents(i):
    return {f"k{i}.py": f"writer {i}\n" * (i + 1), "shared/blob.bin": bytes([i]) * (1000 * (i + 1))}


def _check_one_complete(out, n):
    b = read_build(out)
    i = b.meta["writer"]
    assert 0 <= i < n
    assert b.files == {rel: sha(c) for rel, c in _contents(i).items()}
    assert leftovers(out.parent) == []


def test_concurrent_threads(out):
    n, errors = 8, []
    barrier = threading.Barrier(n)

    def work(i):
        try:
            barrier.wait()
            for _ in range(3):
                write_build(out, _contents(i), {"writer": i})
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    _check_one_complete(out, n)


# The child loads builddir.py by file (stdlib + filelock only) to skip importing torch.
_CHILD = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("builddir", sys.argv[3])
mod = sys.modules["builddir"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
i, out = int(sys.argv[1]), sys.argv[2]
files = {f"k{i}.py": f"writer {i}\\n" * (i + 1), "shared/blob.bin": bytes([i]) * (1000 * (i + 1))}
for _ in range(5):
    mod.write_build(out, files, {"writer": i})
"""


def test_concurrent_processes(out):
    n = 4
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(i), str(out), builddir.__file__], stderr=subprocess.PIPE)
             for i in range(n)]
    errs = [p.communicate(timeout=120)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0] * n, errs
    _check_one_complete(out, n)


# -- crash safety: DIR is a link to an immutable version, switched atomically ----------------
V1 = {"kernels/fwd.py": "v1\n", "old_only.py": "gone in v2\n", "aot/sm_90/fwd.cubin": bytes(range(200))}
V2 = {"kernels/fwd.py": "v2\n", "new_only.py": "new in v2\n", "aot/sm_90/fwd.cubin": bytes(range(100, 0, -1))}
V3 = {"kernels/fwd.py": "v3\n"}
BUILDS = {1: V1, 2: V2, 3: V3}


def _as_bytes(content):
    return content.encode() if isinstance(content, str) else content


def _assert_complete(out, allowed):
    """``out`` reads as one of the builds in ``allowed`` (by meta["v"]), every file exact."""
    b = read_build(out)
    v = b.meta.get("v")
    assert v in allowed, b.meta
    assert b.files == {rel: sha(c) for rel, c in BUILDS[v].items()}
    for rel, content in BUILDS[v].items():
        assert b.read_bytes(rel) == _as_bytes(content)
    return v


def _legacy_build(out, files, meta):
    """A build directory as sparseforge wrote it before versions: a real directory."""
    tmp = out.parent / "tmp-legacy"
    write_build(tmp, files, meta)
    shutil.copytree(os.path.realpath(tmp), out)
    shutil.rmtree(os.path.realpath(tmp))
    os.unlink(tmp)
    for p in out.parent.glob(".tmp-legacy.*"):
        p.unlink()
    assert not out.is_symlink() and read_build(out).meta == meta


def test_dir_is_a_relative_link_to_a_version(out):
    write_build(out, V1, {"v": 1})
    target = os.readlink(out)
    assert re.fullmatch(r"\.build\.v-[0-9a-f]{32}", target)
    assert versions(out.parent) == [target]
    b = read_build(out)
    assert b.path == out and b.root == out.parent / target
    write_build(out, V2, {"v": 2})
    assert os.readlink(out) != target and _assert_complete(out, {2}) == 2


def test_reader_of_a_replaced_build_keeps_its_version(out):
    """A Build read before a replace still reads its own files (the version is kept
    RETAIN_S); once that version is pruned, files equal in the new build are still served
    and others give one clear line."""
    write_build(out, V1, {"v": 1})
    b1 = read_build(out)
    first = os.readlink(out)
    write_build(out, V2, {"v": 2})
    assert versions(out.parent) == sorted([first, os.readlink(out)])  # the superseded one is kept
    assert b1.read_bytes("old_only.py") == b"gone in v2\n" and b1.read_text("kernels/fwd.py") == "v1\n"
    past = time.time() - builddir.RETAIN_S - 10
    os.utime(out.parent / first, (past, past))  # superseded long ago
    write_build(out, {**V1, "kernels/fwd.py": "v3\n"}, {"v": 3})
    assert first not in versions(out.parent) and len(versions(out.parent)) == 2  # v2: superseded just now
    assert b1.read_bytes("old_only.py") == b"gone in v2\n"  # the same bytes in the build now there
    with pytest.raises(BuildIntegrityError, match=rf"^build directory '{re.escape(str(out))}' was replaced since it "
                                                  r"was read \(kernels/fwd.py differs or is gone\); read it again"):
        b1.read_bytes("kernels/fwd.py")


def test_reader_of_an_older_format_build_that_was_replaced(out):
    _legacy_build(out, V1, {"v": 1})
    b1 = read_build(out)
    write_build(out, {**V2, "kernels/fwd.py": "v1\n"}, {"v": 2})
    assert out.is_symlink() and read_build(out).meta == {"v": 2}
    assert b1.read_text("kernels/fwd.py") == "v1\n"  # the same bytes in the new build
    with pytest.raises(BuildIntegrityError, match=r"was replaced since it was read \(old_only.py differs or is gone\)"):
        b1.read_bytes("old_only.py")


def test_stale_leftovers_are_removed_by_the_next_write(out):
    write_build(out, V1, {"v": 1})
    parent, host = out.parent, builddir._host_tag()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    old = time.time() - builddir.STALE_S - 10
    made = {
        f".build.staging-{dead_pid}-{host}-{'a' * 16}": False,              # a killed writer on this host
        f".build.staging-{os.getpid()}-{host}-{'b' * 16}": True,            # a live writer (this process)
        f".build.staging-{dead_pid}-{'0' * 8}-{'c' * 16}": True,            # another host's: cannot tell, young
        f".build.staging-{dead_pid}-{'0' * 8}-{'d' * 16}:old": False,       # ... but abandoned long ago
        f".build.staging-{'e' * 16}": True,                                 # an older sparseforge's, young
        f".build.staging-{'f' * 16}:old": False,                            # ... and old
        f".build.v-{'1' * 32}": True,                                       # never current, young
        f".build.v-{'2' * 32}:old": False,                                  # never current, old
        f".build.link-{'3' * 16}": False,                                   # a temporary link
        f".build.old-{'4' * 16}": False,                                    # renamed aside (DIR is in place)
        f".other.staging-{dead_pid}-{host}-{'5' * 16}": True,               # another build's: not ours to judge
        f".build.vx-{'6' * 16}": True,                                      # not a name we make
    }
    for spec in made:
        name = spec.split(":")[0]
        if ".link-" in name:
            os.symlink(".build.v-" + "9" * 32, parent / name)
        else:
            (parent / name).mkdir()
            (parent / name / "partial.py").write_text("x")
        if spec.endswith(":old"):
            os.utime(parent / name, (old, old))
    write_build(out, V2, {"v": 2})
    assert _assert_complete(out, {2}) == 2
    kept = {p.name for p in parent.iterdir()}
    for spec, keep in made.items():
        assert (spec.split(":")[0] in kept) == keep, spec


def _steps_in(monkeypatch, fail_at=None, exchange=True):
    """Count (and make the ``fail_at``-th raise) the filesystem steps of write_build."""
    calls = []

    def step(name, fn):
        def wrapped(*args, **kwargs):
            calls.append(name)
            if len(calls) == fail_at:
                raise OSError(f"step {name} failed (simulated)")
            return fn(*args, **kwargs)
        return wrapped
    for name in ("rename", "replace", "symlink", "utime", "rmdir"):
        monkeypatch.setattr(builddir.os, name, step(name, getattr(os, name)))
    monkeypatch.setattr(builddir, "_write_file", step("write", builddir._write_file))
    monkeypatch.setattr(builddir, "_exchange", step("exchange", builddir._exchange if exchange else
                                                    (lambda a, b: False)))
    return calls


START = {"link": lambda out: write_build(out, V1, {"v": 1}), "legacy": lambda out: _legacy_build(out, V1, {"v": 1}),
         "legacy_no_exchange": lambda out: _legacy_build(out, V1, {"v": 1}), "empty_dir": lambda out: out.mkdir(),
         "absent": lambda out: None}


@pytest.mark.parametrize("start", list(START))
def test_failure_at_every_step_keeps_old_or_new(tmp_path, monkeypatch, start):
    """Each filesystem step of a replace fails in turn: DIR is the old build or the new one,
    complete, and the next write leaves nothing behind."""
    with monkeypatch.context() as m:
        out = tmp_path / "probe" / "build"
        out.parent.mkdir()
        START[start](out)
        calls = _steps_in(m, exchange=start != "legacy_no_exchange")
        write_build(out, V2, {"v": 2})
    n_steps = len(calls)
    assert calls.count("write") == len(V2) + 1 and ("exchange" in calls) == start.startswith("legacy")
    for fail_at in range(1, n_steps + 1):
        out = tmp_path / f"step{fail_at}" / "build"
        out.parent.mkdir()
        START[start](out)
        with monkeypatch.context() as m:
            _steps_in(m, fail_at=fail_at, exchange=start != "legacy_no_exchange")
            try:
                write_build(out, V2, {"v": 2})
            except OSError as e:
                assert "(simulated)" in str(e)
        if start in ("empty_dir", "absent") and not os.path.islink(out):
            assert not os.path.lexists(out) or not any(out.iterdir())
        else:
            _assert_complete(out, {1, 2})
        assert leftovers(out.parent) == [], fail_at
        monkeypatch.setattr(builddir, "RETAIN_S", -1.0)  # prune every superseded version now
        write_build(out, V3, {"v": 3})
        monkeypatch.undo()
        assert _assert_complete(out, {3}) == 3
        assert leftovers(out.parent) == [] and versions(out.parent) == [os.readlink(out)], fail_at


# The child loads builddir.py by file (stdlib + filelock only) and SIGKILLs itself at one step.
_KILL_CHILD = r"""
import ast, importlib.util, json, os, signal, sys
spec = importlib.util.spec_from_file_location("builddir", sys.argv[1])
mod = sys.modules["builddir"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
out, kill_at, exchange, files = sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", ast.literal_eval(sys.argv[5])
calls = []
def step(name, fn):
    def wrapped(*args, **kwargs):
        calls.append(name)
        if len(calls) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*args, **kwargs)
    return wrapped
for name in ("rename", "replace", "symlink", "utime", "rmdir"):
    setattr(os, name, step(name, getattr(os, name)))
mod._write_file = step("write", mod._write_file)
mod._exchange = step("exchange", mod._exchange if exchange else (lambda a, b: False))
mod.write_build(out, files, {"v": 2})
print(json.dumps(calls))
"""


def _kill_child(out, kill_at, exchange):
    return subprocess.run([sys.executable, "-c", _KILL_CHILD, builddir.__file__, str(out), str(kill_at),
                           "1" if exchange else "0", repr(V2)], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("start", ["link", "legacy"])
def test_sigkill_at_every_step_keeps_old_or_new(tmp_path, monkeypatch, start):
    """A writer killed (SIGKILL) before each of its filesystem steps: a reader sees the old
    build or the new one, complete; what the dead writer left is removed by the next write."""
    exchange = start != "legacy_no_exchange"
    probe = tmp_path / "probe" / "build"
    probe.parent.mkdir()
    START[start](probe)
    done = _kill_child(probe, 0, exchange)
    assert done.returncode == 0, done.stderr
    calls = json.loads(done.stdout)
    assert calls.count("write") == len(V2) + 1
    staging_seen = 0
    for kill_at in range(1, len(calls) + 1):
        out = tmp_path / f"kill{kill_at}" / "build"
        out.parent.mkdir()
        START[start](out)
        killed = _kill_child(out, kill_at, exchange)
        assert killed.returncode == -signal.SIGKILL, (kill_at, killed.stderr)
        staging_seen += any(".build.staging-" in name for name in leftovers(out.parent))
        _assert_complete(out, {1, 2})  # a reader also puts back a build a killed legacy swap left aside
        monkeypatch.setattr(builddir, "RETAIN_S", -1.0)
        write_build(out, V3, {"v": 3})  # removes the dead writer's staging, links, versions
        monkeypatch.undo()
        assert _assert_complete(out, {3}) == 3
        assert leftovers(out.parent) == [] and versions(out.parent) == [os.readlink(out)], kill_at
    # killed inside write_build, before each file and before publishing it: the staging was there
    assert staging_seen == calls.index("rename") + 1 == len(V2) + 2


def test_interrupted_legacy_swap_is_put_back_by_a_reader(out, monkeypatch):
    """Without renameat2, replacing an older-format build takes two renames; a kill between
    them leaves DIR absent and the build aside: the next reader puts it back."""
    _legacy_build(out, V1, {"v": 1})
    killed = _kill_child(out, 0, False)
    calls = json.loads(killed.stdout)
    out.rename(out.parent / "done")
    _legacy_build(out, V1, {"v": 1})
    killed = _kill_child(out, calls.index("replace") + 1, False)  # after renaming DIR aside
    assert killed.returncode == -signal.SIGKILL
    assert not os.path.lexists(out) and any(".build.old-" in n for n in leftovers(out.parent))
    assert _assert_complete(out, {1}) == 1 and not out.is_symlink()
    assert not any(".build.old-" in n for n in leftovers(out.parent))


def test_user_symlink_to_a_build_reads_and_dangling_own_link_is_replaced(tmp_path):
    real = tmp_path / "real"
    write_build(real, V1, {"v": 1})
    mine = tmp_path / "mine"
    mine.symlink_to(real)
    assert _assert_complete(mine, {1}) == 1
    shutil.rmtree(tmp_path / os.readlink(real))  # the version is gone: our own link, dangling
    with pytest.raises(BuildIntegrityError, match=r"failed verification: it is not a directory"):
        read_build(real)
    write_build(real, V2, {"v": 2})
    assert _assert_complete(real, {2}) == 2 and _assert_complete(mine, {2}) == 2


_REPLACER = r"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("builddir", sys.argv[1])
mod = sys.modules["builddir"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
out, n, retain = sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
mod.RETAIN_S = retain
for i in range(n):
    v = 1 + i % 2
    files = {"kernels/fwd.py": f"v{v}\n" * 200, f"only{v}.py": "x" * (1000 * v), "blob.bin": bytes([v]) * 50000}
    mod.write_build(out, files, {"v": v})
"""


def _replaced_build_files(v):
    return {"kernels/fwd.py": f"v{v}\n" * 200, f"only{v}.py": "x" * (1000 * v), "blob.bin": bytes([v]) * 50000}


@pytest.mark.parametrize("retain", [builddir.RETAIN_S, -1.0], ids=["default", "pruned_at_once"])
def test_readers_never_fail_while_a_process_replaces_the_build(out, retain):
    """A process replaces DIR 40 times while this one reads it in a loop: every read is one
    complete build. With pruning at once, versions vanish under readers, which read again."""
    write_build(out, _replaced_build_files(1), {"v": 1})
    child = subprocess.Popen([sys.executable, "-c", _REPLACER, builddir.__file__, str(out), "40", str(retain)],
                             stderr=subprocess.PIPE)
    reads, failures, seen = 0, [], set()
    try:
        while child.poll() is None or reads < 20:
            try:
                b = read_build(out)
                v = b.meta["v"]
                expected = _replaced_build_files(v)
                assert b.files == {rel: sha(c) for rel, c in expected.items()}
                if retain > 0:  # the version read stays: every file reads back
                    for rel, content in expected.items():
                        assert b.read_bytes(rel) == _as_bytes(content)
                seen.add(v)
            except Exception as e:  # noqa: BLE001 - counted and shown below
                failures.append(repr(e))
            reads += 1
    finally:
        err = child.communicate(timeout=120)[1].decode()
    assert child.returncode == 0, err
    assert failures == [], (len(failures), reads, failures[:3])
    assert seen == {1, 2}, (seen, reads)
