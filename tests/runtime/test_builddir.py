"""sparseforge.runtime.builddir: atomic build directories verified by a sha256 manifest."""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading

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


def leftovers(parent, name="build"):
    """Hidden siblings write_build may create, except the lock file."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}.") and p.name != f".{name}.lock")


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
    assert leftovers(out.parent) == []


@pytest.mark.parametrize("fail_at", [1, 2, 3])  # 3: the manifest
def test_interrupted_write_keeps_old_build(built, monkeypatch, fail_at):
    _fail_on_call(monkeypatch, fail_at)
    with pytest.raises(OSError, match="disk full"):
        write_build(built, {"new.py": "new", "kernels/fwd.py": "v2"}, {"v": 2})
    b = read_build(built)
    assert b.meta == META and b.read_bytes("aot/sm_90/fwd.cubin") == FILES["aot/sm_90/fwd.cubin"]
    assert leftovers(built.parent) == []


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
    assert leftovers(built.parent) == []


def test_keyboard_interrupt_cleans_up(out, monkeypatch):
    def boom(path, data):
        raise KeyboardInterrupt
    monkeypatch.setattr(builddir, "_write_file", boom)
    with pytest.raises(KeyboardInterrupt):
        write_build(out, FILES, META)
    assert not os.path.lexists(out) and leftovers(out.parent) == []


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
