"""Each visible GPU's memory (and utilisation) through NVML, or why none can be read.

NVML sees every GPU of the host; CUDA_VISIBLE_DEVICES (indices or GPU-UUIDs, as Slurm
sets it) narrows the list to the job's cards. The NVML module is a parameter so the
reader can be exercised without a GPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

GIB = 1024**3


@dataclass(frozen=True)
class GpuMemory:
    index: int
    name: str
    used_gib: float
    total_gib: float
    util_percent: int | None  # None where the card does not report it


@dataclass(frozen=True)
class GpuReading:
    gpus: tuple[GpuMemory, ...]
    problem: str | None = None  # why no GPU is listed ("no GPU visible (...)")


def _visible_filter(visible: str | None) -> Callable[[int, str], bool] | None:
    """CUDA_VISIBLE_DEVICES -> predicate on (NVML index, UUID); None keeps every device.

    Indices and GPU-UUID prefixes are honoured; an empty value hides every card, as in
    CUDA. Other forms (MIG-... ids) are not mapped: every card is shown then.
    """
    if visible is None:
        return None
    wanted = [v.strip() for v in visible.split(",") if v.strip()]
    indices = {int(v) for v in wanted if v.isdigit()}
    uuids = tuple(v for v in wanted if v.startswith("GPU-"))
    if len(indices) + len(uuids) != len(wanted):
        return None
    return lambda index, uuid: index in indices or uuid.startswith(uuids)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_gpu_memory(nvml: ModuleType | Any | None = None, env: Mapping[str, str] | None = None) -> GpuReading:
    """Memory used/total per visible GPU (`nvml` defaults to pynvml, `env` to os.environ).

    Never raises: a failure comes back as `problem`, so the monitor keeps following the log.
    """
    visible = (os.environ if env is None else env).get("CUDA_VISIBLE_DEVICES")
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            return GpuReading((), "no GPU visible (nvidia-ml-py is not installed)")
    keep = _visible_filter(visible)
    try:
        nvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return GpuReading((), f"no GPU visible (NVML: {exc})")
    try:
        gpus = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            if keep is not None and not keep(index, _text(nvml.nvmlDeviceGetUUID(handle))):
                continue
            mem = nvml.nvmlDeviceGetMemoryInfo(handle)
            try:
                util = int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            except Exception:  # not supported on this card / MIG
                util = None
            gpus.append(
                GpuMemory(index, _text(nvml.nvmlDeviceGetName(handle)), mem.used / GIB, mem.total / GIB, util)
            )
    except Exception as exc:
        return GpuReading((), f"no GPU visible (NVML: {exc})")
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass
    if not gpus:
        where = f" of CUDA_VISIBLE_DEVICES={visible!r}" if keep is not None else ""
        return GpuReading((), f"no GPU visible (NVML lists no device{where})")
    return GpuReading(tuple(gpus))
