"""A static file server with HTTP Range support, for artifacts too large to want over MQTT.

Devices resume an interrupted download with ``Range: bytes=N-``; the manifest's signed sha256 is what
makes any server (this one, a CDN, S3) trustworthy."""

from __future__ import annotations

import re
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


class RangeHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - quiet
        pass

    def do_GET(self) -> None:  # noqa: N802
        path = Path(self.translate_path(self.path))
        rng = self.headers.get("Range")
        if not path.is_file() or not rng:
            return super().do_GET()
        m = _RANGE.match(rng.strip())
        size = path.stat().st_size
        if not m or int(m.group(1)) >= size:
            self.send_error(416, "Range Not Satisfiable")
            return
        start = int(m.group(1))
        end = min(int(m.group(2)) if m.group(2) else size - 1, size - 1)
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        with open(path, "rb") as f:
            f.seek(start)
            remaining = end - start + 1
            while remaining:
                block = f.read(min(1 << 16, remaining))
                if not block:
                    break
                self.wfile.write(block)
                remaining -= len(block)


class ArtifactServer:
    """``with ArtifactServer(root) as s: s.url_for(path)``; binds loopback unless told otherwise."""

    def __init__(self, root: Path, host: str = "127.0.0.1", port: int = 0,
                 handler: type[SimpleHTTPRequestHandler] = RangeHandler) -> None:
        self.root = root
        self.httpd = ThreadingHTTPServer((host, port), partial(handler, directory=str(root)))
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def url_for(self, path: Path) -> str:
        return f"{self.base_url}/{path.resolve().relative_to(self.root.resolve()).as_posix()}"

    def __enter__(self) -> "ArtifactServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def plan_http(http):
    """deploy.yaml's ``fleet.http`` as (what to serve from this host, or None; the URL devices fetch payloads
    from, or None for MQTT chunks): a free port is chosen here when ``serve`` asks for port 0."""
    if http.serve and not http.port:
        from ..broker import free_port

        http = http.model_copy(update={"port": free_port()})
    serve = http if http.serve else None
    return serve, http.base_url or (f"http://{http.host}:{http.port}" if serve else None)
