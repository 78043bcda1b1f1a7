"""Retention with downsampling: recent metrics stay raw, older ones become one row per device and time bucket,
the oldest go. Events follow the rollups' window. The inference API's traffic keeps each device's boots of the
raw window and its latest one; older boots are summed into one row per device and version, and rows not updated
within the rollups' window go (``traffic.fold``). One transaction per pass: a crash leaves either the raw rows
or their rollup, never neither.

A bucket keeps what a budget check needs: the mean of medians and throughput, the worst tail latency,
memory and temperature, the mean energy per inference, the highest error count (a counter), and how many
samples it summarises. A late raw row for a bucket already rolled up merges into it (weighted by samples).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from ..errors import ConfigError
from . import quality, traffic
from .store import WRITERS_LOCK, FleetStore

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str | float, what: str) -> float:
    """``"90d"``, ``"12h"``, ``"5m"``, ``"30s"`` or a number of seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    m = _DURATION.match(text)
    if not m:
        raise ConfigError(f"{what}: expected a duration like 30s, 5m, 12h or 7d, got {text!r}")
    return float(m.group(1)) * _UNIT_S[m.group(2) or "s"]


@dataclass(frozen=True)
class RetentionPolicy:
    raw_s: float = 7 * 86400  # raw rows younger than this are kept as they are
    bucket_s: float = 300  # older rows: one row per device and bucket
    rollup_s: float = 90 * 86400  # rollups (and events) older than this are deleted

    def __post_init__(self) -> None:
        if not 0 < self.bucket_s <= self.raw_s <= self.rollup_s:
            raise ConfigError(f"retention: need 0 < bucket ({self.bucket_s:g} s) <= raw ({self.raw_s:g} s) "
                              f"<= rollup ({self.rollup_s:g} s)")


_ROLLUP = """
INSERT INTO metrics_rollup AS r (device_id, ts, bucket_s, samples, version, latency_ms_p50, latency_ms_p95, latency_ms_p99,
                            throughput_ips, rss_mb, cpu_percent, temperature_c, energy_mj, errors, emulated)
SELECT device_id, floor(ts / :b) * :b AS bucket, :b, count(*), max(version), avg(latency_ms_p50),
       max(latency_ms_p95), max(latency_ms_p99), avg(throughput_ips), max(rss_mb), avg(cpu_percent),
       max(temperature_c), avg(energy_mj), max(errors), max(emulated)
FROM metrics WHERE ts < :cut GROUP BY device_id, bucket
ON CONFLICT (device_id, ts) DO UPDATE SET
    latency_ms_p50 = (r.latency_ms_p50 * r.samples + excluded.latency_ms_p50 * excluded.samples)
                     / (r.samples + excluded.samples),
    throughput_ips = (r.throughput_ips * r.samples + excluded.throughput_ips * excluded.samples)
                     / (r.samples + excluded.samples),
    cpu_percent = (r.cpu_percent * r.samples + excluded.cpu_percent * excluded.samples) / (r.samples + excluded.samples),
    energy_mj = (r.energy_mj * r.samples + excluded.energy_mj * excluded.samples) / (r.samples + excluded.samples),
    latency_ms_p95 = greatest(r.latency_ms_p95, excluded.latency_ms_p95),
    latency_ms_p99 = greatest(r.latency_ms_p99, excluded.latency_ms_p99),
    rss_mb = greatest(r.rss_mb, excluded.rss_mb), temperature_c = greatest(r.temperature_c, excluded.temperature_c),
    errors = greatest(r.errors, excluded.errors), version = greatest(r.version, excluded.version),
    samples = r.samples + excluded.samples
"""


def apply_retention(store: FleetStore, policy: RetentionPolicy, now: float | None = None) -> dict[str, int]:
    """Roll up raw metrics older than ``policy.raw_s``, drop rollups and events older than ``policy.rollup_s``.
    Buckets are aligned to the epoch, so the cut is moved down to a bucket boundary: a bucket is rolled up
    whole or not at all."""
    now = time.time() if now is None else now
    cut = (int((now - policy.raw_s) // policy.bucket_s)) * policy.bucket_s
    oldest = now - policy.rollup_s
    with store.db.transaction(immediate=True) as db:
        db.lock(WRITERS_LOCK)  # PostgreSQL: no ingester writes meanwhile (SQLite: the immediate transaction)
        raw = db.execute("SELECT count(*) FROM metrics WHERE ts < ?", (cut,)).fetchone()[0]
        before = db.execute("SELECT count(*) FROM metrics_rollup").fetchone()[0]
        db.execute(_ROLLUP, {"b": policy.bucket_s, "cut": cut})
        db.execute("DELETE FROM metrics WHERE ts < ?", (cut,))
        dropped = db.execute("DELETE FROM metrics_rollup WHERE ts < ?", (oldest,)).rowcount
        events = db.execute("DELETE FROM events WHERE ts < ?", (oldest,)).rowcount
        after = db.execute("SELECT count(*) FROM metrics_rollup").fetchone()[0]
        folded = traffic.fold(db, cut, oldest)
        forgotten = quality.forget(db, oldest)
    return {"raw_rolled_up": int(raw), "buckets_added": int(after - before + dropped),
            "rollups_dropped": int(dropped), "events_dropped": int(events), **folded, **forgotten}
