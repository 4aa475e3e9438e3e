"""The command lines' rough edges, each against real processes: the worker menu with a user that
has no token, a mistyped alias or host, --help and --version, and a server that cannot bind."""

from __future__ import annotations

import importlib.metadata
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import ServerProcess, add_server_user, server_user

from dcproto import Distribute
from dcproto.errors import UnknownUserError
from dcproto.paths import default_state_dir
from dcproto.server.statedir import read_record
from dcproto.trust.tokens import new_token
from dcproto.users import User, add_user, config_path, get_user, load_users, remove_user

pytestmark = pytest.mark.timeout(90)

RESULT_TIMEOUT = 30.0
WORKER = [sys.executable, "-m", "dcproto.worker.worker"]
SERVER = [sys.executable, "-m", "dcproto.server.main"]
DCPROTO = [sys.executable, "-m", "dcproto.cli"]


def run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}  # --help on one line per option
    return subprocess.run(command, capture_output=True, text=True, timeout=60, env=env, **kwargs)


def _creator(server: ServerProcess) -> User:
    """A user "creator" for ``server``, to submit projects the menu's worker can run."""
    return add_server_user(server, "creator")


def _times_ten(n: int) -> Any:
    @Distribute(user_name="creator", iterator=range(n), task_size=1)
    class TimesTen:
        @staticmethod
        def parallel_func(x):
            return x * 10

    return TimesTen()


# ---- 1: the worker menu and a user without a token --------------------------------------------


def test_menu_asks_for_the_missing_token_and_then_runs_tasks(
    server: ServerProcess, config_dir: Path
) -> None:
    _creator(server)
    add_user(User(name="home", host="127.0.0.1", port=server.port, fingerprint=server.fingerprint))
    token = server.add_token("volunteer", "worker")
    project = _times_ten(2)

    menu = run(WORKER, input=f"home\n{token}\ntask\n2\nexit\n")

    assert menu.returncode == 0, menu.stderr
    assert "home (no token)" in menu.stdout  # listed as such
    assert "user home has no token" in menu.stdout
    assert "saved home" in menu.stdout
    assert "2 tasks done" in menu.stdout
    assert get_user("home").token == token
    assert project.get_results(timeout=RESULT_TIMEOUT) == {0: 0, 1: 10}


def test_menu_task_on_a_user_without_token_asks_for_it(
    server: ServerProcess, config_dir: Path
) -> None:
    """A user chosen without a token: `task` asks for it before it runs."""
    _creator(server)
    token = server.add_token("volunteer", "worker")
    project = _times_ten(1)
    add_user(User(name="home", host="127.0.0.1", port=server.port, fingerprint=server.fingerprint))
    # an empty answer keeps the user unchanged and chosen; `task` then asks again
    menu = run(WORKER, input=f"home\n\ntask\n1\n{token}\nexit\n")
    assert menu.returncode == 0, menu.stderr
    assert "no token entered; home is unchanged" in menu.stdout
    assert "1 tasks done" in menu.stdout
    assert get_user("home").token == token
    assert project.get_results(timeout=RESULT_TIMEOUT) == {0: 0}


def test_menu_token_command_replaces_a_refused_token(
    server: ServerProcess, config_dir: Path
) -> None:
    _creator(server)
    project = _times_ten(1)
    forged = new_token("volunteer")  # the right name, another secret
    add_user(server_user(server, "home", forged))
    token = server.add_token("volunteer", "worker")
    menu = run(WORKER, input=f"home\ntask\n1\ntoken\n{token}\ntask\n1\nexit\n")
    assert menu.returncode == 0, menu.stderr
    assert "refused token 'volunteer'" in menu.stderr
    assert "type 'token' to enter another one" in menu.stdout
    assert "1 tasks done" in menu.stdout
    assert get_user("home").token == token
    assert project.get_results(timeout=RESULT_TIMEOUT) == {0: 0}


def test_menu_takes_a_join_line_for_an_entry_from_before_tokens(
    server: ServerProcess, config_dir: Path
) -> None:
    """An entry the file can no longer load (a secret from before tokens, even an empty one)
    is entered again in the menu, with the join line; the other users are kept."""
    _creator(server)
    path = config_path()
    with path.open("a", encoding="utf-8") as fh:
        fh.write(f'\n[users.home]\nhost = "127.0.0.1"\nport = {server.port}\nsecret = ""\n')
    token = server.add_token("volunteer", "worker")
    record = read_record(server.state_dir)
    assert record is not None
    join_line = record.join_line("volunteer", token)

    menu = run(WORKER, input=f"home\n{join_line}\nexit\n")

    assert menu.returncode == 0, menu.stderr
    assert "from before tokens" in menu.stdout
    assert "saved home" in menu.stdout
    home = get_user("home")
    assert (home.host, home.port, home.token) == ("127.0.0.1", server.port, token)
    assert home.fingerprint == server.fingerprint
    assert "creator" in load_users()


def test_users_add_replaces_an_entry_from_before_tokens(
    server: ServerProcess, config_dir: Path
) -> None:
    """The error about such an entry says to add it again with its join line: that works."""
    config_dir.mkdir(parents=True, exist_ok=True)
    config_path().write_text('[users.home]\nhost = "h"\nsecret = "old"\n', encoding="utf-8")
    listed = run([*DCPROTO, "users", "list"])
    assert listed.returncode == 2
    assert "dcproto users add" in listed.stderr
    token = server.add_token("volunteer", "worker")
    address = f"127.0.0.1:{server.port}"
    added = run([*DCPROTO, "users", "add", "home", address, "--token", token])
    assert added.returncode == 0, added.stderr
    assert get_user("home").token == token


# ---- 2: a mistyped alias or a host that does not resolve --------------------------------------


def test_mistyped_alias_is_refused_with_a_suggestion(config_dir: Path) -> None:
    add_user(User(name="home", host="127.0.0.1", port=9, token="x.y"))
    add_user(User(name="lab", host="127.0.0.1", port=9, token="x.y"))
    typo = run([*WORKER, "connect", "hme"])
    assert typo.returncode == 2, typo.stderr
    assert "no user named 'hme'" in typo.stderr
    assert "did you mean 'home'?" in typo.stderr
    assert "known users: home, lab" in typo.stderr
    assert "hme:8080" in typo.stderr  # how to mean a host of that name


def test_bare_word_without_users_is_refused(config_dir: Path) -> None:
    refused = run([*WORKER, "connect", "home"])
    assert refused.returncode == 2
    assert "no users are configured" in refused.stderr
    assert "did you mean" not in refused.stderr


def _resolver_says_no_such_host(host: str) -> bool:
    try:
        socket.getaddrinfo(host, 8080, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return exc.errno != getattr(socket, "EAI_AGAIN", None)
    return False


@pytest.mark.parametrize("target", ["nosuch-host.invalid:9000", "nosuch-host.invalid"])
def test_host_that_does_not_resolve_fails_at_once(
    config_dir: Path, monkeypatch: pytest.MonkeyPatch, target: str
) -> None:
    if not _resolver_says_no_such_host("nosuch-host.invalid"):
        pytest.skip("this machine's resolver cannot say a name does not exist")
    monkeypatch.setenv("DCPROTO_TOKEN", "volunteer.x")
    failed = run([*WORKER, "connect", target])
    assert failed.returncode == 2, failed.stderr
    assert "cannot resolve host 'nosuch-host.invalid'" in failed.stderr
    assert "reconnecting" not in failed.stderr


def test_user_whose_host_does_not_resolve_fails_at_once(config_dir: Path) -> None:
    if not _resolver_says_no_such_host("nosuch-host.invalid"):
        pytest.skip("this machine's resolver cannot say a name does not exist")
    add_user(User(name="home", host="nosuch-host.invalid", port=9000, token="volunteer.x"))
    failed = run([*WORKER, "connect", "home"])
    assert failed.returncode == 2, failed.stderr
    assert "cannot resolve host 'nosuch-host.invalid' (from 'home')" in failed.stderr


def test_unknown_user_name_in_the_library_suggests_the_closest(config_dir: Path) -> None:
    add_user(User(name="home", host="127.0.0.1", port=9, token="x.y"))
    with pytest.raises(UnknownUserError, match=r"no user named 'hom'; did you mean 'home'\?"):
        get_user("hom")

    @Distribute(user_name="hmoe", iterator=range(3))
    class Tiny:
        @staticmethod
        def parallel_func(x):
            return x

    with pytest.raises(UnknownUserError, match="did you mean 'home'"):
        Tiny()


# ---- 3: --help shows the defaults; --version ----------------------------------------------------


def test_server_help_shows_the_defaults() -> None:
    shown = run([*SERVER, "--help"])
    assert shown.returncode == 0, shown.stderr
    assert "(default: 8080)" in shown.stdout
    assert "(default: 127.0.0.1)" in shown.stdout
    assert f"(default: {default_state_dir()})" in shown.stdout
    assert "(default: None)" not in shown.stdout


def test_worker_connect_help_shows_the_defaults() -> None:
    shown = run([*WORKER, "connect", "--help"])
    assert shown.returncode == 0, shown.stderr
    assert "default port: 8080" in shown.stdout
    assert str(default_state_dir()) in shown.stdout
    assert "(default: INFO)" in shown.stdout
    assert "(default: the number of CPUs" in shown.stdout


@pytest.mark.parametrize(
    ("command", "prog"),
    [
        (SERVER, "dcproto-server"),
        (WORKER, "dcproto-worker"),
        ([sys.executable, "-m", "dcproto.cli"], "dcproto"),
    ],
)
def test_version(command: list[str], prog: str) -> None:
    shown = run([*command, "--version"])
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == f"{prog} {importlib.metadata.version('dcproto')}"


# ---- 4: a server that cannot bind leaves nothing behind ---------------------------------------


def test_server_that_cannot_bind_leaves_no_state_dir(make_server: Any, tmp_path: Path) -> None:
    taken = make_server()
    state_dir = tmp_path / "fresh" / "state"
    second = run([*SERVER, "--port", str(taken.port), "--state-dir", str(state_dir)])
    assert second.returncode == 2
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1, second.stderr
    assert f"cannot listen on 127.0.0.1:{taken.port}" in lines[0]
    assert "dcproto server listening" not in second.stdout
    assert not (tmp_path / "fresh").exists()
    assert taken.alive()


def test_server_that_cannot_bind_adds_nothing_to_an_existing_dir(tmp_path: Path) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        state_dir = tmp_path / "state"
        state_dir.mkdir()
        failed = run([*SERVER, "--port", str(port), "--state-dir", str(state_dir)])
    assert failed.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in failed.stderr
    assert list(state_dir.iterdir()) == []


def test_an_unreadable_entry_is_replaced_in_place_or_removed(config_dir: Path) -> None:
    config_dir.mkdir(parents=True, exist_ok=True)
    config_path().write_text(
        '[users.a]\nhost = "h1"\n\n[users.old]\nhost = "h2"\nsecret = ""\n\n'
        '[users.b]\nhost = "h3"\n',
        encoding="utf-8",
    )
    add_user(User(name="old", host="h4", token="x.y"))
    assert list(load_users()) == ["a", "old", "b"]
    assert get_user("old").token == "x.y"
    config_path().write_text(
        '[users.a]\nhost = "h1"\n\n[users.old]\nhost = "h2"\nsecret = "s"\n', encoding="utf-8"
    )
    remove_user("old")
    assert list(load_users()) == ["a"]
