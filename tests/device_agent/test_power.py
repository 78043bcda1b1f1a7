"""Energy counters, read from a directory laid out like sysfs (this machine has no RAPL)."""

from pathlib import Path

from device_agent.power import EnergyMeter


def fake_rapl(root: Path, energy: int, max_range: int = 2**32) -> Path:
    zone = root / "class" / "powercap" / "intel-rapl:0"
    zone.mkdir(parents=True)
    (zone / "name").write_text("package-0\n")
    (zone / "energy_uj").write_text(f"{energy}\n")
    (zone / "max_energy_range_uj").write_text(f"{max_range}\n")
    sub = root / "class" / "powercap" / "intel-rapl:0:0"  # a sub-zone (core): not the package
    sub.mkdir()
    (sub / "energy_uj").write_text("5\n")
    return zone / "energy_uj"


def test_rapl_counter_with_wraparound(tmp_path):
    counter = fake_rapl(tmp_path, energy=2**32 - 1000)
    meter = EnergyMeter.probe(tmp_path)
    assert meter.source == "rapl:package-0" and meter.max_uj == 2**32

    def work():  # each call "spends" 600 uJ, wrapping past the range once
        counter.write_text(str((int(counter.read_text()) + 600) % 2**32))

    assert meter.measure(work, 4) == 0.6  # mJ per call


def test_hwmon_energy_and_power(tmp_path):
    chip = tmp_path / "class" / "hwmon" / "hwmon3"
    chip.mkdir(parents=True)
    (chip / "name").write_text("ina3221\n")
    (chip / "power1_input").write_text("2000000\n")  # 2 W, in microwatts
    meter = EnergyMeter.probe(tmp_path)
    assert meter.source == "hwmon:ina3221/power1_input" and meter.power_uw
    mj = meter.measure(lambda: __import__("time").sleep(0.01), 5)
    assert 18 < mj < 40  # 2 W for a little over 10 ms per call: ~20 mJ


def test_no_counter_means_none(tmp_path):
    assert EnergyMeter.probe(tmp_path) is None


def test_hottest_thermal_zone(tmp_path):
    from device_agent.power import temperature_c

    assert temperature_c(tmp_path) is None
    for i, milli in enumerate((41000, 57500, 12000)):
        zone = tmp_path / "class" / "thermal" / f"thermal_zone{i}"
        zone.mkdir(parents=True)
        (zone / "temp").write_text(f"{milli}\n")
    assert temperature_c(tmp_path) == 57.5
