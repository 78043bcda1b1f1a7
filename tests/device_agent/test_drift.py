"""device_agent.drift: the reference schema is total and round-trips; the monitor's memory is bounded, it never
raises, it is thread-safe, and its scores separate in-distribution traffic from shifted traffic.

The traffic comes from one generator: 10 classes of 3x8x8 images (a random template per class plus Gaussian
noise) and a linear "model" scoring each class by its template (logits, not probabilities), so the reference is
computed here with plain numpy, independently of the monitor's own arithmetic."""

from __future__ import annotations

import json
import math
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from device_agent.drift import (EPS, MAX_CLASSES, SLOTS, DriftMonitor, Reference, Thresholds, channel_sums,
                                class_rows, events, psi, top1)
from device_agent.errors import ProtocolError
from device_agent.manifest import Manifest

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------- the generator and its reference

C, H, W, K = 3, 8, 8, 10
TEMPLATES = np.random.default_rng(1234).normal(size=(K, C * H * W))
GAIN = 0.2  # top-1 confidence spread over the bins 0.2-1.0 (a model neither sure of everything nor of nothing)
SKEWED = [0.3, 0.3, 0.1, 0.1, 0.1, 0.1, 0, 0, 0, 0]  # another class mix: four classes never seen


def images(rng: np.random.Generator, n: int, mix=None) -> np.ndarray:
    y = rng.choice(K, n, p=mix)
    x = 0.5 + 0.1 * TEMPLATES[y] + rng.normal(0, 0.3, (n, C * H * W))
    return x.reshape(n, C, H, W).astype(np.float32)


def model(x: np.ndarray) -> np.ndarray:
    return (GAIN * (x.reshape(len(x), -1) - 0.5) @ TEMPLATES.T).astype(np.float32)


def numpy_reference(x: np.ndarray, logits: np.ndarray, bins: int = 10) -> Reference:
    z = logits.astype(np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    conf = (e / e.sum(axis=1, keepdims=True)).max(axis=1)
    return Reference(len(x), 1, tuple(x.mean(axis=(0, 2, 3), dtype=np.float64)),
                     tuple(x.std(axis=(0, 2, 3), dtype=np.float64)), "logits",
                     tuple(np.bincount(z.argmax(axis=1), minlength=K) / len(z)),
                     tuple(np.bincount(np.minimum((conf * bins).astype(int), bins - 1), minlength=bins) / len(z)))


@pytest.fixture(scope="module")
def reference() -> Reference:
    x = images(np.random.default_rng(99), 5000)
    return numpy_reference(x, model(x))


def live_scores(reference: Reference, x: np.ndarray, window: int = 1000):
    """Each sample as its own request, as an application sends them."""
    monitor, z = DriftMonitor(reference, window), model(x)
    for i in range(len(x)):
        assert monitor.observe(x[i:i + 1], [z[i:i + 1]])
    return monitor.scores()


# --------------------------------------------------------------------------- the schema

@st.composite
def references(draw) -> Reference:
    c = draw(st.integers(1, 6))
    finite = st.floats(-1e6, 1e6, allow_nan=False)
    mean = tuple(draw(st.lists(finite, min_size=c, max_size=c)))
    std = tuple(draw(st.lists(st.floats(1e-6, 1e6), min_size=c, max_size=c)))
    ref = Reference(draw(st.integers(1, 2**53 - 1)), draw(st.integers(1, 7)), mean, std)
    if draw(st.booleans()):
        return ref

    def shares(n):
        w = np.asarray(draw(st.lists(st.integers(0, 1000), min_size=n, max_size=n)), dtype=float)
        w[0] += 1
        return tuple(float(v) for v in w / w.sum())

    return Reference(ref.samples, ref.channel_axis, mean, std, draw(st.sampled_from(["logits", "probabilities"])),
                     shares(draw(st.integers(2, 40))), shares(draw(st.integers(2, 20))))


@SETTINGS
@given(references())
def test_a_reference_round_trips_through_json(ref):
    assert Reference.from_dict(json.loads(json.dumps(ref.to_dict()))) == ref


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=30,
)
VALID = Reference(100, 1, (0.5, 0.4, 0.3), (0.2, 0.2, 0.2), "logits", (0.25, 0.25, 0.5), (0.1, 0.2, 0.7)).to_dict()


def _paths(obj, prefix=()):
    yield prefix
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        yield from _paths(v, prefix + (k,))


@st.composite
def mutated(draw):
    """The valid reference with one value anywhere replaced by anything JSON (and NaN) can hold, or a key added."""
    body = json.loads(json.dumps(VALID))
    where = draw(st.sampled_from(list(_paths(body))[1:]))
    parent = body
    for k in where[:-1]:
        parent = parent[k]
    if draw(st.booleans()) and isinstance(parent, dict):
        parent[draw(st.text(max_size=8))] = draw(json_values)
    else:
        parent[where[-1]] = draw(json_values)
    return body


@SETTINGS
@given(st.one_of(json_values, mutated(), st.just(VALID)))
def test_from_dict_is_total(value):
    try:
        ref = Reference.from_dict(value)
    except ProtocolError as exc:
        assert str(exc).startswith("reference")  # names the field
    else:
        assert Reference.from_dict(ref.to_dict()) == ref


@pytest.mark.parametrize("change, expected", [
    (lambda d: d.update(samples=0), "reference.samples"),
    (lambda d: d["input"].update(channel_axis=0), "reference.input.channel_axis"),
    (lambda d: d["input"].update(std=[0.2, 0.0, 0.2]), "reference.input.std: every value must be > 0"),
    (lambda d: d["input"].update(std=[0.2]), "1 values for 3 channel means"),
    (lambda d: d["input"].update(mean=[0.5, float("nan"), 0.1]), "reference.input.mean[1]: expected a finite number"),
    (lambda d: d["input"].update(mean=[0.0] * 4097, std=[1.0] * 4097), "reference.input.mean: expected a list of 1 to"),
    (lambda d: d["output"].update(classes=[0.5, 0.6]), "reference.output.classes: shares must sum to 1"),
    (lambda d: d["output"].update(classes=[1.0 / (MAX_CLASSES + 1)] * (MAX_CLASSES + 1)), "reference.output.classes"),
    (lambda d: d["output"].update(confidence=[-0.5, 1.5]), "every share must be in [0, 1]"),
    (lambda d: d["output"].update(scores="logprobs"), "reference.output.scores: expected one of logits"),
    (lambda d: d["output"].pop("confidence"), "reference.output.confidence"),
    (lambda d: d.update(colour="red"), "reference: unknown key 'colour'; known: samples, input, output"),
])
def test_a_bad_reference_names_its_field(change, expected):
    body = json.loads(json.dumps(VALID))
    change(body)
    with pytest.raises(ProtocolError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        Reference.from_dict(body)


def test_a_reference_without_outputs_has_no_class_parts():
    ref = Reference.from_dict({"samples": 5, "input": {"channel_axis": 3, "mean": [1], "std": [2]}})
    assert ref.scores is None and ref.classes is None and "output" not in ref.to_dict()


MANIFEST = {
    "type": "edgefleet.manifest", "manifest_version": 1, "name": "m", "version": 3, "target": "rpi4",
    "created": "2026-01-01T00:00:00+00:00", "expires": None, "runtime": "onnxruntime",
    "artifact": {"filename": "model.onnx", "length": 100, "sha256": "0" * 64, "chunk_size": 32, "chunks": 4},
    "io": {"inputs": [{"name": "x", "shape": ["batch", 3, 8, 8], "dtype": "float32"}],
           "outputs": [{"name": "y", "shape": ["batch", 3], "dtype": "float32"}]},
    "golden": {"cases": []},
}


def test_the_manifest_checks_a_reference_against_the_models_io():
    m = Manifest.from_signed({**MANIFEST, "reference": VALID})
    assert m.reference == Reference.from_dict(VALID) and Manifest.from_signed(m.to_signed()) == m
    with pytest.raises(ProtocolError, match=r"manifest: reference: 3 channel\(s\) for a first input of shape"):
        Manifest.from_signed({**MANIFEST, "reference": {**VALID, "input": {**VALID["input"], "channel_axis": 2}}})
    with pytest.raises(ProtocolError, match="channel_axis 7 for a first input of shape"):
        Manifest.from_signed({**MANIFEST, "reference": {**VALID, "input": {**VALID["input"], "channel_axis": 7}}})
    wide = {**MANIFEST["io"], "outputs": [{"name": "y", "shape": [1, 10, 1, 1], "dtype": "float32"}]}
    with pytest.raises(ProtocolError, match=r"3 classes for a first output of shape \[1, 10, 1, 1\]"):
        Manifest.from_signed({**MANIFEST, "io": wide, "reference": VALID})
    with pytest.raises(ProtocolError, match="manifest: reference.input.std"):
        Manifest.from_signed({**MANIFEST, "reference": {**VALID, "input": {**VALID["input"], "std": [1, 1, -1]}}})
    dynamic = {"inputs": [{"name": "x", "shape": ["n", "c", "h", "w"]}], "outputs": [{"name": "y", "shape": ["n", "k"]}]}
    assert Manifest.from_signed({**MANIFEST, "io": dynamic, "reference": VALID}).reference is not None


def test_a_manifest_without_a_reference_has_none_and_writes_none():
    m = Manifest.from_signed(MANIFEST)
    assert m.reference is None and "reference" not in m.to_signed()


@SETTINGS
@given(st.dictionaries(st.sampled_from(["psi_outputs", "psi_confidence", "mean_shift", "min_samples", "other"]),
                       json_values, max_size=4) | json_values)
def test_thresholds_parse_is_total(value):
    try:
        t = Thresholds.from_dict(value)
    except ProtocolError as exc:
        assert str(exc).startswith("drift")
    else:
        assert Thresholds.from_dict(t.to_dict()) == t


def test_thresholds_default_to_the_conventional_readings():
    t = Thresholds.from_dict({})
    assert (t.psi_outputs, t.psi_confidence, t.mean_shift) == (0.25, 0.25, 0.25)
    assert Thresholds.from_dict({"mean_shift": 1}).mean_shift == 1.0
    with pytest.raises(ProtocolError, match="drift.psi_outputs: expected a number in"):
        Thresholds.from_dict({"psi_outputs": -1})


# --------------------------------------------------------------------------- the per-request arithmetic

@pytest.mark.parametrize("shape, axis", [((1, 3, 5, 7), 1), ((4, 3, 5, 7), 1), ((2, 5, 7, 3), 3), ((6, 9), 1),
                                         ((2, 4, 3), 1), ((1, 2, 3, 4, 5), 2)])
def test_channel_sums_are_numpys_sums(shape, axis):
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    sums, n = channel_sums(x, axis, shape[axis])
    others = tuple(a for a in range(len(shape)) if a != axis)
    np.testing.assert_allclose(sums, x.astype(np.float64).sum(axis=others), rtol=1e-5, atol=1e-4)
    assert n == x.size // shape[axis]


def test_top1_reads_logits_through_a_softmax_and_probabilities_as_they_are():
    logits = np.array([[0.0, 1.0, 0.0], [5.0, 0.0, 0.0]], np.float32)
    idx, conf = top1(logits, "logits")
    assert list(idx) == [1, 0]
    np.testing.assert_allclose(conf, [math.e / (math.e + 2), math.exp(5) / (math.exp(5) + 2)], rtol=1e-6)
    idx, conf = top1(np.array([[0.2, 0.8]], np.float32), "probabilities")
    assert list(idx) == [1] and conf[0] == pytest.approx(0.8)
    assert top1(np.array([[np.nan, 1.0]], np.float32), "logits") is None
    assert class_rows(np.zeros((2, 10, 1, 1)), 10).shape == (2, 10)
    assert class_rows(np.zeros((2, 21, 4, 4))) is None  # a segmenter's map is not one score per class


def test_psi_floors_empty_bins_at_eps():
    same = np.array([0.2, 0.3, 0.5])
    assert psi(same, same) == 0.0
    empty = psi(np.array([0.0, 0.5, 0.5]), np.array([0.2, 0.4, 0.4]))
    expected = (EPS - 0.2) * math.log(EPS / 0.2) + 2 * 0.1 * math.log(0.5 / 0.4)
    assert empty == pytest.approx(expected)


# --------------------------------------------------------------------------- the monitor

def test_memory_is_bounded_and_the_window_slides(reference):
    monitor = DriftMonitor(reference, window=200)
    size = monitor.state_bytes()
    assert size == SLOTS * (C + K + len(reference.confidence) + 4) * 8
    x = images(np.random.default_rng(1), 2000)
    z = model(x)
    seen = []
    for i in range(len(x)):  # ten windows
        monitor.observe(x[i:i + 1], z[i:i + 1])
        seen.append(monitor.scores().requests)
    assert monitor.state_bytes() == size
    assert max(seen) == 200 and min(seen[200:]) >= 200 - monitor.per_slot  # the last 200 within one slot (25)
    # the window forgets: after in-distribution traffic, 200 requests of another mix are all it reports
    y = images(np.random.default_rng(2), 200, mix=SKEWED)
    for i in range(len(y)):
        monitor.observe(y[i:i + 1], model(y[i:i + 1]))
    assert monitor.scores().psi_outputs == pytest.approx(live_scores(reference, y, 200).psi_outputs)


def test_the_reference_data_itself_scores_nothing(reference):
    x = images(np.random.default_rng(99), 5000)  # the very samples the reference summarises
    monitor = DriftMonitor(reference, window=5000)
    monitor.observe(x, model(x))  # one request of 5000 samples: the batch axis is summed like many requests
    s = monitor.scores()
    assert s.samples == 5000 and s.requests == 1
    assert s.psi_outputs == pytest.approx(0, abs=1e-9) and s.psi_confidence == pytest.approx(0, abs=1e-9)
    assert s.max_mean_shift == pytest.approx(0, abs=1e-5)


SEEDS = range(6)


def test_in_distribution_traffic_scores_low_and_shifted_traffic_crosses_the_thresholds(reference):
    """Measured over seeds 0-5, windows of 1000 requests against a reference of 5000 samples (PSI / mean shift):
    in distribution: outputs 0.005-0.013, confidence 0.001-0.013, max mean shift 0.001-0.009;
    brightness +0.5 std: max mean shift 0.498-0.509; a class mix with four classes missing: outputs 2.4-3.2;
    Gaussian noise of 2 std: confidence 0.41-0.49 (noise of 1 std reaches only 0.15-0.22: a model's confidence
    is what noise moves, and this one tolerates its own noise level)."""
    t = Thresholds()
    std = np.asarray(reference.std, np.float32)[None, :, None, None]
    shifts = {
        "brightness": (lambda r: images(r, 1000) + 0.5 * std, "mean_shift"),
        "noise": (lambda r: images(r, 1000) + 2 * std * r.normal(size=(1000, C, H, W)).astype(np.float32),
                  "psi_confidence"),
        "class mix": (lambda r: images(r, 1000, mix=SKEWED), "psi_outputs"),
    }
    quiet = [live_scores(reference, images(np.random.default_rng(s), 1000)) for s in SEEDS]
    assert all(events(s, t) == [] for s in quiet), [events(s, t) for s in quiet]
    worst = {"psi_outputs": max(s.psi_outputs for s in quiet), "psi_confidence": max(s.psi_confidence for s in quiet),
             "mean_shift": max(s.max_mean_shift for s in quiet)}
    assert max(worst.values()) < 0.05  # a fifth of the thresholds
    for name, (make, score) in shifts.items():
        for seed in SEEDS:
            s = live_scores(reference, make(np.random.default_rng(seed)))
            raised = {e["score"]: e["value"] for e in events(s, t)}
            assert score in raised, (name, seed, s)
            assert raised[score] > 1.5 * getattr(t, score) and raised[score] > 8 * worst[score], (name, seed, s)


def test_events_wait_for_min_samples(reference):
    y = images(np.random.default_rng(3), 300, mix=SKEWED)
    early = live_scores(reference, y[:100])
    assert early.psi_outputs > 0.25 and events(early, Thresholds()) == []  # 100 < min_samples 200
    assert [e["score"] for e in events(live_scores(reference, y), Thresholds())] == ["psi_outputs"]
    bright = live_scores(reference, images(np.random.default_rng(4), 300) + 1.0)
    shift = [e for e in events(bright, Thresholds()) if e["score"] == "mean_shift"]
    assert shift and shift[0]["channel"] in range(C) and shift[0]["threshold"] == 0.25


def test_several_threads_observing_lose_nothing(reference):
    x = images(np.random.default_rng(5), 4 * 300)
    z = model(x)
    shared, alone = DriftMonitor(reference, window=10_000), DriftMonitor(reference, window=10_000)
    for i in range(len(x)):
        alone.observe(x[i:i + 1], z[i:i + 1])
    start = threading.Barrier(4)

    def client(part: int) -> None:
        start.wait()
        for i in range(part, len(x), 4):
            shared.observe(x[i:i + 1], z[i:i + 1])
            if i % 50 == 0:
                shared.scores()  # readers while writers write

    threads = [threading.Thread(target=client, args=(p,)) for p in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    a, b = shared.scores(), alone.scores()
    assert (a.requests, a.samples, a.skipped) == (b.requests, b.samples, b.skipped) == (1200, 1200, 0)
    assert a.psi_outputs == pytest.approx(b.psi_outputs, rel=1e-9)
    assert a.psi_confidence == pytest.approx(b.psi_confidence, rel=1e-9)
    assert a.mean_shift == pytest.approx(b.mean_shift, rel=1e-6)


odd_arrays = hnp.arrays(
    dtype=st.sampled_from([np.float32, np.float64, np.float16, np.int8, np.uint8, np.int64, np.bool_, np.complex64]),
    shape=hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=4),
)  # every value a dtype holds, NaN and infinity included
odd_values = st.one_of(odd_arrays, st.none(), st.text(max_size=3), st.lists(odd_arrays, max_size=2),
                       st.just(np.array([["a"]], dtype=object)), st.just(np.full((1, 3, 2, 2), np.nan, np.float32)))


@SETTINGS
@given(odd_values, odd_values)
def test_observe_never_raises_and_counts_what_it_cannot_read(reference, inputs, outputs):
    monitor = DriftMonitor(reference, window=10)
    ok = monitor.observe(inputs, outputs)
    s = monitor.scores()
    assert (s.requests, s.skipped) == ((1, 0) if ok else (0, 1))
    assert all(v is None or math.isfinite(v) for v in (s.psi_outputs, s.psi_confidence, s.max_mean_shift))
    json.dumps(s.to_dict(), allow_nan=False)


def test_a_readable_request_of_another_shape_is_skipped(reference):
    monitor = DriftMonitor(reference, window=10)
    good = images(np.random.default_rng(6), 1)
    assert monitor.observe(good, model(good))
    assert not monitor.observe(good.transpose(0, 2, 3, 1), model(good))  # NHWC for an NCHW reference
    assert not monitor.observe(good, np.zeros((1, K + 1), np.float32))  # another class count
    assert not monitor.observe(good, np.full((1, K), np.inf, np.float32))
    assert not monitor.observe(np.full_like(good, np.nan), model(good))
    s = monitor.scores()
    assert (s.requests, s.skipped) == (1, 4)
    assert s.to_dict()["skipped"] == 4 and set(s.to_dict()) == {
        "window", "requests", "samples", "skipped", "psi_outputs", "psi_confidence", "mean_shift", "max_mean_shift"}


def test_an_empty_window_has_no_scores(reference):
    s = DriftMonitor(reference, window=10).scores()
    assert s.samples == 0 and s.psi_outputs is None and s.mean_shift is None and events(s, Thresholds()) == []
    with pytest.raises(ValueError, match="window"):
        DriftMonitor(reference, window=0)
