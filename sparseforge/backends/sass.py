"""What a compiled kernel's SASS says about its speed, read without a GPU.

``cuobjdump -sass`` (bundled with Triton) disassembles the cubin of an ahead-of-time compile;
this module finds its loops (a branch back to a lower address closes one) and reports, per
loop, the figures that predict time on Hopper:

- ``instructions``: SASS instructions in one iteration (the loop body, inner loops included
  once), i.e. issue slots per warp per iteration;
- ``wgmma``: the ``HGMMA`` instructions and their shapes (``64x32x16``: M x N x K per
  warpgroup), ``hmma``: ``HMMA`` (``mma.sync``) instructions, the slower path on sm_90;
- ``waits``: instructions that wait (``DEPBAR``, ``WARPGROUP.DEPBAR``, ``BAR.SYNC``).

The loops that hold matrix instructions are the tile loops (``mma_loops``): for the forward
and dQ kernels the template emits the FULL-tile loop first, then the PARTIAL ones.
``issue_slots_per_pair`` turns those figures and a schedule's tile counts into issue slots
per allowed (query, key) pair, the number to compare between kernels.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
import subprocess
import tempfile
from collections import Counter

__all__ = ["Instruction", "Loop", "SassReport", "analyse", "disassemble", "issue_slots_per_pair"]

_LINE_RE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRA_RE = re.compile(r"^(?:@!?U?P\w+\s+)?BRA(?:\.\w+)*\s+(?:`\(.*?\)\s*)?0x([0-9a-f]+)")
_HGMMA_RE = re.compile(r"\bHGMMA\.(\d+x\d+x\d+)")
_WAIT_RE = re.compile(r"^(?:@!?P\w+\s+)?(WARPGROUP\.DEPBAR|DEPBAR|BAR\.SYNC|WARPSYNC)\b")


@dataclasses.dataclass(frozen=True)
class Instruction:
    address: int   # byte offset in the function
    text: str      # the instruction, predicate included, without the trailing ';'

    @property
    def opcode(self) -> str:
        words = self.text.split()
        return (words[1] if words[0].startswith("@") else words[0]) if words else ""


@dataclasses.dataclass(frozen=True)
class Loop:
    """The body [start, end] (addresses, the closing branch included) of one loop."""

    start: int
    end: int
    depth: int                  # 0 for an outermost loop
    instructions: int           # issue slots per warp of one iteration
    wgmma: tuple[str, ...]      # HGMMA shapes in issue order
    hmma: int
    waits: int

    @property
    def has_mma(self) -> bool:
        return bool(self.wgmma) or self.hmma > 0

    def as_dict(self) -> dict:
        shapes = Counter(self.wgmma)
        return dict(start=self.start, end=self.end, depth=self.depth, instructions=self.instructions,
                    wgmma=len(self.wgmma), wgmma_shapes=dict(sorted(shapes.items())), hmma=self.hmma, waits=self.waits)


@dataclasses.dataclass(frozen=True)
class SassReport:
    """The loops of one kernel function and its totals."""

    function: str
    instructions: int
    wgmma: int
    hmma: int
    loops: tuple[Loop, ...]

    @property
    def mma_loops(self) -> tuple[Loop, ...]:
        """The innermost loops that hold matrix instructions: the tile loops, in order."""
        with_mma = [lp for lp in self.loops if lp.has_mma]
        return tuple(lp for lp in with_mma
                     if not any(o is not lp and lp.start <= o.start and o.end <= lp.end for o in with_mma))

    def as_dict(self) -> dict:
        return dict(function=self.function, instructions=self.instructions, wgmma=self.wgmma, hmma=self.hmma,
                    mma_loops=[lp.as_dict() for lp in self.mma_loops])


@functools.lru_cache(maxsize=1)
def _cuobjdump() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise RuntimeError(f"cuobjdump not found at {path} (it ships with Triton's NVIDIA backend)")
    return path


def disassemble(cubin: bytes) -> str:
    """The SASS text of ``cubin`` (``cuobjdump -sass``)."""
    if not cubin:
        raise ValueError("cubin is empty: compile for a real target first (ResourceReport.cubin)")
    with tempfile.TemporaryDirectory(prefix="sparseforge-sass-") as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        proc = subprocess.run([_cuobjdump(), "-sass", path], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"cuobjdump failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def parse(sass: str) -> tuple[str, list[Instruction]]:
    """(function name, instructions) of the first function in ``sass``."""
    name = ""
    out: list[Instruction] = []
    for line in sass.splitlines():
        if "Function :" in line:
            if out:
                break
            name = line.split("Function :", 1)[1].strip()
            continue
        m = _LINE_RE.match(line)
        if m:
            out.append(Instruction(int(m.group(1), 16), m.group(2)))
    return name, out


def analyse(sass: str) -> SassReport:
    """Loops and matrix-instruction figures of the first function in ``sass``."""
    name, instrs = parse(sass)
    spans = []
    for ins in instrs:
        m = _BRA_RE.match(ins.text)
        if m and int(m.group(1), 16) < ins.address:
            spans.append((int(m.group(1), 16), ins.address))
    loops = []
    for start, end in spans:
        body = [i for i in instrs if start <= i.address <= end]
        depth = sum(1 for s, e in spans if (s, e) != (start, end) and s <= start and end <= e)
        shapes = tuple(m.group(1) for i in body for m in [_HGMMA_RE.search(i.text)] if m)
        loops.append(Loop(start, end, depth, len(body), shapes, sum(i.opcode.startswith("HMMA") for i in body),
                          sum(1 for i in body if _WAIT_RE.match(i.text))))
    loops.sort(key=lambda lp: (lp.start, -lp.end))
    real = [i for i in instrs if i.opcode not in ("NOP",)]
    return SassReport(name, len(real), sum(1 for i in instrs if i.opcode.startswith("HGMMA")),
                      sum(1 for i in instrs if i.opcode.startswith("HMMA")), tuple(loops))


def issue_slots_per_pair(loops: tuple[Loop, ...], iterations: tuple[int, ...], num_warps: int,
                         allowed_pairs: int) -> float:
    """Issue slots (instructions x warps) the tile loops spend per allowed pair: ``loops[i]``
    runs ``iterations[i]`` times in all (e.g. the FULL loop once per FULL tile pair)."""
    if len(loops) != len(iterations):
        raise ValueError(f"{len(loops)} loops but {len(iterations)} iteration counts")
    if allowed_pairs <= 0:
        raise ValueError(f"allowed_pairs must be positive, got {allowed_pairs}")
    return sum(lp.instructions * n for lp, n in zip(loops, iterations)) * num_warps / allowed_pairs
