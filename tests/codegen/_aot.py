"""Shared ahead-of-time checks: compile every kernel of some schedules for sm_80 and sm_90
and assert what real GPUs need (tensor cores, no register spills)."""
from __future__ import annotations

from sparseforge.codegen.config import default_config
from sparseforge.backends.triton import TritonKernels

from ._spills import allowed_spills, spill_message

TARGETS = ("sm_80", "sm_90")


class Reports(dict):
    """{(index, kernel, target): ResourceReport}, with ``ids``: index -> instance id (the
    key of ``_spills.KNOWN``)."""

    ids: dict = {}


def compile_reports(instances, schedule_of) -> dict:
    """{(index, kernel, target): ResourceReport} for every (pattern, problem) in
    ``instances``, its schedule from ``schedule_of(pattern, problem)``, at the default config."""
    out = Reports()
    out.ids = dict(enumerate(instance_ids(instances)))
    for i, (pattern, problem) in enumerate(instances):
        schedule = schedule_of(pattern, problem)
        for target in TARGETS:  # each target's default config (sm_90 gives dK/dV tiles of its own)
            config = default_config(problem, pattern, capability=int(target.removeprefix("sm_")))
            kernels = TritonKernels(schedule, config=config)
            for name in TritonKernels.KERNELS:
                out[(i, name, target)] = kernels.aot(name, target)
    return out


def assert_tensor_cores_without_spills(reports, index: int, kernels=TritonKernels.KERNELS,
                                       tensor_cores: bool = True) -> None:
    """mma on sm_80 (wgmma or mma on sm_90) unless ``tensor_cores`` is False (fp32 inputs),
    zero spill bytes (or at most what ``_spills.KNOWN`` lists for this older Triton) and a
    sane register count on both targets."""
    for name in kernels:
        if tensor_cores:
            assert reports[(index, name, "sm_80")].tensor_core == "mma", name
            assert reports[(index, name, "sm_90")].tensor_core in ("wgmma", "mma"), name
        for target in TARGETS:
            r = reports[(index, name, target)]
            allowed = allowed_spills(getattr(reports, "ids", {}).get(index), name, target)
            assert r.spills <= allowed, (name, target, r.as_dict(), spill_message(allowed))
            assert 0 < r.registers <= 255, (name, target, r.as_dict())


def instance_ids(instances) -> list[str]:
    return [f"{p!r}-{q.name()}" for p, q in instances]
