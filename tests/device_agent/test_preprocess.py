"""The preprocess spec: parsed or refused (never a crash), applied in numpy with the shape it promises, and carried
in the signed manifest (old manifests without it still verify)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_agent.errors import ProtocolError, VerificationError
from device_agent.manifest import Manifest, keyid, sign_envelope, verify_envelope
from device_agent.preprocess import KEYS, Preprocess, PreprocessError

IMAGENET = {"resize": 256, "crop": [224, 224], "scale": "1/255", "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225], "channel_order": "RGB", "layout": "NCHW", "dtype": "float32"}


def body(**over):
    b = {"type": "edgefleet.manifest", "manifest_version": 1, "name": "m", "version": 3, "target": "rpi4",
         "created": "2026-01-01T00:00:00+00:00", "expires": None, "runtime": "onnxruntime",
         "artifact": {"filename": "model.onnx", "length": 100, "sha256": "0" * 64, "chunk_size": 32, "chunks": 4},
         "io": {}, "golden": {"cases": []}}
    b.update(over)
    return b


# --- the spec ---------------------------------------------------------------------------------------------------

def test_a_spec_round_trips_and_says_its_output_shape():
    p = Preprocess.from_dict(IMAGENET)
    assert p.scale == 1 / 255 and p.crop == (224, 224) and p.mean == (0.485, 0.456, 0.406)
    assert Preprocess.from_dict(p.to_dict()) == p
    assert p.output_shape(480, 640, 3) == (3, 224, 224)
    assert Preprocess.from_dict({"resize": 10, "layout": "NHWC"}).output_shape(20, 50, 1) == (10, 25, 1)
    assert Preprocess.from_dict({"resize": [8, 9], "crop": 4, "channels": 1}).output_shape(3, 3, 3) == (1, 4, 4)
    assert Preprocess.from_dict({}) == Preprocess()


@pytest.mark.parametrize("spec, expected", [
    ([1, 2], "expected a mapping"),
    ({"resize": 0}, "preprocess.resize: expected an integer in [1, 16384]"),
    ({"resize": True}, "preprocess.resize"),
    ({"resize": [1, 2, 3]}, "expected [height, width]"),
    ({"crop": [2.5, 2]}, "preprocess.crop"),
    ({"scale": 0}, "non-zero number"),
    ({"scale": "1/0"}, "preprocess.scale"),
    ({"scale": float("nan")}, "preprocess.scale"),
    ({"mean": [0.1, 0.2]}, "one value, or one per channel"),
    ({"std": [0.0]}, "must be > 0"),
    ({"mean": [1, 2, 3], "channels": 1}, "3 values for 1 channel"),
    ({"channels": 2}, "preprocess.channels: expected one of 1, 3"),
    ({"channels": 1.0}, "preprocess.channels"),
    ({"layout": "nchw"}, "preprocess.layout: expected one of NCHW, NHWC"),
    ({"dtype": "uint8"}, "preprocess.dtype"),
    ({"channel_order": "BGR", "channels": 1}, "BGR needs 3 channels"),
    ({"normalise": True}, "unknown key 'normalise'; known: channels, resize"),
])
def test_malformed_specs_are_refused_naming_the_field(spec, expected):
    with pytest.raises(PreprocessError) as err:
        Preprocess.from_dict(spec)
    assert expected in str(err.value)
    assert isinstance(err.value, ProtocolError)


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                       max_size=4), max_leaves=12)
field_values = st.one_of(json_values, st.integers(0, 300), st.lists(st.integers(0, 300), max_size=3),
                         st.lists(st.floats(-2, 2), max_size=4), st.sampled_from(["RGB", "BGR", "NCHW", "NHWC",
                                                                                  "float32", "1/255", "2/0"]))


@settings(max_examples=400, deadline=None)
@given(st.one_of(json_values, st.dictionaries(st.sampled_from([*KEYS, "other"]), field_values, max_size=6)))
def test_any_value_is_a_spec_or_one_error(value):
    try:
        p = Preprocess.from_dict(value)
    except PreprocessError:
        return
    assert Preprocess.from_dict(p.to_dict()) == p


specs = st.builds(
    lambda channels, resize, crop, order, scale, mean, std, layout: {
        k: v for k, v in {"channels": channels, "resize": resize, "crop": crop, "channel_order": order,
                          "scale": scale, "mean": mean, "std": std, "layout": layout}.items() if v is not None},
    st.sampled_from([None, 1, 3]), st.one_of(st.none(), st.integers(1, 12), st.lists(st.integers(1, 12), min_size=2,
                                                                                       max_size=2)),
    st.one_of(st.none(), st.integers(1, 6), st.lists(st.integers(1, 6), min_size=2, max_size=2)),
    st.sampled_from([None, "RGB", "BGR"]), st.sampled_from([None, 1.0, "1/255", -2.0]),
    st.sampled_from([None, [0.5], [0.1, 0.2, 0.3]]), st.sampled_from([None, [2.0], [0.5, 1.0, 2.0]]),
    st.sampled_from([None, "NCHW", "NHWC"]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs, st.integers(1, 9), st.integers(1, 9), st.sampled_from([1, 3]), st.sampled_from([np.uint8, np.float64]))
def test_the_transform_gives_the_shape_the_spec_says(spec, h, w, c, dtype):
    try:
        p = Preprocess.from_dict(spec)
        shape = p.output_shape(h, w, c)
    except PreprocessError:
        return
    images = np.random.default_rng(h * 10 + w).integers(0, 256, (2, h, w, c)).astype(dtype)
    out = p.apply_batch(images)
    assert out.shape == (2, *shape) and out.dtype == np.float32 and np.isfinite(out).all()
    assert np.array_equal(p.apply(images[1] if c == 3 else images[1, :, :, 0]), out[1])


def test_what_a_spec_cannot_prepare_is_one_error():
    with pytest.raises(PreprocessError, match="smaller than the crop 8x8"):
        Preprocess(crop=(8, 8)).apply(np.zeros((4, 9, 3)))
    with pytest.raises(PreprocessError, match="4 channel"):
        Preprocess().apply(np.zeros((4, 4, 4)))
    with pytest.raises(PreprocessError, match="3 values for images of 1 channel"):
        Preprocess(mean=(0.0, 0.0, 0.0)).apply(np.zeros((4, 4)))
    with pytest.raises(PreprocessError, match="numbers"):
        Preprocess().apply_batch(np.array([["a"]]))


def test_each_step_computes_what_the_docs_say():
    row = np.array([[0.0, 1.0]])  # 1 x 2, gray
    up = Preprocess(resize=(1, 4)).apply(row)
    assert np.allclose(up, [[[0, 0.25, 0.75, 1]]])  # half-pixel centres, edges clamped
    rgb = np.arange(2 * 4 * 3, dtype=np.uint8).reshape(2, 4, 3)
    assert np.array_equal(Preprocess(channel_order="BGR", layout="NHWC").apply(rgb), rgb[..., ::-1])
    gray = Preprocess(channels=1, layout="NHWC").apply(rgb)
    assert np.allclose(gray[..., 0], rgb @ np.array([0.299, 0.587, 0.114]))
    cropped = Preprocess(crop=(2, 2), layout="NHWC").apply(rgb)
    assert np.array_equal(cropped, rgb[:, 1:3])
    norm = Preprocess(scale=0.5, mean=(1.0, 2.0, 3.0), std=(2.0, 2.0, 2.0)).apply(rgb)
    assert np.allclose(norm, ((rgb * 0.5 - [1, 2, 3]) / 2).transpose(2, 0, 1))
    assert Preprocess(resize=3).output_shape(6, 10, 3) == (3, 3, 5)  # int(3 * 10 / 6): torchvision's rule


def test_bilinear_resize_matches_torch():
    import torch  # the host environment the tests run in has it; the agent code under test does not import it
    images = np.random.default_rng(0).integers(0, 256, (2, 13, 21, 3)).astype(np.float32)
    for size in ([5, 7], [40, 33], [13, 50]):
        ours = Preprocess(resize=tuple(size)).apply_batch(images)
        ref = torch.nn.functional.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2), size=size,
                                              mode="bilinear", align_corners=False).numpy()
        assert np.abs(ours - ref).max() < 2e-3  # of 255: torch computes in float32


# --- in the signed manifest -------------------------------------------------------------------------------------

def test_the_manifest_carries_the_spec_signed():
    key = Ed25519PrivateKey.generate()
    trusted = {keyid(key.public_key()): key.public_key()}
    m = Manifest.from_signed(body(preprocess=IMAGENET))
    assert m.preprocess == Preprocess.from_dict(IMAGENET)
    assert Manifest.from_signed(m.to_signed()) == m
    env = sign_envelope(m.to_signed(), key)
    assert Manifest.from_signed(verify_envelope(env, trusted)).preprocess.mean == (0.485, 0.456, 0.406)
    tampered = copy.deepcopy(env)
    tampered["signed"]["preprocess"]["std"] = [1.0, 1.0, 1.0]
    with pytest.raises(VerificationError, match="does not verify"):
        verify_envelope(tampered, trusted)


def test_a_manifest_without_a_spec_still_verifies_as_before():
    key = Ed25519PrivateKey.generate()
    old = body()
    env = sign_envelope(old, key)
    m = Manifest.from_signed(verify_envelope(env, {keyid(key.public_key()): key.public_key()}))
    assert m.preprocess is None and "preprocess" not in m.to_signed()
    assert Manifest.from_signed(body(preprocess=None)).preprocess is None


@pytest.mark.parametrize("spec", [{"resize": -1}, "resize 224", {"layout": "CHW"}, {"mean": ["a"]}])
def test_a_malformed_spec_in_a_manifest_is_a_protocol_error(spec):
    with pytest.raises(ProtocolError, match="manifest: preprocess"):
        Manifest.from_signed(body(preprocess=spec))


# --- class names ------------------------------------------------------------------------------------------------

def test_the_manifest_carries_class_names_for_the_application():
    io = {"inputs": [], "outputs": [{"name": "logits", "shape": [1, 3], "dtype": "float32"}]}
    m = Manifest.from_signed(body(io=io, labels=["cat", "dog", "ünïcode bird"]))
    assert m.labels == ("cat", "dog", "ünïcode bird")
    assert Manifest.from_signed(m.to_signed()) == m and m.to_signed()["labels"] == ["cat", "dog", "ünïcode bird"]
    assert "labels" not in Manifest.from_signed(body()).to_signed()  # older manifests stay byte for byte
    dynamic = {"outputs": [{"name": "logits", "shape": ["batch", "classes"], "dtype": "float32"}]}
    assert Manifest.from_signed(body(io=dynamic, labels=["a"])).labels == ("a",)
    conv_head = {"outputs": [{"name": "logits", "shape": [1, 3, 1, 1], "dtype": "float32"}]}
    assert Manifest.from_signed(body(io=conv_head, labels=["x", "y", "z"])).labels == ("x", "y", "z")


@pytest.mark.parametrize("labels, expected", [
    ("cat,dog", "labels must be a list"), ([], "labels must be a list"), ([1, 2, 3], r"labels\[0\]"),
    (["a", ""], r"labels\[1\]"), (["a", "x" * 201], r"labels\[1\]"), (["a", "a", "b"], "twice"),
    (["a", "b"], r"2 labels for an output of shape \[1, 3\]"), (["a", "b\udcff", "c"], r"labels\[1\].*UTF-8"),
])
def test_malformed_class_names_are_a_protocol_error(labels, expected):
    io = {"outputs": [{"name": "logits", "shape": [1, 3], "dtype": "float32"}]}
    with pytest.raises(ProtocolError, match=expected):
        Manifest.from_signed(body(io=io, labels=labels))
