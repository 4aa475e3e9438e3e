"""``dcproto``: manage named servers ("users"); ``dcproto server`` / ``dcproto worker`` alias
the dedicated commands."""

from __future__ import annotations

import argparse
import sys
import time

from . import users
from .errors import DcprotoError, ProjectCancelled


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
    projects = sub.add_parser("projects", help="projects on a server")
    projects_sub = projects.add_subparsers(dest="action", required=True)
    listing = projects_sub.add_parser("list", help="list the server's projects")
    listing.add_argument("--user", required=True, help="the named server")
    results = projects_sub.add_parser(
        "results", help="wait for a project's results and write them to a directory"
    )
    results.add_argument("project_id")
    results.add_argument("--user", required=True, help="the named server")
    results.add_argument("--out", default=None, help="results directory (default: ./ID)")
    results.add_argument("--timeout", type=float, default=None, help="seconds to wait")
    cancel = projects_sub.add_parser("cancel", help="cancel a running project")
    cancel.add_argument("project_id")
    cancel.add_argument("--user", required=True, help="the named server")
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


def projects_command(args: argparse.Namespace) -> int:
    from .creator.client import call, get_client
    from .creator.creator import attach

    if args.action == "list":
        user = users.get_user(args.user)

        async def listing() -> list[dict[str, object]]:
            client = await get_client(user.host, user.port, user.secret or "")
            return await client.list_projects()

        rows = call(listing(), timeout=30)
        if not rows:
            print("no projects")
        for row in rows:
            submitted = time.strftime("%Y-%m-%d %H:%M", time.localtime(float(row["submitted_at"])))
            total = row.get("total_tasks")
            tasks = f"{row.get('tasks_received')}/{total if total is not None else '?'} tasks"
            print(f"{row['project_id']}  {row['status']:<9}  {submitted}  {tasks}  {row['name']}")
        return 0
    handle = attach(args.project_id, user_name=args.user, results_path=args.out or args.project_id)
    if args.action == "cancel":
        handle.cancel()
        try:
            handle.get_results(30)
        except ProjectCancelled:
            print(f"cancelled {args.project_id}")
            return 0
        print(f"{args.project_id} had already finished")
        return 1
    results = handle.get_results(args.timeout)
    print(f"{len(results)} results of {args.project_id} written to {args.out or args.project_id}/")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "server":
        from .server.server import main as server_main

        return server_main(argv[1:])
    if argv and argv[0] == "worker":
        from .worker.worker import main as worker_main

        return worker_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if args.command == "projects":
            return projects_command(args)
        return users_command(args)
    except DcprotoError as exc:
        print(f"dcproto: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
