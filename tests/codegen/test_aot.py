"""Ahead-of-time compilation for real CUDA targets on a CPU-only machine (sparseforge.backends.aot).

Every compile here runs Triton's full pipeline plus ptxas; nothing needs a GPU.
"""
from __future__ import annotations

import importlib.util
import json
import sys
import textwrap
from dataclasses import FrozenInstanceError
from functools import lru_cache

import pytest
import triton
import triton.language as tl

from sparseforge.backends.aot import (
    SUPPORTED_TARGETS,
    ResourceReport,
    _parse_ptxas_log,
    aot_compile,
    parse_target,
    tensor_core_kind,
)


@pytest.fixture(autouse=True, scope="module")
def _private_triton_cache(tmp_path_factory):
    """Compile for real in this module rather than hit a cache other runs filled."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TRITON_CACHE_DIR", str(tmp_path_factory.mktemp("triton-cache")))
    yield
    mp.undo()


# --------------------------------------------------------------------------- kernels


@triton.jit
def _fa_tile(Q, K, V, O, stride_m, n_ctx,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """A flash-attention-like forward over one query tile: online softmax, two dots."""
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rd = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + rm[:, None] * stride_m + rd[None, :])
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start in range(0, n_ctx, BLOCK_N):
        k = tl.load(K + (start + rn)[:, None] * stride_m + rd[None, :])
        v = tl.load(V + (start + rn)[:, None] * stride_m + rd[None, :])
        s = tl.dot(q, tl.trans(k))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    tl.store(O + rm[:, None] * stride_m + rd[None, :], (acc / l_i[:, None]).to(O.dtype.element_ty))


@triton.jit
def _register_hog(X, Y, BM: tl.constexpr, BN: tl.constexpr):
    """A whole [BM, BN] fp32 tile live at once: 64x128 on one warp needs ~256 values/thread."""
    rm = tl.arange(0, BM)
    rn = tl.arange(0, BN)
    x = tl.load(X + rm[:, None] * BN + rn[None, :])
    s = tl.sum(x, axis=1)
    m = tl.max(x, axis=0)
    tl.store(Y + rm[:, None] * BN + rn[None, :], x * s[:, None] + m[None, :])


@triton.jit
def _scale(X, Y, n, BLOCK: tl.constexpr = 128):
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + r, tl.load(X + r, mask=r < n) * 2.0, mask=r < n)


def _fa_signature(dtype: str) -> dict[str, str]:
    return {"Q": f"*{dtype}", "K": f"*{dtype}", "V": f"*{dtype}", "O": f"*{dtype}",
            "stride_m": "i32:16", "n_ctx": "i32",  # strides divisible by 16, as the JIT would see
            "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "HEAD_DIM": "constexpr"}


_FA_CONSTS = {"BLOCK_M": 64, "BLOCK_N": 64, "HEAD_DIM": 64}


@lru_cache(maxsize=None)
def _fa_report(target: str, dtype: str = "fp16", num_warps: int = 4) -> ResourceReport:
    return aot_compile(_fa_tile, _fa_signature(dtype), _FA_CONSTS,
                       target=target, num_warps=num_warps, num_stages=2)


# --------------------------------------------------------------------------- targets


@pytest.mark.parametrize("text, cap", [
    ("sm_90", 90), ("sm90", 90), ("90", 90), ("cuda:90", 90), ("SM_90", 90), (" sm_90a ", 90),
    ("sm_80", 80), ("86", 86), ("sm_89", 89), ("sm_100", 100), ("cuda:100", 100), (80, 80),
])
def test_parse_target_spellings(text, cap):
    assert parse_target(text) == cap


@pytest.mark.parametrize("text", ["sm_75", "sm_120", "hopper", "", "sm_", "cuda:", "sm_9x", "gfx942", "70"])
def test_parse_target_rejects_with_argument_name(text):
    with pytest.raises(ValueError, match=r"target=") as err:
        parse_target(text)
    msg = str(err.value)
    assert repr(text) in msg and "sm_90" in msg  # the value and what was expected


@pytest.mark.parametrize("bad", [90.0, None, True, b"sm_90"])
def test_parse_target_rejects_non_strings(bad):
    with pytest.raises(TypeError, match="target="):
        parse_target(bad)


def test_aot_compile_rejects_bad_target_before_compiling():
    with pytest.raises(ValueError, match="target='sm_75'"):
        aot_compile(_scale, {"X": "*fp32", "Y": "*fp32", "n": "i32"}, {}, target="sm_75")


# --------------------------------------------------------------------------- FA-like kernel


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_fa_sm80_uses_mma_without_spills(dtype):
    r = _fa_report("sm_80", dtype)
    assert r.target == "sm_80"
    assert r.tensor_core == "mma"
    assert "mma.sync" in r.ptx and "wgmma" not in r.ptx
    assert 0 < r.registers <= 255
    assert r.spills == 0 and r.spill_stores == 0 and r.spill_loads == 0
    assert r.shared_bytes > 0
    assert (r.num_warps, r.num_stages) == (4, 2)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_fa_sm90_uses_wgmma_without_spills(dtype):
    r = _fa_report("sm_90", dtype)
    assert r.target == "sm_90"
    assert r.tensor_core == "wgmma"
    assert "wgmma.mma_async" in r.ptx
    assert 0 < r.registers <= 255
    assert r.spills == 0
    assert r.shared_bytes > 0


def test_num_stages_pipelines_through_shared_memory():
    two, three = _fa_report("sm_90"), aot_compile(_fa_tile, _fa_signature("fp16"), _FA_CONSTS,
                                                  target="sm_90", num_stages=3)
    assert three.num_stages == 3
    assert three.shared_bytes > two.shared_bytes  # one more K/V stage buffered


def test_bf16_and_fp16_give_different_code():
    fp16, bf16 = _fa_report("sm_90", "fp16"), _fa_report("sm_90", "bf16")
    assert ".bf16" in bf16.ptx and ".bf16" not in fp16.ptx


@pytest.mark.parametrize("target, kind", [("sm_86", "mma"), ("sm_89", "mma"), ("sm_100", "tcgen05")])
def test_other_targets(target, kind):
    r = _fa_report(target)
    assert r.target == target
    assert r.tensor_core == kind
    assert r.registers > 0 and r.spills == 0


def test_sm90_with_too_few_warps_for_wgmma_falls_back_to_mma():
    # wgmma needs a warp group (4 warps); with 2 warps Hopper code uses mma.sync.
    r = _fa_report("sm_90", num_warps=2)
    assert r.tensor_core == "mma"
    assert r.num_warps == 2


def test_kernel_without_dot_uses_no_tensor_core():
    r = aot_compile(_scale, {"X": "*fp32", "Y": "*fp32", "n": "i32"}, {"BLOCK": 256}, target="sm_90")
    assert r.tensor_core == "none"
    assert r.registers > 0 and r.spills == 0


# --------------------------------------------------------------------------- spills


def test_register_hog_spills():
    r = aot_compile(_register_hog, {"X": "*fp32", "Y": "*fp32"}, {"BM": 64, "BN": 128},
                    target="sm_90", num_warps=1)
    assert r.spill_stores > 0 and r.spill_loads > 0
    assert r.spills == r.spill_stores + r.spill_loads
    assert r.registers == 255  # the hardware maximum, and it still was not enough


# --------------------------------------------------------------------------- report object


def test_report_is_frozen_hashable_and_hides_ptx():
    r = _fa_report("sm_90")
    assert "ptx" not in repr(r) and "wgmma" in repr(r)
    with pytest.raises(FrozenInstanceError):
        r.registers = 1  # type: ignore[misc]
    d = r.as_dict()
    assert "ptx" not in d and d["spills"] == r.spills
    json.dumps(d)
    fields_only = {k: v for k, v in d.items() if k != "spills"}
    twin = ResourceReport(**fields_only, ptx="// other text")
    assert twin == r and hash(twin) == hash(r)  # ptx takes no part in equality
    assert {r, twin} == {r}


# --------------------------------------------------------------------------- signatures


def test_constexprs_may_be_left_out_of_signature_and_defaults_apply():
    # HEAD_DIM etc. not listed in signature; _scale's BLOCK has a default of 128.
    sig = {k: v for k, v in _fa_signature("fp16").items() if v != "constexpr"}
    assert len(sig) == 6
    r = aot_compile(_fa_tile, sig, _FA_CONSTS, target="sm_80")
    assert r == _fa_report("sm_80")
    r2 = aot_compile(_scale, {"X": "*fp32", "Y": "*fp32", "n": "i32"}, {}, target="sm_80")
    assert r2.registers > 0


def test_alignment_assumption_changes_the_code():
    consts = {"BM": 16, "BN": 64}
    aligned = aot_compile(_register_hog, {"X": "*fp32", "Y": "*fp32"}, consts, target="sm_90")
    unaligned = aot_compile(_register_hog, {"X": "*fp32", "Y": "*fp32"}, consts, target="sm_90",
                            assume_aligned=False)
    hinted = aot_compile(_register_hog, {"X": "*fp32:16", "Y": "*fp32:16"}, consts, target="sm_90",
                         assume_aligned=False)
    assert "ld.global.v4" in aligned.ptx  # 16-byte vector loads need the alignment
    assert "ld.global.v4" not in unaligned.ptx
    assert hinted == aligned


@pytest.mark.parametrize("signature, constexprs, needle", [
    ({"X": "*fp32", "Y": "*fp32", "n": "i32", "Z": "*fp32"}, {}, r"signature names \['Z'\]"),
    ({"X": "*fp32", "Y": "*fp32"}, {}, r"signature has no type for parameter 'n'"),
    ({"X": "*fp32", "Y": "*float", "n": "i32"}, {}, r"signature\['Y'\]='\*float' is not a Triton type"),
    ({"X": "*fp32", "Y": "*fp32", "n": "int32"}, {}, r"signature\['n'\]='int32'"),
    ({"X": "*fp32", "Y": "*fp32", "n": "i32", "BLOCK": "i32"}, {"BLOCK": 64},
     r"contradicts constexprs\['BLOCK'\]"),
    ({"X": "*fp32", "Y": "*fp32", "n": "i32", "BLOCK": "i32"}, {}, r"annotated tl.constexpr"),
    ({"X": "*fp32:8", "Y": "*fp32", "n": "i32"}, {}, r"signature\['X'\]='\*fp32:8' has hint '8'"),
    ({"X": "*fp32", "Y": "*fp32", "n": "i32"}, {"M": 3}, r"constexprs names \['M'\]"),
])
def test_signature_errors_name_the_argument(signature, constexprs, needle):
    with pytest.raises(ValueError, match=needle):
        aot_compile(_scale, signature, constexprs, target="sm_80")


def test_missing_constexpr_value_is_named():
    sig = _fa_signature("fp16")
    with pytest.raises(ValueError, match=r"constexprs has no value for 'HEAD_DIM'"):
        aot_compile(_fa_tile, sig, {"BLOCK_M": 64, "BLOCK_N": 64}, target="sm_80")


@pytest.mark.parametrize("kwargs, needle", [
    ({"num_warps": 3}, "num_warps=3"), ({"num_warps": 0}, "num_warps=0"), ({"num_warps": 64}, "num_warps=64"),
    ({"num_stages": 0}, "num_stages=0"), ({"num_stages": 2.0}, "num_stages=2.0"),
])
def test_bad_launch_options(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        aot_compile(_scale, {"X": "*fp32", "Y": "*fp32", "n": "i32"}, {}, **kwargs)


def test_non_kernel_is_rejected():
    def plain(X):
        pass

    with pytest.raises(TypeError, match=r"fn=.*@triton.jit"):
        aot_compile(plain, {"X": "*fp32"}, {})
    with pytest.raises(TypeError, match=r"signature="):
        aot_compile(_scale, [("X", "*fp32")], {})  # type: ignore[arg-type]


# --------------------------------------------------------------------------- interpreter-made kernels

_INTERP_MODULE = '''
import triton
import triton.language as tl


@triton.jit
def _twice(x):
    return x * 2.0


@triton.jit
def _inc(x):
    return _twice(x) + 1.0


@triton.jit
def kernel(X, Y, n, BLOCK: tl.constexpr):
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + r, _inc(tl.load(X + r, mask=r < n)), mask=r < n)
'''


def test_kernel_made_under_interpreter_compiles(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from triton.runtime.interpreter import InterpretedFunction

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    path = tmp_path / "sf_interp_kernels.py"
    path.write_text(textwrap.dedent(_INTERP_MODULE))
    spec = importlib.util.spec_from_file_location("sf_interp_kernels", path)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "sf_interp_kernels", mod)
    spec.loader.exec_module(mod)

    @triton.jit
    def closure_kernel(X, Y, n, BLOCK: tl.constexpr):  # reaches mod_helper through its closure
        r = tl.arange(0, BLOCK)
        tl.store(Y + r, mod_helper(tl.load(X + r, mask=r < n)), mask=r < n)

    mod_helper = mod._inc  # noqa: F841 - a closure cell of closure_kernel; _inc calls _twice via globals

    assert isinstance(mod.kernel, InterpretedFunction)
    assert isinstance(closure_kernel, InterpretedFunction)

    # The interpreter runs first (as CPU tests do), then the same objects compile for real.
    x = torch.arange(100, dtype=torch.float32)
    y = torch.empty_like(x)
    mod.kernel[(1,)](x, y, 100, BLOCK=128)
    torch.testing.assert_close(y, x * 2 + 1)

    sig = {"X": "*fp32", "Y": "*fp32", "n": "i32"}
    for kern in (mod.kernel, closure_kernel):
        r = aot_compile(kern, sig, {"BLOCK": 128}, target="sm_90")
        assert r.registers > 0 and r.spills == 0 and r.tensor_core == "none"
        assert "fma.rn.f32" in r.ptx or "mul.f32" in r.ptx
    # The caller's module still holds its interpreted functions, untouched.
    assert isinstance(mod._twice, InterpretedFunction) and isinstance(mod.kernel, InterpretedFunction)
    assert triton.knobs.runtime.interpret  # and the interpreter is still on


# --------------------------------------------------------------------------- pure helpers

_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Function properties for helper
    0 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Compiling entry function 'kern' for 'sm_90a'
ptxas info    : Function properties for kern
    184 bytes stack frame, 208 bytes spill stores, 200 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers, 184 bytes cumulative stack size
ptxas info    : Compile time = 188.862 ms
"""


def test_parse_ptxas_log():
    assert _parse_ptxas_log(_LOG, "kern") == (255, 216, 204)
    assert _parse_ptxas_log(_LOG) == (255, 216, 204)
    with pytest.raises(RuntimeError, match="Used N registers"):
        _parse_ptxas_log("ptxas info    : 0 bytes gmem\n")


@pytest.mark.parametrize("ptx, kind", [
    ("wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {...}", "wgmma"),
    ("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {...}", "mma"),
    ("tcgen05.mma.cta_group::1.kind::f16 [%r1], ...", "tcgen05"),
    ("wgmma.fence.sync.aligned;\nmma.sync.aligned.m16n8k16", "mma"),
    ("ld.global.v4.b32 {...}", "none"),
])
def test_tensor_core_kind(ptx, kind):
    assert tensor_core_kind(ptx) == kind


def test_supported_targets():
    assert SUPPORTED_TARGETS == (80, 86, 89, 90, 100)
