"""``dcproto``: manage named servers ("users"); ``dcproto server`` / ``dcproto worker`` alias
the dedicated commands."""

from __future__ import annotations

import argparse
import sys

from . import users
from .errors import DcprotoError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dcproto", description="dcproto command line")
    sub = parser.add_subparsers(dest="command", required=True)
    users_parser = sub.add_parser("users", help="named servers: alias -> address and secret")
    users_sub = users_parser.add_subparsers(dest="action", required=True)
    add = users_sub.add_parser("add", help="add or replace a named server")
    add.add_argument("name")
    add.add_argument("address", help="HOST[:PORT]")
    add.add_argument("--secret", default=None, help="the server's secret")
    users_sub.add_parser("list", help="list named servers")
    remove = users_sub.add_parser("remove", help="forget a named server")
    remove.add_argument("name")
    sub.add_parser("server", help="same as dcproto-server", add_help=False)
    sub.add_parser("worker", help="same as dcproto-worker", add_help=False)
    return parser


def users_command(args: argparse.Namespace) -> int:
    if args.action == "add":
        host, port = users.parse_address(args.address)
        users.add_user(users.User(name=args.name, host=host, port=port, secret=args.secret))
        print(f"added {args.name} -> {host}:{port} ({users.config_path()})")
    elif args.action == "list":
        known = users.load_users()
        if not known:
            print("no users; add one with: dcproto users add NAME HOST[:PORT] --secret ...")
        for user in known.values():
            secret = "secret set" if user.secret else "no secret"
            print(f"{user.name}\t{user.address}\t{secret}")
    else:
        users.remove_user(args.name)
        print(f"removed {args.name}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "server":
        from .server import main as server_main

        return server_main(argv[1:])
    if argv and argv[0] == "worker":
        from .worker import main as worker_main

        return worker_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return users_command(args)
    except DcprotoError as exc:
        print(f"dcproto: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
