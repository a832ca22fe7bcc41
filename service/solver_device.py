"""Which device the structured LipSDP solver of this process uses (``LIPCERT_DEVICE``).

Solver processes (local runner, RQ workers) and ``lipcert bound --device`` call
:func:`use_solver_device` before solving; the maths stays in :mod:`sdp` and the torch backend
in :mod:`models.lipsdp_device`.
"""

from __future__ import annotations

import os

from sdp.errors import LipcertError


def gpu_driver_present() -> bool:
    """Whether this machine exposes a GPU driver (NVIDIA or ROCm), checked without importing
    torch: a CPU-only solver process then starts without paying for the torch import."""
    paths = ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/kfd")
    return any(os.path.exists(p) for p in paths)


def use_solver_device(device: str) -> str:
    """Put the structured LipSDP solver's matrices on ``device`` (``LIPCERT_DEVICE``: auto|cpu|
    cuda) for this process (:func:`models.lipsdp_device.use_device_for_lipsdp`); returns the
    device used. auto: cuda when a GPU driver is present and torch sees the GPU, else cpu."""
    if device == "cpu" or (device == "auto" and not gpu_driver_present()):
        return "cpu"
    from models.lipsdp_device import use_device_for_lipsdp  # torch: only when a GPU may run

    try:
        return use_device_for_lipsdp(device)
    except ValueError as e:  # a name that is no device
        raise LipcertError(str(e), code="invalid-device") from e
    except RuntimeError as e:  # cuda asked for, none visible
        raise LipcertError(str(e), code="device-unavailable") from e
