"""The model on live traffic, on the device: the shared schemas' parsers are total, live accuracy from the
application's feedback through a real inference API, the drift monitor fed by served requests, and a shadowed
candidate compared off the request path with a real onnxruntime session, within its CPU share."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from device_agent.client import Client
from device_agent.drift import DriftMonitor, DriftScores, Reference
from device_agent.errors import ProtocolError
from device_agent.quality import LiveAccuracy, Shadow, ShadowStats
from device_agent.runtimes import get_runtime
from device_agent.serving import BUCKETS_MS, InferenceServer, ModelHolder, ServeConfig, Served
from device_agent.shadow import ShadowRunner
from fleet_probe import until
from traffic import SteadyTraffic

BUCKETS = len(BUCKETS_MS) + 1

_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=14), inner,
                                                                                  max_size=6), max_leaves=40)


def _near(keys: tuple[str, ...]):
    """Objects with the schema's own keys and arbitrary values: parsers meet plausible garbage, not only noise."""
    return st.dictionaries(st.sampled_from(keys), _JSON, max_size=len(keys))


@settings(max_examples=120, deadline=None)
@given(value=st.one_of(_JSON, _near(ShadowStats.KEYS), _near(("versions", "unmatched", "window_s")),
                       _near(Shadow.KEYS), _near(("version", "window", "requests", "samples", "skipped", "psi_outputs",
                                                  "psi_confidence", "mean_shift", "max_mean_shift"))))
def test_every_parser_takes_any_json_or_names_what_is_wrong(value):
    for parse in (lambda v: ShadowStats.from_dict(v, BUCKETS), LiveAccuracy.from_dict, Shadow.from_dict,
                  DriftScores.from_dict):
        try:
            parse(value)
        except ProtocolError as exc:
            assert str(exc)


def test_what_the_agent_reports_parses_back_on_the_host():
    acc = LiveAccuracy()
    for i in range(5):
        acc.answered(f"r{i}", 3, i % 2)
    assert acc.feedback("r0", 0) == {"3": True} and acc.feedback("r1", 0) == {"3": False}
    assert acc.feedback("r1", 0) is None  # labelled once only
    parsed = LiveAccuracy.from_dict(json.loads(json.dumps(acc.snapshot())))
    assert parsed["versions"] == {3: {"labelled": 2, "correct": 1}} and parsed["unmatched"] == 1
    stats = ShadowStats(candidate=4, active=3, sample=0.5, offered=10, compared=8, agree=7, errors=1,
                        max_distance=0.5, sum_distance=0.8, active_ms=[1] * BUCKETS, candidate_ms=[2] * BUCKETS)
    back = ShadowStats.from_dict(json.loads(json.dumps(stats.to_dict())), BUCKETS)
    assert back.to_dict() == stats.to_dict() and back.agreement == 7 / 8
    with pytest.raises(ProtocolError, match="agree"):
        ShadowStats.from_dict({**stats.to_dict(), "agree": 9}, BUCKETS)
    assert Shadow.from_dict(Shadow(0.2, 0.5).to_dict()) == Shadow(0.2, 0.5)
    with pytest.raises(ProtocolError, match="above 0"):
        Shadow.from_dict({"sample": 0})


def test_what_the_host_refuses_and_what_the_agent_never_sends():
    for key in ("²", "١٢", "9" * 19, "-1", ""):  # digits of other scripts, past int64, signs
        with pytest.raises(ProtocolError):
            LiveAccuracy.from_dict({"versions": {key: {"labelled": 1, "correct": 1}}})
    assert ShadowStats.from_dict(ShadowStats(candidate=1, active=None, sample=0.1).to_dict()).compared == 0
    inf = ShadowStats(candidate=1, active=None, sample=0.1, compared=1, offered=1, max_distance=float("inf"),
                      sum_distance=float("nan"))
    assert json.loads(json.dumps(inf.to_dict(), allow_nan=False))["mean_distance"] is None
    with pytest.raises(ProtocolError):
        ShadowStats.from_dict({**inf.to_dict(), "compared": 2**52, "offered": 2**52, "mean_distance": 1e300})
    with pytest.raises(ProtocolError):
        DriftScores.from_dict({"window": 1, "requests": 1, "samples": 1, "skipped": 0, "mean_shift": [None]})


def test_live_accuracy_keeps_the_versions_labelled_last():
    acc = LiveAccuracy()
    for v in [*range(10, 20), 3]:  # ten newer versions, then a rollback to version 3
        acc.answered(f"r{v}", v, 0)
        acc.feedback(f"r{v}", 0)
    assert set(acc.snapshot()["versions"]) == {"3", *map(str, range(13, 20))}


def test_pending_answers_are_bounded_and_expire():
    now = [0.0]
    acc = LiveAccuracy(max_pending=100, window_s=10, clock=lambda: now[0])
    for i in range(1000):
        acc.answered(f"r{i}", 1, 0)
    assert acc.pending == 100 and acc.feedback("r0", 0) is None and acc.feedback("r999", 0) == {"1": True}
    now[0] = 11.0
    assert acc.feedback("r998", 0) is None and acc.pending == 0  # past the window: gone
    assert acc.snapshot()["unmatched"] == 2


def export(model: nn.Module, path, shape=(1, 8, 8)):
    torch.onnx.export(model.eval(), (torch.zeros(1, *shape),), str(path), input_names=["image"],
                      output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                      dynamo=False)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("quality")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    same = export(base, d / "same.onnx")
    near = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    near.load_state_dict({k: v + 1e-4 * torch.randn_like(v) for k, v in base.state_dict().items()})
    torch.manual_seed(5)
    other = export(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), d / "other.onnx")
    slow = export(nn.Sequential(*[nn.Conv2d(32 if i else 1, 32, 3, padding=1) for i in range(6)], nn.Flatten(),
                                nn.Linear(32 * 24 * 24, 10)), d / "slow.onnx", (1, 24, 24))
    return {"same": same, "near": export(near, d / "near.onnx"), "other": other, "slow": slow}


def session(path, threads=1):
    return get_runtime("onnxruntime").load(path, threads)


@pytest.fixture
def api(tmp_path, models):
    holder = ModelHolder()
    holder.swap(Served(session(models["same"]), "m", 1, {"labels": [f"c{i}" for i in range(10)]}))
    with InferenceServer(holder, ServeConfig(socket_path=tmp_path / "q.sock")) as server:
        yield server


def test_feedback_gives_live_accuracy_by_index_or_label_name(api, models):
    x = np.random.default_rng(0).random((30, 1, 1, 8, 8), dtype=np.float32)
    truth = session(models["same"]).run({"image": x[:, 0]})[0].argmax(axis=1)
    with Client(str(api.cfg.socket_path)) as c:
        ids = [c.infer(xi).id for xi in x]
        raw = lambda body: c._request("POST", "/v1/feedback", json.dumps(body).encode(),  # noqa: E731
                                      {"Content-Type": "application/json"})
        for k, rid in enumerate(ids[:20]):  # the first 10 right by index, the next 10 wrong by name
            label = int(truth[k]) if k < 10 else f"c{(truth[k] + 1) % 10}"
            status, _, body = raw({"id": rid, "label": label})
            assert status == 200 and json.loads(body) == {"id": rid, "matched": True, "correct": {"1": k < 10}}
        status, _, body = raw({"id": "never-answered", "label": 0})
        assert status == 200 and json.loads(body)["matched"] is False
        for bad in ({"id": ids[25], "label": "c99"}, {"id": ids[25], "label": -1}, {"label": 0}, [1, 2]):
            status, _, body = raw(bad)
            assert status == 400 and json.loads(body)["message"], bad
    snap = api.accuracy.snapshot()
    assert snap["versions"] == {"1": {"labelled": 20, "correct": 10}} and snap["unmatched"] == 1


def test_served_requests_feed_the_versions_drift_monitor(tmp_path, models):
    ref = Reference(1000, 1, (0.5,), (0.29,))  # uniform [0, 1) pixels: mean 0.5, std 0.29
    holder = ModelHolder()
    holder.swap(Served(session(models["same"]), "m", 1, monitor=DriftMonitor(ref, 200)))
    with InferenceServer(holder, ServeConfig(socket_path=tmp_path / "d.sock")) as api:
        rng = np.random.default_rng(1)
        with Client(str(api.cfg.socket_path)) as c:
            monitor = holder.current.monitor
            for _ in range(100):
                c.infer(rng.random((1, 1, 8, 8), dtype=np.float32))
            # the monitor sees a request just after its answer went out
            until(lambda: monitor.scores().requests == 100, 10, "the 100th request in the drift window")
            calm = monitor.scores()
            for _ in range(200):
                c.infer(rng.random((1, 1, 8, 8), dtype=np.float32) + 0.5)  # brighter by 1.7 std
            until(lambda: monitor.scores().requests == 200, 10, "a window of brighter requests")
            shifted = monitor.scores()
    assert calm.requests == 100 and calm.max_mean_shift < 0.1
    assert shifted.max_mean_shift > 1.0


def _runner(models, candidate, sample=1.0, max_cpu=1.0, active=1):
    return ShadowRunner(session(models[candidate]), 2, active, Shadow(sample, max_cpu))


def _wait(runner, compared, timeout=30.0):
    deadline = time.monotonic() + timeout
    while runner.snapshot()["compared"] + runner.snapshot()["errors"] < compared:
        assert time.monotonic() < deadline, runner.snapshot()
        time.sleep(0.01)  # a poll interval while the worker catches up, not a synchronisation


@pytest.mark.parametrize("candidate,agree", [("near", True), ("other", False)])
def test_a_shadow_counts_top1_agreement_with_the_active_answers(models, candidate, agree):
    active = session(models["same"])
    runner = _runner(models, candidate)
    rng = np.random.default_rng(2)
    try:
        for i in range(40):
            feeds = {"image": rng.random((1, 1, 8, 8), dtype=np.float32)}
            runner.offer(f"r{i}", feeds, active.run(feeds), 0.1, 1)
            _wait(runner, i + 1)
    finally:
        runner.stop()
    s = ShadowStats.from_dict(runner.snapshot(), BUCKETS)
    assert s.offered == s.compared == 40 and s.errors == 0 and s.top1
    assert (s.agreement == 1.0) if agree else (s.agreement < 0.6), s
    assert (s.max_distance < 1e-2) if agree else (s.max_distance > 1e-2)
    assert sum(s.candidate_ms) == 40 and sum(s.active_ms) == 40


def test_a_shadow_samples_and_drops_when_busy_never_blocking_the_caller(models):
    active = session(models["same"])
    feeds = {"image": np.zeros((1, 1, 24, 24), np.float32)}
    runner = ShadowRunner(session(models["slow"]), 2, 1, Shadow(1.0, 0.05))  # a slow candidate, 5% of a core
    try:
        answer = active.run({"image": np.zeros((1, 1, 8, 8), np.float32)})
        t0 = time.perf_counter()
        for i in range(200):
            runner.offer(f"r{i}", feeds, answer, 0.1, 1)
        offered_in = time.perf_counter() - t0
    finally:
        runner.stop()
    s = runner.snapshot()
    assert s["offered"] == 200 and s["dropped"] >= 190 and s["compared"] + s["errors"] <= 10, s
    assert offered_in < 0.5  # 200 offers while the candidate ran: none waited for it
    half = ShadowRunner(session(models["same"]), 2, 1, Shadow(0.5, 1.0), chance=iter([0.1, 0.9] * 50).__next__)
    try:
        for i in range(100):
            half.offer(f"r{i}", {"image": np.zeros((1, 1, 8, 8), np.float32)}, answer, 0.1, 1)
    finally:
        half.stop()
    assert half.snapshot()["offered"] == 50


def test_a_shadow_takes_at_most_its_cpu_share(models):
    feeds = {"image": np.zeros((1, 1, 24, 24), np.float32)}
    answer = session(models["same"]).run({"image": np.zeros((1, 1, 8, 8), np.float32)})
    slow = session(models["slow"])
    runs = []
    for _ in range(7):
        t0 = time.perf_counter()
        slow.run(feeds)
        runs.append(time.perf_counter() - t0)
    run_s = float(np.median(runs))
    runner = ShadowRunner(session(models["slow"]), 2, 1, Shadow(1.0, 0.25))
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2.0:  # offer without pause for two seconds
            runner.offer("r", feeds, answer, 0.1, 1)
            time.sleep(0.001)  # the pace of a busy application, not a synchronisation
        elapsed = time.monotonic() - t0
        s = runner.snapshot()
    finally:
        runner.stop()
    done = s["compared"] + s["errors"]
    assert done >= 2 and done * run_s / elapsed <= 0.25 * 1.3, (done, run_s, s)  # the queue never runs back to back


def test_with_traffic_the_server_hands_answers_to_the_shadow(api, models):
    runner = _runner(models, "near", sample=1.0)
    api.shadow = runner
    try:
        x = np.random.default_rng(3).random((1, 1, 8, 8), dtype=np.float32)
        with SteadyTraffic(str(api.cfg.socket_path), x, clients=2) as traffic:
            traffic.wait_for(100)
        assert traffic.failures == []
        _wait(runner, 1)
    finally:
        api.shadow = None
        runner.stop()
    s = runner.snapshot()
    assert s["offered"] >= 100 and s["compared"] >= 1 and s["agree"] == s["compared"]
