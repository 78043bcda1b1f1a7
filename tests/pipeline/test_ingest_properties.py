"""Property tests of the ingester's per-message handling (pipeline.fleet.ingest): whatever the topic and payload,
``Ingester.handle`` and the commit into a real SQLite store never raise; a well-formed message is stored, with
fields of the wrong type as unknown; the examples pin each drop reason."""

from __future__ import annotations

import itertools
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_agent.config import BrokerConfig
from device_agent.protocol import Event, Leaf, Metrics, Status, check_id, encode, topic
from pipeline.fleet import FleetStore
from pipeline.fleet.ingest import MAX_DEPTH, MAX_PAYLOAD, Drop, Ingester, nesting

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LEAVES = [leaf.value for leaf in Leaf]
FIELDS = {"metrics": list(Metrics.__dataclass_fields__), "status": list(Status.__dataclass_fields__),
          "events": list(Event.__dataclass_fields__)}
_unique = itertools.count()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def bench(request, tmp_path_factory):
    """An ingester (never connected: its handling and commit are driven directly) and the store it commits to, on
    each engine."""
    db = (tmp_path_factory.mktemp("props") / "fleet.db" if request.param == "sqlite"
          else request.getfixturevalue("postgres").url(f"props_{next(_unique)}"))
    ingester = Ingester(BrokerConfig(host="127.0.0.1", port=1), db)
    store = FleetStore(db)
    yield ingester, store
    store.close()


def handled(bench, name: str, payload: bytes):
    """The ingester's whole per-message path: handle, then commit what it kept. Neither may raise."""
    ingester, store = bench
    before, ignored = ingester.dropped, ingester.ignored
    message = ingester.handle(name, payload)
    if message is None:  # a refusal is always counted; a calibration message is ignored, and counted as such
        assert (ingester.dropped, ingester.ignored) in ((before + 1, ignored), (before, ignored + 1))
    else:
        device, leaf, body = message
        assert check_id(device, "device") and leaf in ("metrics", "status", "events", "online")
        assert isinstance(body, dict)
        ingester._commit(store, [message])
    # nothing raised inside the handling, and the store took all it was given
    assert ingester.dropped_by[Drop.INTERNAL] == 0 and ingester.dropped_by[Drop.STORE] == 0
    return message


# -- strategies ---------------------------------------------------------------------------------------------------
any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=80)  # lone surrogates included
json_scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**80), max_value=2**80)
                | st.floats(allow_nan=True, allow_infinity=True) | any_text)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(any_text, inner, max_size=4), max_leaves=12)
device_ids = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
topics = st.one_of(any_text, st.builds(lambda d, leaf: f"edgefleet/v1/{d}/{leaf}", any_text | device_ids,
                                       st.sampled_from(LEAVES) | any_text))


def dumps(body) -> bytes:
    return json.dumps(body, ensure_ascii=True, allow_nan=True).encode()  # \ud800 escapes, NaN, Infinity


@st.composite
def shaped_bodies(draw):
    """A message of the right shape (its leaf's fields, "v": 1) whose values are anything JSON holds."""
    leaf = draw(st.sampled_from(sorted(FIELDS)))
    keys = draw(st.lists(st.sampled_from(FIELDS[leaf]), unique=True))
    body = {k: draw(json_values) for k in keys}
    body["v"] = 1
    return leaf, body


# -- properties ---------------------------------------------------------------------------------------------------
@SETTINGS
@given(name=topics, payload=st.binary(max_size=2048))
def test_any_topic_and_any_bytes_are_handled_without_raising(bench, name, payload):
    handled(bench, name, payload)


@SETTINGS
@given(leaf=st.sampled_from(["metrics", "status", "events"]), opening=st.sampled_from([b"[", b'{"a":', b'[{"a":']),
       depth=st.integers(min_value=0, max_value=50_000), tail=st.binary(max_size=64))
def test_deep_or_large_json_is_refused_before_parsing(bench, leaf, opening, depth, tail):
    payload = opening * depth + tail
    message = handled(bench, f"edgefleet/v1/dev-1/{leaf}", payload)
    if len(payload) > MAX_PAYLOAD or depth > MAX_DEPTH:
        assert message is None


@SETTINGS
@given(shaped=shaped_bodies())
def test_a_well_formed_message_with_wrong_types_is_stored_with_them_unknown(bench, shaped):
    leaf, body = shaped
    ingester, store = bench
    device = f"shaped-{next(_unique)}"  # a device of its own: what is stored is this example's
    message = handled(bench, topic("edgefleet", device, Leaf(leaf)), dumps(body))
    if message is None:  # only the protocol's decoder may refuse it (NaN, infinities, lone surrogates, ...)
        return
    if leaf == "events":
        assert store.events(device=device)
    else:
        row = next(d for d in store.devices() if d["device_id"] == device)
        for column in ("active_version", "progress", "boot", "seq"):
            v = row[column]
            assert v is None or (isinstance(v, (int, float)) and math.isfinite(v))
        if leaf == "metrics":  # whatever its clock said (series() would leave out ts < 0)
            assert store.db.execute("SELECT count(*) FROM metrics WHERE device_id = ?", (device,)).fetchone()[0] == 1


# -- examples: each reason, and the agent's own messages stored as sent -------------------------------------------
@pytest.mark.parametrize(("name", "payload", "reason"), [
    ("elsewhere/v1/dev-1/metrics", b"{}", Drop.TOPIC),
    ("edgefleet/v1/dev-1/job", b"{}", Drop.TOPIC),
    ("edgefleet/v1/dev-1/metrics/extra", b"{}", Drop.TOPIC),
    ("edgefleet/v1/<img src=x>/metrics", b"{}", Drop.DEVICE_ID),
    ("edgefleet/v1/" + "x" * 70 + "/metrics", b"{}", Drop.DEVICE_ID),
    ("edgefleet/v1/dev-1/metrics", b"[" * 100_000, Drop.SIZE),
    ("edgefleet/v1/dev-1/metrics", b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), Drop.SIZE),
    ("edgefleet/v1/dev-1/metrics", b"\xff", Drop.JSON),
    ("edgefleet/v1/dev-1/status", b'{"v":1,"ts":' + b"9" * 5000 + b"}", Drop.JSON),
    ("edgefleet/v1/dev-1/status", b"[]", Drop.SCHEMA),
    ("edgefleet/v1/dev-1/events", b'{"v":2}', Drop.SCHEMA),
    ("edgefleet/v1/dev-1/online", b"yes", Drop.SCHEMA),
])
def test_each_refusal_is_counted_under_its_reason(tmp_path, name, payload, reason):
    ingester = Ingester(BrokerConfig(host="127.0.0.1", port=1), tmp_path / "fleet.db")
    assert ingester.handle(name, payload) is None
    assert {r: n for r, n in ingester.dropped_by.items() if n} == {reason: 1}
    assert ingester.counters()["dropped"][reason.value] == 1


def test_calibration_messages_are_ignored_not_dropped(tmp_path):
    """A calibration's timings are the calibrate command's, not telemetry: not subscribed to, and one that arrives
    all the same is neither stored nor counted as a malformed or refused message."""
    from device_agent.protocol import Calibration
    from pipeline.fleet.ingest import LEAVES

    ingester = Ingester(BrokerConfig(host="127.0.0.1", port=1), tmp_path / "fleet.db")
    assert Leaf.CALIBRATION not in LEAVES
    assert not any("calibration" in t for t, _ in ingester.link.subscriptions)
    good = encode(Calibration(device_id="dev-1", job_id="c1-ab", version=1, done=1, total=2,
                              results=[{"id": "k0", "median_ms": 0.1, "p10_ms": 0.1, "p90_ms": 0.1}]))
    for payload in (good, b"\xff", b"[" * 100_000):
        assert ingester.handle("edgefleet/v1/dev-1/calibration", payload) is None
    assert ingester.dropped == 0 and ingester.ignored == 3


def test_nesting_ignores_brackets_inside_strings():
    assert nesting(b'{"a": "' + b"[" * 40 + b'"}') == 1
    assert nesting(b'[[1], {"a": [2]}]') == 0  # no more brackets than the bound: not even scanned
    assert nesting(b'["' + b"[" * 100 + b'", [[1]]]') == 3
    assert nesting(b'["\\"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[", {}]') == 2
    assert nesting(b"[" * 1000) == MAX_DEPTH + 1  # stops counting past the bound


def test_the_agents_own_messages_are_stored_as_sent(tmp_path):
    ingester = Ingester(BrokerConfig(host="127.0.0.1", port=1), tmp_path / "fleet.db")
    store = FleetStore(tmp_path / "fleet.db")
    try:
        m = Metrics("dev-1", 3, 3.0, 4.0, 80.0, 10, True, 4.5, 250.0, 2, 35.0, 51.5, 1.9, "predicted", "a", 60.0,
                    "idle", ts=1_700_000_000.0, boot=2, seq=5)
        s = Status("dev-1", "activated", "rpi4", 3, "a", agent_version="1.0", ts=1_700_000_000.5, boot=2, seq=6)
        e = Event("dev-1", "activated", "v3 active", "j3", 3, ts=1_700_000_001.0, boot=2, seq=7)
        messages = [ingester.handle(topic("edgefleet", "dev-1", leaf), encode(x))
                    for leaf, x in ((Leaf.METRICS, m), (Leaf.STATUS, s), (Leaf.EVENTS, e))]
        messages.append(ingester.handle(topic("edgefleet", "dev-1", Leaf.ONLINE), b"online"))
        ingester._commit(store, messages)
        assert ingester.stored == 3 and ingester.dropped == 0
        [d] = store.devices()
        assert (d["state"], d["target"], d["active_version"], d["slot"], d["online"], d["boot"], d["seq"]) == (
            "activated", "rpi4", 3, "a", 1, None, None)  # online (last here) starts the order afresh
        assert {k: d["metrics"][k] for k in ("latency_ms_p95", "throughput_ips", "errors", "energy_source")} == {
            "latency_ms_p95": 4.0, "throughput_ips": 250.0, "errors": 2, "energy_source": "predicted"}
        [ev] = store.events(device="dev-1")
        assert (ev["kind"], ev["message"], ev["job_id"]) == ("activated", "v3 active", "j3")
    finally:
        store.close()
