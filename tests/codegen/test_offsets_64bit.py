"""Batch and head offsets in 64 bits: a problem of B*H*N*D > 2^31 elements (16 heads x 1M
tokens x d128, 2^31 elements per batch element) compiled ahead of time for sm_90. Every
kernel's PTX must use each 32-bit stride argument only in 64-bit arithmetic (a widening
multiply or a sign extension): a 32-bit product of a head index and a stride wraps here
and addresses the wrong memory, silently."""
from __future__ import annotations

import re

import pytest
import torch

import sparseforge as sf
from sparseforge.backends.triton import TritonKernels
from sparseforge.lower import build_schedule

#: PTX instructions that take a 32-bit register into 64-bit arithmetic.
WIDENING = ("mul.wide.s32", "mul.wide.u32", "mad.wide.s32", "mad.wide.u32", "cvt.s64.s32", "cvt.u64.u32")

PROBLEMS = [
    (sf.SlidingWindow(256, 256), sf.Problem(grid=1 << 20, heads=16, head_dim=128, dtype=torch.bfloat16)),
    (sf.Causal() & sf.SlidingWindow(512), sf.Problem(grid=1 << 20, heads=16, kv_heads=2, head_dim=128,
                                                      dtype=torch.float16)),
]


def _param_loads(ptx: str, kernel: str, index: int) -> list[tuple[str, str]]:
    """(load type, destination register) of every ``ld.param`` of the kernel's ``index``-th
    parameter, e.g. ("s32", "%rd93"): a 32-bit parameter loaded sign-extended into a 64-bit
    register, or ("b32", "%r58"): loaded into a 32-bit one."""
    pattern = rf"ld\.param\.([usb]\d+)\s+(%r[d]?\d+),\s*\[{re.escape(kernel)}_param_{index}\]"
    return re.findall(pattern, ptx)


def _uses(ptx: str, register: str) -> list[str]:
    """Instructions that read ``register`` (it appears after the destination operand)."""
    out = []
    for line in ptx.splitlines():
        line = line.strip()
        parts = line.split(None, 1)
        if len(parts) < 2 or line.startswith(("ld.param", "//", ".")):
            continue
        operands = [o.strip(" ;") for o in parts[1].split(",")]
        if register in operands[1:]:
            out.append(line)
    return out


@pytest.mark.parametrize("pattern,problem", PROBLEMS, ids=lambda x: repr(x) if isinstance(x, sf.Pattern) else None)
@pytest.mark.parametrize("kernel", TritonKernels.KERNELS)
def test_strides_enter_64_bit_arithmetic_only(pattern, problem, kernel):
    assert problem.heads * problem.tokens * problem.head_dim >= 2 ** 31  # one batch element is past 2^31
    kernels = TritonKernels(build_schedule(pattern, problem))
    signature = kernels.signature(kernel)
    report = kernels.aot(kernel, "sm_90")
    entry = re.search(r"\.entry\s+(\w+)\(", report.ptx).group(1)
    names = list(signature)
    checked = 0
    for name in names:
        if not name.startswith("stride_"):
            continue
        index = names.index(name)
        loads = _param_loads(report.ptx, entry, index)
        assert loads, (kernel, name)  # every stride is read
        for kind, register in loads:
            if register.startswith("%rd"):  # a 64-bit register: a 64-bit argument, or sign-extended on load
                assert kind in ("b64", "u64", "s64", "s32"), (kernel, name, kind)
                checked += 1
                continue
            assert signature[name] != "i64", (kernel, name, kind)
            uses = _uses(report.ptx, register)
            assert uses, (name, register)
            narrow = [u for u in uses if not u.startswith(WIDENING)]
            assert not narrow, f"{kernel}: {name} ({register}) enters 32-bit arithmetic: {narrow[:3]}"
            checked += 1
    assert checked == sum(n.startswith("stride_") for n in names)


def test_stride_types_follow_the_jit():
    """A stride of 2^31 or more is a 64-bit argument (what Triton's JIT specialises it to)."""
    pattern, problem = PROBLEMS[0]
    signature = TritonKernels(build_schedule(pattern, problem)).signature("fwd")
    assert signature["stride_qb"] == "i64" and signature["stride_qh"] == "i32:16"
