"""SASS figures without a GPU (``backends.sass``): loops found from backward branches, wgmma
and HMMA counts and shapes per loop, ptxas's wgmma serialization warnings, and issue slots
per allowed pair; on hand-written SASS and on real ahead-of-time compiles."""
from __future__ import annotations

import pytest
import torch

import sparseforge as sf
from sparseforge.backends.aot import serialization_warnings
from sparseforge.backends.sass import Loop, analyse, issue_slots_per_pair
from sparseforge.backends.triton import TritonKernels
from sparseforge.codegen.config import default_config
from sparseforge.lower import build_schedule


def _sass(lines: list[tuple[int, str]]) -> str:
    body = "\n".join(f"        /*{a:04x}*/                   {t} ;    /* 0x0 */\n        /* 0x0 */" for a, t in lines)
    return f"\tcode for sm_90a\n\t\tFunction : kern\n{body}\n"


HAND = _sass([
    (0x00, "MOV R1, c[0x0][0x28]"),
    (0x10, "WARPGROUP.ARRIVE"),                                     # outer loop: 0x10..0x90
    (0x20, "HGMMA.64x32x16.F32.BF16 R56, gdesc[UR8], RZ, !UPT"),
    (0x30, "HGMMA.64x32x16.F32.BF16 R56, gdesc[UR8], R56, gsb0"),
    (0x40, "WARPGROUP.DEPBAR.LE gsb0, 0x0"),
    (0x50, "IADD3 R2, R2, 0x1, RZ"),                                # inner loop: 0x50..0x70
    (0x60, "HMMA.16816.F32.BF16 R36, R88, R44, RZ"),
    (0x70, "@P0 BRA 0x50"),
    (0x80, "HGMMA.64x64x16.F32.BF16 R24, R72, gdesc[UR4].tnspB, R24"),
    (0x90, "@!P2 BRA 0x10"),
    (0xa0, "@!P1 BRA 0xc0"),                                        # a forward branch: no loop
    (0xb0, "NOP"),
    (0xc0, "EXIT"),
])


def test_loops_of_hand_written_sass():
    r = analyse(HAND)
    assert r.function == "kern" and r.wgmma == 3 and r.hmma == 1
    outer, inner = r.loops
    assert (outer.start, outer.end, outer.depth, outer.instructions) == (0x10, 0x90, 0, 9)
    assert outer.wgmma == ("64x32x16", "64x32x16", "64x64x16") and outer.hmma == 1 and outer.waits == 1
    assert (inner.start, inner.end, inner.depth, inner.instructions, inner.wgmma, inner.hmma) == (0x50, 0x70, 1, 3,
                                                                                                   (), 1)
    assert r.mma_loops == (inner,)  # the innermost loop with matrix instructions
    assert outer.as_dict()["wgmma_shapes"] == {"64x32x16": 2, "64x64x16": 1}


def test_issue_slots_per_pair():
    full = Loop(0, 0x100, 0, 100, ("64x64x16",) * 2, 0, 1)
    partial = Loop(0x200, 0x400, 0, 300, ("64x64x16",) * 2, 0, 2)
    # 10 FULL and 5 PARTIAL iterations of 4 warps over 128 * 64 * 12 allowed pairs
    got = issue_slots_per_pair((full, partial), (10, 5), 4, 128 * 64 * 12)
    assert got == pytest.approx((100 * 10 + 300 * 5) * 4 / (128 * 64 * 12))
    with pytest.raises(ValueError, match="2 loops but 1 iteration counts"):
        issue_slots_per_pair((full, partial), (10,), 4, 1)


def test_serialization_warnings_parsed():
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
           "ptxas warning : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to "
           "non wgmma instructions defining accumulator registers of a wgmma between start and end of the pipeline "
           "stage in the function 'k'\n"
           "ptxas info    : Used 168 registers\n")
    (got,) = serialization_warnings(log)
    assert got.startswith("C7515: wgmma.mma_async instructions are serialized due to non wgmma instructions")
    assert serialization_warnings("ptxas info    : Used 168 registers\n") == ()


@pytest.mark.parametrize("target, dtype", [("sm_90", torch.bfloat16), ("sm_80", torch.float16)])
def test_forward_sass_of_a_real_compile(target, dtype):
    """The closed-form forward kernel: its tile loops hold the matrix instructions of the
    target (HGMMA on sm_90, HMMA on sm_80); the FULL loop (first) is the shortest."""
    pattern, problem = sf.Neighborhood(7), sf.Problem(grid=(56, 56), heads=8, head_dim=64, dtype=dtype)
    schedule = build_schedule(pattern, problem)
    report = TritonKernels(schedule, config=default_config(problem, pattern)).aot("fwd", target)
    sass = report.sass()
    loops = sass.mma_loops
    assert len(loops) >= 2 and schedule.loop_bounds == "closed form"
    if target == "sm_90":
        assert all(lp.wgmma and lp.hmma == 0 for lp in loops) and sass.hmma == 0
    else:
        assert all(lp.hmma and not lp.wgmma for lp in loops) and sass.wgmma == 0
    assert loops[0].instructions < min(lp.instructions for lp in loops[1:])
    assert report.serialized == ()
