"""The rollout's judgement of canaries, without a broker: which latency each kind of agent is held to, and the
host's statuses against the agent's states."""

from __future__ import annotations

import pytest

from device_agent.protocol import TERMINAL_STATES, State
from pipeline.ota.delivery import DeviceResult
from pipeline.ota.rollout import RolloutPolicy, judge, too_slow
from pipeline.ota.status import SETTLED, DeviceStatus


def canary(p50: float, p95: float, emulated: bool, device: str = "d") -> DeviceResult:
    return DeviceResult(device, DeviceStatus.ACTIVATED, active_version=2,
                        metrics={"latency_ms_p50": p50, "latency_ms_p95": p95, "emulated": emulated})


def test_the_demo_on_a_busy_host_activates():
    """`make demo` on a loaded machine: the stand-in's p95 12.1 ms is over rpi4's 10 ms, but it measured this
    host, whose p50 is close to what was predicted for it."""
    policy = RolloutPolicy(latency_p95_ms=10.0, host_latency_ms=0.9)
    assert judge([canary(p50=1.4, p95=12.1, emulated=True)], policy, predicted_ms=2.0) is None


def test_an_emulated_agent_scales_the_targets_prediction_by_how_this_host_fared():
    policy = RolloutPolicy(latency_p95_ms=10.0, host_latency_ms=1.0)
    # 4x slower than predicted here: the target's 2 ms becomes 8 ms, within the budget, whatever the p95
    assert too_slow(canary(p50=4.0, p95=50.0, emulated=True), policy, predicted_ms=2.0) is None
    why = too_slow(canary(p50=6.0, p95=5.0, emulated=True), policy, predicted_ms=2.0)
    assert why is not None and "6.0x the 1.000 ms predicted for it" in why and "12.000 ms" in why
    # without a prediction for this host or for the target, an emulated agent's latency is not judged at all
    assert too_slow(canary(p50=1e3, p95=1e3, emulated=True), RolloutPolicy(latency_p95_ms=10.0), 2.0) is None
    assert too_slow(canary(p50=1e3, p95=1e3, emulated=True), policy, None) is None


def test_a_host_measurement_replaces_the_hosts_prediction():
    """MobileNetV2-224 int8: this host's prediction said 0.47 ms, the profile stage measured 11.8 ms here and the
    emulated agents 9.8-11.6 ms. Judged against the measurement, the canaries are what this host does."""
    measured = RolloutPolicy(latency_p95_ms=80.0, host_latency_ms=11.76, host_basis="measured")
    assert too_slow(canary(p50=11.65, p95=15.7, emulated=True), measured, predicted_ms=50.9) is None
    predicted = RolloutPolicy(latency_p95_ms=80.0, host_latency_ms=0.469)
    assert "predicted for it" in too_slow(canary(p50=11.65, p95=15.7, emulated=True), predicted, predicted_ms=50.9)
    why = too_slow(canary(p50=30.0, p95=40.0, emulated=True), measured, predicted_ms=50.9)  # 2.6x slower than here
    assert why is not None and "11.760 ms measured for it" in why


def test_a_real_device_is_held_to_the_targets_budget():
    policy = RolloutPolicy(latency_p95_ms=10.0, host_latency_ms=100.0)
    assert too_slow(canary(p50=5.0, p95=9.9, emulated=False), policy) is None
    reason = judge([canary(p50=5.0, p95=12.1, emulated=False, device="pi-1")], policy)
    assert reason == "canary latency too high: pi-1 (12.100 ms, over the 10 ms p95 budget)"


def test_without_a_latency_budget_nothing_is_judged_on_latency():
    policy = RolloutPolicy(host_latency_ms=1e-6)  # abort_on_latency off (or --force)
    assert judge([canary(1e3, 1e3, True), canary(1e3, 1e3, False)], policy, predicted_ms=1.0) is None


def test_canaries_that_did_not_activate_abort_whatever_their_latency():
    failed = DeviceResult("d", DeviceStatus.TIMEOUT)
    assert "1/1 canaries did not activate (d: timeout)" in judge([failed], RolloutPolicy())


@pytest.mark.parametrize("state", sorted(TERMINAL_STATES))
def test_a_terminal_agent_state_is_a_host_status_of_the_same_value(state: State):
    assert DeviceStatus(state.value).value == state.value and DeviceStatus(state.value) in SETTLED


def test_host_only_statuses_are_not_agent_states():
    agent = {s.value for s in State}
    assert {s.value for s in DeviceStatus} - agent == {"pending", "rollback_refused", "timeout", "no_answer",
                                                       "shadow_dropped"}
    assert DeviceStatus.PENDING not in SETTLED
