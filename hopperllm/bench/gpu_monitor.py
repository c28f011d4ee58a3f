"""The GPUs' clocks, power and throttle reasons while a benchmark runs, read through NVML.

Two H200s of the same image ran the same throughput benchmark 2% apart (perf-notes v28), and a decode-attention
kernel ran slower inside the throughput run's FP8-GEMM-heavy steps than alone: whether a GPU held its clock or
was power-capped is part of what a figure means. `GpuMonitor` samples every GPU this process uses from a daemon
thread (NVML through ctypes: libnvidia-ml ships with the driver, no Python package needed) and summarizes:

    {"interval_s", "gpus": [{"name", "pci_bus_id", "samples", "sm_clock_mhz": {"mean", "min", "max"},
      "max_sm_clock_mhz", "mem_clock_mhz": {...}, "power_w": {"mean", "max"}, "power_limit_w",
      "temperature_c": {"max"}, "throttle_share": {reason: share of samples},
      "energy_j": joules from start() to stop() by NVML's energy counter (None where the GPU has none)}]}

Without a GPU or without libnvidia-ml the monitor does nothing and `summary()` is None.
"""

from __future__ import annotations

import ctypes
import os
import threading
from typing import Any

# nvmlClocksEventReasons (nvml.h): why the SM clock is below its maximum. GpuIdle is left out: a benchmark's
# GPU idles only between steps, and the idle bit says nothing about the clock under load.
THROTTLE_REASONS = {
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}
_CLOCK_SM, _CLOCK_MEM = 1, 2
_TEMPERATURE_GPU = 0


class NvmlError(RuntimeError):
    pass


class Nvml:
    """The few NVML calls the monitor makes, over ctypes. Raises NvmlError when the library is missing or a
    call fails."""

    def __init__(self, lib: Any = None):
        if lib is None:
            try:
                lib = ctypes.CDLL("libnvidia-ml.so.1")
            except OSError as e:
                raise NvmlError(f"libnvidia-ml not found: {e}") from None
        self._lib = lib
        self._check(self._lib.nvmlInit_v2(), "nvmlInit_v2")

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            raise NvmlError(f"{what} returned {rc}")

    def _uint(self, fn: str, *args) -> int:
        v = ctypes.c_uint()
        self._check(getattr(self._lib, fn)(*args, ctypes.byref(v)), fn)
        return v.value

    def device_count(self) -> int:
        return self._uint("nvmlDeviceGetCount_v2")

    def handle_by_index(self, i: int):
        h = ctypes.c_void_p()
        self._check(self._lib.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(i), ctypes.byref(h)), "handle")
        return h

    def handle_by_pci_bus_id(self, bus_id: str):
        h = ctypes.c_void_p()
        rc = self._lib.nvmlDeviceGetHandleByPciBusId_v2(ctypes.c_char_p(bus_id.encode()), ctypes.byref(h))
        self._check(rc, "nvmlDeviceGetHandleByPciBusId_v2")
        return h

    def name(self, h) -> str:
        buf = ctypes.create_string_buffer(96)
        self._check(self._lib.nvmlDeviceGetName(h, buf, ctypes.c_uint(96)), "nvmlDeviceGetName")
        return buf.value.decode(errors="replace")

    def pci_bus_id(self, h) -> str | None:
        # nvmlPciInfo_t: busIdLegacy[16], domain, bus, device, pciDeviceId, pciSubSystemId, busId[32]
        class PciInfo(ctypes.Structure):
            _fields_ = [("busIdLegacy", ctypes.c_char * 16), ("domain", ctypes.c_uint), ("bus", ctypes.c_uint),
                        ("device", ctypes.c_uint), ("pciDeviceId", ctypes.c_uint),
                        ("pciSubSystemId", ctypes.c_uint), ("busId", ctypes.c_char * 32)]  # fmt: skip

        info = PciInfo()
        if self._lib.nvmlDeviceGetPciInfo_v3(h, ctypes.byref(info)) != 0:
            return None
        return info.busId.decode(errors="replace")

    def clock(self, h, kind: int) -> int:
        return self._uint("nvmlDeviceGetClockInfo", h, ctypes.c_uint(kind))

    def max_clock(self, h, kind: int) -> int:
        return self._uint("nvmlDeviceGetMaxClockInfo", h, ctypes.c_uint(kind))

    def power_mw(self, h) -> int:
        return self._uint("nvmlDeviceGetPowerUsage", h)

    def energy_mj(self, h) -> int:
        """Energy the GPU used since the driver loaded, in millijoules (Volta and later)."""
        v = ctypes.c_ulonglong()
        self._check(self._lib.nvmlDeviceGetTotalEnergyConsumption(h, ctypes.byref(v)), "energy")
        return v.value

    def power_limit_mw(self, h) -> int:
        return self._uint("nvmlDeviceGetEnforcedPowerLimit", h)

    def temperature(self, h) -> int:
        return self._uint("nvmlDeviceGetTemperature", h, ctypes.c_uint(_TEMPERATURE_GPU))

    def throttle_reasons(self, h) -> int:
        v = ctypes.c_ulonglong()
        for fn in ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons"):
            f = getattr(self._lib, fn, None)
            if f is not None and f(h, ctypes.byref(v)) == 0:
                return v.value
        raise NvmlError("no clocks event reasons")


def _visible_nvml_indices(count: int) -> list[int]:
    """The NVML indices of the GPUs CUDA may use: CUDA_VISIBLE_DEVICES' integers where it lists integers (set but
    empty: none), else all `count` (unset, or UUIDs: the bus ids below pick those out where torch knows them)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return list(range(count))
    items = [x.strip() for x in visible.split(",") if x.strip()]
    if not all(x.isdigit() for x in items):
        return list(range(count))
    return [int(x) for x in items if int(x) < count]


def _gpus_in_use(nvml: Any) -> list[tuple[str | None, int]]:
    """Which GPUs to watch, as (PCI bus id or None, NVML index). Where this process has initialized CUDA, the GPUs
    torch sees, in its order, by bus id; otherwise (the tensor-parallel driver, whose ranks run in their own
    processes) the visible ones by NVML index, without touching CUDA (a context would take GPU memory the ranks
    sized their KV caches without)."""
    import torch

    indices = _visible_nvml_indices(nvml.device_count())
    if not torch.cuda.is_initialized():
        return [(None, i) for i in indices]
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        dom, bus, dev = (getattr(p, a, None) for a in ("pci_domain_id", "pci_bus_id", "pci_device_id"))
        bus_id = None if None in (dom, bus, dev) else f"{dom:08X}:{bus:02X}:{dev:02X}.0"
        out.append((bus_id, indices[i] if i < len(indices) else i))
    return out


class GpuMonitor:
    """Samples the GPUs from a daemon thread between `start()` and `stop()` (or as a context manager).
    `nvml`: an Nvml-like object (tests pass a fake); `bus_ids`: which GPUs, by PCI bus id, the i-th falling back
    to NVML index i where its bus id is None or unknown (default: _gpus_in_use)."""

    def __init__(self, interval_s: float = 0.5, nvml: Any = None, bus_ids: list[str | None] | None = None):
        self.interval_s = interval_s
        self._gpus: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            self._nvml = nvml if nvml is not None else Nvml()
            gpus = _gpus_in_use(self._nvml) if bus_ids is None else [(b, i) for i, b in enumerate(bus_ids)]
            for bus, index in gpus:
                try:
                    h = self._nvml.handle_by_pci_bus_id(bus) if bus else self._nvml.handle_by_index(index)
                except NvmlError:
                    h = self._nvml.handle_by_index(index)
                self._gpus.append(self._describe(h))
        except (NvmlError, AttributeError, OSError):
            self._nvml, self._gpus = None, []

    def _read(self, method: str, *args) -> Any:
        """One NVML reading, None where NVML refuses it (an older driver, a field this GPU lacks)."""
        try:
            return getattr(self._nvml, method)(*args)
        except NvmlError:
            return None

    def _describe(self, h) -> dict[str, Any]:
        limit_mw = self._read("power_limit_mw", h)
        return {
            "handle": h,
            "name": self._nvml.name(h),
            "pci_bus_id": self._nvml.pci_bus_id(h),
            "max_sm_clock_mhz": self._read("max_clock", h, _CLOCK_SM),
            "power_limit_w": None if limit_mw is None else limit_mw / 1000,
            "rows": [],
        }

    @property
    def active(self) -> bool:
        return bool(self._gpus)

    def sample(self) -> None:
        """One reading of every GPU (a field NVML refuses is None)."""
        for gpu in self._gpus:
            h = gpu["handle"]
            power_mw = self._read("power_mw", h)
            gpu["rows"].append({
                "sm": self._read("clock", h, _CLOCK_SM),
                "mem": self._read("clock", h, _CLOCK_MEM),
                "power": None if power_mw is None else power_mw / 1000,
                "temp": self._read("temperature", h),
                "reasons": self._read("throttle_reasons", h),
            })  # fmt: skip

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def start(self) -> GpuMonitor:
        if self.active and self._thread is None:
            for gpu in self._gpus:
                gpu["energy_mj"] = [self._read("energy_mj", gpu["handle"])]
            self.sample()
            self._thread = threading.Thread(target=self._run, name="gpu-monitor", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.sample()
            for gpu in self._gpus:
                gpu["energy_mj"].append(self._read("energy_mj", gpu["handle"]))

    def __enter__(self) -> GpuMonitor:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def summary(self) -> dict[str, Any] | None:
        if not self.active:
            return None
        return {"interval_s": self.interval_s, "gpus": [_summarize(g) for g in self._gpus]}


def _stats(values: list[float], keys: tuple[str, ...]) -> dict[str, float | None]:
    if not values:
        return {k: None for k in keys}
    fns = {"mean": lambda v: sum(v) / len(v), "min": min, "max": max}
    return {k: round(float(fns[k](values)), 1) for k in keys}


def _summarize(gpu: dict[str, Any]) -> dict[str, Any]:
    rows = gpu["rows"]

    def col(key):
        return [r[key] for r in rows if r.get(key) is not None]

    reasons = col("reasons")
    share = {
        name: round(sum(1 for r in reasons if r & bit) / len(reasons), 3)
        for bit, name in THROTTLE_REASONS.items()
        if reasons and any(r & bit for r in reasons)
    }
    return {
        "name": gpu["name"],
        "pci_bus_id": gpu["pci_bus_id"],
        "samples": len(rows),
        "sm_clock_mhz": _stats(col("sm"), ("mean", "min", "max")),
        "max_sm_clock_mhz": gpu["max_sm_clock_mhz"],
        "mem_clock_mhz": _stats(col("mem"), ("mean", "min", "max")),
        "power_w": _stats(col("power"), ("mean", "max")),
        "power_limit_w": gpu["power_limit_w"],
        "temperature_c": _stats(col("temp"), ("max",)),
        "throttle_share": share,
        "energy_j": _energy_j(gpu.get("energy_mj")),
    }


def _energy_j(readings: list[int | None] | None) -> float | None:
    """Joules between the first and last counter readings, None if either is missing."""
    if not readings or len(readings) < 2 or readings[0] is None or readings[-1] is None:
        return None
    return round((readings[-1] - readings[0]) / 1000, 1)


def total_energy_j(summary: dict[str, Any] | None) -> float | None:
    """The energy of every monitored GPU together, None unless each has its figure."""
    if not summary or not summary["gpus"] or any(g.get("energy_j") is None for g in summary["gpus"]):
        return None
    return round(sum(g["energy_j"] for g in summary["gpus"]), 1)


def describe(summary: dict[str, Any] | None) -> str | None:
    """One line for a results table: the first GPU's mean SM clock against its maximum, mean power against
    its limit, and the throttle reasons seen ("1745/1980 MHz, 655/700 W, sw_power_cap 81%"); None without one."""
    if not summary or not summary["gpus"]:
        return None
    g = summary["gpus"][0]
    clock, power = g["sm_clock_mhz"]["mean"], g["power_w"]["mean"]
    parts = [f"{clock:.0f}/{g['max_sm_clock_mhz'] or '?'} MHz" if clock is not None else "? MHz"]
    if power is not None:
        limit = g["power_limit_w"]
        parts.append(f"{power:.0f}/{limit:.0f} W" if limit else f"{power:.0f} W")
    parts += [f"{k} {v:.0%}" for k, v in g["throttle_share"].items()]
    return ", ".join(parts)
