"""The calibration schema both ends share: the suite a calibration artifact holds, the message that reports it,
the manifest's ``kind``. Every parser is total: any input gives the value or a ProtocolError naming the field."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_agent.calibration import MAX_CASES, Case, Suite
from device_agent.errors import ProtocolError
from device_agent.manifest import Manifest
from device_agent.protocol import MAX_CALIBRATION_RESULTS, Calibration, encode

SUITE = Suite(name="rpi4-calibration", threads=4, cases=(Case("k0", "k0.onnx", (1, 8, 28, 28), 0),
                                                         Case("k1", "k1.onnx", (1, 64), 1)))


def test_a_suite_round_trips_and_groups_its_cases():
    again = Suite.from_json(SUITE.to_json())
    assert again == SUITE and [[c.id for c in g] for g in again.groups()] == [["k0"], ["k1"]]


@pytest.mark.parametrize("change, expected", [
    ({"suite_version": 2}, "suite_version 2"), ({"threads": 0}, "threads"), ({"rounds": 0}, "rounds"),
    ({"budget_s": -1}, "budget_s"), ({"cases": []}, "cases must be a list"),
    ({"cases": [{"id": "a", "file": "../x.onnx", "shape": [1]}]}, "plain file name"),
    ({"cases": [{"id": "a", "file": "suite.json", "shape": [1]}]}, "plain file name"),
    ({"cases": [{"id": "a", "file": "a.onnx", "shape": [1, 0]}]}, "shape"),
    ({"cases": [{"id": "a", "file": "a.onnx", "shape": [4096, 4096, 4096]}]}, "elements"),
    ({"cases": [{"id": "a", "file": "a.onnx", "shape": [1]}] * 2}, "appears twice"),
    ({"cases": [{"id": "a", "file": "a.onnx", "shape": [1]}] * (MAX_CASES + 1)}, "cases must be a list"),
])
def test_a_malformed_suite_is_one_protocol_error(change, expected):
    with pytest.raises(ProtocolError, match=expected):
        Suite.from_dict({**SUITE.to_dict(), **change})


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                     max_leaves=20)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(list(SUITE.to_dict())), _JSON, max_size=6) | st.binary(max_size=64))
def test_any_suite_input_gives_a_suite_or_a_protocol_error(changes):
    try:
        if isinstance(changes, bytes):
            Suite.from_json(changes)
        else:
            Suite.from_dict({**SUITE.to_dict(), **changes})
    except ProtocolError:
        pass


def test_a_calibration_message_round_trips_and_refuses_what_does_not_fit():
    result = {"id": "k0", "median_ms": 0.5, "p10_ms": 0.45, "p90_ms": 0.6, "runs": 20, "rounds": 5}
    msg = Calibration("d1", "cal-1", 7, 1, 2, [result], env={"runtime": "onnxruntime 1.22"})
    assert Calibration.parse(encode(msg)) == msg
    body = json.loads(encode(msg))
    for change, expected in (({"results": [result] * (MAX_CALIBRATION_RESULTS + 1)}, "results"),
                             ({"done": 3}, "done 3 of 2"), ({"results": [{"median_ms": 1}]}, "case id"),
                             ({"results": [{**result, "p90_ms": 1e12}]}, "p90_ms"),
                             ({"job_id": "a/b"}, "job_id"), ({"results": "k0"}, "results")):
        with pytest.raises(ProtocolError, match=expected):
            Calibration.parse(json.dumps({**body, **change}).encode())


def test_the_manifest_says_what_an_artifact_is():
    from test_preprocess import body

    assert Manifest.from_signed(body()).kind == "model" and "kind" not in Manifest.from_signed(body()).to_signed()
    m = Manifest.from_signed(body(kind="calibration"))
    assert m.kind == "calibration" and Manifest.from_signed(m.to_signed()) == m
    with pytest.raises(ProtocolError, match="kind 'firmware' unknown"):
        Manifest.from_signed(body(kind="firmware"))
