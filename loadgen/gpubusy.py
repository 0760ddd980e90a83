"""How busy the GPU was while a rung ran: NVML's utilization, sampled on a thread.

NVML's `utilization.gpu` is the share of its last sample period (1/6 s to 1 s, by
product) during which at least one kernel ran. Sampled every `interval_s` over a rung, its
mean is the device-busy fraction the ladder reports (the issue's 95 % figure). It says
nothing about how full each kernel kept the SMs: a busy device can still be doing small
kernels, which is what the tokens/s column shows.

No GPU, no NVML library, or a device NVML cannot find: `mean` is None and nothing fails.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from worker.ops.gpu import open_nvml


class BusySampler:
    def __init__(self, device: str, interval_s: float = 0.1, nvml: Any = None,
                 environ: dict[str, str] | os._Environ = os.environ):
        self.interval_s = interval_s
        self.samples: list[float] = []
        self.error: str | None = None
        self._nvml: Any = None
        self._handle: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            opened = open_nvml(device, nvml, environ)
        except Exception as e:  # noqa: BLE001 - no driver or library: the figure is absent
            self.error = repr(e)
            return
        if opened is not None:
            self._nvml, self._handle, _ = opened

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu / 100)
            except Exception as e:  # noqa: BLE001 - the reading went away: stop sampling
                self.error = repr(e)
                return

    def __enter__(self) -> BusySampler:
        if self._handle is not None:
            self._thread = threading.Thread(target=self._run, name="gpu-busy", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None
