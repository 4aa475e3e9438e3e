"""The interactive worker menu (``dcproto-worker`` with no arguments), as the original app had:
choose or create a user, then ``help``, ``user``, ``token``, ``task``, ``exit``. While
``task`` runs the worker (in this process), ``pause`` and ``resume`` typed then reach it at once;
any other line waits for the next prompt.

Wherever the menu asks for a token it also takes the whole join line a server's admin hands
out (``dcproto users add NAME HOST:PORT --token ... --fingerprint ...``). A user kept without a
token (or whose entry cannot be read any more) is asked for one when chosen."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shlex
import sys
from collections import deque
from collections.abc import Callable

from .. import users
from ..errors import DcprotoError, UsageError
from ..trust.tls import normalize_fingerprint
from ..trust.tokens import parse_token
from .worker import VOLUNTEER, Worker, WorkerConfig, run_worker

HELP = """commands:
  help   show this help
  user   switch to another user (named server) or create one
  token  enter a new token, or the whole join line, for the current user
  task   run a number of tasks for the current user, then come back here
  exit   leave
while tasks run:
  pause  stop the running tasks where they are and take no new ones
  resume go on (the worker process also takes SIGUSR1 = pause, SIGUSR2 = resume)"""
LIVE_COMMANDS = ("pause", "resume")

TOKEN_PROMPT = "token (NAME.SECRET), or the whole join line (dcproto users add ...): "
_JOIN = ["dcproto", "users", "add"]


@dataclasses.dataclass
class JoinLine:
    """What a join line says: ``dcproto users add NAME HOST[:PORT] --token T [...]``."""

    host: str
    port: int
    token: str | None
    fingerprint: str | None
    insecure: bool


def parse_join_line(text: str) -> JoinLine | None:
    """The join line in ``text``; None if ``text`` is not one. UsageError if it is a broken
    one (the message never repeats the token)."""
    try:
        words = shlex.split(text)
    except ValueError:
        return None
    if words[:3] != _JOIN:
        return None
    words = words[3:]
    options: dict[str, str] = {}
    insecure = False
    positional: list[str] = []
    while words:
        word = words.pop(0)
        key, eq, value = word.partition("=")
        if key in ("--token", "--fingerprint"):
            if not eq:
                if not words:
                    raise UsageError(f"the join line has no value after {key}")
                value = words.pop(0)
            options[key] = value
        elif word == "--insecure":
            insecure = True
        elif word.startswith("--"):
            raise UsageError(f"the join line has an option the menu does not know: {key}")
        else:
            positional.append(word)
    if len(positional) != 2:
        raise UsageError("a join line reads: dcproto users add NAME HOST[:PORT] --token ...")
    host, port = users.parse_address(positional[1])
    token = options.get("--token")
    if token is not None:
        parse_token(token)
    fingerprint = options.get("--fingerprint")
    if fingerprint is not None:
        fingerprint = normalize_fingerprint(fingerprint)
    return JoinLine(host, port, token, fingerprint, insecure)


def _ask(prompt: str, read: Callable[[str], str]) -> str:
    try:
        return read(prompt).strip()
    except EOFError:
        raise SystemExit(0) from None


class Console:
    """The menu's standard input, readable while a worker runs in the same event loop.

    On a terminal, prompts use ``input()`` (line editing), and a running worker's loop reads
    the lines typed meanwhile (a terminal hands out one line at a time, so nothing is read
    ahead). Otherwise (a pipe, a script) every line goes through this object's own buffer, so
    lines read ahead are never lost between the two. Never a thread blocked on stdin: one
    would crash the interpreter at exit."""

    def __init__(self, fd: int = 0) -> None:
        self.fd = fd
        try:
            self.tty = os.isatty(fd)
        except OSError:
            self.tty = False
        self._buffer = b""
        self._pending: deque[str] = deque()  # complete lines, oldest first
        self._eof = False
        self._listening: asyncio.AbstractEventLoop | None = None

    def read(self, prompt: str) -> str:
        """One line, as ``input(prompt)`` reads it; EOFError at the end."""
        if self._pending:  # typed while the worker ran
            line = self._pending.popleft()
            print(f"{prompt}{line}" if self.tty else prompt, end="\n" if self.tty else "")
            return line
        if self.tty:
            return input(prompt)
        print(prompt, end="", flush=True)
        while not self._eof and not self._pending:
            self._take(os.read(self.fd, 65536))
            self._pending.extend(self._split())
        if self._pending:
            return self._pending.popleft()
        if self._buffer:  # a last line without its newline
            rest, self._buffer = self._buffer, b""
            return rest.decode(errors="replace")
        raise EOFError

    def _take(self, data: bytes) -> None:
        if data:
            self._buffer += data
        else:
            self._eof = True

    def _split(self) -> list[str]:
        """The complete lines in the buffer, taken out of it."""
        *lines, self._buffer = self._buffer.split(b"\n")
        return [line.decode(errors="replace").rstrip("\r") for line in lines]

    def listen(self, loop: asyncio.AbstractEventLoop, command: Callable[[str], bool]) -> None:
        """Until :meth:`stop_listening`, give each line to ``command`` as it comes; the lines
        it does not take (False) wait for the next :meth:`read`."""

        def offer(lines: list[str]) -> None:
            self._pending.extend(line for line in lines if not command(line))

        def readable() -> None:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            self._take(data)
            if self._eof:
                loop.remove_reader(self.fd)
            offer(self._split())

        # lines read ahead (a script's) are for this worker too
        ahead, self._pending = [*self._pending, *self._split()], deque()
        offer(ahead)
        if self._eof:
            return
        try:
            loop.add_reader(self.fd, readable)
        except (NotImplementedError, OSError, ValueError):  # e.g. a regular file, or Windows
            return
        self._listening = loop

    def stop_listening(self) -> None:
        if self._listening is not None:
            with contextlib.suppress(Exception):
                self._listening.remove_reader(self.fd)
            self._listening = None


def live_command(worker: Worker, line: str) -> bool:
    """A line typed while ``worker`` runs: True if it was for the worker."""
    command = line.strip().lower()
    if command not in LIVE_COMMANDS:
        if command:
            print(f"({command!r} waits until the tasks are done; now: pause, resume, Ctrl-C)")
        return False
    if command == "pause":
        worker.pause(VOLUNTEER)
        print(f"paused ({worker.paused_by}); type 'resume' to go on", flush=True)
    else:
        worker.resume(VOLUNTEER)
        still = f"still paused ({worker.paused_by})" if worker.paused else "running"
        print(f"resumed; {still}", flush=True)
    return True


async def _run_with_console(config: WorkerConfig, alias: str, console: Console | None) -> int:
    loop = asyncio.get_running_loop()

    def started(worker: Worker) -> None:
        if console is not None:
            console.listen(loop, lambda line: live_command(worker, line))

    try:
        return await run_worker(config, alias, started=started)
    finally:
        if console is not None:
            console.stop_listening()


def _save(user: users.User) -> users.User | None:
    try:
        users.add_user(user)
    except DcprotoError as exc:
        print(f"error: {exc}")
        return None
    print(f"saved {user.name} -> {user.address}")
    return user


def enter_token(user: users.User, read: Callable[[str], str] = input) -> users.User | None:
    """Ask for a new token (or join line) for ``user`` and save it; None if none was given."""
    text = _ask(TOKEN_PROMPT, read)
    if not text:
        print(f"no token entered; {user.name} is unchanged (type 'token' to enter one)")
        return None
    try:
        join = parse_join_line(text)
        if join is None:
            parse_token(text)
            user = dataclasses.replace(user, token=text)
        else:
            user = dataclasses.replace(
                user,
                host=join.host,
                port=join.port,
                token=join.token or user.token,
                fingerprint=join.fingerprint,
                insecure=join.insecure,
            )
    except DcprotoError as exc:
        print(f"error: {exc}")
        return None
    if not user.token:
        print("that join line holds no token: paste the token itself")
        return None
    return _save(user)


def _new_user(name: str, read: Callable[[str], str]) -> users.User | None:
    text = _ask(f"address of {name} (HOST[:PORT]), or the whole join line: ", read)
    needed = f"a token is needed to run tasks; {name} was not saved"
    try:
        join = parse_join_line(text)
        if join is None:
            host, port = users.parse_address(text)
            token = _ask(TOKEN_PROMPT, read)
            join = parse_join_line(token) if token else None
            if join is None:
                if not token:
                    print(needed)
                    return None
                parse_token(token)
                fingerprint = _ask(
                    "certificate fingerprint (sha256:..., empty to verify by CA): ", read
                )
                pin = normalize_fingerprint(fingerprint) if fingerprint else None
                join = JoinLine(host, port, token, pin, False)
        if not join.token:
            token = _ask("that join line holds no token; token (NAME.SECRET): ", read)
            if not token:
                print(needed)
                return None
            parse_token(token)
            join.token = token
        user = users.User(
            name=name,
            host=join.host,
            port=join.port,
            token=join.token,
            fingerprint=join.fingerprint,
            insecure=join.insecure,
        )
    except DcprotoError as exc:
        print(f"error: {exc}")
        return None
    return _save(user)


def choose_user(read: Callable[[str], str] = input) -> users.User:
    while True:
        try:
            known = users.load_users()
        except DcprotoError as exc:
            # e.g. an entry from before tokens: typing its name enters it again
            print(f"error: {exc}")
            print("type the name of the entry named there to enter it again")
            known = {}
        if known:
            print(
                "users: "
                + ", ".join(f"{n} (no token)" if not u.token else n for n, u in known.items())
            )
        name = _ask("user name (new or existing): ", read)
        if not name:
            continue
        if name in known:
            user = known[name]
            if user.token:
                return user
            print(f"user {name} has no token; enter the one its server's admin gave you")
            return enter_token(user, read) or user  # without one, 'task' asks again
        created = _new_user(name, read)
        if created is not None:
            return created


def run_menu(read: Callable[[str], str] | None = None) -> int:
    """The menu on ``read`` (default: standard input, which then also takes ``pause`` and
    ``resume`` while tasks run)."""
    console = Console() if read is None else None
    read = console.read if console is not None else read
    assert read is not None
    print("dcproto worker. Type 'help' for the commands.")
    user = choose_user(read)
    while True:
        command = _ask(f"[{user.name}] > ", read).lower()
        if command == "help":
            print(HELP)
        elif command == "user":
            user = choose_user(read)
        elif command == "token":
            user = enter_token(user, read) or user
        elif command == "task":
            text = _ask("how many tasks? ", read)
            if not text.isdigit() or int(text) < 1:
                print("a positive whole number, please")
                continue
            try:
                user = users.load_users().get(user.name, user)
            except DcprotoError as exc:
                print(f"error: {exc}")
            if not user.token:
                print(f"user {user.name} has no token; enter the one its server's admin gave you")
                user = enter_token(user, read) or user
            try:
                endpoint = user.endpoint()
            except DcprotoError as exc:
                print(f"error: {exc}; or type 'token' here to enter it")
                continue
            config = WorkerConfig(
                endpoint=endpoint,
                device_id=user.device_id,
                max_tasks=int(text),
                reconnect=False,
            )
            try:
                code = asyncio.run(_run_with_console(config, user.name, console))
            except DcprotoError as exc:
                print(f"error: {exc}")
                continue
            except KeyboardInterrupt:
                print("interrupted")
                continue
            if code == 3:  # the token was refused; the reason is on stderr
                print("the server refused the token; type 'token' to enter another one")
        elif command in LIVE_COMMANDS:
            print(f"no tasks are running: '{command}' works while 'task' runs")
        elif command in ("exit", "quit"):
            return 0
        elif command:
            print(f"unknown command {command!r}; type 'help'")


if __name__ == "__main__":
    sys.exit(run_menu())
