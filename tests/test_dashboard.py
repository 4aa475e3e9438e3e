"""The server's HTTP surface (``--http-port``): Prometheus ``/metrics``, ``/api/state``, the
dashboard page in a real headless Chromium, and who may see them.

Real server and worker processes (tests/conftest.py). The auth rule under test: a loopback
bind serves anyone who reaches it (with a loopback Host header), a non-loopback bind (HTTPS
with the server's certificate) only admin tokens, as bearer tokens or through the login form;
a token that is presented is always checked.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from conftest import ServerProcess, wait_for
from prometheus_client.parser import text_string_to_metric_families

from dcproto import Distribute
from dcproto.server.http_options import HttpOptions, is_loopback
from dcproto.trust.tokens import TokenStore, new_token
from dcproto.users import User

pytestmark = pytest.mark.timeout(120)

RESULT_TIMEOUT = 30.0
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM = next(
    (
        path
        for name in ("chromium", "chromium-browser", "google-chrome")
        if (path := shutil.which(name))
    ),
    None,
)
METRICS = {  # every family /metrics shows, with its type
    "dcproto_tasks_done": "counter",
    "dcproto_tasks_failed": "counter",
    "dcproto_tasks_reissued": "counter",
    "dcproto_tasks_recalled": "counter",
    "dcproto_projects_finished": "counter",
    "dcproto_connections_refused": "counter",
    "dcproto_forged_results_dropped": "counter",
    "dcproto_queue_depth": "gauge",
    "dcproto_tasks_in_flight": "gauge",
    "dcproto_workers_connected": "gauge",
    "dcproto_workers_paused": "gauge",
    "dcproto_worker_slots": "gauge",
    "dcproto_worker_slots_busy": "gauge",
    "dcproto_creators_connected": "gauge",
    "dcproto_projects_running": "gauge",
    "dcproto_task_queue_wait_seconds": "histogram",
    "dcproto_task_round_trip_seconds": "histogram",
    "dcproto_task_service_seconds": "histogram",
    "dcproto_store_commit_seconds": "histogram",
    "process_resident_memory_bytes": "gauge",
}


# ---- helpers ------------------------------------------------------------------------------------


def dashboard_url(server: ServerProcess) -> str:
    """The URL on the server's ``dashboard:`` banner line."""
    line = wait_for(
        lambda: next((ln for ln in server.stdout_lines if ln.startswith("dashboard: ")), None),
        10,
        "the server's dashboard line",
    )
    return str(line.split()[1])


@dataclass
class Reply:
    status: int
    headers: Message
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # the test sees the 303 itself


def fetch(
    url: str,
    *,
    token: str | None = None,
    headers: dict[str, str] | None = None,
    form: dict[str, str] | None = None,
    context: ssl.SSLContext | None = None,
) -> Reply:
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    data = None
    if form is not None:
        data = urllib.parse.urlencode(form).encode()
        sent["Content-Type"] = "application/x-www-form-urlencoded"
    request = urllib.request.Request(url, data=data, headers=sent)
    opener = urllib.request.build_opener(
        _NoRedirects(), urllib.request.HTTPSHandler(context=context)
    )
    try:
        with opener.open(request, timeout=10) as response:
            return Reply(response.status, response.headers, response.read())
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, exc.headers, exc.read())


def raw_get(host: str, port: int, path: str, host_header: str) -> int:
    """The status of a GET sent with a Host header of our choosing (DNS rebinding)."""
    connection = http.client.HTTPConnection(host, port, timeout=10)
    try:
        connection.putrequest("GET", path, skip_host=True)
        connection.putheader("Host", host_header)
        connection.endheaders()
        return connection.getresponse().status
    finally:
        connection.close()


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def metrics(url: str, **kwargs: Any) -> Samples:
    """``/metrics`` parsed: (sample name, labels) -> value."""
    reply = fetch(url + "metrics", **kwargs)
    assert reply.status == 200, reply.text
    assert reply.headers["Content-Type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(reply.text)
        for sample in family.samples
    }


def value(samples: Samples, metric: str, /, **labels: str) -> float:
    return samples.get((metric, frozenset(labels.items())), 0.0)


def metrics_when(
    url: str, check: Callable[[Samples], bool], what: str, timeout: float = 10.0
) -> Samples:
    """``/metrics`` parsed, once ``check`` holds for it (the test fails after ``timeout``)."""
    seen: list[Samples] = []

    def ready() -> bool:
        seen.append(metrics(url))
        return check(seen[-1])

    wait_for(ready, timeout, what)
    return seen[-1]


def state(url: str, **kwargs: Any) -> Any:
    reply = fetch(url + "api/state", **kwargs)
    assert reply.status == 200, reply.text
    assert reply.headers["Content-Type"].startswith("application/json")
    return reply.json()


def https_context(server: ServerProcess) -> ssl.SSLContext:
    """Trusts the server's own (self-signed) certificate; its names are not 127.0.0.1."""
    context = ssl.create_default_context(cafile=str(server.state_dir / "tls" / "cert.pem"))
    context.check_hostname = False
    return context


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def server(make_server: Callable[..., ServerProcess]) -> ServerProcess:
    """The ``server`` of conftest (and so of ``user`` and ``start_worker``), with a dashboard
    on a free loopback port."""
    return make_server(extra=["--http-port", "0"])


# ---- the options --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("192.168.1.5", False),
        ("myhost.example.org", False),
        ("localhost.evil.example", False),
        (None, False),
    ],
)
def test_which_hosts_are_loopback(host: str | None, loopback: bool) -> None:
    assert is_loopback(host) is loopback
    if host is not None:
        assert HttpOptions(host=host).tokens_required is not loopback
        assert HttpOptions(host=host, require_token=True).tokens_required


# ---- what it shows ------------------------------------------------------------------------------


def test_metrics_and_state_follow_a_project(
    server: ServerProcess, start_worker: Any, user: User
) -> None:
    url = dashboard_url(server)
    assert url.startswith("http://127.0.0.1:")
    start_worker()
    start_worker()
    before = metrics_when(
        url, lambda m: value(m, "dcproto_workers_connected") == 2, "two workers in /metrics"
    )
    families = {
        family.name: family.type
        for family in text_string_to_metric_families(fetch(url + "metrics").text)
    }
    for name, kind in METRICS.items():
        assert families.get(name) == kind, f"{name} ({kind}) missing from /metrics"
    assert value(before, "dcproto_worker_slots") == 4
    assert value(before, "dcproto_tasks_done_total") == 0
    assert value(before, "dcproto_task_round_trip_seconds_count") == 0

    @Distribute(user_name="home", iterator=range(60), task_size=3)
    class Squares:
        @staticmethod
        def parallel_func(x):
            return x * x

    project = Squares()
    assert project.get_results(timeout=RESULT_TIMEOUT) == {x: x * x for x in range(60)}

    after = metrics_when(
        url,
        lambda m: value(m, "dcproto_projects_finished_total", status="done") == 1,
        "the finished project in /metrics",
    )
    assert value(after, "dcproto_tasks_done_total") == 20
    assert value(after, "dcproto_task_round_trip_seconds_count") == 20
    assert value(after, "dcproto_task_queue_wait_seconds_count") == 20  # each first attempt
    assert 0 < value(after, "dcproto_task_service_seconds_count") <= 20
    assert value(after, "dcproto_store_commit_seconds_count") > 0
    assert value(after, "dcproto_projects_running") == 0
    assert value(after, "dcproto_tasks_failed_total", outcome="crash") == 0

    seen = state(url)
    assert seen["totals"]["tasks_done"] == 20
    assert seen["totals"]["workers"] == 2
    assert seen["totals"]["slots"] == 4
    assert seen["projects"] == []
    [finished] = seen["finished"]
    assert finished["project_id"] == project.project_id
    assert finished["name"].endswith("Squares")
    assert finished["owner"] == "creator"
    assert finished["status"] == "done"
    assert (finished["tasks_done"], finished["total_tasks"], finished["items_done"]) == (20, 20, 60)
    assert sorted(w["name"] for w in seen["workers"]) == ["worker-1", "worker-2"]
    assert sum(w["done"] for w in seen["workers"]) == 20
    for worker in seen["workers"]:
        assert worker["identity"] == "volunteer"  # the admin's view
        assert worker["slots"] == 2
        assert worker["state"] in ("idle", "busy")
    throughput = seen["throughput"]
    assert throughput["interval"] == 1.0
    assert len(throughput["time"]) == len(throughput["tasks_per_second"]) > 0
    assert len(throughput["tasks_done"]) == len(throughput["slots"]) == len(throughput["time"])
    # every task done shows up in the per-second series (give the sampler its next beat)
    wait_for(
        lambda: sum(state(url)["throughput"]["tasks_done"]) == 20,
        10,
        "the throughput series to count the project's 20 tasks",
    )


def test_queue_depth_and_progress_while_tasks_wait(
    server: ServerProcess, start_worker: Any, user: User
) -> None:
    url = dashboard_url(server)

    @Distribute(user_name="home", iterator=range(20), task_size=1)
    class Waiting:
        @staticmethod
        def parallel_func(x):
            return -x

    project = Waiting()  # no worker yet: its tasks wait on the server
    labels = {"project": project.project_id, "name": project.name}
    queued = metrics_when(
        url,
        lambda m: value(m, "dcproto_queue_depth", **labels) == 20,
        "20 queued tasks in dcproto_queue_depth",
        RESULT_TIMEOUT,
    )
    assert value(queued, "dcproto_projects_running") == 1
    assert value(queued, "dcproto_tasks_in_flight", **labels) == 0
    [row] = state(url)["projects"]
    assert row["project_id"] == project.project_id
    assert (row["tasks_done"], row["queued"], row["in_flight"]) == (0, 20, 0)
    assert row["total_tasks"] == 20 and row["eta"] is None

    start_worker()
    assert project.get_results(timeout=RESULT_TIMEOUT) == {x: -x for x in range(20)}
    done = metrics_when(
        url, lambda m: value(m, "dcproto_projects_running") == 0, "the project to end in /metrics"
    )
    assert ("dcproto_queue_depth", frozenset(labels.items())) not in done  # gone with it
    assert value(done, "dcproto_task_queue_wait_seconds_count") == 20
    assert state(url)["finished"][0]["status"] == "done"


def test_the_page_is_self_contained(server: ServerProcess) -> None:
    url = dashboard_url(server)
    page = fetch(url)
    assert page.status == 200
    assert page.headers["Content-Type"].startswith("text/html")
    html = page.text
    assert "<canvas" in html and 'fetch("api/state"' in html
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html), "nothing from elsewhere"
    policy = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert "'unsafe-inline'" not in policy  # the inline script and style are allowed by hash
    assert page.headers["X-Frame-Options"] == "DENY"
    assert fetch(url + "nothing-here").status == 404


# ---- who may look -------------------------------------------------------------------------------


def test_loopback_needs_no_token_but_checks_one_given(server: ServerProcess) -> None:
    url = dashboard_url(server)
    port = int(url.rsplit(":", 1)[1].strip("/"))
    for path in ("", "api/state", "metrics"):
        assert fetch(url + path).status == 200
        assert fetch(url + path, token=server.token).status == 200
    assert state(url)["auth"] == {"tokens_required": False}
    # a presented token is checked all the same
    wrong = fetch(url + "metrics", token=new_token("admin"))
    assert wrong.status == 401
    assert wrong.headers["WWW-Authenticate"].startswith("Bearer")
    assert fetch(url + "metrics", token="not a token").status == 401
    assert fetch(url + "api/state", headers={"Authorization": "Basic YWRtaW46eA=="}).status == 401
    assert fetch(url + "api/state", token=server.add_token("creator", "creator")).status == 403
    assert fetch(url + "metrics", token=server.add_token("volunteer", "worker")).status == 403
    # another site's name for 127.0.0.1 (DNS rebinding) is refused
    assert raw_get("127.0.0.1", port, "/api/state", f"127.0.0.1:{port}") == 200
    assert raw_get("127.0.0.1", port, "/api/state", f"localhost:{port}") == 200
    assert raw_get("127.0.0.1", port, "/api/state", f"evil.example:{port}") == 421
    assert raw_get("127.0.0.1", port, "/metrics", "evil.example") == 421
    # there is nothing to log in to
    assert fetch(url + "login").status == 303


def test_a_non_loopback_bind_needs_an_admin_token(
    make_server: Callable[..., ServerProcess],
) -> None:
    server = make_server(extra=["--http-port", "0", "--http-host", "0.0.0.0"])
    banner = dashboard_url(server)
    assert banner.startswith("https://0.0.0.0:")  # TLS, with the server's certificate
    url = "https://127.0.0.1:" + banner.rsplit(":", 1)[1]
    tls = https_context(server)

    # no token: nothing but the login form
    for path in ("api/state", "metrics"):
        refused = fetch(url + path, context=tls)
        assert refused.status == 401, path
        assert "admin token" in refused.text
    page = fetch(url, context=tls)
    assert (page.status, page.headers["Location"]) == (303, "login")
    form = fetch(url + "login", context=tls)
    assert form.status == 200 and 'name="token"' in form.text

    # bearer tokens: an admin's only
    assert fetch(url + "metrics", token=server.token, context=tls).status == 200
    assert state(url, token=server.token, context=tls)["auth"] == {"tokens_required": True}
    worker = server.add_token("volunteer", "worker")
    assert fetch(url + "metrics", token=worker, context=tls).status == 403
    assert fetch(url + "api/state", token=new_token("admin"), context=tls).status == 401

    # the login form: an HttpOnly, SameSite=Strict, Secure session cookie
    assert fetch(url + "login", form={"token": worker}, context=tls).status == 403
    assert fetch(url + "login", form={"token": new_token("nobody")}, context=tls).status == 401
    foreign = fetch(
        url + "login",
        form={"token": server.token},
        headers={"Origin": "https://evil.example"},
        context=tls,
    )
    assert foreign.status == 403
    ops = server.add_token("ops", "admin")
    login = fetch(url + "login", form={"token": ops}, context=tls)
    assert (login.status, login.headers["Location"]) == (303, "./")
    cookie = login.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" in cookie
    session = {"Cookie": cookie.split(";", 1)[0]}
    assert fetch(url, headers=session, context=tls).status == 200
    assert fetch(url + "metrics", headers=session, context=tls).status == 200
    assert (
        fetch(url + "api/state", headers={"Cookie": "dcproto_session_1=forged"}, context=tls).status
        == 401
    )

    # revoking the token ends its session (the server looks at the tokens file twice a second)
    TokenStore(server.state_dir).revoke("ops")
    wait_for(
        lambda: fetch(url + "api/state", headers=session, context=tls).status == 401,
        10,
        "the revoked token's session to end",
    )
    assert fetch(url + "metrics", token=ops, context=tls).status == 401

    # logging out ends a session too
    login = fetch(url + "login", form={"token": server.token}, context=tls)
    session = {"Cookie": login.headers["Set-Cookie"].split(";", 1)[0]}
    assert fetch(url + "api/state", headers=session, context=tls).status == 200
    logout = fetch(url + "logout", form={}, headers=session, context=tls)
    assert (logout.status, logout.headers["Location"]) == (303, "login")
    assert fetch(url + "api/state", headers=session, context=tls).status == 401


def test_require_token_on_loopback(make_server: Callable[..., ServerProcess]) -> None:
    server = make_server(extra=["--http-port", "0", "--http-require-token"])
    url = dashboard_url(server)
    assert url.startswith("http://127.0.0.1:")  # loopback stays plain HTTP
    assert "admin token required" in next(
        ln for ln in server.stdout_lines if ln.startswith("dashboard: ")
    )
    assert fetch(url + "metrics").status == 401
    assert fetch(url).status == 303
    assert fetch(url + "metrics", token=server.token).status == 200


def test_failed_tokens_slow_the_address_down(server: ServerProcess) -> None:
    url = dashboard_url(server)
    statuses = []
    for _ in range(10):
        reply = fetch(url + "metrics", token=new_token("admin"))
        statuses.append(reply.status)
        if reply.status == 429:
            assert int(reply.headers["Retry-After"]) >= 1
            break
    assert statuses[:5] == [401] * 5 and statuses[-1] == 429, statuses
    # while it lasts, even the right token waits; then it works again
    wait_for(
        lambda: fetch(url + "metrics", token=server.token).status == 200,
        30,
        "the slow-down to pass",
        interval=0.5,
    )
    refused = metrics(url, token=server.token)
    assert value(refused, "dcproto_connections_refused_total", reason="http_auth_failed") >= 5


def test_an_http_port_in_use_stops_the_start(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        state_dir = tmp_path / "state"
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "dcproto.server.main",
                "--port",
                "0",
                "--state-dir",
                str(state_dir),
                "--http-port",
                str(port),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert not state_dir.exists()  # refused before it made anything


def test_sigterm_with_a_dashboard_open_stops_cleanly(server: ServerProcess) -> None:
    url = dashboard_url(server)
    port = int(url.rsplit(":", 1)[1].strip("/"))
    browser = http.client.HTTPConnection("127.0.0.1", port, timeout=10)  # kept alive, idle
    browser.request("GET", "/api/state")
    assert browser.getresponse().read()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=30) == 0
    browser.close()


def test_no_http_without_http_port(make_server: Callable[..., ServerProcess]) -> None:
    server = make_server()
    assert not any(ln.startswith("dashboard: ") for ln in server.stdout_lines)


# ---- a real browser -----------------------------------------------------------------------------


class _Page(HTMLParser):
    """What a test reads in the rendered DOM: the body's data attributes, the text inside each
    element with an id, each project card's data attributes and each worker row's name."""

    VOID = frozenset(
        {
            "area",
            "base",
            "br",
            "col",
            "embed",
            "hr",
            "img",
            "input",
            "link",
            "meta",
            "source",
            "wbr",
        }
    )

    def __init__(self, html: str) -> None:
        super().__init__()
        self.body: dict[str, str | None] = {}
        self.text: dict[str, str] = {}
        self.projects: dict[str, dict[str, str | None]] = {}
        self.workers: list[str] = []
        self._stack: list[tuple[str, str | None]] = []  # open elements: (tag, id)
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "body":
            self.body = found
        if tag == "article" and found.get("data-project-id"):
            self.projects[str(found["data-project-id"])] = found
        if tag == "tr" and found.get("data-worker"):
            self.workers.append(str(found["data-worker"]))
        if tag in self.VOID:
            return
        element = found.get("id")
        if element:
            self.text.setdefault(element, "")
        self._stack.append((tag, element))

    def handle_endtag(self, tag: str) -> None:
        while self._stack:
            if self._stack.pop()[0] == tag:
                break

    def handle_data(self, data: str) -> None:
        for _, element in self._stack:
            if element:
                self.text[element] += data


def chromium(url: str, profile: Path, screenshot: Path | None = None) -> str:
    """Load ``url`` in headless Chromium, run its scripts for 3 s of virtual time, and return
    the DOM (or write a screenshot)."""
    assert CHROMIUM is not None
    command = [
        CHROMIUM,
        "--headless=new",
        "--disable-gpu",
        "--no-sandbox",  # CI runs as root
        "--no-first-run",
        "--no-default-browser-check",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=3000",
        "--window-size=1280,1180",
        f"--screenshot={screenshot}" if screenshot is not None else "--dump-dom",
        url,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=90, cwd=profile.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed (.ci/run installs it: apt-get install chromium)",
)
def test_dashboard_in_headless_chromium(
    server: ServerProcess, start_worker: Any, user: User, tmp_path: Path
) -> None:
    url = dashboard_url(server)
    for _ in range(3):
        start_worker()

    @Distribute(user_name="home", iterator=range(40), task_size=2)
    class WarmUp:
        @staticmethod
        def parallel_func(x):
            return x + 1

    WarmUp().get_results(timeout=RESULT_TIMEOUT)

    @Distribute(user_name="home", iterator=range(10**7), task_size=20)
    class PrimeSearch:  # runs until cancelled
        @staticmethod
        def parallel_func(x):
            import time

            time.sleep(0.002)
            return x

    @Distribute(user_name="home", iterator=range(30), task_size=1)
    class RenderFrames:  # its total is known at once
        @staticmethod
        def parallel_func(x):
            import time

            time.sleep(2)
            return x

    search, frames = PrimeSearch(), RenderFrames()
    try:
        wait_for(
            lambda: any(p["tasks_done"] > 0 for p in state(url)["projects"]),
            RESULT_TIMEOUT,
            "the running projects to make progress",
        )
        profile = tmp_path / "chromium"
        first = _Page(chromium(url, profile))
        assert first.body.get("data-state") == "live", first.body
        assert int(first.body.get("data-updates") or 0) >= 1
        assert first.text["kpi-workers"] == "3"
        assert first.text["server-address"] == f"127.0.0.1:{server.port}"
        assert sorted(first.workers) == ["worker-1", "worker-2", "worker-3"]
        assert set(first.projects) == {search.project_id, frames.project_id}
        assert first.projects[frames.project_id]["data-total-tasks"] == "30"
        assert "WarmUp" in first.text["finished"]
        done = int(first.projects[search.project_id]["data-tasks-done"] or 0)

        wait_for(
            lambda: (
                next(
                    p["tasks_done"]
                    for p in state(url)["projects"]
                    if p["project_id"] == search.project_id
                )
                > done
            ),
            RESULT_TIMEOUT,
            "more tasks done",
        )
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "dashboard.png"
        shot.unlink(missing_ok=True)
        chromium(url, profile, screenshot=shot)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert shot.stat().st_size > 20_000  # a rendered page, not a blank one

        second = _Page(chromium(url, profile))
        assert int(second.projects[search.project_id]["data-tasks-done"] or 0) > done
        assert second.text["kpi-workers"] == "3"
    finally:
        search.cancel()
        frames.cancel()
