"""``pipeline dashboard``: the fleet store over HTTP, with the ingester running beside it.

- ``/``: the dashboard (HTML, JS and CSS served from this package: no CDN, works offline);
- ``/api/overview``, ``/api/devices/<id>``, ``/api/deployments``, ``/api/events``: JSON;
- ``/api/stream``: server-sent events, one ``change`` whenever the store commits (live updates);
- ``/metrics``: Prometheus (text format, or OpenMetrics when asked); ``/healthz``: liveness, without
  authentication: 503 once the ingester has stopped.

Bound to loopback by default, where requests must name a loopback Host (no DNS rebinding). Bound beyond it,
every request needs the token: ``Authorization: Bearer <token>``, or ``?token=`` once in a browser, which
sets an HttpOnly cookie and redirects to the clean URL.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import secrets
import threading
import time
from http import cookies
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

from ..errors import ConfigError
from ..fleet.store import FleetStore
from . import prometheus
from .views import BudgetBook, FleetView

log = logging.getLogger(__name__)
COOKIE = "edgefleet_token"
STATIC = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "chart.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}


def is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Dashboard:
    """``Dashboard(db, ...).start()`` serves in a thread; ``ingester`` (a fleet Ingester) runs beside it."""

    def __init__(self, db: Path, host: str = "127.0.0.1", port: int = 8600, token: str | None = None,
                 budgets: BudgetBook | None = None, ingester=None, stream_poll_s: float = 0.5) -> None:
        if not is_loopback(host) and not token:
            raise ConfigError(f"dashboard: binding {host} (beyond loopback) needs a token "
                              "(--token or EDGEFLEET_DASHBOARD_TOKEN)")
        FleetStore(db).close()  # create or migrate the store before any reader opens it
        self.db, self.token, self.ingester, self.stream_poll_s = db, token, ingester, stream_poll_s
        self.budgets = budgets or BudgetBook.from_config(None)
        self.stopping = threading.Event()
        handler = type("Handler", (_Handler,), {"app": self})
        try:
            self.httpd = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise ConfigError(f"dashboard: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        self.httpd.daemon_threads = True
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/"

    def start(self) -> "Dashboard":
        if self.ingester is not None:
            def ingest() -> None:
                try:
                    self.ingester.run()
                except Exception:  # recorded in ingester.error: /healthz and /metrics say so
                    pass

            self._threads.append(threading.Thread(target=ingest, name="ingest", daemon=True))
        self._threads.append(threading.Thread(target=self.httpd.serve_forever, name="http", daemon=True))
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        if self.ingester is not None:
            self.ingester.stop()
        for t in self._threads:
            t.join(10)

    def __enter__(self) -> "Dashboard":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def view(self) -> FleetView:
        return FleetView(FleetStore(self.db, readonly=True), self.budgets)

    def ingest_counters(self) -> dict[str, Any] | None:
        """The ingester's counters for /metrics (messages, rows, drops by reason, up), when one runs here."""
        return None if self.ingester is None else self.ingester.counters()


class _Handler(BaseHTTPRequestHandler):
    app: Dashboard
    server_version = "edgefleet-dashboard"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug("%s %s", self.address_string(), format % args)

    # -- responses ----------------------------------------------------------------------------------------
    def _send(self, code: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", "default-src 'self'; img-src 'self' data:")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, data: Any, code: int = 200) -> None:
        self._send(code, json.dumps(data, default=str).encode(), "application/json")

    def _error(self, code: int, message: str) -> None:
        self._json({"error": message}, code)

    # -- authentication -----------------------------------------------------------------------------------
    def _authorized(self, query: dict[str, list[str]]) -> bool | str:
        """True, False, or a token that came in the query string (then: set the cookie, redirect)."""
        token = self.app.token
        if token is None:
            return is_loopback(host_name(self.headers.get("Host") or ""))
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Bearer ") and hmac.compare_digest(auth[7:].strip().encode(), token.encode()):
            return True
        jar = cookies.SimpleCookie(self.headers.get("Cookie", ""))
        if COOKIE in jar and hmac.compare_digest(jar[COOKIE].value.encode(), token.encode()):
            return True
        given = query.get("token", [""])[0]
        if given and hmac.compare_digest(given.encode(), token.encode()):
            return given
        return False

    # -- routing ------------------------------------------------------------------------------------------
    def do_HEAD(self) -> None:  # noqa: N802
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802
        url = urlsplit(self.path)
        path, query = url.path, parse_qs(url.query)
        if path == "/healthz":
            error = self.app.ingester.error if self.app.ingester is not None else None
            if error:
                return self._send(503, f"ingester stopped: {error}\n".encode(), "text/plain")
            return self._send(200, b"ok\n", "text/plain")
        ok = self._authorized(query)
        if ok is False:
            if self.app.token is None:
                return self._error(403, "this dashboard answers loopback host names only")
            return self._error(401, "a token is required: Authorization: Bearer <token>, or ?token=<token> once")
        if isinstance(ok, str):  # the token came in the URL: keep it in a cookie, drop it from the address bar
            rest = {k: v for k, v in query.items() if k != "token"}
            clean = path + ("?" + urlencode(rest, doseq=True) if rest else "")
            return self._send(303, b"", "text/plain", {
                "Location": clean, "Set-Cookie": f"{COOKIE}={ok}; HttpOnly; SameSite=Strict; Path=/"})
        try:
            self._route(path, query)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _route(self, path: str, query: dict[str, list[str]]) -> None:
        if path in ("/", "/index.html"):
            return self._static("index.html")
        if path.startswith("/static/"):
            return self._static(path.removeprefix("/static/"))
        if path == "/metrics":
            view = self.app.view()
            try:
                body, content_type = prometheus.render(view, self.app.ingest_counters(),
                                                       self.headers.get("Accept", ""))
            finally:
                view.store.close()
            return self._send(200, body, content_type)
        if path == "/api/stream":
            if self.command == "HEAD":
                return self._send(200, b"", "text/event-stream")
            return self._stream()
        if not path.startswith("/api/"):
            return self._error(404, f"no such page: {path}")
        view = self.app.view()
        try:
            limit = _int(query, "limit", 50)
            if path == "/api/overview":
                return self._json(view.overview())
            if path == "/api/deployments":
                return self._json(view.deployments(limit))
            if path == "/api/events":
                return self._json(view.events(limit, query.get("device", [None])[0]))
            if path.startswith("/api/devices/"):
                device = unquote(path.removeprefix("/api/devices/"))
                data = view.device(device, float(query.get("since", ["0"])[0] or 0))
                return self._json(data) if data else self._error(404, f"unknown device {device!r}")
            return self._error(404, f"no such endpoint: {path}")
        except ValueError as exc:
            return self._error(400, str(exc))
        finally:
            view.store.close()

    def _static(self, name: str) -> None:
        if name not in STATIC:
            return self._error(404, f"no such file: {name}")
        body = resources.files("pipeline.dashboard").joinpath("static", name).read_bytes()
        self._send(200, body, STATIC[name])

    def _stream(self) -> None:
        """Server-sent events: ``change`` after every commit to the store, a comment every 15 s to keep
        proxies from closing the connection."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        store = FleetStore(self.app.db, readonly=True)
        try:
            seen, last_write = None, time.monotonic()
            while not self.app.stopping.is_set():
                version = store.data_version()
                if version != seen:
                    seen = version
                    self.wfile.write(f"event: change\ndata: {json.dumps({'ts': time.time()})}\n\n".encode())
                    self.wfile.flush()
                    last_write = time.monotonic()
                elif time.monotonic() - last_write > 15:
                    self.wfile.write(b": keep-alive\n\n")
                    self.wfile.flush()
                    last_write = time.monotonic()
                self.app.stopping.wait(self.app.stream_poll_s)
        finally:
            store.close()


def _int(query: dict[str, list[str]], name: str, default: int) -> int:
    raw = query.get(name, [str(default)])[0]
    if not raw.isdigit() or not 0 < int(raw) <= 10_000:
        raise ValueError(f"{name}: expected a whole number from 1 to 10000, got {raw!r}")
    return int(raw)


def host_name(header: str) -> str:
    """The host of a Host header: ``[::1]:8600`` -> ``::1``, ``localhost:8600`` -> ``localhost``."""
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def new_token() -> str:
    return secrets.token_urlsafe(24)
