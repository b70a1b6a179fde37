"""What every benchmark result records about where and with what it ran: the device's
name, the versions that decide the numbers, and the UTC time."""
from __future__ import annotations

import datetime
import platform


def device_name(cuda: bool) -> str:
    """The CUDA device's name, or ``"cpu: <model name>"`` from /proc/cpuinfo (the platform's
    processor or machine where that file is missing)."""
    if cuda:  # pragma: no cover - needs a CUDA device
        import torch

        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        model = None
    return f"cpu: {model or platform.processor() or platform.machine()}"


def versions() -> dict[str, str]:
    """sparseforge, torch, triton and Python versions."""
    import torch
    import triton

    import sparseforge as sf

    return dict(sparseforge=sf.__version__, torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version())


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
