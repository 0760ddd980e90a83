"""GPU readings for /metrics: SM utilisation, memory, power and temperature, from NVML.

Rule: read per scrape from NVML when the device is `cuda:N` and NVML answers; otherwise the
`fabric_gpu_*` series are absent and one info line says why. A reading this GPU (or MIG
slice) does not support is logged once and dropped, never retried every scrape.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import structlog
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = structlog.get_logger("metrics")


def nvml_target(device: str, visible_devices: str | None) -> int | str | None:
    """The NVML key of a torch device: an NVML index, a GPU/MIG UUID, or None (no GPU).

    NVML numbers every GPU on the host; CUDA numbers only those CUDA_VISIBLE_DEVICES lists,
    in its order, by index or UUID. In a container that sees one GPU both say 0.
    """
    if not device.startswith("cuda"):
        return None
    idx = int(device.partition(":")[2] or 0)
    if visible_devices is None:
        return idx
    entries = [e.strip() for e in visible_devices.split(",") if e.strip()]
    if idx >= len(entries):
        return None
    entry = entries[idx]
    return int(entry) if entry.isdigit() else entry


def open_nvml(device: str, nvml: Any = None,
              environ: dict[str, str] | os._Environ = os.environ) -> tuple[Any, Any, Any] | None:
    """(the NVML module, the device's handle, its NVML key) for a torch device; None when
    the device is not a GPU. Raises whatever NVML raises (no driver, no library, no GPU)."""
    target = nvml_target(device, environ.get("CUDA_VISIBLE_DEVICES"))
    if target is None:
        return None
    if nvml is None:
        import pynvml
        nvml = pynvml
    nvml.nvmlInit()
    handle = (nvml.nvmlDeviceGetHandleByIndex(target) if isinstance(target, int)
              else nvml.nvmlDeviceGetHandleByUUID(target))
    return nvml, handle, target


class GpuCollector(Collector):
    """SM utilisation, memory, power and temperature of the worker's GPU, read per scrape."""

    def __init__(self, device: str, nvml: Any = None,
                 environ: dict[str, str] | os._Environ = os.environ):
        self.device = device
        self._nvml = nvml
        self._handle = None
        self._failed: set[str] = set()  # readings that failed once: not asked again
        try:
            opened = open_nvml(device, nvml, environ)
        except Exception as e:  # noqa: BLE001 - no driver, no library, no such GPU: metrics only
            log.info("gpu_metrics_off", device=device, reason=repr(e))
            return
        if opened is None:
            log.info("gpu_metrics_off", device=device, reason="no GPU device configured")
            return
        self._nvml, self._handle, target = opened
        log.info("gpu_metrics_on", device=device, nvml_device=str(target))

    @property
    def enabled(self) -> bool:
        return self._handle is not None

    def describe(self) -> Iterator:
        return iter(())

    def _readings(self) -> list[tuple[str, str, Callable[[Any], float]]]:
        n = self._nvml
        return [
            ("fabric_gpu_sm_utilization_ratio",
             "Share of the last sample period a kernel ran (NVML utilization.gpu).",
             lambda h: n.nvmlDeviceGetUtilizationRates(h).gpu / 100),
            ("fabric_gpu_memory_used_bytes", "Device memory in use (all processes).",
             lambda h: n.nvmlDeviceGetMemoryInfo(h).used),
            ("fabric_gpu_memory_total_bytes", "Device memory installed.",
             lambda h: n.nvmlDeviceGetMemoryInfo(h).total),
            ("fabric_gpu_power_watts", "Board power draw.",
             lambda h: n.nvmlDeviceGetPowerUsage(h) / 1e3),
            ("fabric_gpu_temperature_celsius", "GPU die temperature.",
             lambda h: n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU)),
        ]

    def collect(self) -> Iterator:
        if self._handle is None:
            return
        for name, doc, read in self._readings():
            if name in self._failed:
                continue
            try:
                value = float(read(self._handle))
            except Exception as e:  # noqa: BLE001 - unsupported on this GPU/MIG slice, or lost
                # Logged once per series, then the series is dropped: a scrape every 15 s
                # must not turn one unsupported reading into a log line every 15 s.
                self._failed.add(name)
                log.info("gpu_metric_unavailable", metric=name, error=repr(e))
                continue
            g = GaugeMetricFamily(name, doc, labels=["device"])
            g.add_metric([self.device], value)
            yield g
