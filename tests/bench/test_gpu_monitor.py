"""bench/gpu_monitor.py: NVML's readings summarized, with a stand-in NVML (this machine has no GPU)."""

import ctypes
import itertools
import time

import pytest

from hopperllm.bench import gpu_monitor
from hopperllm.bench.gpu_monitor import GpuMonitor, Nvml, NvmlError


class FakeNvml:
    """Two GPUs by PCI bus id; GPU 1 refuses its power readings. Each sample steps through the given
    clocks / reasons."""

    def __init__(self):
        self.clocks = itertools.cycle([1980, 1755, 1500])
        self.reasons = itertools.cycle([0x0, 0x4, 0x4 | 0x1])  # none, power cap, power cap + idle

    def handle_by_pci_bus_id(self, bus):
        if bus == "bad":
            raise NvmlError("no such bus")
        return {"00000000:18:00.0": 0, "00000000:2A:00.0": 1}[bus]

    def device_count(self):
        return 2

    def handle_by_index(self, i):
        return i

    def name(self, h):
        return "NVIDIA H200"

    def pci_bus_id(self, h):
        return ["00000000:18:00.0", "00000000:2A:00.0"][h]

    def max_clock(self, h, kind):
        return 1980

    def power_limit_mw(self, h):
        return 700_000

    def clock(self, h, kind):
        return next(self.clocks) if kind == 1 else 3201

    def power_mw(self, h):
        if h == 1:
            raise NvmlError("not supported")
        return 650_000

    def temperature(self, h):
        return 41 + h

    def throttle_reasons(self, h):
        return next(self.reasons)

    def energy_mj(self, h):
        if h == 1:
            raise NvmlError("not supported")
        self.energy = getattr(self, "energy", 10_000_000) + 250_500  # 250.5 J a reading
        return self.energy


def test_summary_of_samples():
    mon = GpuMonitor(nvml=FakeNvml(), bus_ids=["00000000:18:00.0", "00000000:2A:00.0"])
    assert mon.active
    for _ in range(3):
        mon.sample()
    s = mon.summary()
    g0, g1 = s["gpus"]
    assert g0["samples"] == 3 and g0["name"] == "NVIDIA H200" and g0["pci_bus_id"] == "00000000:18:00.0"
    # the clock cycle is shared by both GPUs' readings: GPU 0 read 1980, 1500, 1755
    assert g0["sm_clock_mhz"] == {"mean": 1745.0, "min": 1500.0, "max": 1980.0}
    assert g0["max_sm_clock_mhz"] == 1980 and g0["power_limit_w"] == 700.0
    assert g0["power_w"] == {"mean": 650.0, "max": 650.0}
    assert g0["mem_clock_mhz"]["mean"] == 3201.0
    assert g0["temperature_c"] == {"max": 41.0}
    # GPU 0 read reasons 0, 0x4 | 0x1, 0x4: the power cap in 2 of 3; the idle bit is not reported
    assert g0["throttle_share"] == {"sw_power_cap": pytest.approx(2 / 3, abs=1e-3)}
    assert g1["power_w"] == {"mean": None, "max": None}  # refused: None, the rest still read
    assert g1["temperature_c"] == {"max": 42.0}
    assert g0["energy_j"] is None  # sampled without start() / stop(): no energy interval
    line = gpu_monitor.describe(s)
    assert line == "1745/1980 MHz, 650/700 W, sw_power_cap 67%"


def test_thread_samples_until_stopped():
    mon = GpuMonitor(interval_s=0.01, nvml=FakeNvml(), bus_ids=["00000000:18:00.0"])
    with mon:
        time.sleep(0.1)
    n = mon.summary()["gpus"][0]["samples"]
    assert n >= 3  # one at start, some from the thread, one at stop
    time.sleep(0.05)
    assert mon.summary()["gpus"][0]["samples"] == n  # stopped
    # the energy counter read at start and at stop: two readings 250.5 J apart
    assert mon.summary()["gpus"][0]["energy_j"] == 250.5
    assert gpu_monitor.total_energy_j(mon.summary()) == 250.5


def test_energy_of_several_gpus():
    mon = GpuMonitor(interval_s=10, nvml=FakeNvml(), bus_ids=["00000000:18:00.0", "00000000:2A:00.0"])
    with mon:
        pass
    g0, g1 = mon.summary()["gpus"]
    assert g0["energy_j"] == 250.5 and g1["energy_j"] is None  # GPU 1 has no counter
    assert gpu_monitor.total_energy_j(mon.summary()) is None  # a total only when every GPU has its figure
    assert gpu_monitor.total_energy_j(None) is None


def test_bus_id_falls_back_to_the_index():
    mon = GpuMonitor(nvml=FakeNvml(), bus_ids=["bad", None])
    mon.sample()
    assert [g["pci_bus_id"] for g in mon.summary()["gpus"]] == ["00000000:18:00.0", "00000000:2A:00.0"]


def test_without_nvml_nothing_is_sampled(monkeypatch):
    def missing(*a, **k):
        raise OSError("libnvidia-ml.so.1: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", missing)
    mon = GpuMonitor(bus_ids=["00000000:18:00.0"])
    with mon:
        pass
    assert not mon.active and mon.summary() is None and gpu_monitor.describe(None) is None


class FakeLib:
    """libnvidia-ml's C functions as ctypes calls them: outputs through byref pointers, 0 for success."""

    def nvmlInit_v2(self):
        return 0

    def nvmlDeviceGetCount_v2(self, out):
        out._obj.value = 2
        return 0

    def nvmlDeviceGetClockInfo(self, h, kind, out):
        out._obj.value = {1: 1830, 2: 3201}[kind.value]
        return 0

    def nvmlDeviceGetPowerUsage(self, h, out):
        return 3  # NVML_ERROR_NOT_SUPPORTED

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, h, out):
        out._obj.value = 0x4
        return 0

    def nvmlDeviceGetTotalEnergyConsumption(self, h, out):
        out._obj.value = 5_000_000_000_123  # millijoules: past 2^32, so the 64-bit type matters
        return 0


def test_ctypes_wrapper_reads_through_pointers():
    n = Nvml(lib=FakeLib())
    assert n.device_count() == 2
    assert n.clock(None, 1) == 1830 and n.clock(None, 2) == 3201
    with pytest.raises(NvmlError, match="nvmlDeviceGetPowerUsage returned 3"):
        n.power_mw(None)
    assert n.throttle_reasons(None) == 0x4  # the older name where the newer one is missing
    assert n.energy_mj(None) == 5_000_000_000_123


def test_without_cuda_in_this_process_nvml_indices(monkeypatch):
    # the tensor-parallel driver never initializes CUDA (its ranks do, in their own processes): the monitor
    # picks GPUs by NVML index, CUDA_VISIBLE_DEVICES' where set, and creates no CUDA context
    import torch

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    mon = GpuMonitor(nvml=FakeNvml())
    assert [g["pci_bus_id"] for g in mon._gpus] == ["00000000:18:00.0", "00000000:2A:00.0"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    mon = GpuMonitor(nvml=FakeNvml())
    assert [g["pci_bus_id"] for g in mon._gpus] == ["00000000:2A:00.0"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert not GpuMonitor(nvml=FakeNvml()).active
