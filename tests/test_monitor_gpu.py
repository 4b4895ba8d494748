"""NVML reading: the real "no GPU visible" path on this machine, and device listing through a small NVML double."""

from __future__ import annotations

from types import SimpleNamespace

import pynvml

from vlnflow.monitor.gpu import GIB, read_gpu_memory
from vlnflow.monitor.report import format_report
from vlnflow.monitor.stats import RunState, summarize


def test_real_nvml_reports_gpus_or_says_none_is_visible():
    reading = read_gpu_memory(env={})
    if reading.gpus:  # a GPU machine: every card has sane numbers
        assert reading.problem is None
        assert all(0 <= g.used_gib <= g.total_gib and g.total_gib > 0 for g in reading.gpus)
    else:  # this CPU machine: NVML cannot start
        assert reading.problem.startswith("no GPU visible (NVML: ")
        text = format_report(summarize(RunState()), reading, log="metrics.jsonl", now=0.0)
        assert "  gpu: no GPU visible (NVML: " in text


def test_nvml_init_failure_is_reported_not_raised():
    def fail():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)

    reading = read_gpu_memory(nvml=SimpleNamespace(nvmlInit=fail), env={})
    assert reading.gpus == () and reading.problem == "no GPU visible (NVML: Driver Not Loaded)"


class FakeNvml:
    """Two 80 GiB cards; records shutdown so the reader is seen to release NVML."""

    def __init__(self):
        self.shut_down = False
        self.devices = [("GPU-aaa1", 10 * GIB, 97), ("GPU-bbb2", 61.5 * GIB, None)]

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        self.shut_down = True

    def nvmlDeviceGetCount(self):
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetUUID(self, handle):
        return self.devices[handle][0]

    def nvmlDeviceGetName(self, handle):
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(used=self.devices[handle][1], total=80 * GIB)

    def nvmlDeviceGetUtilizationRates(self, handle):
        util = self.devices[handle][2]
        if util is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return SimpleNamespace(gpu=util)


def test_lists_every_card_with_memory_and_utilisation():
    nvml = FakeNvml()
    reading = read_gpu_memory(nvml=nvml, env={})
    assert [(g.index, g.used_gib, g.total_gib, g.util_percent) for g in reading.gpus] == [
        (0, 10.0, 80.0, 97), (1, 61.5, 80.0, None)]
    assert reading.gpus[0].name == "NVIDIA H100 80GB HBM3" and nvml.shut_down
    text = format_report(summarize(RunState()), reading, log="m.jsonl", now=0.0)
    assert "  gpu0 NVIDIA H100 80GB HBM3: 10.0/80.0 GiB util=97%" in text
    assert "  gpu1 NVIDIA H100 80GB HBM3: 61.5/80.0 GiB util=?%" in text


def test_cuda_visible_devices_narrows_the_list():
    assert [g.index for g in read_gpu_memory(FakeNvml(), {"CUDA_VISIBLE_DEVICES": "1"}).gpus] == [1]
    assert [g.index for g in read_gpu_memory(FakeNvml(), {"CUDA_VISIBLE_DEVICES": "GPU-aaa"}).gpus] == [0]
    hidden = read_gpu_memory(FakeNvml(), {"CUDA_VISIBLE_DEVICES": ""})
    assert hidden.gpus == () and "CUDA_VISIBLE_DEVICES=''" in hidden.problem
