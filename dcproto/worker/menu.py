"""The interactive worker menu (``dcproto-worker`` with no arguments), as the original app had:
choose or create a user, then ``help``, ``user``, ``task``, ``exit``."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable

from .. import users
from ..errors import DcprotoError
from .worker import WorkerConfig, run_worker

HELP = """commands:
  help   show this help
  user   switch to another user (named server) or create one
  task   run a number of tasks for the current user, then come back here
  exit   leave"""


def _ask(prompt: str, read: Callable[[str], str]) -> str:
    try:
        return read(prompt).strip()
    except EOFError:
        raise SystemExit(0) from None


def choose_user(read: Callable[[str], str] = input) -> users.User:
    while True:
        known = users.load_users()
        if known:
            print("users: " + ", ".join(known))
        name = _ask("user name (new or existing): ", read)
        if not name:
            continue
        if name in known:
            return known[name]
        address = _ask(f"address of {name} (HOST[:PORT]): ", read)
        token = _ask("token (NAME.SECRET, from the server's admin): ", read) or None
        fingerprint = _ask("certificate fingerprint (sha256:..., empty to verify by CA): ", read)
        try:
            host, port = users.parse_address(address)
            user = users.User(
                name=name, host=host, port=port, token=token, fingerprint=fingerprint or None
            )
            users.add_user(user)
        except DcprotoError as exc:
            print(f"error: {exc}")
            continue
        print(f"saved {name} -> {user.address}")
        return user


def run_menu(read: Callable[[str], str] = input) -> int:
    print("dcproto worker. Type 'help' for the commands.")
    user = choose_user(read)
    while True:
        command = _ask(f"[{user.name}] > ", read).lower()
        if command == "help":
            print(HELP)
        elif command == "user":
            user = choose_user(read)
        elif command == "task":
            text = _ask("how many tasks? ", read)
            if not text.isdigit() or int(text) < 1:
                print("a positive whole number, please")
                continue
            user = users.load_users().get(user.name, user)
            try:
                endpoint = user.endpoint()
            except DcprotoError as exc:
                print(f"error: {exc}")
                continue
            config = WorkerConfig(
                endpoint=endpoint,
                device_id=user.device_id,
                max_tasks=int(text),
                reconnect=False,
            )
            try:
                asyncio.run(run_worker(config, user.name))
            except DcprotoError as exc:
                print(f"error: {exc}")
            except KeyboardInterrupt:
                print("interrupted")
        elif command in ("exit", "quit"):
            return 0
        elif command:
            print(f"unknown command {command!r}; type 'help'")


if __name__ == "__main__":
    sys.exit(run_menu())
