"""Payloads over HTTP with Range requests: a server that drops the connection mid-download, resumed."""

from __future__ import annotations


import pytest

from conftest import make_artifact
from device_agent.download import Download
from device_agent.http_fetch import HttpFetch
from pipeline.ota import LocalFleet, deliver
from pipeline.ota.http_server import ArtifactServer, RangeHandler

pytestmark = pytest.mark.slow


class Flaky(RangeHandler):
    """Cuts every third response halfway through its body, as a dropping link would."""

    seen: list[str] = []

    def do_GET(self):  # noqa: N802
        Flaky.seen.append(self.headers.get("Range", ""))
        if len(Flaky.seen) % 3 == 2:
            self.send_response(206)
            self.send_header("Content-Length", "32768")
            self.end_headers()
            self.wfile.write(b"\0" * 100)
            self.wfile.flush()
            self.connection.close()
            return
        super().do_GET()


def test_range_fetch_resumes_after_cuts(tmp_path):
    payload = bytes(range(256)) * 1000  # 256,000 bytes: 8 chunks
    (tmp_path / "srv").mkdir()
    (tmp_path / "srv" / "p.bin").write_bytes(payload)
    Flaky.seen = []
    with ArtifactServer(tmp_path / "srv", handler=Flaky) as server:
        dl = Download(tmp_path / "dl", "j1", len(payload), 32768, 8)
        result = {}
        fetch = HttpFetch(server.url_for(tmp_path / "srv" / "p.bin"), dl, lambda e: result.setdefault("e", e))
        fetch.run()
    assert result["e"] is None and dl.complete
    dl.close()
    assert dl.path.read_bytes() == payload
    assert len(Flaky.seen) > 8 and all(r.startswith("bytes=") for r in Flaky.seen)  # cut requests were retried


def test_agent_downloads_over_http_when_the_manifest_names_a_url(mosquitto, key_dir, tiny_onnx, tmp_path):
    root = tmp_path / "artifacts"
    root.mkdir()
    Flaky.seen = []
    with ArtifactServer(root, handler=Flaky) as server, \
            LocalFleet(tmp_path / "dev", mosquitto.config, "rpi4", 1, key_dir / "signing.pub", "edgefleet") as fleet:
        art = make_artifact(tiny_onnx, root, key_dir, version=80, url_base=server.base_url)
        assert art.manifest.url.startswith(server.base_url)
        [r] = deliver(mosquitto.config, "edgefleet", art, fleet.device_ids, 60)
    assert r.status == "activated" and r.active_version == 80, r.reason
    assert r.chunks_served == 0  # nothing went over MQTT
    assert Flaky.seen and Flaky.seen[0] == "bytes=0-" + str(min(art.size_bytes, 32768) - 1)
