"""The local inference API on a real Unix socket, a real onnxruntime session and the standard-library client:
answers and their versions, every malformed request a 4xx naming what is wrong, backpressure, deadlines, bounded
connections, and swaps under steady traffic from several threads with no failed request."""

from __future__ import annotations

import http.client
import json
import os
import socket
import stat
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import torch
from torch import nn

from device_agent.client import Client, InferenceError, Unavailable
from fleet_probe import until
from traffic import SteadyTraffic
from device_agent.runtimes import get_runtime
from device_agent.serving import (BUCKETS_MS, InferenceServer, ModelHolder, ServeConfig, Served, TrafficStats,
                                  quantile_ms)


def export(model: nn.Module, shape: tuple[int, ...], path) -> str:
    torch.onnx.export(model.eval(), (torch.zeros(1, *shape),), str(path), input_names=["image"],
                      output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                      dynamo=False)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    small = export(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), (1, 8, 8), d / "small.onnx")
    torch.manual_seed(1)
    other = export(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), (1, 8, 8), d / "other.onnx")
    # ~tens of ms per run: long enough for requests to queue behind it
    slow = export(nn.Sequential(*[nn.Conv2d(32 if i else 1, 32, 3, padding=1) for i in range(6)]), (1, 96, 96),
                  d / "slow.onnx")
    return {"small": small, "other": other, "slow": slow}


def served(path, version, name="m", released=None) -> Served:
    session = get_runtime("onnxruntime").load(path, 1)
    return Served(session, name, version, {"labels": [str(i) for i in range(10)]},
                  release=(lambda: released.append(version)) if released is not None else None)


@pytest.fixture
def api(tmp_path, models):
    holder = ModelHolder()
    holder.swap(served(models["small"], 1))
    with InferenceServer(holder, ServeConfig(socket_path=tmp_path / "infer.sock", workers=2, queue=4)) as server:
        yield server


def raw(sock_path, method, path, body=b"", headers=None):
    conn = http.client.HTTPConnection("localhost")
    conn.sock = socket.socket(socket.AF_UNIX)
    conn.sock.connect(str(sock_path))
    conn.request(method, path, body=body, headers=headers or {})
    r = conn.getresponse()
    out = r.status, dict(r.getheaders()), r.read()
    conn.close()
    return out


def test_an_application_gets_answers_with_the_version_that_gave_them(api, models):
    x = np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32)
    expected = get_runtime("onnxruntime").load(models["small"], 1).run({"image": x})[0]
    with Client(str(api.cfg.socket_path)) as client:
        answer = client.infer({"image": x}, request_id="req-1")
        assert answer.id == "req-1" and answer.version == 1 and answer.latency_ms > 0
        np.testing.assert_allclose(answer.outputs["logits"], expected, rtol=1e-6)
        np.testing.assert_allclose(client.infer(x).outputs["logits"], expected, rtol=1e-6)  # .npy body
        assert client.health() == {"status": "ok", "model": "m", "version": 1}
        model = client.model()
    assert model["inputs"] == [{"name": "image", "shape": ["batch", 1, 8, 8], "dtype": "float32"}]
    assert model["outputs"][0]["name"] == "logits" and model["labels"][3] == "3"
    assert stat.S_IMODE(os.stat(api.cfg.socket_path).st_mode) == 0o660
    status, headers, body = raw(api.cfg.socket_path, "POST", "/v1/infer", np.zeros(0).tobytes(),
                                {"Content-Type": "application/x-npy", "Accept": "application/x-npy"})
    assert status == 400
    snap = api.stats.snapshot()
    assert snap["versions"]["1"]["count"] == 2 and snap["versions"]["1"]["errors"]["bad_request"] == 1
    assert len(snap["versions"]["1"]["buckets"]) == len(BUCKETS_MS) + 1


@pytest.mark.parametrize("body, content_type, expected", [
    (b'{"inputs": {"image": [[1, 2]]}}', "application/json", "input 'image': shape [1, 2], the model takes "
                                                             "[any, 1, 8, 8]"),
    (b'{"inputs": {"pixels": []}}', "application/json", "the model takes ['image'] (missing ['image']) "
                                                        "(unknown ['pixels'])"),
    (b'{"inputs": {"image": {"data": [1, 2, 3], "shape": [1, 1, 8, 8]}}}', "application/json",
     "does not hold 3 values"),
    (b'{"inputs": {"image": [["a"]]}}', "application/json", "not an array of numbers"),
    (b'{"inputs": {"image": [[1], [1, 2]]}}', "application/json", "not a rectangular array"),
    (b'{"inputs": {"image": {"data": [1], "dtype": "complex"}}}', "application/json", "dtype 'complex' unknown"),
    (b"[" * 100_000, "application/json", "neither JSON nor .npy"),
    (b"\x93NUMPY garbage", "application/x-npy", "not a .npy array"),
    (b'{"x": 1}', "application/json", 'expected {"inputs"'),
])
def test_every_malformed_request_is_a_400_naming_what_is_wrong(api, body, content_type, expected):
    status, headers, out = raw(api.cfg.socket_path, "POST", "/v1/infer", body, {"Content-Type": content_type})
    doc = json.loads(out)
    assert status == 400 and expected in doc["message"], doc
    assert headers["X-Request-Id"] == doc["id"]


def test_limits_on_bodies_paths_and_headers(tmp_path, models):
    holder = ModelHolder()
    with InferenceServer(holder, ServeConfig(socket_path=tmp_path / "s.sock", max_body_bytes=1000)) as api:
        assert raw(api.cfg.socket_path, "GET", "/v1/health")[0] == 503  # no model yet
        holder.swap(served(models["small"], 1))
        assert raw(api.cfg.socket_path, "POST", "/v1/infer", b"x" * 2000)[0] == 413
        assert raw(api.cfg.socket_path, "GET", "/v2/anything")[0] == 404
        assert raw(api.cfg.socket_path, "POST", "/v1/infer", b"{}", {"X-Deadline-Ms": "soon"})[0] == 400
        assert api.stats.snapshot()["versions"]["None"]["errors"]["too_large"] == 1


def test_a_refused_body_is_read_and_dropped_so_the_client_reads_why(tmp_path, models):
    """A client that writes its body after the server answered 413 (http.client sends the head, then the body) must
    still get to read the 413: the server lingers, dropping the body, instead of closing under the client's write."""
    holder = ModelHolder()
    holder.swap(served(models["small"], 1))
    with InferenceServer(holder, ServeConfig(socket_path=tmp_path / "s.sock", max_body_bytes=1000)) as api:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(api.cfg.socket_path))
            sock.settimeout(10)
            sock.sendall(b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\n\r\n")
            answer = b""
            while b"\r\n\r\n" not in answer:  # the server answered before any of the body was sent
                answer += sock.recv(65536)
            sock.sendall(b"x" * 200_000)  # EPIPE here if the server had closed at once
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 413 ") and b"Connection: close" in answer
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"] == "too_large"


def test_a_full_queue_answers_503_with_retry_after_and_a_passed_deadline_504(tmp_path, models):
    holder = ModelHolder()
    holder.swap(served(models["slow"], 7))
    cfg = ServeConfig(socket_path=tmp_path / "q.sock", workers=1, queue=1)
    x = np.zeros((1, 1, 96, 96), np.float32)
    with InferenceServer(holder, cfg) as api:
        results: list[int] = []
        started = threading.Barrier(6)

        body = json.dumps({"inputs": {"image": x.tolist()}}).encode()

        def call():
            started.wait()
            status, headers, _ = raw(cfg.socket_path, "POST", "/v1/infer", body, {"Content-Type": "application/json"})
            results.append(status)
            if status == 503:
                assert headers["Retry-After"] == "1"

        threads = [threading.Thread(target=call) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert 200 in results and 503 in results  # one running, one waiting, the rest turned away
        assert api.stats.snapshot()["rejected"] >= 1
        with pytest.raises(InferenceError) as err:
            Client(str(cfg.socket_path)).infer(x, deadline_ms=0.001)
        assert err.value.status == 504 and err.value.kind == "deadline"


def test_connections_beyond_the_bound_are_refused_not_queued(tmp_path, models):
    holder = ModelHolder()
    holder.swap(served(models["small"], 1))
    cfg = ServeConfig(socket_path=tmp_path / "c.sock", max_connections=2)
    with InferenceServer(holder, cfg):
        idle = []
        for _ in range(2):  # two idle keep-alive connections hold both slots
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(cfg.socket_path))
            s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
            idle.append(s)
        third = socket.socket(socket.AF_UNIX)
        third.connect(str(cfg.socket_path))
        assert third.recv(4096).startswith(b"HTTP/1.1 503")
        for s in [*idle, third]:
            s.close()


def test_swaps_under_steady_traffic_fail_no_request_and_release_the_old_model(tmp_path, models):
    """Four client threads call without pause while the model is swapped back and forth ten times: every request
    is answered, by the version current when it started or a later one, and each swapped-out model is released
    once its requests are done."""
    holder, released = ModelHolder(), []
    holder.swap(served(models["small"], 1, released=released))
    cfg = ServeConfig(socket_path=tmp_path / "swap.sock", workers=2, queue=64)
    x = np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32)
    with InferenceServer(holder, cfg), SteadyTraffic(str(cfg.socket_path), {"image": x}) as traffic:
        for version in range(2, 12):
            traffic.wait_for(traffic.answers + 20)  # some traffic on each version before the next swap
            holder.swap(served(models["other" if version % 2 else "small"], version, released=released))
        traffic.wait_for(400)
    failures, seen = traffic.failures, traffic.seen
    assert failures == []
    for versions in seen:
        assert versions == sorted(versions)  # never answered by an older model after a newer one
    assert {v for s in seen for v in s} >= {1, 11}
    assert sorted(released) == list(range(1, 11))  # every swapped-out model released, the current one kept


def test_the_client_survives_an_agent_restart(tmp_path, models):
    """The agent stops (its connections and socket go with it) and another starts on the same path: the client's
    next call fails on its dead keep-alive connection, connects again and is answered by the new agent."""
    cfg = ServeConfig(socket_path=tmp_path / "r.sock")
    holder = ModelHolder()
    holder.swap(served(models["small"], 1))
    x = np.zeros((1, 1, 8, 8), np.float32)
    with Client(str(cfg.socket_path), timeout=20) as client:
        with InferenceServer(holder, cfg):
            assert client.infer(x).version == 1
        assert not cfg.socket_path.exists()
        holder2 = ModelHolder()
        holder2.swap(served(models["other"], 2))
        with InferenceServer(holder2, cfg):
            assert client.infer(x).version == 2
    with pytest.raises(Unavailable, match="no answer within 0.5 s"):
        Client(str(cfg.socket_path), timeout=0.5).infer(x)  # nobody serves: a clear error, not a hang


def test_a_stale_socket_is_replaced_and_a_live_one_or_a_file_is_refused(tmp_path, models):
    path = tmp_path / "stale.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()  # the file stays, nothing listens: what a killed agent leaves
    holder = ModelHolder()
    holder.swap(served(models["small"], 1))
    with InferenceServer(holder, ServeConfig(socket_path=path)):
        with pytest.raises(OSError, match="another process is serving"):
            InferenceServer(holder, ServeConfig(socket_path=path)).start()
    (tmp_path / "plain").write_text("not a socket")
    with pytest.raises(OSError, match="not a socket"):
        InferenceServer(holder, ServeConfig(socket_path=tmp_path / "plain")).start()


def test_histograms_give_quantiles_and_merge_by_adding():
    a, b = TrafficStats(), TrafficStats()
    for ms in (0.05, 0.3, 0.3, 4.0):
        a.observe(3, ms)
    for ms in (40.0, 9000.0):
        b.observe(3, ms)
    merged = [x + y for x, y in zip(a.snapshot()["versions"]["3"]["buckets"], b.snapshot()["versions"]["3"]["buckets"])]
    assert quantile_ms(merged, 0.5) == 0.5 and quantile_ms(merged, 0.99) == BUCKETS_MS[-1]
    assert quantile_ms([0] * (len(BUCKETS_MS) + 1), 0.5) is None


_JSONISH = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=6),
                        lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=6), inner,
                                                                                     max_size=3), max_leaves=30)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(st.binary(max_size=300), _JSONISH.map(lambda v: json.dumps({"inputs": {"image": v}}).encode()),
                      _JSONISH.map(lambda v: json.dumps(v).encode())),
       content_type=st.sampled_from(["application/json", "application/x-npy", "text/plain", ""]),
       deadline=st.one_of(st.none(), st.sampled_from(["0", "-1", "nan", "1e9", "5", "x" * 50])))
def test_no_request_an_attacker_sends_breaks_the_server(api, body, content_type, deadline):
    headers = {"Content-Type": content_type, **({"X-Deadline-Ms": deadline} if deadline is not None else {})}
    status, _, out = raw(api.cfg.socket_path, "POST", "/v1/infer", body, headers)
    assert status in (200, 400, 500, 504), (status, out[:200])
    if status != 200:
        assert json.loads(out)["message"]
    assert raw(api.cfg.socket_path, "GET", "/v1/health")[0] == 200  # and it still serves


def test_the_agent_config_says_where_and_how_it_serves(tmp_path):
    from device_agent.config import parse_config
    from device_agent.errors import ConfigError

    base = {"device_id": "d1", "target": "rpi4", "state_dir": "state", "trusted_keys": ["k.pub"]}
    cfg = parse_config(base, "agent.yaml", tmp_path)
    assert cfg.socket_path == tmp_path / "state" / "infer.sock" and cfg.serve.socket_mode == 0o660
    cfg = parse_config({**base, "serve": {"socket": "/run/ef/infer.sock", "port": 0, "workers": 4}}, "agent.yaml",
                       tmp_path)
    assert str(cfg.socket_path) == "/run/ef/infer.sock" and cfg.serve.port == 0 and cfg.serve.workers == 4
    assert parse_config({**base, "serve": {"enabled": False}}, "agent.yaml", tmp_path).socket_path is None
    for bad, expected in (({"workers": 0}, "serve.workers 0 is outside"), ({"port": 70000}, "serve.port"),
                          ({"sockets": "x"}, "unknown key"), ("yes", "'serve' must be a mapping")):
        with pytest.raises(ConfigError, match=expected):
            parse_config({**base, "serve": bad}, "agent.yaml", tmp_path)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(["<f4", "<f2", "<f8", "<i8", "<i4", "|i1", "|u1", "|b1", ">f4"]),
       st.lists(st.integers(0, 5), min_size=0, max_size=4), st.booleans())
def test_npy_bodies_round_trip_without_numpy_load(dtype, shape, fortran):
    from device_agent.npy import read_npy, write_npy

    a = np.random.default_rng(0).integers(0, 2, shape).astype(dtype)
    a = np.asfortranarray(a) if fortran else a
    back = read_npy(write_npy(a))
    assert back.dtype == a.dtype and back.shape == a.shape and np.array_equal(back, a)


@pytest.mark.parametrize("data, expected", [
    (b"PK\x03\x04", "magic"), (b"\x93NUMPY\x01\x00\xff\xff", "longer than the body"),
    (b"\x93NUMPY\x09\x00\x00\x00", "version 9"),
])
def test_npy_bodies_that_are_not_plain_arrays_are_refused(data, expected):
    from device_agent.npy import read_npy, write_npy

    with pytest.raises(ValueError, match=expected):
        read_npy(data)
    with pytest.raises(ValueError, match="only numbers"):
        read_npy(write_npy(np.array(["a", "b"])))
    with pytest.raises(ValueError, match="needs 64 bytes"):
        read_npy(write_npy(np.zeros(16, np.float32))[:-4])


def test_the_example_application_classifies_an_image_as_the_model_was_trained(tmp_path, models):
    """examples/classify.py, as a user runs it: it reads the spec and class names from /v1/model, prepares a PNG
    with them and prints the top classes with the version that answered."""
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image

    from device_agent.preprocess import Preprocess

    Image.fromarray((np.random.default_rng(0).random((20, 30)) * 255).astype("uint8")).save(tmp_path / "photo.png")
    holder = ModelHolder()
    spec = Preprocess(channels=1, resize=(8, 8), scale=1 / 255)
    session = get_runtime("onnxruntime").load(models["small"], 1)
    holder.swap(Served(session, "digits", 7, {"preprocess": spec.to_dict(), "labels": [f"d{i}" for i in range(10)]}))
    example = Path(__file__).resolve().parents[2] / "examples" / "classify.py"
    with InferenceServer(holder, ServeConfig(socket_path=tmp_path / "app.sock")):
        done = subprocess.run([sys.executable, str(example), str(tmp_path / "photo.png"), "--socket",
                               str(tmp_path / "app.sock")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    image = np.asarray(Image.open(tmp_path / "photo.png").convert("L"))
    scores = session.run({"image": spec.apply(image)[None].astype(np.float32)})[0][0]
    assert lines[0].split()[0] == f"d{int(scores.argmax())}" and "digits v7" in lines[-1]


def _exchange(sock_path, data: bytes) -> bytes:
    """Everything the server writes back on one connection for ``data``, until it closes it."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(str(sock_path))
    s.sendall(data)
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    s.close()
    return out


def test_a_body_that_was_not_read_closes_the_connection_and_is_never_a_request(api):
    smuggled = b"GET /v1/model HTTP/1.1\r\nHost: x\r\n\r\n"
    for head in (b"GET /v1/health HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n",
                 b"POST /v1/nope HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"):
        out = _exchange(api.cfg.socket_path, head % len(smuggled) + smuggled)
        assert out.count(b"HTTP/1.1 ") == 1 and b"Connection: close" in out, out[:300]


@pytest.mark.parametrize("headers,status", [
    (b"Content-Length: 2\r\nContent-Length: 2\r\n", b"400"),
    (b"Transfer-Encoding: chunked\r\nContent-Length: 2\r\n", b"501"),
    (b"Content-Length : 2\r\n", b"400"),
    (b"X-A: 1\r\n  folded\r\nContent-Length: 2\r\n", b"400"),
    ("Content-Length: \u00b2\r\n".encode("latin-1", "replace").replace(b"?", b"\xb2"), b"400"),
    (b"Content-Length: " + b"9" * 5000 + b"\r\n", b"400"),  # past int()'s digit limit
])
def test_ambiguous_framing_is_refused_with_an_answer_not_a_dropped_connection(api, headers, status):
    out = _exchange(api.cfg.socket_path, b"POST /v1/infer HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n{}")
    assert out.startswith(b"HTTP/1.1 " + status), out[:200]
    assert b"Connection: close" in out


def test_bodies_declared_at_once_are_bounded_before_a_byte_is_read(tmp_path, models):
    holder = ModelHolder()
    holder.swap(served(models["small"], 1))
    cfg = ServeConfig(socket_path=tmp_path / "b.sock", max_body_bytes=1 << 20)  # two of them read at once
    with InferenceServer(holder, cfg) as api:
        held = []
        for _ in range(2):  # two clients declare the largest body and send ten bytes of it
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(cfg.socket_path))
            s.sendall(b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n0123456789" % (1 << 20))
            held.append(s)
        until(lambda: api.bodies.used == 2 << 20, 10, "both bodies being read")
        status, headers, out = raw(cfg.socket_path, "POST", "/v1/infer", b"{}" + b" " * 1000)
        assert status == 503 and headers["Retry-After"] == "1" and "being read already" in json.loads(out)["message"]
        for s in held:
            s.close()
        until(lambda: api.bodies.used == 0, 10, "the budget given back")
        assert raw(cfg.socket_path, "GET", "/v1/health")[0] == 200


def test_a_body_ending_early_is_a_connection_error_and_a_whole_one_reads_in_pieces():
    import io

    from device_agent.httpd import read_exactly

    with pytest.raises(ConnectionError, match="ended after 3 of 10"):
        read_exactly(io.BytesIO(b"abc"), 10)
    data = bytes(range(256)) * 4000
    assert read_exactly(io.BufferedReader(io.BytesIO(data), 4096), 1_000_000) == data[:1_000_000]


def test_the_client_reports_a_413_and_never_sends_a_lost_request_twice(tmp_path, models):
    holder = ModelHolder()
    holder.swap(served(models["small"], 1))
    cfg = ServeConfig(socket_path=tmp_path / "t.sock", max_body_bytes=1000)
    with InferenceServer(holder, cfg):
        with pytest.raises(InferenceError) as err:
            Client(str(cfg.socket_path), timeout=5).infer(np.zeros((1, 1, 300, 300), np.float32))
        assert err.value.status == 413
    # a scripted agent that takes a request whole and closes without answering: the model may have run
    path = str(tmp_path / "mute.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(4)
    seen = []

    def mute():
        for _ in range(2):
            conn, _ = srv.accept()
            f = conn.makefile("rb")
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                head += f.read(1)
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            seen.append(f.read(length))
            conn.close()

    t = threading.Thread(target=mute, daemon=True)
    t.start()
    with pytest.raises(InferenceError) as err:
        Client(path, timeout=5).infer(np.zeros((1, 1, 8, 8), np.float32))
    assert err.value.kind == "lost" and len(seen) == 1  # sent once, not again
    srv.close()
