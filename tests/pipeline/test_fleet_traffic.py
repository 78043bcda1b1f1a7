"""The inference API's traffic as the host keeps it (pipeline.fleet.traffic), from snapshots a real
``device_agent.serving.TrafficStats`` took, through the ingester's path into a real SQLite store: restarts add up
and never go backwards, repeated and late snapshots change nothing, retention folds old boots without losing a
request, the percentiles are the agent's own reading of the merged histogram, and any value a device sends is
stored, or left out and counted, never a crash (properties with hypothesis)."""

from __future__ import annotations

import copy
import itertools
import json
import random
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_agent.config import BrokerConfig
from device_agent.protocol import Leaf, Metrics, encode, topic
from device_agent.serving import BUCKETS_MS, ERROR_KINDS, TrafficStats, quantile_ms
from pipeline.fleet import FleetStore
from pipeline.fleet.ingest import Drop, Ingester
from pipeline.fleet.retention import RetentionPolicy, apply_retention
from pipeline.fleet.traffic import Counts, Skip, traffic_summary

T0 = 1_700_000_000.0
SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                            HealthCheck.function_scoped_fixture])
_unique = itertools.count()


@pytest.fixture
def store(fleet_db):
    s = FleetStore(fleet_db)
    yield s
    s.close()


def report(device: str, boot: int, seq: int, traffic, version: int | None = 3) -> tuple[str, str, dict]:
    return device, "metrics", {"device_id": device, "version": version, "latency_ms_p50": 1.0, "latency_ms_p95": 2.0,
                               "rss_mb": 80.0, "ts": T0 + seq, "boot": boot, "seq": seq, "traffic": traffic}


def answered(stats: TrafficStats, version: int | None, *latencies_ms: float) -> TrafficStats:
    for ms in latencies_ms:
        stats.observe(version, ms)
    return stats


def device_row(store, device: str) -> dict:
    [d] = [d for d in traffic_summary(store)["devices"] if d["device_id"] == device]
    return d


# -- restarts, order, repeats --------------------------------------------------------------------------------------
def test_a_restart_starts_the_counters_again_and_the_totals_go_on(store):
    first = answered(TrafficStats(), 3, 0.2, 0.3, 4.0)
    first.error(3, "deadline")
    store.ingest([report("d1", 1, 5, first.snapshot())], now=T0)
    answered(first, 3, 0.4)
    store.ingest([report("d1", 1, 9, first.snapshot())], now=T0 + 1)
    assert (device_row(store, "d1")["requests"], device_row(store, "d1")["answered"]) == (5, 4)

    second = answered(TrafficStats(), 3, 30.0, 30.0)  # the agent restarted: boot 2, its counters from zero
    second.error(None, "overloaded")
    store.ingest([report("d1", 2, 1, second.snapshot())], now=T0 + 2)
    d = device_row(store, "d1")
    assert (d["requests"], d["answered"], d["rejected"], d["boot"]) == (8, 6, 1, 2)
    assert d["errors"] == {"deadline": 1, "overloaded": 1} and d["errors_total"] == 2
    [v3, none] = d["versions"]
    assert (v3["version"], v3["answered"], v3["requests"]) == (3, 6, 7)
    assert (none["version"], none["requests"], none["answered"]) == (None, 1, 0)  # no model answered it
    # the histogram is both boots' sum, and the percentiles are the agent's reading of it
    merged = [a + b for a, b in zip(first.snapshot()["versions"]["3"]["buckets"],
                                    second.snapshot()["versions"]["3"]["buckets"])]
    assert v3["buckets"] == merged
    assert (v3["p50_ms"], v3["p95_ms"], v3["p99_ms"]) == tuple(quantile_ms(merged, q) for q in (0.5, 0.95, 0.99))
    assert v3["mean_ms"] == pytest.approx((0.2 + 0.3 + 4.0 + 0.4 + 60.0) / 6)

    # a late snapshot of the first boot (ingesters commit out of order) and a redelivery change nothing
    before = device_row(store, "d1")
    store.ingest([report("d1", 1, 5, copy.deepcopy(first.snapshot())), report("d1", 2, 1, second.snapshot())])
    assert device_row(store, "d1") == before


def test_a_version_the_agent_dropped_and_took_again_adds_up(store):
    """The agent keeps four versions' counts and drops the oldest: a version it serves again starts from zero
    within the same boot. The store sees its counters go down and adds the new snapshot whole."""
    stats = answered(TrafficStats(), 1, 1.0, 1.0, 1.0)
    store.ingest([report("d1", 1, 1, stats.snapshot())])
    for seq, version in enumerate((2, 3, 4, 5), start=2):  # the fifth version pushes version 1 out
        answered(stats, version, 2.0)
        store.ingest([report("d1", 1, seq, stats.snapshot(), version)])
    assert "1" not in stats.snapshot()["versions"]
    answered(stats, 1, 7.0)  # version 1 again (a rollback): its count starts at 1
    store.ingest([report("d1", 1, 10, stats.snapshot(), 1)])
    v1 = next(v for v in device_row(store, "d1")["versions"] if v["version"] == 1)
    assert v1["answered"] == 4 and v1["sum_ms"] == pytest.approx(10.0)
    assert device_row(store, "d1")["answered"] == 8


def test_the_queue_figures_are_the_latest_boot_s_and_rejected_adds_up(store):
    stats = TrafficStats()
    stats.queued(+3)
    stats.queued(-3)
    stats.error(None, "overloaded")
    store.ingest([report("d1", 4, 1, stats.snapshot())])
    again = TrafficStats()
    again.queued(+1)
    store.ingest([report("d1", 5, 1, again.snapshot())])
    d = device_row(store, "d1")
    assert (d["queue_peak"], d["queue_depth"], d["rejected"], d["boot"]) == (1, 1, 1, 5)


def test_classes_add_their_devices_up_per_version(store):
    store.ingest([("a", "status", {"target": "rpi4"}), ("b", "status", {"target": "rpi4"}),
                  ("c", "status", {"target": "jetson"})])
    store.ingest([report("a", 1, 1, answered(TrafficStats(), 3, 1.0, 2.0).snapshot()),
                  report("b", 1, 1, answered(TrafficStats(), 3, 3.0).snapshot()),
                  report("c", 1, 1, answered(TrafficStats(), 3, 4.0).snapshot())])
    classes = {(c["target"], c["version"]): c for c in traffic_summary(store)["classes"]}
    assert (classes[("rpi4", 3)]["answered"], classes[("rpi4", 3)]["devices"]) == (3, 2)
    assert (classes[("jetson", 3)]["answered"], classes[("jetson", 3)]["devices"]) == (1, 1)
    assert [c["target"] for c in traffic_summary(store)["classes"]] == ["jetson", "rpi4"]


# -- retention ---------------------------------------------------------------------------------------------------
def test_retention_folds_old_boots_without_losing_a_request(store):
    day = 86400.0
    for boot in range(1, 6):  # five restarts, a day apart
        stats = answered(TrafficStats(), 3, *[0.3] * boot)
        stats.error(None, "overloaded")
        store.ingest([report("d1", boot, 1, stats.snapshot())], now=T0 + boot * day)
    before = device_row(store, "d1")
    assert (before["answered"], before["rejected"]) == (15, 5) and store.count("traffic_boots") == 5

    done = apply_retention(store, RetentionPolicy(raw_s=2.5 * day, bucket_s=300, rollup_s=90 * day), now=T0 + 5 * day)
    assert done["traffic_boots_folded"] == 2  # boots 1 and 2: older than the raw window, not the latest
    assert store.count("traffic_boots") == 4  # the folded row, boots 3, 4, 5
    assert device_row(store, "d1") == before  # nothing lost, nothing counted twice
    apply_retention(store, RetentionPolicy(raw_s=0.5 * day, bucket_s=300, rollup_s=90 * day), now=T0 + 5 * day)
    assert store.count("traffic_boots") == 2 and store.count("traffic") == 4  # folded (v3, none) + boot 5's
    assert device_row(store, "d1") == before and device_row(store, "d1")["boot"] == 5

    # a snapshot of a folded boot arriving now (a broker that kept it a week) is stale: counted, not added
    skipped: Counter = Counter()
    store.ingest([report("d1", 2, 7, answered(TrafficStats(), 3, 1.0).snapshot())], skipped=skipped)
    assert skipped == {Skip.STALE: 1} and device_row(store, "d1") == before

    # a device silent for longer than the rollup window goes
    done = apply_retention(store, RetentionPolicy(raw_s=day, bucket_s=300, rollup_s=2 * day), now=T0 + 30 * day)
    assert done["traffic_rows_dropped"] == 4 and store.count("traffic_boots") == 0
    assert traffic_summary(store)["devices"] == []


# -- malformed values ----------------------------------------------------------------------------------------------
def good() -> dict:
    stats = answered(TrafficStats(), 3, 0.2, 3.0)
    stats.error(3, "runtime")
    return stats.snapshot()


def with_(path: tuple, value) -> dict:
    snap = good()
    node = snap
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return snap


NAN = float("nan")


@pytest.mark.parametrize(("traffic", "reason", "kept"), [
    ([1, 2], Skip.SHAPE, 0),
    ("busy", Skip.SHAPE, 0),
    (with_(("buckets_ms",), [1, 2, 3]), Skip.BUCKETS, 0),
    (with_(("buckets_ms",), None), Skip.SHAPE, 0),
    (with_(("versions",), []), Skip.SHAPE, 0),
    (with_(("versions", "3"), "x"), Skip.SHAPE, 0),
    (with_(("versions", "3", "buckets"), [0] * 3), Skip.BUCKETS, 0),
    (with_(("versions", "3", "buckets"), [-1] + [0] * len(BUCKETS_MS)), Skip.COUNT, 0),
    (with_(("versions", "3", "buckets"), [0.5] + [0] * len(BUCKETS_MS)), Skip.COUNT, 0),
    (with_(("versions", "3", "buckets"), [True] + [0] * len(BUCKETS_MS)), Skip.COUNT, 0),
    (with_(("versions", "3", "buckets"), [2**80] + [0] * len(BUCKETS_MS)), Skip.COUNT, 0),
    (with_(("versions", "3", "count"), 7), Skip.COUNT, 0),  # not the sum of its buckets
    (with_(("versions", "3", "sum_ms"), NAN), Skip.COUNT, 0),
    (with_(("versions", "3", "sum_ms"), -1.0), Skip.COUNT, 0),
    (with_(("versions", "3", "sum_ms"), 1e300), Skip.COUNT, 0),
    (with_(("versions", "3", "errors", "runtime"), -2), Skip.COUNT, 2),  # that value only
    (with_(("versions", "3", "errors", "cosmic_ray"), 1), Skip.KIND, 2),
    (with_(("versions", "3", "errors"), [1]), Skip.SHAPE, 2),
    (with_(("versions",), {"v3": good()["versions"]["3"]}), Skip.VERSION, 0),
    (with_(("versions",), {"-3": good()["versions"]["3"]}), Skip.VERSION, 0),
    (with_(("versions",), {"9" * 30: good()["versions"]["3"]}), Skip.VERSION, 0),
    (with_(("versions",), {str(i): good()["versions"]["3"] for i in range(20)}), Skip.SHAPE, 32),  # 16 kept
    (with_(("rejected",), -1), Skip.COUNT, 2),
    (with_(("queue_peak",), "many"), Skip.COUNT, 2),
])
def test_each_malformed_value_is_left_out_and_counted(store, traffic, reason, kept):
    skipped: Counter = Counter()
    written = store.ingest([report("d1", 1, 1, traffic)], skipped=skipped)
    assert written == 1  # the metrics row itself is stored whatever its traffic holds
    assert set(skipped) == {reason} and skipped[reason] >= 1, skipped
    rows = traffic_summary(store)["devices"]
    assert sum(d["answered"] for d in rows) == kept


def test_traffic_without_an_order_is_counted_and_an_agent_without_traffic_is_not(store):
    skipped: Counter = Counter()
    no_order = report("d1", 1, 1, good())
    del no_order[2]["boot"]
    store.ingest([no_order, report("d2", 1, 1, None)], skipped=skipped)
    assert skipped == {Skip.ORDER: 1} and traffic_summary(store)["devices"] == []


@pytest.mark.parametrize("fleet_db", ["sqlite"], indirect=True)  # writes SQLite-only values around the store
def test_rows_another_writer_left_unreadable_are_counted_and_crash_no_view(store):
    from pipeline.dashboard import BudgetBook, FleetView, prometheus

    store.ingest([report("d1", 1, 1, good()), report("d2", 1, 1, good())])
    store.db.execute("UPDATE traffic SET total = '{\"buckets\": \"x\"}' WHERE device_id = 'd1'")
    store.db.execute("INSERT INTO traffic VALUES ('d3', 1, 3, 0, x'00ff', NULL)")
    store.db.execute("INSERT INTO traffic_boots VALUES (7, 'b', 1, 0, 'lots', NULL, NULL, 0)")
    summary = traffic_summary(store)
    assert summary["unreadable"] == 3
    assert next(d for d in summary["devices"] if d["device_id"] == "d2")["answered"] == 2
    body, _ = prometheus.render(FleetView(store, BudgetBook.from_config(None)))
    assert b'edgefleet_inference_request_duration_seconds_count{device="d2",target=""} 2.0' in body
    # and the writer goes on over them: the next snapshot of d1 starts its totals afresh
    store.ingest([report("d1", 1, 2, answered(TrafficStats(), 3, 1.0).snapshot())])
    assert device_row(store, "d1")["answered"] == 1


# -- properties, through the ingester's whole path -------------------------------------------------------------------
@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def bench(request, tmp_path_factory):
    db = (tmp_path_factory.mktemp("traffic") / "fleet.db" if request.param == "sqlite"
          else request.getfixturevalue("postgres").url(f"traffic_{next(_unique)}"))
    ingester = Ingester(BrokerConfig(host="127.0.0.1", port=1), db)
    store = FleetStore(db)
    yield ingester, store
    store.close()


def through_ingester(bench, device: str, payloads: list[bytes]) -> None:
    """Each payload handled and committed as the ingester does; nothing may be dropped for its traffic."""
    ingester, store = bench
    messages = [ingester.handle(topic("edgefleet", device, Leaf.METRICS), p) for p in payloads]
    ingester._commit(store, [m for m in messages if m is not None])
    assert ingester.dropped_by[Drop.INTERNAL] == 0 and ingester.dropped_by[Drop.STORE] == 0


scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=17)
                      | st.dictionaries(st.text(max_size=6) | st.sampled_from(["3", "None", *ERROR_KINDS]), inner,
                                        max_size=5), max_leaves=40)
#: a real snapshot with some of its values replaced by anything
keys = st.sampled_from(["buckets_ms", "versions", "rejected", "queue_depth", "queue_peak", "buckets", "count",
                        "sum_ms", "errors", "runtime", "3", "None"])


def mutate(snapshot, edits):
    snap = copy.deepcopy(snapshot)
    for key, value in edits:
        stack = [snap]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                if key in node:
                    node[key] = value
                    break
                stack.extend(node.values())
    return snap


def payload(device: str, boot: int, seq: int, traffic) -> bytes:
    m = Metrics(device, 3, 1.0, 2.0, 80.0, 10, True, ts=T0, boot=boot, seq=seq)
    body = json.loads(encode(m))
    body["traffic"] = traffic
    return json.dumps(body, allow_nan=True).encode()


@SETTINGS
@given(traffic=values | st.builds(mutate, st.just(good()), st.lists(st.tuples(keys, values), max_size=3)),
       boot=st.integers(min_value=0, max_value=3), seq=st.integers(min_value=0, max_value=3))
def test_any_traffic_value_is_stored_or_counted_and_every_view_answers(bench, traffic, boot, seq):
    from pipeline.dashboard import BudgetBook, FleetView, prometheus

    ingester, store = bench
    device = f"any-{next(_unique)}"
    before = sum(ingester.traffic_skipped.values()) + ingester.dropped
    through_ingester(bench, device, [payload(device, boot, seq, traffic)])
    rows = store.db.execute("SELECT total, last FROM traffic WHERE device_id = ?", (device,)).fetchall()
    assert all(Counts.load(r[0]) is not None and Counts.load(r[1]) is not None for r in rows)  # as checked
    if not rows and traffic is not None and isinstance(traffic, dict) and traffic.get("versions"):
        # left out: then counted (a value the protocol's decoder refuses, NaN, drops the whole message)
        assert sum(ingester.traffic_skipped.values()) + ingester.dropped > before
    summary = traffic_summary(store)
    assert summary["unreadable"] == 0
    for d in summary["devices"]:
        assert d["requests"] == d["answered"] + d["errors_total"] >= 0 and sum(d["buckets"]) == d["answered"]
        assert d["p95_ms"] is None or d["p95_ms"] in BUCKETS_MS
    prometheus.render(FleetView(store, BudgetBook.from_config(None)), ingester.counters())


@st.composite
def agent_lives(draw):
    """An agent's life: boots, each a run of requests (a version from three, or none; a latency or an error) with
    a snapshot taken after some of them, as the agent reports. No more versions than the agent keeps."""
    boots = []
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        stats, snapshots = TrafficStats(), []
        for _ in range(draw(st.integers(min_value=1, max_value=6))):
            for _ in range(draw(st.integers(min_value=0, max_value=5))):
                version = draw(st.sampled_from([7, 8, 9, None]))
                if draw(st.booleans()):
                    stats.observe(version, draw(st.floats(min_value=0.0, max_value=8000.0)))
                else:
                    stats.error(version, draw(st.sampled_from(ERROR_KINDS)))
            snapshots.append(stats.snapshot())
        boots.append(snapshots)
    return boots


@SETTINGS
@given(life=agent_lives(), seed=st.integers(min_value=0, max_value=2**32), batch=st.integers(min_value=1, max_value=5))
def test_in_any_order_a_device_s_totals_are_what_each_boot_counted_last(bench, life, seed, batch):
    """However the snapshots arrive (shared-subscription ingesters commit out of order, QoS 1 redelivers), the
    store ends with each boot's last snapshot summed over boots."""
    ingester, store = bench
    device = f"life-{next(_unique)}"
    sent = [(boot, seq, snap) for boot, snaps in enumerate(life, start=1) for seq, snap in enumerate(snaps, start=1)]
    rng = random.Random(seed)
    shuffled = sent + rng.sample(sent, k=min(3, len(sent)))  # a few twice
    rng.shuffle(shuffled)
    for i in range(0, len(shuffled), batch):
        through_ingester(bench, device, [payload(device, b, s, snap) for b, s, snap in shuffled[i:i + batch]])
    expected = Counter()
    for snaps in life:
        last = snaps[-1]
        for entry in last["versions"].values():
            expected["answered"] += entry["count"]
            expected["errors"] += sum(entry["errors"].values())
        expected["rejected"] += last["rejected"]
    d = device_row(store, device)
    assert (d["answered"], d["errors_total"], d["rejected"]) == (
        expected["answered"], expected["errors"], expected["rejected"])
    assert d["requests"] == expected["answered"] + expected["errors"] and d["boot"] == len(life)
