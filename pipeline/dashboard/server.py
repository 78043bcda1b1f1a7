"""``pipeline dashboard``: the fleet store over HTTP (Starlette, served in-process by uvicorn), with the ingester
running beside it.

- ``/``: the dashboard (HTML, JS and CSS served from this package: no CDN, works offline);
- ``/api/overview``, ``/api/devices/<id>``, ``/api/deployments``, ``/api/events``, ``/api/predictions`` (the
  fleet's measurements against their predictions, per class), ``/api/traffic`` (the inference API's requests,
  latency and errors per device and per class and version), ``/api/quality`` (the models on live traffic: drift
  per device and version with its state, live accuracy, shadow comparisons): JSON;
- ``/api/stream``: server-sent events, one ``change`` whenever the store commits (live updates);
- ``/metrics``: Prometheus (text format, or OpenMetrics when asked); ``/healthz``: liveness, without
  authentication: 503 once the ingester has stopped.

Bound to loopback by default, where requests must name a loopback Host (no DNS rebinding). Bound beyond it,
every request needs the token (see ``guard``). The app is its routes plus those guards; request handlers run
in Starlette's thread pool and share one read-only store (a connection per thread, not one per request).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..errors import ConfigError
from ..fleet.store import FleetStore
from . import prometheus
from .guard import LoopbackHosts, SecurityHeaders, TokenAuth, error, host_name, is_loopback
from .stream import ChangeFeed
from .views import BudgetBook, FleetView

__all__ = ["Dashboard", "host_name", "is_loopback", "new_token"]
log = logging.getLogger(__name__)
STREAM_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-store"}


def new_token() -> str:
    return secrets.token_urlsafe(24)


class Dashboard:
    """``Dashboard(db, ...).start()`` serves in a thread; ``ingester`` (a fleet Ingester) runs beside it."""

    def __init__(self, db: Path, host: str = "127.0.0.1", port: int = 8600, token: str | None = None,
                 budgets: BudgetBook | None = None, ingester=None, stream_poll_s: float = 0.5) -> None:
        if not is_loopback(host) and not token:
            raise ConfigError(f"dashboard: binding {host} (beyond loopback) needs a token "
                              "(--token or EDGEFLEET_DASHBOARD_TOKEN)")
        FleetStore(db).close()  # create or migrate the store before any reader opens it
        self.db, self.token, self.ingester = db, token, ingester
        self.budgets = budgets or BudgetBook.from_config(None)
        self.stopping = threading.Event()
        self.sock = _listen(host, port)  # bound now: the port is known (and taken) before start
        self.store = FleetStore(db, readonly=True)
        self.feed = ChangeFeed(self.store, stream_poll_s)
        self.app = build_app(self)
        self.server = uvicorn.Server(uvicorn.Config(
            self.app, log_config=None, log_level="warning", access_log=False, http="h11", ws="none",
            loop="asyncio", lifespan="on", proxy_headers=False, server_header=False,
            headers=[("Server", "edgefleet-dashboard")], timeout_graceful_shutdown=5))
        self.loop: asyncio.AbstractEventLoop | None = None  # the server's, once it runs
        self._threads: list[threading.Thread] = []

    @property
    def server_address(self) -> tuple[str, int]:
        return self.sock.getsockname()[:2]

    @property
    def url(self) -> str:
        host, port = self.server_address
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
        http = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, name="http", daemon=True)
        self._threads.append(http)
        for t in self._threads:
            t.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not http.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise ConfigError(f"dashboard: the HTTP server did not start on {self.url}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.stopping.set()
        if self.loop is not None and not self.loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop ended on its own meanwhile
                self.loop.call_soon_threadsafe(self.feed.close)  # open streams end: shutdown waits for none
        self.server.should_exit = True
        if self.ingester is not None:
            self.ingester.stop()
        for t in self._threads:
            t.join(10)
        self.sock.close()
        self.store.close()

    def __enter__(self) -> "Dashboard":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def view(self) -> FleetView:
        """What the pages show, over the shared read-only store (safe from any thread)."""
        return FleetView(self.store, self.budgets)

    def ingest_counters(self) -> dict[str, Any] | None:
        """The ingester's counters for /metrics (messages, rows, drops by reason, up), when one runs here."""
        return None if self.ingester is None else self.ingester.counters()


def _listen(host: str, port: int) -> socket.socket:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        raise ConfigError(f"dashboard: cannot listen on {host}:{port}: {exc.strerror or exc}") from None


class WireHeaderCase:
    """Response header names in their canonical case on the wire (``Content-Type``), as the http.server
    dashboard sent them: ASGI carries them lowercased, and HTTP/1 clients that look them up by exact name
    (``dict(response.headers)``) keep working."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        async def send_canonical(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [(b"-".join(w.capitalize() for w in k.split(b"-")), v)
                                                  for k, v in message.get("headers", [])]}
            await send(message)

        await self.app(scope, receive, send_canonical if scope["type"] == "http" else send)


class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return json.dumps(content, default=str).encode()


def _int(request: Request, name: str, default: int) -> int:
    raw = request.query_params.get(name, str(default))
    if not raw.isdigit() or not 0 < int(raw) <= 10_000:
        raise ValueError(f"{name}: expected a whole number from 1 to 10000, got {raw!r}")
    return int(raw)


def _api(read: Callable[[FleetView, Request], Any], dash: Dashboard) -> Callable[[Request], Response]:
    """A JSON endpoint over the fleet view; a bad query parameter is a 400 naming it. A plain function:
    Starlette runs it in its thread pool, where each worker has its own connection to the store."""

    def endpoint(request: Request) -> Response:
        try:
            _int(request, "limit", 50)  # checked on every endpoint, as it always was
            data = read(dash.view(), request)
        except ValueError as exc:
            return error(400, str(exc))
        return JSON(data) if data is not None else error(404, f"unknown device {request.path_params['device']!r}")

    return endpoint


def build_app(dash: Dashboard) -> Starlette:
    def index(request: Request) -> Response:
        return HTMLResponse(resources.files("pipeline.dashboard").joinpath("static", "index.html").read_bytes())

    def healthz(request: Request) -> Response:
        failed = dash.ingester.error if dash.ingester is not None else None
        if failed:
            return PlainTextResponse(f"ingester stopped: {failed}\n", 503)
        return PlainTextResponse("ok\n")

    def metrics(request: Request) -> Response:
        # the custom collector over the view; prometheus_client picks the format from Accept
        body, content_type = prometheus.render(dash.view(), dash.ingest_counters(), request.headers.get("accept", ""))
        return Response(body, media_type=content_type)

    async def stream(request: Request) -> Response:
        if request.method == "HEAD":
            return Response(b"", headers=STREAM_HEADERS)
        return StreamingResponse(dash.feed.events(), headers=STREAM_HEADERS)

    async def not_found(request: Request, exc: HTTPException) -> Response:
        path = request.url.path
        if exc.status_code != 404:
            return error(exc.status_code, exc.detail)
        if path.startswith("/static/"):
            return error(404, f"no such file: {path.removeprefix('/static/')}")
        return error(404, f"no such {'endpoint' if path.startswith('/api/') else 'page'}: {path}")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        dash.loop = asyncio.get_running_loop()
        watcher = asyncio.create_task(dash.feed.watch(), name="dashboard-watch")
        try:
            yield
        finally:
            dash.feed.close()
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    routes = [
        Route("/healthz", healthz),
        Route("/", index),
        Route("/index.html", index),
        Mount("/static", StaticFiles(packages=[("pipeline.dashboard", "static")]), name="static"),
        Route("/metrics", metrics),
        Route("/api/stream", stream),
        Route("/api/overview", _api(lambda v, r: v.overview(), dash)),
        Route("/api/deployments", _api(lambda v, r: v.deployments(_int(r, "limit", 50)), dash)),
        Route("/api/predictions", _api(lambda v, r: v.predictions(), dash)),
        Route("/api/traffic", _api(lambda v, r: v.traffic(), dash)),
        Route("/api/quality", _api(lambda v, r: v.quality(), dash)),
        Route("/api/events", _api(lambda v, r: v.events(_int(r, "limit", 50), r.query_params.get("device")), dash)),
        Route("/api/devices/{device:path}", _api(
            lambda v, r: v.device(r.path_params["device"], float(r.query_params.get("since") or 0)), dash)),
    ]
    guard = Middleware(LoopbackHosts) if dash.token is None else Middleware(TokenAuth, token=dash.token)
    return Starlette(routes=routes, middleware=[Middleware(WireHeaderCase), Middleware(SecurityHeaders), guard],
                     exception_handlers={HTTPException: not_found}, lifespan=lifespan)
