"""sparseforge.bench.run_info: one description of the machine and versions for every result."""
from __future__ import annotations

import torch
import triton

import sparseforge as sf
from sparseforge.bench import memory, run_info, suite


def test_cpu_device_name_and_versions():
    name = run_info.device_name(cuda=False)
    assert name.startswith("cpu: ") and len(name) > len("cpu: ")
    assert run_info.versions() == dict(sparseforge=sf.__version__, torch=torch.__version__,
                                       triton=triton.__version__, python=run_info.platform.python_version())


def test_suite_and_memory_describe_the_machine_alike():
    a, b = suite.metadata("cpu", 3, "cmd"), memory.metadata("cpu", "cmd")
    assert a["device"] == b["device"] == run_info.device_name(cuda=False)
    assert a["versions"] == b["versions"] == run_info.versions()
