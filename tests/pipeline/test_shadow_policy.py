"""The shadow stage's judgement, without a broker: per device verdicts over the agent's own counters (ShadowStats, as
the host parses them from a metrics message), the overall decision, the latency figures read from the histograms,
and the shadow job the host signs for an artifact."""

from __future__ import annotations

import dataclasses
import json
from bisect import bisect_left

import pytest

from conftest import make_artifact
from device_agent.manifest import Manifest, keyid, load_public_key, verify_envelope
from device_agent.quality import BUCKETS_MS, HISTOGRAM, Shadow, ShadowStats
from pipeline.bundle import shadow_artifact
from pipeline.errors import ExportError
from pipeline.ota.rollout import RolloutPolicy, RolloutResult, latency_over
from pipeline.ota.shadow import (DeviceShadow, ShadowPolicy, ShadowResult, Verdict, decide, histogram_quantile,
                                 judge_device)

N = HISTOGRAM


def hist(ms: float, n: int) -> list[int]:
    h = [0] * N
    h[bisect_left(BUCKETS_MS, ms)] = n
    return h


def stats(compared: int = 300, agree: int | None = None, errors: int = 0, active_ms: float = 1.0,
          candidate_ms: float = 1.0, top1: bool = True, mean_distance: float = 0.0) -> ShadowStats:
    """The agent's counters for a candidate v2 beside v1, through the wire: built with the agent's class, parsed as
    the host parses a metrics message's ``shadow``."""
    s = ShadowStats(candidate=2, active=1, sample=0.1, offered=compared + errors + 7, compared=compared, dropped=7,
                    errors=errors, agree=compared if agree is None else agree, top1=top1,
                    max_distance=2 * mean_distance, sum_distance=mean_distance * compared,
                    active_ms=hist(active_ms, compared), candidate_ms=hist(candidate_ms, compared))
    return ShadowStats.from_dict(json.loads(json.dumps(s.to_dict())), N)


def device(s: ShadowStats | None, emulated: bool = False, name: str = "pi-1") -> DeviceShadow:
    return DeviceShadow(name, stats=s, emulated=emulated)


POLICY = ShadowPolicy(min_samples=200, min_agreement=0.9, max_latency_ratio=1.5)


def test_a_candidate_that_agrees_over_enough_requests_passes():
    assert judge_device(device(stats(compared=300, agree=290)), POLICY) == (Verdict.PASS, None)


def test_below_min_samples_nothing_is_decided():
    verdict, reason = judge_device(device(stats(compared=150, agree=0)), POLICY)
    assert verdict is Verdict.UNDECIDED and reason == "150 of 200 requests compared"
    assert judge_device(device(None), POLICY) == (Verdict.UNDECIDED, "0 of 200 requests compared")


def test_disagreement_fails_and_says_by_how_much():
    verdict, reason = judge_device(device(stats(compared=300, agree=255)), POLICY)
    assert verdict is Verdict.FAIL
    assert reason == "top-1 agreement 85.0% (255 of 300), under the 90% required"


def test_a_shadow_run_that_failed_does_not_agree():
    # 280 of 300 compared agree (93%), but 30 more runs failed: 280 of 330 is 84.8%
    verdict, reason = judge_device(device(stats(compared=300, agree=280, errors=30)), POLICY)
    assert verdict is Verdict.FAIL and "84.8% (280 of 330, 30 shadow runs failed)" in reason


def test_a_slower_candidate_fails_on_the_ratio_of_p95s_and_only_when_asked_to():
    slow = device(stats(active_ms=1.0, candidate_ms=4.0))  # (0.5, 1] ms against (2.5, 5] ms
    verdict, reason = judge_device(slow, POLICY)
    assert verdict is Verdict.FAIL
    assert reason == "p95 4.875 ms is 5.00x the active model's 0.975 ms (shadow), over the 1.5x allowed"
    assert judge_device(slow, dataclasses.replace(POLICY, max_latency_ratio=None)) == (Verdict.PASS, None)
    assert judge_device(slow, dataclasses.replace(POLICY, max_latency_ratio=6.0)) == (Verdict.PASS, None)


def test_both_models_timed_alike_at_install_are_the_latency_judged_when_the_agent_sends_them():
    """The shadow's histograms time the candidate on a low-priority thread beside the traffic; the benchmark the
    agent ran of both at install (same threads, same priority) is what a promotion would serve at."""
    s = stats(active_ms=1.0, candidate_ms=40.0)  # starved on its nice-19 thread: 40x in the histograms
    s.bench = {"candidate_p50_ms": 1.1, "candidate_p95_ms": 1.2, "active_p50_ms": 1.0, "active_p95_ms": 1.0,
               "runs": 100, "threads": 2}
    assert judge_device(device(s), POLICY) == (Verdict.PASS, None)
    s.bench = {**s.bench, "candidate_p95_ms": 2.0}
    assert judge_device(device(s), POLICY) == (
        Verdict.FAIL, "p95 2 ms is 2.00x the active model's 1 ms (benchmark), over the 1.5x allowed")
    f = device(s).figures()
    assert f["latency_basis"] == "benchmark" and f["shadow_ms_p95"] > 25


def test_the_targets_budget_holds_a_real_device_never_an_emulated_one():
    rollout = RolloutPolicy(latency_p95_ms=4.0)  # no prediction for this host: emulated agents are not judged
    def over(d, m):
        return latency_over(d, m, rollout, predicted_ms=2.0)
    policy = dataclasses.replace(POLICY, max_latency_ratio=None)
    verdict, reason = judge_device(device(stats(candidate_ms=4.0)), policy, over)
    assert verdict is Verdict.FAIL
    assert reason == "the target's latency budget: pi-1 (4.875 ms, over the 4 ms p95 budget)"
    assert judge_device(device(stats(candidate_ms=4.0), emulated=True), policy, over) == (Verdict.PASS, None)
    assert judge_device(device(stats(candidate_ms=1.0)), policy, over) == (Verdict.PASS, None)


def test_outputs_that_are_not_class_scores_are_judged_by_distance_or_not_at_all():
    regression = stats(top1=False, mean_distance=0.001)
    verdict, reason = judge_device(device(regression), POLICY)
    assert verdict is Verdict.FAIL and "rollout.shadow.max_distance is not set" in reason
    near = dataclasses.replace(POLICY, max_distance=0.01)
    assert judge_device(device(regression), near) == (Verdict.PASS, None)
    verdict, reason = judge_device(device(stats(top1=False, mean_distance=0.05)), near)
    assert verdict is Verdict.FAIL and reason == "mean output distance 0.05 over the 0.01 allowed (max 0.1)"
    verdict, reason = judge_device(device(stats(top1=False, errors=40, mean_distance=0.001)), near)
    assert verdict is Verdict.FAIL and reason == "40 of 340 shadow runs failed"


def test_a_classifier_may_be_held_to_a_distance_too():
    policy = dataclasses.replace(POLICY, max_distance=0.01)
    verdict, reason = judge_device(device(stats(mean_distance=0.5)), policy)
    assert verdict is Verdict.FAIL and reason.startswith("mean output distance 0.5")


def test_every_limit_missed_is_named():
    _, reason = judge_device(device(stats(agree=10, candidate_ms=40.0)), POLICY)
    assert reason.count("; ") == 1 and "agreement 3.3%" in reason and "over the 1.5x allowed" in reason


def test_the_decision_needs_every_device():
    good, bad = device(stats(), name="a"), device(stats(agree=0), name="b")
    for d in (good, bad):
        d.verdict, d.reason = judge_device(d, POLICY)
    assert decide([good]) is None
    assert decide([good, bad]) == "the candidate fails: b: top-1 agreement 0.0% (0 of 300), under the 90% required"
    short = DeviceShadow("c", Verdict.UNDECIDED, "120 of 200 requests compared in 600 s")
    assert decide([good, short]) == "not enough evidence: c: 120 of 200 requests compared in 600 s"
    # a device that runs no model has nothing to compare the candidate with: it is not in the way
    assert decide([good, DeviceShadow("d", Verdict.SKIPPED, "runs no model")]) is None


def test_histogram_quantiles_interpolate_within_the_bucket():
    assert histogram_quantile([0] * N, 0.5) is None
    h = [0] * N
    h[3], h[4] = 50, 50  # (0.5, 1] and (1, 2.5]
    assert histogram_quantile(h, 0.5) == pytest.approx(1.0)
    assert histogram_quantile(h, 0.95) == pytest.approx(1.0 + 1.5 * 0.9)
    over = [0] * N
    over[-1] = 3  # past the last bound: read as that bound
    assert histogram_quantile(over, 0.95) == BUCKETS_MS[-1]
    first = hist(0.05, 10)  # [0, 0.1]
    assert histogram_quantile(first, 0.5) == pytest.approx(0.05)


def test_the_record_is_what_the_store_keeps():
    d = device(stats(compared=300, agree=297, errors=3))
    d.verdict, d.reason = judge_device(d, POLICY)
    row = d.to_dict()
    assert row == {"device_id": "pi-1", "verdict": "pass", "reason": None, "samples": 300, "offered": 310,
                   "dropped": 7, "errors": 3, "agreement": 0.9802, "top1": True, "mean_distance": 0.0,
                   "max_distance": 0.0, "active_version": 1, "emulated": False, "active_ms_p50": 0.75,
                   "active_ms_p95": 0.975, "candidate_ms_p50": 0.75, "candidate_ms_p95": 0.975,
                   "shadow_ms_p50": 0.75, "shadow_ms_p95": 0.975, "latency_basis": "shadow",
                   "active_ms_p95_against": 0.975, "latency_ratio": 1.0}
    result = RolloutResult([], ["pi-1"], aborted=False,
                           shadow=ShadowResult(2, POLICY, devices=[d], promoted=True, wall_s=1.5))
    record = json.loads(json.dumps(result.to_dict()))  # the deployments row's rollout JSON
    assert record["shadow"]["decision"] == "promoted" and record["shadow"]["devices"] == [row]
    assert record["shadow"]["policy"]["min_samples"] == 200


def test_the_shadow_job_is_the_same_payload_signed_again_with_the_leaf(tmp_path, key_dir, tiny_onnx):
    art = make_artifact(tiny_onnx, tmp_path / "a", key_dir, version=5)
    shadow = shadow_artifact(art, Shadow(sample=0.2, max_cpu=0.5), key_dir)
    key = load_public_key(key_dir / "signing.pub")
    signed = verify_envelope(shadow.envelope, {keyid(key): key})  # as the agent verifies it
    m = Manifest.from_signed(signed)
    assert m.shadow == Shadow(0.2, 0.5) and shadow.manifest == m
    assert (m.version, m.sha256, m.length, m.chunks) == (art.version, art.sha256, art.size_bytes, art.manifest.chunks)
    assert shadow.model_path == art.model_path and shadow.dir == art.dir
    assert signed == {**art.envelope["signed"], "shadow": {"sample": 0.2, "max_cpu": 0.5}}
    # the normal envelope, on disk and in memory, is still the one that promotes it
    assert json.loads((art.dir / "manifest.json").read_text()) == art.envelope
    assert "shadow" not in art.envelope["signed"] and art.manifest.shadow is None


def test_the_host_refuses_to_sign_a_shadow_leaf_the_device_would_refuse(tmp_path, key_dir, tiny_onnx):
    art = make_artifact(tiny_onnx, tmp_path / "a", key_dir, version=6)
    with pytest.raises(ExportError, match=r"the device would refuse this manifest: .*sample and max_cpu must be "
                                          r"above 0"):
        shadow_artifact(art, Shadow(sample=0.0, max_cpu=0.25), key_dir)


def _report(s: ShadowStats, boot: int, seq: int) -> bytes:
    from device_agent.protocol import Metrics, encode

    return encode(Metrics("pi-1", 1, 1.0, 1.0, 10.0, 5, False, boot=boot, seq=seq, state="shadowing",
                          shadow=s.to_dict()))


def test_a_restarted_agent_counts_from_zero_and_the_host_adds_what_each_start_counted():
    """An agent restarted mid-shadow counts from zero: the disagreements it saw before still count, a redelivered
    report is not counted twice, and the samples add up to the decision."""
    from device_agent.protocol import Leaf, topic
    from pipeline.ota.shadow import _Collector

    notes: list[str] = []
    c = _Collector("edgefleet", 2, ["pi-1"], POLICY, None, notes.append)
    name = topic("edgefleet", "pi-1", Leaf.METRICS)
    c.handle(name, _report(stats(compared=120, agree=60), boot=1, seq=9))  # half disagree, then a restart
    r = c.records["pi-1"]
    assert r.verdict is Verdict.UNDECIDED and r.stats.compared == 120
    c.handle(name, _report(stats(compared=30, agree=30), boot=2, seq=3))
    c.handle(name, _report(stats(compared=100, agree=60), boot=1, seq=4))  # boot 1's older report, again: ignored
    assert r.stats.compared == 150 and r.stats.agree == 90 and r.verdict is Verdict.UNDECIDED
    c.handle(name, _report(stats(compared=100, agree=100), boot=2, seq=5))
    assert (r.stats.compared, r.stats.agree) == (220, 160) and r.stats.offered == 120 + 7 + 100 + 7
    assert r.stats.active_ms[bisect_left(BUCKETS_MS, 1.0)] == 220
    # judged on both starts: 160/220 = 73% agreement fails; on the restart's counters alone it would have passed
    assert r.verdict is Verdict.FAIL and "agreement" in r.reason, r.reason
    assert judge_device(device(stats(compared=100, agree=100)), dataclasses.replace(POLICY, min_samples=100))[0] \
        is Verdict.PASS
