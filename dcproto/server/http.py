"""The server's HTTP surface: a live dashboard (``/``), its data (``/api/state``) and Prometheus
metrics (``/metrics``), served by aiohttp in the server's own event loop.

Off unless ``--http-port`` is given. Bound to ``--http-host`` (default 127.0.0.1).

Who may look (every path but the login form):

* **Bound to a loopback address** (127.0.0.0/8, ::1, ``localhost``): anyone who can reach the
  port, without a token, but only with a ``Host`` header that names a loopback address, so a
  web page elsewhere cannot read it through DNS rebinding. ``--http-require-token`` asks for a
  token here too (a shared machine, a reverse proxy in front).
* **Bound to any other address**: every request needs an admin token, as an HTTP bearer token
  (``Authorization: Bearer NAME.SECRET``, what a Prometheus scrape config sends) or through the
  login form, which sets an HttpOnly, SameSite=Strict session cookie. When the server has a
  TLS identity (it has unless ``--insecure``), this is HTTPS with the server's certificate, so
  the token never crosses the network in clear.
* A token that is presented is always checked, on any bind: unknown, revoked or malformed ->
  401; a valid token whose role is not ``admin`` -> 403. Failures count towards the same
  per-address slow-down as failed protocol logins (then 429 with ``Retry-After``).

A token is checked as the wire protocol's verifier allows: ``SHA-256(HMAC(secret, name))``
against the stored key, in constant time. Sessions live in memory (at most MAX_SESSIONS, for
SESSION_SECONDS), and end when their token is revoked or replaced.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import importlib.resources
import json
import logging
import re
import secrets
import ssl
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client.exposition import choose_encoder

from ..errors import UsageError
from ..trust.tls import server_context
from ..trust.tokens import TokenRecord, client_key, parse_token, stored_key
from .admission import address_key, peer_text
from .http_options import HttpListenError, HttpOptions, is_loopback
from .metrics import Metrics

if TYPE_CHECKING:
    from .server import Server

__all__ = ["HttpListenError", "HttpOptions", "HttpSurface", "is_loopback"]

log = logging.getLogger("dcproto.server")

SESSION_SECONDS = 12 * 3600.0
MAX_SESSIONS = 64  # past that the oldest session ends
MAX_BODY = 16 * 1024  # bytes of a request body (the login form)
SHUTDOWN_TIMEOUT = 1.0  # seconds a request under way may take when the server stops
_DUMMY_KEY = bytes(32)  # compared against when a token's name is unknown: the same work


@dataclass
class _Session:
    name: str
    stored_key: bytes
    expires: float  # monotonic


def _page(name: str) -> str:
    return (importlib.resources.files(__package__) / "dashboard" / name).read_text("utf-8")


def _csp(html: str) -> str:
    """A Content-Security-Policy that allows exactly the page's inline <script> and <style>
    blocks (by hash), fetches to this origin, and nothing else."""

    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
        return " ".join(
            f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'"
            for b in blocks
        )

    scripts = hashes("script") or "'none'"
    styles = hashes("style") or "'none'"
    return (
        f"default-src 'none'; script-src {scripts}; style-src {styles}; "
        "connect-src 'self'; img-src 'self' data:; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    )


_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HttpSurface:
    """The dashboard and ``/metrics`` of one :class:`~dcproto.server.server.Server`."""

    def __init__(self, server: Server, options: HttpOptions, metrics: Metrics) -> None:
        self.server = server
        self.options = options
        self.metrics = metrics
        self.tokens_required = options.tokens_required
        self.https = not is_loopback(options.host) and server.identity is not None
        self.address: tuple[str, int] | None = None
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        self._runner: web.AppRunner | None = None
        self._index = _page("index.html")
        self._login = _page("login.html")
        self._index_csp = _csp(self._index)
        self._login_csp = _csp(self._login)

    @property
    def cookie(self) -> str:
        # cookies are not kept apart by port: two servers on one host must not share one
        return f"dcproto_session_{self.address[1] if self.address else 0}"

    @property
    def url(self) -> str:
        assert self.address is not None
        host, port = self.address
        shown = self.options.host or host
        if ":" in shown:
            shown = f"[{shown}]"
        return f"{'https' if self.https else 'http'}://{shown}:{port}/"

    async def start(self) -> tuple[str, int]:
        app = web.Application(middlewares=[self._guard], client_max_size=MAX_BODY)
        app.router.add_get("/", self._dashboard)
        app.router.add_get("/api/state", self._state)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/login", self._login_form)
        app.router.add_post("/login", self._log_in)
        app.router.add_post("/logout", self._log_out)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        context: ssl.SSLContext | None = None
        if self.https:
            assert self.server.identity is not None
            context = server_context(self.server.identity)
        site = web.TCPSite(
            runner,
            self.options.host or None,
            self.options.port,
            ssl_context=context,
            shutdown_timeout=SHUTDOWN_TIMEOUT,
        )
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise HttpListenError(exc.errno, exc.strerror or str(exc)) from exc
        self._runner = runner
        sockname = runner.addresses[0]
        self.address = (str(sockname[0]), int(sockname[1]))
        self.metrics.start()
        if not self.tokens_required:
            log.info("dashboard on %s (loopback: no token needed)", self.url)
        elif self.https or is_loopback(self.options.host):
            log.info("dashboard on %s (admin token required)", self.url)
        else:
            log.warning(
                "dashboard on %s without TLS (--insecure): admin tokens cross the network in clear",
                self.url,
            )
        return self.address

    async def stop(self) -> None:
        await self.metrics.stop()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    # who may look ------------------------------------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        try:
            response = await self._refusal(request)
            if response is None:
                response = await handler(request)
        except web.HTTPException as exc:  # 404, 405, 413...
            self._harden(exc)
            raise
        self._harden(response)
        return response

    @staticmethod
    def _harden(response: web.StreamResponse) -> None:
        headers = response.headers
        headers.setdefault("Cache-Control", "no-store")
        headers.setdefault("X-Content-Type-Options", "nosniff")
        headers.setdefault("Referrer-Policy", "no-referrer")
        headers.setdefault("X-Frame-Options", "DENY")
        headers.setdefault("Content-Security-Policy", "default-src 'none'")

    async def _refusal(self, request: web.Request) -> web.StreamResponse | None:
        """None if ``request`` may go on; else the answer that refuses it."""
        peer = address_key(request.remote or "?")
        if not self.tokens_required:
            name = urllib.parse.urlsplit("//" + request.host).hostname
            if not is_loopback(name):
                return _text(
                    421,
                    "this dashboard answers only to a loopback host name "
                    "(http://127.0.0.1:PORT/ or http://localhost:PORT/)",
                )
        header = request.headers.get("Authorization")
        if header is not None:
            scheme, _, credentials = header.partition(" ")
            if scheme.lower() != "bearer":
                return _unauthorized("use 'Authorization: Bearer NAME.SECRET'")
            return self._check_token(credentials.strip(), peer)
        if request.path == "/login":
            return None
        if not self.tokens_required or self._session(request) is not None:
            return None
        if request.method in ("GET", "HEAD") and request.path == "/":
            return _see_other("login")
        return _unauthorized("an admin token is required: 'Authorization: Bearer NAME.SECRET'")

    def _check_token(self, token: str, peer: str) -> web.StreamResponse | None:
        """None for a valid admin token; else 401 (unknown, revoked, wrong or malformed),
        403 (not an admin's) or 429 (this address failed too often lately)."""
        record = self._verify(token, peer)
        if isinstance(record, web.StreamResponse):
            return record
        if record.role != "admin":
            self.server.refused(
                peer,
                "http_forbidden",
                "HTTP request from %s with %s token %r: only admin tokens may see the dashboard",
                peer,
                record.role,
                record.name,
            )
            return _text(
                403, f"a {record.role} token may not see the dashboard: use an admin token"
            )
        return None

    def _verify(self, token: str, peer: str) -> TokenRecord | web.StreamResponse:
        now = time.monotonic()
        admission = self.server.admission
        wait = admission.penalty(peer, now)
        if wait > 0:
            response = _text(429, "too many failed logins from your address: slow down")
            response.headers["Retry-After"] = str(max(1, round(wait + 0.5)))
            return response
        record: TokenRecord | None = None
        try:
            name, secret = parse_token(token)
        except UsageError:
            name, secret = "", b""
        else:
            record = self.server.tokens.get(name)
            if record is None:  # a token added a moment ago works at once
                self.server._check_tokens()
                record = self.server.tokens.get(name)
        expected = _DUMMY_KEY if record is None else record.stored_key
        given = stored_key(client_key(name, secret)) if secret else bytes(32)
        if record is None or not hmac.compare_digest(given, expected):
            admission.failed(peer, now)
            self.server.refused(
                peer,
                "http_auth_failed",
                "HTTP request from %s: unknown, revoked or wrong token %r",
                peer,
                peer_text(name or "?", 60),
            )
            return _unauthorized("unknown, revoked or wrong token")
        admission.succeeded(peer)
        return record

    def _session(self, request: web.Request) -> _Session | None:
        key = request.cookies.get(self.cookie)
        if key is None:
            return None
        session = self._sessions.get(key)
        if session is None:
            return None
        record = self.server.tokens.get(session.name)  # revoked or replaced: the session ends
        if (
            session.expires < time.monotonic()
            or record is None
            or record.role != "admin"
            or not hmac.compare_digest(record.stored_key, session.stored_key)
        ):
            del self._sessions[key]
            return None
        return session

    def _same_origin(self, request: web.Request) -> bool:
        """A form posted from this origin (or by a client that sends no Origin)."""
        origin = request.headers.get("Origin")
        if origin is None or origin == "null":
            return origin is None
        return urllib.parse.urlsplit(origin).netloc == request.host

    # pages -------------------------------------------------------------------------------------

    async def _dashboard(self, request: web.Request) -> web.StreamResponse:
        response = web.Response(text=self._index, content_type="text/html", charset="utf-8")
        response.headers["Content-Security-Policy"] = self._index_csp
        return response

    def _login_page(self, status: int, error: str = "") -> web.Response:
        html = self._login.replace(
            "<!--error-->", f'<p class="error" role="alert">{error}</p>' if error else ""
        )
        response = web.Response(status=status, text=html, content_type="text/html", charset="utf-8")
        response.headers["Content-Security-Policy"] = self._login_csp
        return response

    async def _login_form(self, request: web.Request) -> web.StreamResponse:
        if not self.tokens_required or self._session(request) is not None:
            return _see_other("./")
        return self._login_page(200)

    async def _log_in(self, request: web.Request) -> web.StreamResponse:
        if not self._same_origin(request):
            return _text(403, "a login form from another site")
        form = await request.post()
        token = form.get("token")
        peer = address_key(request.remote or "?")
        record = self._verify(token if isinstance(token, str) else "", peer)
        if isinstance(record, web.StreamResponse):
            if record.status == 429:
                return self._login_page(429, "Too many failed attempts: wait a few seconds.")
            return self._login_page(401, "Unknown, revoked or wrong token.")
        if record.role != "admin":
            return self._login_page(403, f"A {record.role} token cannot see the dashboard.")
        key = secrets.token_urlsafe(32)
        self._sessions[key] = _Session(
            record.name, record.stored_key, time.monotonic() + SESSION_SECONDS
        )
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        log.info("dashboard login by %r from %s", record.name, peer)
        response = _see_other("./")
        response.set_cookie(
            self.cookie,
            key,
            max_age=int(SESSION_SECONDS),
            path="/",
            httponly=True,
            samesite="Strict",
            secure=self.https,
        )
        return response

    async def _log_out(self, request: web.Request) -> web.StreamResponse:
        if not self._same_origin(request):
            return _text(403, "a logout form from another site")
        key = request.cookies.get(self.cookie)
        if key is not None:
            self._sessions.pop(key, None)
        response = _see_other("login" if self.tokens_required else "./")
        response.del_cookie(self.cookie, path="/")
        return response

    async def _state(self, request: web.Request) -> web.StreamResponse:
        state = self.metrics.state()
        state["auth"] = {"tokens_required": self.tokens_required}
        return web.Response(
            text=json.dumps(state, default=str, separators=(",", ":")),
            content_type="application/json",
        )

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        body = encoder(self.metrics.registry)
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response


def _text(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text + "\n")


def _unauthorized(text: str) -> web.Response:
    response = _text(401, text)
    response.headers["WWW-Authenticate"] = 'Bearer realm="dcproto"'
    return response


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})
