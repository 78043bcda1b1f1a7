"""Energy counters where the machine exposes them: Intel/AMD RAPL (powercap) and hwmon.

``EnergyMeter.probe()`` finds a counter under a sysfs root (a directory laid out like /sys, so tests
can use a fake tree); ``read_uj()`` returns cumulative microjoules, handling counter wrap-around.
Where there is none, callers fall back to a predicted figure and label it so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class EnergyMeter:
    source: str  # "rapl:<zone name>" or "hwmon:<chip>/<file>"
    path: Path
    max_uj: int | None = None  # RAPL wraps at max_energy_range_uj
    power_uw: bool = False  # hwmon power*_input (instantaneous); integrated by sampling

    @classmethod
    def probe(cls, sysfs: Path = Path("/sys")) -> "EnergyMeter | None":
        for zone in sorted((sysfs / "class" / "powercap").glob("*rapl*:*")):
            energy = zone / "energy_uj"
            if _readable(energy) and ":" in zone.name and zone.name.count(":") == 1:  # a package, not a subzone
                name = (zone / "name").read_text().strip() if (zone / "name").exists() else zone.name
                rng = zone / "max_energy_range_uj"
                return cls(f"rapl:{name}", energy, int(rng.read_text()) if _readable(rng) else None)
        for chip in sorted((sysfs / "class" / "hwmon").glob("hwmon*")):
            for f in sorted(chip.glob("energy*_input")):
                if _readable(f):
                    return cls(f"hwmon:{_chip(chip)}/{f.name}", f)
            for f in sorted(chip.glob("power*_input")):  # e.g. an INA219/INA3221 on the board
                if _readable(f):
                    return cls(f"hwmon:{_chip(chip)}/{f.name}", f, power_uw=True)
        return None

    def read_uj(self) -> int:
        return int(self.path.read_text().strip())

    def measure(self, fn, repeats: int) -> float:
        """Run ``fn`` ``repeats`` times; return millijoules per call (whole-package energy)."""
        if self.power_uw:
            t0, samples = time.perf_counter(), []
            for _ in range(repeats):
                fn()
                samples.append(self.read_uj())  # microwatts
            elapsed = time.perf_counter() - t0
            return (sum(samples) / len(samples)) * elapsed / repeats / 1e3  # uW * s = uJ -> mJ
        start = self.read_uj()
        for _ in range(repeats):
            fn()
        used = self.read_uj() - start
        if used < 0 and self.max_uj:
            used += self.max_uj
        return used / repeats / 1e3


def _readable(path: Path) -> bool:
    try:
        int(path.read_text().strip())
        return True
    except (OSError, ValueError):
        return False


def _chip(chip: Path) -> str:
    name = chip / "name"
    return name.read_text().strip() if name.exists() else chip.name


def temperature_c(sysfs: Path = Path("/sys")) -> float | None:
    """The hottest thermal zone in degrees Celsius, or None where the device exposes none."""
    best = None
    for zone in (sysfs / "class" / "thermal").glob("thermal_zone*"):
        try:
            value = int((zone / "temp").read_text().strip()) / 1000
        except (OSError, ValueError):
            continue
        best = value if best is None else max(best, value)
    return best
