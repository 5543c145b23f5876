"""What keeps a local server from being everyone's server.

Any web page a user opens can send requests to ``127.0.0.1``.  So:

- **Binding.** Loopback by default; any other address needs ``--token``
  (:func:`check_bind`).
- **Token.** With ``--token`` every ``/api`` and clip-retrieval request carries it, as
  ``Authorization: Bearer TOKEN`` or as the cookie that ``/?token=TOKEN`` sets (HttpOnly,
  SameSite=Strict); else 401.  The page and its static files need none (they hold no
  data); compared in constant time.
- **Host header.** A name must be one the server was bound as (or ``--allow-host``): a
  page of another site whose name was rebound to 127.0.0.1 (DNS rebinding) sends its own
  name, and is refused.  An IP address is always fine (no name to rebind).
- **Other sites.** A browser says where a request comes from (``Sec-Fetch-Site``); a
  request from another site is refused, except from the ``--cors`` origin, the only one
  that gets CORS headers.  A top-level navigation to the page itself (a link) is let
  through.
- **Headers.** A strict Content-Security-Policy (scripts, styles, images and media from
  the server only; no inline script; no framing), ``nosniff``, no referrer, and
  ``Cross-Origin-Resource-Policy: same-origin`` (other sites cannot embed the library's
  images), relaxed to ``cross-origin`` when ``--cors`` names a front end elsewhere.

A pure ASGI middleware (:class:`Guard`): nothing reaches a route before these checks.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import re
import socket
import sys
from http.cookies import SimpleCookie
from typing import Iterable
from urllib.parse import parse_qsl, urlencode

from ..errors import UsageError

#: A token travels in a header, a cookie and a URL: URL-safe characters only.
TOKEN_RE = re.compile(r"[A-Za-z0-9._~-]{8,512}")

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
       "media-src 'self'; connect-src 'self'; form-action 'self'; base-uri 'none'; "
       "frame-ancestors 'none'")
#: Paths that hold no library data: served without the token (the page then asks for it).
PUBLIC = ("/", "/favicon.ico", "/docs", "/openapi.json")
PUBLIC_PREFIX = "/static/"


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` reaches this machine only."""
    h = host.strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Raise :class:`UsageError` (exit 2) for an address beyond this machine without a token."""
    if not is_loopback(host) and not token:
        raise UsageError(f"--host {host} reaches beyond this machine: give --token too "
                         "(or bind 127.0.0.1)")
    if token is not None and not TOKEN_RE.fullmatch(token):
        raise UsageError("--token: at least 8 characters out of letters, digits and . _ ~ - "
                         "(e.g. python -c 'import secrets; print(secrets.token_urlsafe())')")


def cookie_name(port: int) -> str:
    """The token cookie's name (cookies ignore ports: two servers must not share one)."""
    return f"itr_token_{port}"


def allowed_hosts(host: str, extra: Iterable[str] = ()) -> frozenset[str]:
    """Host names (lower case) the server answers to when bound as ``host``."""
    names = {host.strip("[]").lower(), "localhost"}
    if host in ("0.0.0.0", "::", ""):
        try:
            hn = socket.gethostname()
            names |= {hn.lower(), f"{hn.lower()}.local", socket.getfqdn().lower()}
        except OSError:
            pass
    return frozenset(names | {e.strip().lower() for e in extra if e.strip()})


def host_name(value: str) -> str:
    """The name in a Host header, without the port (``[::1]:8765`` -> ``::1``)."""
    v = value.strip().lower()
    if v.startswith("["):
        return v[1:].split("]", 1)[0]
    return v.rsplit(":", 1)[0] if v.count(":") == 1 else v


def host_ok(value: str | None, allowed: frozenset[str]) -> bool:
    if not value:
        return False
    name = host_name(value)
    try:
        ipaddress.ip_address(name)
        return True  # an address: nothing to rebind
    except ValueError:
        return name in allowed


def _json(status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None):
    body = json.dumps({"error": message}).encode()
    return status, [(b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())] + (headers or []), body


class Guard:
    """The checks above, around an ASGI app."""

    def __init__(self, app, *, host: str, port: int, token: str | None = None,
                 cors: str | None = None, allow_hosts: Iterable[str] = ()) -> None:
        self.app = app
        self.token = token
        self.cookie = cookie_name(port)
        self.cors = cors.rstrip("/") if cors else None
        self.allowed = allowed_hosts(host, allow_hosts)
        self.headers = [
            (b"content-security-policy", CSP.encode()),
            (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"no-referrer"),
            (b"x-frame-options", b"DENY"),
            (b"cross-origin-opener-policy", b"same-origin"),
            (b"cross-origin-resource-policy", b"cross-origin" if cors else b"same-origin"),
        ]

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        if not self.token:
            return True
        want = self.token.encode()
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer " and hmac.compare_digest(auth[7:].strip(), want):
            return True
        raw = headers.get(b"cookie", b"").decode("latin-1")
        try:
            jar = SimpleCookie(raw)
        except Exception:
            return False
        got = jar.get(self.cookie)
        return got is not None and hmac.compare_digest(got.value.encode(), want)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers: dict[bytes, bytes] = {}
        for k, v in scope["headers"]:
            headers.setdefault(k.lower(), v)
        path = scope.get("path", "/")
        method = scope.get("method", "GET")
        origin = headers.get(b"origin", b"").decode("latin-1").rstrip("/")
        from_cors = bool(self.cors) and origin == self.cors
        extra = list(self.headers)
        if from_cors:
            extra += [(b"access-control-allow-origin", self.cors.encode()),  # type: ignore[union-attr]
                      (b"vary", b"Origin")]

        async def reply(status, hdrs, body):
            await send({"type": "http.response.start", "status": status,
                        "headers": hdrs + extra})
            await send({"type": "http.response.body", "body": body})

        if not host_ok(headers.get(b"host", b"").decode("latin-1"), self.allowed):
            return await reply(*_json(403, "this Host is not a name of this server (a defence "
                                           "against DNS rebinding; see itr serve --allow-host)"))
        site = headers.get(b"sec-fetch-site", b"").decode("latin-1")
        navigation = (headers.get(b"sec-fetch-mode") == b"navigate" and method == "GET"
                      and path == "/")
        if site in ("cross-site", "same-site") and not from_cors and not navigation:
            return await reply(*_json(403, "a request from another site (no --cors for it)"))
        if method == "OPTIONS" and from_cors:  # a CORS preflight
            return await reply(204, [
                (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
                (b"access-control-allow-headers", b"authorization, content-type"),
                (b"access-control-max-age", b"600")], b"")
        public = path in PUBLIC or path.startswith(PUBLIC_PREFIX)
        if path == "/" and self.token:
            query = parse_qsl(scope.get("query_string", b"").decode("latin-1"),
                              keep_blank_values=True)
            given = [v for k, v in query if k == "token"]
            if given:
                if not hmac.compare_digest(given[0].encode(), self.token.encode()):
                    return await reply(*_json(401, "wrong token"))
                rest = urlencode([(k, v) for k, v in query if k != "token"])
                cookie = (f"{self.cookie}={self.token}; Path=/; HttpOnly; SameSite=Strict"
                          ).encode("latin-1")
                return await reply(303, [(b"location", ("/?" + rest if rest else "/").encode()),
                                         (b"set-cookie", cookie),
                                         (b"cache-control", b"no-store"),
                                         (b"content-length", b"0")], b"")
        if not public and not self._authorized(headers):
            return await reply(*_json(401, "this server needs its token: open the URL that "
                                           "itr serve printed, or send Authorization: Bearer "
                                           "TOKEN", [(b"www-authenticate", b"Bearer")]))

        started = []

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                started.append(True)
                message = {**message, "headers": list(message.get("headers", [])) + extra}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception as e:  # past the routes' own handling (a file gone mid-answer)
            try:
                sys.stderr.write(f"itr serve: {method} {path}: {type(e).__name__}: {e}\n")
            except (OSError, ValueError):
                pass
            if not started:
                await reply(*_json(500, f"unexpected {type(e).__name__}"))


__all__ = ["CSP", "Guard", "allowed_hosts", "check_bind", "cookie_name", "host_ok",
           "is_loopback"]
