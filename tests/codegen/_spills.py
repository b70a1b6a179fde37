"""Register spills that older Triton releases are known to produce at the default configs.

The default configs (``codegen.config.default_config``) were measured spill-free with Triton
3.9, and on 3.9 every ahead-of-time resource test requires zero spill bytes. sparseforge also
supports the Triton that torch 2.10-2.14 pin (3.6, 3.7, 3.8: ``sparseforge.compat``), whose
compilers allocate registers differently: a few kernels spill there. They still compile and
run (a spill costs local-memory traffic, not correctness), so on those versions the AOT tests
allow exactly the kernels listed below to spill at most the bytes listed; every other kernel
must still be spill-free, and a listed kernel spilling more fails. CI runs tests/codegen on the
oldest supported Triton (``.ci/run``), so the 3.6 entries are checked on every push; the 3.7
and 3.8 entries were measured by hand.

Regenerate an entry after a template or default-config change with the Triton in question
first on ``sys.path``::

    PYTHONPATH=/path/to/old-triton python -m tests.codegen._spills

which compiles every instance of the AOT tests and prints this version's table (and any
instance that does not compile at all: Triton 3.8.0 twice crashed in its own
``TritonGPURemoveLayoutConversions`` pass on the sm_90 backward of
``PerHead([Blocks(8), Grid(8)])-g64x64_h2_d32_bf16`` in such a run, yet compiled it in a fresh
pytest process and alone: not reproducible, so not listed).
"""
from __future__ import annotations

import triton

from sparseforge.compat import version_tuple

#: Triton (major, minor) -> {(instance id, kernel, target): most spill bytes allowed}. Instance
#: ids are the AOT tests' parameter ids. Measured 2026-12 (Triton 3.6.0, 3.7.1, 3.8.0) on the
#: default configs of that date.
KNOWN: dict[tuple[int, int], dict[tuple[str, str, str], int]] = {
    (3, 6): {  # Triton 3.6.0 (torch 2.10, 2.11); checked by CI; regenerated 2026-12-01 after the
        # dK/dV kernel got tiles of its own (the 3.7 and 3.8 rows below predate it)
        ('Neighborhood(7, dilation=2)-g56x56_h8_d128_bf16', 'bwd_dkdv', 'sm_90'): 32,
        ('Scattered((8, 8))-gvar_h8_d128_fp16', 'bwd_dq', 'sm_80'): 8,
        # measured by hand 2026-12-01 (test_modifier_kernels, test_padding_kernels)
        ('t5-d64', 'bwd_dq', 'sm_90'): 8,
        ('groups-causal_window', 'bwd_dkdv', 'sm_90'): 24,
    },
    (3, 7): {  # Triton 3.7.1 (torch 2.12.1, 2.13)
        ('Full()-g256_h2_d64_fp16', 'bwd_dkdv', 'sm_90'): 28,
        ('Neighborhood(7, dilation=2)-g56x56_h8_d64_bf16', 'bwd_dkdv', 'sm_90'): 8,
        ('bfloat16_hd64_elu+1', 'lin_fwd_kv', 'sm_80'): 8,
    },
    (3, 8): {  # Triton 3.8.0 (torch 2.14)
        ('Neighborhood(7)-g56x56_h4_d64_fp32', 'bwd_dq', 'sm_90'): 16,
        ('Neighborhood(7, dilation=2)-g56x56_h8_d64_bf16', 'bwd_dkdv', 'sm_90'): 8,
        ('Scattered((8, 8))-gvar_h8_d64_bf16', 'bwd_dkdv', 'sm_90'): 40,
    },
}


def triton_minor() -> tuple[int, int]:
    return version_tuple(triton.__version__)[:2]


def allowed_spills(instance: str | None, kernel: str, target: str) -> int:
    """Spill bytes the running Triton is known to need for this kernel (0 unless listed)."""
    return KNOWN.get(triton_minor(), {}).get((instance, kernel, target), 0)


def spill_message(allowed: int) -> str:
    where = f"Triton {triton.__version__}"
    return (f"{where} may spill {allowed} bytes here (tests/codegen/_spills.py)" if allowed else
            f"no spill is expected here on {where}; if this is a known older-Triton spill, list it "
            f"in tests/codegen/_spills.py (python -m tests.codegen._spills prints the table)")


def measure() -> tuple[dict[tuple[str, str, str], int], dict[str, str]]:
    """Compile every instance of the AOT tests on the running Triton: (the spilling kernels,
    {instance id: error} for instances that do not compile at all)."""
    from sparseforge.lower import build_schedule
    from sparseforge.lower.routed import build_routed_schedule

    from . import test_aot_kernels, test_linear_kernels, test_routed_kernels, test_scattered_kernels
    from ._aot import compile_reports, instance_ids

    found, failed = {}, {}

    def record(reports, ids):
        for (index, kernel, target), r in reports.items():
            if r.spills:
                found[(ids[index], kernel, target)] = r.spills

    for instances, schedule_of in ((test_aot_kernels.INSTANCES, build_schedule),
                                   (test_routed_kernels.INSTANCES, build_routed_schedule),
                                   (test_scattered_kernels.INSTANCES, test_scattered_kernels.schedule_of)):
        for instance, name in zip(instances, instance_ids(instances)):
            try:
                record(compile_reports([instance], schedule_of), [name])
            except Exception as e:  # noqa: BLE001  (a compiler crash is what we are looking for)
                failed[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}"
    reports = test_linear_kernels.compile_linear_reports()
    record(reports, reports.ids)
    return found, failed


if __name__ == "__main__":
    table, failed = measure()
    print(f"    {triton_minor()}: {{  # Triton {triton.__version__}")
    for key in sorted(table):
        print(f"        {key!r}: {table[key]},")
    print("    },")
    for name, error in sorted(failed.items()):
        print(f"    # does not compile: {name}: {error}")
