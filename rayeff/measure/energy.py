"""Energy meters: what a run drew, in joules, and where the number comes from.

A meter is started once and read many times; `read_joules()` is the energy since `start()`. Three sources:
  nvml      the GPU's cumulative energy counter (Volta and newer), a measurement
  rapl      the CPU package counters under /sys/class/powercap, a measurement (whole package: other processes too)
  estimate  this worker's CPU seconds times a power per busy core: an estimate, always labelled with its formula

Workers that share one physical counter (two workers on one GPU, or on one CPU package) report the same `key`,
and `combine` counts each key once.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import psutil
import torch

POWERCAP = Path("/sys/class/powercap")


class EnergyMeter:
    """The interface: `source`, `formula` (None for measurements), `key`; call `start()`, then `read_joules()`."""

    source: str = ""
    formula: str | None = None
    key: str = ""

    def start(self) -> None:
        raise NotImplementedError

    def read_joules(self) -> float:
        raise NotImplementedError


class NvmlMeter(EnergyMeter):
    source = "nvml"

    def __init__(self, device_index: int):
        import pynvml  # from nvidia-ml-py

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        uuid = pynvml.nvmlDeviceGetUUID(self._handle)
        self.key = f"nvml:{uuid.decode() if isinstance(uuid, bytes) else uuid}"
        self._start_mj = 0

    def _millijoules(self) -> int:
        return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)

    def start(self) -> None:
        self._start_mj = self._millijoules()

    def read_joules(self) -> float:
        return (self._millijoules() - self._start_mj) / 1000.0


def rapl_packages() -> list[Path]:
    """Readable top-level RAPL zones (one per CPU package)."""
    if not POWERCAP.is_dir():
        return []
    zones = [z for z in POWERCAP.glob("intel-rapl:*") if z.name.count(":") == 1]
    return [z for z in zones if os.access(z / "energy_uj", os.R_OK)]


class RaplMeter(EnergyMeter):
    source = "rapl"

    def __init__(self, zones: list[Path]):
        self._zones = zones
        self.key = f"rapl:{socket.gethostname()}"
        self._last: list[int] = []
        self._ranges = [int((z / "max_energy_range_uj").read_text()) for z in zones]
        self._total_uj = 0

    def _read(self) -> list[int]:
        return [int((z / "energy_uj").read_text()) for z in self._zones]

    def start(self) -> None:
        self._last, self._total_uj = self._read(), 0

    def read_joules(self) -> float:
        now = self._read()
        for i, (before, after) in enumerate(zip(self._last, now)):
            self._total_uj += after - before if after >= before else after + self._ranges[i] - before  # wrapped
        self._last = now
        return self._total_uj / 1e6


class CpuTimeEstimateMeter(EnergyMeter):
    source = "estimate"

    def __init__(self, watts_per_cpu: float):
        self.watts_per_cpu = watts_per_cpu
        self.formula = (f"E = CPU seconds (user + system) of each worker process x {watts_per_cpu:g} W per busy core;"
                        " no RAPL or NVML counter was readable")
        self.key = f"estimate:{socket.gethostname()}:{os.getpid()}"
        self._process = psutil.Process()
        self._start_cpu = 0.0

    def _cpu_seconds(self) -> float:
        times = self._process.cpu_times()
        return times.user + times.system

    def start(self) -> None:
        self._start_cpu = self._cpu_seconds()

    def read_joules(self) -> float:
        return (self._cpu_seconds() - self._start_cpu) * self.watts_per_cpu


def make_meter(kind: str, device: torch.device, watts_per_cpu: float) -> EnergyMeter:
    """`auto` picks NVML on a GPU, else RAPL where readable, else the labelled estimate. Naming a meter that cannot
    be read here is an error rather than a silent fallback."""
    if kind in ("auto", "nvml") and device.type == "cuda":
        try:
            return NvmlMeter(device.index if device.index is not None else torch.cuda.current_device())
        except Exception as err:
            if kind == "nvml":
                raise RuntimeError(f"energy.meter is nvml but NVML is not readable here ({err})") from None
    elif kind == "nvml":
        raise RuntimeError("energy.meter is nvml but this worker has no GPU; use auto, rapl or estimate")
    if kind in ("auto", "rapl"):
        zones = rapl_packages()
        if zones:
            return RaplMeter(zones)
        if kind == "rapl":
            raise RuntimeError("energy.meter is rapl but /sys/class/powercap has no readable RAPL zone here")
    return CpuTimeEstimateMeter(watts_per_cpu)


def combine(readings: list[dict]) -> dict:
    """Sum per-worker readings ({key, joules, source, formula}) counting each physical counter once."""
    by_key: dict[str, dict] = {}
    for r in readings:
        if r["key"] not in by_key or r["joules"] > by_key[r["key"]]["joules"]:
            by_key[r["key"]] = r
    sources = sorted({r["source"] for r in by_key.values()})
    formulas = sorted({r["formula"] for r in by_key.values() if r.get("formula")})
    out = {"joules": sum(r["joules"] for r in by_key.values()), "source": "+".join(sources)}
    if formulas:
        out["formula"] = " | ".join(formulas)
    return out

