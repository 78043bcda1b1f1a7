"""What the agent reports about itself and its model: latency percentiles and throughput from a benchmark
on the golden inputs, inference errors, its own memory and CPU, the device's temperature, and energy per
inference (measured where the device has a power counter, else the manifest's prediction, labelled which)."""

from __future__ import annotations

import logging
import time

from .errors import AgentError
from .health import Benchmark
from .manifest import Manifest
from .power import EnergyMeter, temperature_c
from .procstat import CpuShare
from .protocol import Metrics
from .runtimes import Session
from .slots import ActiveModel

log = logging.getLogger(__name__)


class Telemetry:
    def __init__(self, device_id: str, emulated: bool) -> None:
        self.device_id, self.emulated = device_id, emulated
        self.errors = 0  # inference errors since the agent started
        self._started = time.monotonic()
        self._cpu = CpuShare()  # starts the CPU accounting window
        self._meter = EnergyMeter.probe()

    def energy(self, bench: Benchmark, session: Session | None,
               manifest: Manifest | None) -> tuple[float | None, str | None]:
        """Energy per inference: measured where the device has a counter, else the manifest's prediction."""
        if self._meter is not None and session is not None and manifest is not None:
            feeds = manifest.golden_pairs()[0][0]
            repeats = max(20, int(0.2 / max(bench.latency_ms_p50 / 1e3, 1e-6)))
            try:
                return (round(self._meter.measure(lambda: session.run(feeds), repeats), 5),
                        f"measured:{self._meter.source}")
            except (AgentError, OSError, ValueError) as exc:  # a flaky counter or a failing run: predicted instead
                log.warning("energy measurement failed (%s); reporting the prediction", exc)
                if isinstance(exc, AgentError):
                    self.errors += 1
        predicted = manifest.predicted.get("energy_mj") if manifest else None
        return (predicted, "predicted") if predicted is not None else (None, None)

    def metrics(self, bench: Benchmark, active: ActiveModel | None, session: Session | None,
                manifest: Manifest | None, state: str | None) -> Metrics:
        energy, source = self.energy(bench, session, manifest)
        return Metrics(self.device_id, active.version if active else None, bench.latency_ms_p50,
                       bench.latency_ms_p95, bench.rss_mb, bench.runs, self.emulated,
                       latency_ms_p99=bench.latency_ms_p99, throughput_ips=bench.throughput_ips, errors=self.errors,
                       cpu_percent=round(self._cpu.percent(), 1), temperature_c=temperature_c(),
                       energy_mj=energy, energy_source=source, slot=active.slot if active else None,
                       uptime_s=round(time.monotonic() - self._started, 1), state=state)
