"""The dashboard's guards, each one small ASGI middleware doing one thing (Starlette's own pattern):

- ``SecurityHeaders``: no caching, no sniffing, a same-origin content policy, on every response;
- ``LoopbackHosts``: bound to loopback, answer only requests that name a loopback host (no DNS rebinding) --
  TrustedHostMiddleware's job, but for every loopback address and IPv6 literals (``[::1]:8600``), with a 403;
- ``TokenAuth``: bound beyond loopback, every request carries the token: ``Authorization: Bearer``, the cookie,
  or ``?token=`` once (then set as an HttpOnly cookie and dropped from the address by a redirect).

``/healthz`` passes both guards: a liveness probe knows no token and may name any host.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from urllib.parse import parse_qs, urlencode

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import cookie_parser
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

COOKIE = "edgefleet_token"
OPEN_PATHS = frozenset({"/healthz"})
_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}
_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "default-src 'self'; img-src 'self' data:"}


def is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The host of a Host header: ``[::1]:8600`` -> ``::1``, ``localhost:8600`` -> ``localhost``."""
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def error(code: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """The JSON error every part of the dashboard answers with: ``{"error": message}``."""
    return Response(json.dumps({"error": message}), code, headers, media_type="application/json")


def _same(given: str, token: str) -> bool:
    return hmac.compare_digest(given.encode(), token.encode())


class SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for k, v in _HEADERS.items():
                    headers[k] = v
            await send(message)

        await self.app(scope, receive, send_with_headers)


class LoopbackHosts:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS \
                and not is_loopback(host_name(Headers(scope=scope).get("host", ""))):
            return await error(403, "this dashboard answers loopback host names only")(scope, receive, send)
        await self.app(scope, receive, send)


class TokenAuth:
    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app, self.token = app, token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        auth = headers.get("authorization", "")
        if auth.startswith("Bearer ") and _same(auth[7:].strip(), self.token):
            return await self.app(scope, receive, send)
        cookie = cookie_parser(headers.get("cookie", "")).get(COOKIE)
        if cookie and _same(cookie, self.token):
            return await self.app(scope, receive, send)
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        given = query.get("token", [""])[0]
        if given and _same(given, self.token):
            # the token came in the URL: keep it in a cookie, drop it from the address bar
            rest = {k: v for k, v in query.items() if k != "token"}
            clean = scope["path"] + ("?" + urlencode(rest, doseq=True) if rest else "")
            response = Response(b"", 303, {"Location": clean,
                                           "Set-Cookie": f"{COOKIE}={given}; HttpOnly; SameSite=Strict; Path=/"},
                                media_type="text/plain")
            return await response(scope, receive, send)
        await error(401, "a token is required: Authorization: Bearer <token>, or ?token=<token> once")(
            scope, receive, send)
