"""Energy meters: what a run drew, in joules, and where the number comes from; and how every display labels it.

A meter is started once and read many times; `read_joules()` is the energy since `start()`. Three sources:
  nvml      the GPU's cumulative energy counter (Volta and newer), a measurement of the whole device
  rapl      the CPU package counters under /sys/class/powercap, a measurement of the whole package (other
            processes too)
  estimate  this worker's CPU seconds times a power per busy core: an estimate, always labelled with its formula

`make_meter` returns a `MeterChain`: the best meter that can be read here, followed by the ones after it
(nvml -> rapl -> estimate). When a read fails, the chain keeps the joules the failed meter had counted, records why
("nvml: <error> at step N; continued with estimate") and continues with the next one, so a run never stops for its
meter and its total never goes down.

Workers that share one physical counter (two workers on one GPU, or on one CPU package) report the same `key`,
and `combine` counts each key once. Every display of an energy figure goes through `energy_label` (or
`energy_axis_label` for a plot's axis), which says "estimate" whenever any part of the figure is one.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path

POWERCAP = Path("/sys/class/powercap")
ORDER = ("nvml", "rapl", "estimate")   # preference, and the direction a failed meter falls back in
SCOPES = {   # what each source's joules cover, as result.json says (`energy.scope`)
    "nvml": "gpu device: the whole GPU, other processes on it included",
    "rapl": "package: whole CPU package, other processes included",
    "estimate": "worker processes: CPU time of the run's own worker processes",
}


class EnergyMeter:
    """The interface: `source`, `formula` (None for measurements), `key`; call `start()`, then `read_joules()`."""

    source: str = ""
    formula: str | None = None
    key: str = ""

    def start(self) -> None:
        raise NotImplementedError

    def read_joules(self) -> float:
        raise NotImplementedError


def nvml_handle(nvml, cuda_index: int):
    """NVML's handle and UUID of the GPU that CUDA calls `cuda_index`. The two number devices differently: CUDA
    counts only CUDA_VISIBLE_DEVICES (which Ray sets per worker), NVML counts every GPU of the machine, so the
    device is found by its UUID."""
    import torch

    uuid = str(torch.cuda.get_device_properties(cuda_index).uuid)
    names = [uuid] if uuid.startswith(("GPU-", "MIG-")) else [f"GPU-{uuid}", f"MIG-{uuid}"]
    for name in names:
        try:
            return nvml.nvmlDeviceGetHandleByUUID(name), name
        except nvml.NVMLError:
            if name == names[-1]:
                raise
    raise AssertionError("unreachable")


class NvmlMeter(EnergyMeter):
    source = "nvml"

    def __init__(self, cuda_index: int):
        import pynvml  # from nvidia-ml-py

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handle, uuid = nvml_handle(pynvml, cuda_index)
        self.key = f"nvml:{uuid}"
        self._start_mj = self._millijoules()   # a GPU without an energy counter fails here, not in the run

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
        self._start_cpu = 0.0

    @staticmethod
    def _cpu_seconds() -> float:
        # user + system seconds of every thread of this process, to the nanosecond (CLOCK_PROCESS_CPUTIME_ID). The
        # /proc figures counted whole 10 ms clock ticks, so a short step read as 0 J or as a whole tick.
        return time.process_time()

    def start(self) -> None:
        self._start_cpu = self._cpu_seconds()

    def read_joules(self) -> float:
        return (self._cpu_seconds() - self._start_cpu) * self.watts_per_cpu


def _why(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _ordered(sources: Iterable[str]) -> list[str]:
    found = {s for s in sources if s}
    return [s for s in ORDER if s in found] + sorted(found - set(ORDER))


class MeterChain(EnergyMeter):
    """A meter followed by the ones to fall back on. A failure to build, start or read the current meter keeps the
    joules it had counted at its last good read, records why (`fallbacks`) and continues with the next meter
    (started then: the energy between its last good read and the failure is not counted). `where()` says when,
    e.g. "step 12"; `readings()` gives one reading per meter used, for `combine`."""

    def __init__(self, meters: list[tuple[str, Callable[[], EnergyMeter]]], where: Callable[[], str] | None = None,
                 first: EnergyMeter | None = None):
        self._next = list(meters)
        self._where = where
        self._reads = 0
        self._started = False
        self._done: list[dict] = []     # readings of the meters that failed, at their last good read
        self._banked = 0.0              # ... their joules, which the total keeps
        self._current = 0.0             # the current meter's last good read
        self._counted = False           # whether the current meter has had a good read
        self.fallbacks: list[str] = []
        self._meter = first if first is not None else self._open_next([])

    def _when(self) -> str:
        if not self._started:
            return "start"
        if self._where is not None:
            try:
                return self._where()
            except Exception:   # a description must never be what stops a run
                pass
        return f"read {self._reads}"

    def _open_next(self, failed: list[tuple[str, BaseException]]) -> EnergyMeter:
        while self._next:
            source, build = self._next.pop(0)
            try:
                meter = build()
                if self._started:
                    meter.start()
            except Exception as err:
                failed.append((source, err))
                continue
            when = self._when()
            self.fallbacks += [f"{s}: {_why(e)} at {when}; continued with {meter.source}" for s, e in failed]
            return meter
        raise RuntimeError("no energy meter is readable here: " + "; ".join(f"{s}: {_why(e)}" for s, e in failed))

    def _fall_back(self, err: BaseException) -> None:
        failed = self._meter
        if self._counted:   # a meter that never read counted nothing: it is no source of the figure
            self._done.append({"key": failed.key, "joules": self._current, "source": failed.source,
                               "formula": failed.formula})
        self._banked += self._current
        self._current, self._counted = 0.0, False
        self._meter = self._open_next([(failed.source, err)])

    @property
    def source(self) -> str:
        return "+".join(_ordered([r["source"] for r in self._done] + [self._meter.source]))

    @property
    def formula(self) -> str | None:
        formulas = sorted({f for f in [r["formula"] for r in self._done] + [self._meter.formula] if f})
        return " | ".join(formulas) or None

    @property
    def key(self) -> str:
        """The counter being read now (what training-step energy is attributed to)."""
        return self._meter.key

    def start(self) -> None:
        self._started = True
        try:
            self._meter.start()
        except Exception as err:
            self._fall_back(err)   # the next meter is started as it opens

    def read_joules(self) -> float:
        self._reads += 1
        while True:
            try:
                self._current = max(self._meter.read_joules(), self._current)
                self._counted = True
                return self._banked + self._current
            except Exception as err:
                self._fall_back(err)

    def readings(self) -> list[dict]:
        """Reads the meter; one reading per meter used ({key, joules, source, formula}), the last with the
        fallback reasons."""
        self.read_joules()
        m = self._meter
        current = {"key": m.key, "joules": self._current, "source": m.source, "formula": m.formula}
        if self.fallbacks:
            current["fallback"] = " | ".join(self.fallbacks)
        return [*self._done, current]


def make_meter(kind: str, device, watts_per_cpu: float, where: Callable[[], str] | None = None) -> MeterChain:
    """`auto` picks NVML on a GPU, else RAPL where readable, else the labelled estimate; each is followed by the
    ones after it. Naming a meter that cannot be read here is an error rather than a silent fallback; one that
    fails later falls back like any other."""
    if kind == "nvml" and device.type != "cuda":
        raise RuntimeError("energy.meter is nvml but this worker has no GPU; use auto, rapl or estimate")
    meters: list[tuple[str, Callable[[], EnergyMeter]]] = []
    if kind in ("auto", "nvml") and device.type == "cuda":
        import torch

        index = device.index if device.index is not None else torch.cuda.current_device()
        meters.append(("nvml", lambda: NvmlMeter(index)))
    zones = rapl_packages() if kind in ("auto", "nvml", "rapl") else []
    if kind == "rapl" and not zones:
        raise RuntimeError("energy.meter is rapl but /sys/class/powercap has no readable RAPL zone here")
    if zones:
        meters.append(("rapl", lambda: RaplMeter(zones)))
    meters.append(("estimate", lambda: CpuTimeEstimateMeter(watts_per_cpu)))
    first = None
    if kind in ("nvml", "rapl"):
        try:
            first = meters[0][1]()
        except Exception as err:
            raise RuntimeError(f"energy.meter is {kind} but {kind.upper()} is not readable here ({err})") from None
        meters = meters[1:]
    return MeterChain(meters, where, first)


def combine(readings: list[dict]) -> dict:
    """Sum readings ({key, joules, source, formula, fallback}: per worker, per meter used) counting each physical
    counter once. The result says what the joules cover (`scope`), how an estimate was made (`formula`) and why a
    meter was given up (`fallback`). A reading's source, formula and fallback may each join several with "+" or
    " | " (an earlier segment of a resumed run)."""
    by_key: dict[str, dict] = {}
    for r in readings:
        if r["key"] not in by_key or r["joules"] > by_key[r["key"]]["joules"]:
            by_key[r["key"]] = r
    sources = _ordered(s for r in readings for s in (r.get("source") or "").split("+"))
    out = {"joules": sum(r["joules"] for r in by_key.values()), "source": "+".join(sources)}
    if sources:
        out["scope"] = (SCOPES.get(sources[0], "unknown") if len(sources) == 1 else
                        "; ".join(f"{s} ({SCOPES.get(s, 'unknown')})" for s in sources))
    for field in ("formula", "fallback"):
        values = sorted({v for r in readings for v in (r.get(field) or "").split(" | ") if v})
        if values:
            out[field] = " | ".join(values)
    return out


# -- how every display labels an energy figure ------------------------------------------------------------------

def is_estimate(source: str | None) -> bool:
    """Whether any part of a figure from this source (e.g. "nvml+estimate" after a fallback) is an estimate."""
    return "estimate" in (source or "").split("+")


def source_label(source: str | None) -> str:
    return " + ".join(_ordered((source or "").split("+"))) or "source unknown"


def energy_label(energy: dict, watts: float | None = None) -> str:
    """An energy figure as every display shows it: "1,921.0 J (estimate)", "88.2 J (nvml)"; with a power,
    "1,921.0 J, 12.5 W (estimate)". `energy` is a result's energy dict, or any dict with joules and source."""
    power = "" if watts is None else f", {watts:,.1f} W"
    return f"{energy['joules']:,.1f} J{power} ({source_label(energy.get('source'))})"


def estimate_note(*sources: str | None) -> str:
    """" (estimate)" for a figure derived from energies (a ratio) of which any is estimated, else ""."""
    return " (estimate)" if any(is_estimate(s) for s in sources) else ""


def energy_axis_label(sources: Iterable[str | None], watts_per_cpu: float) -> str:
    """A plot axis of energies from these sources: "energy (J, estimate: CPU-s x 10 W)", "energy (J, nvml)"."""
    found = _ordered(s for source in sources for s in (source or "").split("+"))
    parts = [f"estimate: CPU-s x {watts_per_cpu:g} W" if s == "estimate" else s for s in found]
    return f"energy (J, {', '.join(parts)})" if parts else "energy (J)"
