"""``dcproto``: named servers ("users"), a server's tokens, and projects on a server;
``dcproto status`` sums a server up; ``dcproto server`` / ``dcproto worker`` alias the
dedicated commands. Listings take ``--json`` (one JSON document on stdout)."""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import users
from .connection import Endpoint
from .errors import DcprotoError
from .paths import default_state_dir
from .server.statedir import read_record
from .trust.tls import normalize_fingerprint
from .trust.tokens import ROLES, TOKEN_ENV, TokenStore, parse_token, read_token_file


def build_parser() -> argparse.ArgumentParser:
    from .server.main import version_text

    parser = argparse.ArgumentParser(prog="dcproto", description="dcproto command line")
    parser.add_argument("--version", action="version", version=version_text("dcproto"))
    sub = parser.add_subparsers(dest="command", required=True)
    users_parser = sub.add_parser("users", help="named servers: alias -> address and token")
    users_sub = users_parser.add_subparsers(dest="action", required=True)
    add = users_sub.add_parser("add", help="add or replace a named server (its join line)")
    add.add_argument("name")
    add.add_argument("address", help="HOST[:PORT]")
    add.add_argument(
        "--token",
        default=None,
        help=f"the token (or --token-file, ${TOKEN_ENV}, or asked for on a terminal)",
    )
    add.add_argument("--token-file", type=Path, default=None, help="a file holding the token")
    add.add_argument(
        "--fingerprint", default=None, help="the server certificate's sha256 fingerprint (pin)"
    )
    add.add_argument(
        "--insecure", action="store_true", help="plain TCP, for a server run with --insecure"
    )
    tokens = sub.add_parser("tokens", help="a server's tokens (run where its state dir is)")
    tokens_sub = tokens.add_subparsers(dest="action", required=True)
    token_add = tokens_sub.add_parser("add", help="make a token and print its join line")
    token_add.add_argument("name")
    token_add.add_argument("--role", required=True, choices=ROLES)
    token_list = tokens_sub.add_parser("list", help="list the tokens")
    token_revoke = tokens_sub.add_parser("revoke", help="revoke a token; its connections close")
    token_revoke.add_argument("name")
    for command in (token_add, token_list, token_revoke):
        command.add_argument(
            "--state-dir", type=Path, default=default_state_dir(), help="the server's state dir"
        )
    users_list = users_sub.add_parser("list", help="list named servers")
    remove = users_sub.add_parser("remove", help="forget a named server")
    remove.add_argument("name")
    projects = sub.add_parser("projects", help="projects on a server")
    projects_sub = projects.add_subparsers(dest="action", required=True)
    listing = projects_sub.add_parser("list", help="list the server's projects")
    results = projects_sub.add_parser(
        "results", help="wait for a project's results and write them to a directory"
    )
    results.add_argument("project_id")
    results.add_argument("--out", default=None, help="results directory (default: ./ID)")
    results.add_argument("--timeout", type=float, default=None, help="seconds to wait")
    cancel = projects_sub.add_parser("cancel", help="cancel a running project")
    cancel.add_argument("project_id")
    workers = sub.add_parser("workers", help="the workers connected to a server")
    workers_sub = workers.add_subparsers(dest="action", required=True)
    workers_list = workers_sub.add_parser(
        "list", help="connected workers: slots, tasks, paused (an admin sees their usage too)"
    )
    status = sub.add_parser(
        "status", help="the server, its workers and projects, as your token may see them"
    )
    for command in (listing, results, cancel, workers_list, status):
        _server_arguments(command)
    for command in (listing, workers_list, users_list, token_list, status):
        command.add_argument(
            "--json", action="store_true", help="print one JSON document instead of a table"
        )
    sub.add_parser("server", help="same as dcproto-server", add_help=False)
    sub.add_parser("worker", help="same as dcproto-worker", add_help=False)
    return parser


def _server_arguments(command: argparse.ArgumentParser) -> None:
    """Which server: a named one, or HOST[:PORT] as ``dcproto-worker connect`` takes it."""
    command.add_argument(
        "--user",
        "--server",
        dest="target",
        required=True,
        metavar="NAME|HOST[:PORT]",
        help="a named server (dcproto users list), or the server's address",
    )
    command.add_argument(
        "--token-file", type=Path, default=None, help=f"file holding the token (or ${TOKEN_ENV})"
    )
    command.add_argument(
        "--fingerprint", default=None, help="the server certificate's sha256 fingerprint"
    )
    command.add_argument(
        "--insecure", action="store_true", help="plain TCP, for a server run with --insecure"
    )


def _project_server(args: argparse.Namespace) -> tuple[Endpoint, str | None]:
    """The server ``--user``/``--server`` names, with the same rules as ``dcproto-worker
    connect``: a named server, else HOST[:PORT] with --token-file, $DCPROTO_TOKEN or, for a
    server of this machine, its state dir."""
    from .worker.worker import resolve_target

    token = read_token_file(args.token_file) if args.token_file is not None else None
    fingerprint = None if args.fingerprint is None else normalize_fingerprint(args.fingerprint)
    endpoint, _, alias = resolve_target(
        args.target, token=token, fingerprint=fingerprint, insecure=args.insecure
    )
    return endpoint, alias


def format_projects(rows: list[dict[str, object]]) -> list[str]:
    """``dcproto projects list``'s lines: a header, then one line per project. TASKS is
    ``done/total tasks done``; ``?`` where the server does not say, and ``N+`` for a project
    whose creator has sent N tasks so far but not all (not complete on the server)."""
    lines = [("ID", "STATUS", "SUBMITTED", "TASKS", "NAME")]
    for row in rows:
        submitted = row.get("submitted_at")
        when = (
            time.strftime("%Y-%m-%d %H:%M", time.localtime(submitted))
            if isinstance(submitted, int | float)
            else "?"
        )
        total, done = row.get("total_tasks"), row.get("tasks_done")
        if done is None and row.get("status") == "done" and total is not None:
            done = total  # a project is done when every one of its tasks is
        total_text = f"{row.get('tasks_received', '?')}+" if total is None else str(total)
        tasks = f"{'?' if done is None else done}/{total_text} tasks done"
        lines.append(
            (str(row.get("project_id")), str(row.get("status")), when, tasks, str(row.get("name")))
        )
    widths = [max(len(line[i]) for line in lines) for i in range(4)]
    return ["  ".join([*(line[i].ljust(widths[i]) for i in range(4)), line[4]]) for line in lines]


def _token_for_user(args: argparse.Namespace) -> str | None:
    if args.token is not None:
        token: str = args.token.strip()
    elif args.token_file is not None:
        token = read_token_file(args.token_file)
    elif os.environ.get(TOKEN_ENV):
        token = os.environ[TOKEN_ENV].strip()
    elif sys.stdin.isatty():
        token = getpass.getpass(f"token for {args.name} (NAME.SECRET): ").strip()
    else:
        return None
    parse_token(token)
    return token


def users_command(args: argparse.Namespace) -> int:
    if args.action == "add":
        host, port = users.parse_address(args.address)
        fingerprint = None
        if args.fingerprint is not None:
            fingerprint = normalize_fingerprint(args.fingerprint)
        token = _token_for_user(args)
        users.add_user(
            users.User(
                name=args.name,
                host=host,
                port=port,
                token=token,
                fingerprint=fingerprint,
                insecure=args.insecure,
            )
        )
        trust = "TLS, pinned" if fingerprint else "plain TCP" if args.insecure else "TLS, CA"
        print(f"added {args.name} -> {host}:{port} ({trust}; {users.config_path()})")
        if token is None:
            print("no token kept: give one with --token-file or $DCPROTO_TOKEN when connecting")
    elif args.action == "list":
        known = users.load_users()
        if args.json:
            _print_json([_user_row(user) for user in known.values()])
            return 0
        if not known:
            print("no users; add one with the join line a server's admin gives you")
        for user in known.values():
            token = f"token {user.token.rsplit('.', 1)[0]}" if user.token else "no token"
            trust = "pinned" if user.fingerprint else "insecure" if user.insecure else "CA"
            print(f"{user.name}\t{user.address}\t{token}\t{trust}")
    else:
        users.remove_user(args.name)
        print(f"removed {args.name}")
    return 0


def _user_row(user: users.User) -> dict[str, Any]:
    """A named server for ``users list --json``: never the token's secret, only its name."""
    return {
        "name": user.name,
        "host": user.host,
        "port": user.port,
        "address": user.address,
        "token": user.token.rsplit(".", 1)[0] if user.token else None,
        "fingerprint": user.fingerprint,
        "insecure": user.insecure,
    }


def _json_value(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return str(value)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=_json_value))


def projects_command(args: argparse.Namespace) -> int:
    from .creator.client import call, get_client
    from .creator.creator import attach, cancel_project

    endpoint, user_name = _project_server(args)
    if args.action == "list":

        async def listing() -> list[dict[str, object]]:
            client = await get_client(endpoint)
            return await client.list_projects()

        rows = call(listing(), timeout=30)
        if args.json:
            _print_json(rows)
            return 0
        if not rows:
            print("no projects")
            return 0
        for line in format_projects(rows):
            print(line)
        return 0
    project_id = args.project_id
    if args.action == "cancel":
        try:
            status, ended_before = cancel_project(
                project_id, user_name=user_name, endpoint=endpoint, timeout=30
            )
        except TimeoutError:
            print(f"dcproto: no answer to the cancel of {project_id} within 30 s", file=sys.stderr)
            return 1
        if not ended_before:
            print(f"cancelled {project_id}")
            return 0
        print(
            f"dcproto: {project_id} had already ended ({status}): nothing to cancel",
            file=sys.stderr,
        )
        return 1
    out = Path(args.out or project_id)
    existed = out.exists()
    try:
        handle = attach(project_id, user_name=user_name, endpoint=endpoint, results_path=out)
    except DcprotoError:
        if not existed:
            with contextlib.suppress(OSError):
                out.rmdir()  # made for the results, and still empty
        raise
    try:
        results = handle.get_results(args.timeout)
    except TimeoutError:
        print(
            f"dcproto: project {project_id} has not finished within {args.timeout:g} s; it goes "
            "on on the server: run this again to wait for it",
            file=sys.stderr,
        )
        return 1
    print(f"{len(results)} results of {project_id} written to {out}/")
    return 0


def workers_command(args: argparse.Namespace) -> int:
    from .creator.client import call, get_client

    endpoint, _ = _project_server(args)

    async def listing() -> list[dict[str, Any]]:
        client = await get_client(endpoint)
        return await client.list_workers()

    rows = call(listing(), timeout=30)
    if args.json:
        _print_json(rows)
        return 0
    if not rows:
        print("no workers connected")
        return 0
    for line in format_workers(rows):
        print(line)
    return 0


def format_workers(rows: list[dict[str, Any]]) -> list[str]:
    """``dcproto workers list``: a header, one line per worker. CPU and RSS are the usage its
    volunteer's worker reports (shown to admins only)."""
    lines = [("NAME", "SLOTS", "STATE", "RUNNING", "HELD", "DONE", "CPU%", "RSS", "TRUSTS")]
    for row in rows:
        usage = row.get("usage")
        if not isinstance(usage, dict):
            usage = {}
        cpu = usage.get("cpu_percent")
        rss = usage.get("rss_bytes")
        state = "paused" if row.get("paused") else "running"
        if row.get("paused") and usage.get("paused_by"):
            state += f" ({usage['paused_by']})"
        lines.append(
            (
                str(row.get("name", "?")),
                str(row.get("slots", "?")),
                state,
                str(row.get("running", "?")),
                str(row.get("held", "?")),
                str(row.get("done", "?")),
                f"{cpu:.0f}" if isinstance(cpu, int | float) else "-",
                f"{rss / 2**20:.0f}M" if isinstance(rss, int | float) else "-",
                ",".join(row.get("trust") or []) or ("all" if "trust" in row else "-"),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    ]


INFO_TIMEOUT = 10.0  # seconds for ServerInfo's answer (a server from before it closes instead)


def status_command(args: argparse.Namespace) -> int:
    """``dcproto status``: ServerInfo, WorkerList and ProjectList in one view. What it holds
    follows the token's role, as the server answers each: an admin sees every project and
    the volunteers' usage; a creator its own projects and the workers' names and load."""
    import asyncio

    from . import protocol as p
    from .creator.client import call, get_client

    endpoint, _ = _project_server(args)

    async def gather() -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
        client = await get_client(endpoint)
        workers = await client.list_workers()
        projects = await client.list_projects()
        ref = client.next_ref()
        try:  # last: a server that does not know ServerInfo closes the connection
            reply = await asyncio.wait_for(client.request(p.ServerInfo(ref=ref), ref), INFO_TIMEOUT)
        except (DcprotoError, TimeoutError) as exc:
            return (
                {"error": f"no ServerInfo from the server ({exc or 'timed out'})"},
                workers,
                projects,
            )
        assert isinstance(reply, p.ServerInfoReply)
        return dict(reply.info), workers, projects

    info, workers, projects = call(gather(), timeout=60)
    now = _number(info.get("time"))
    now = time.time() if now is None else now
    info.setdefault("connected_to", endpoint.address)
    projects = [{**row, **project_figures(row, now)} for row in projects]
    if args.json:
        _print_json({"server": info, "workers": workers, "projects": projects})
        return 0
    for line in format_status(info, workers, projects):
        print(line)
    return 0


def project_figures(row: dict[str, Any], now: float) -> dict[str, Any]:
    """``rate`` (items per second since the first task started, to its end or ``now`` by
    the server's clock), ``eta`` (seconds left at that rate, for a running project whose
    total is known) and ``fraction`` (of the items done), each None when unknown."""
    started = _number(row.get("first_started_at"))
    items, total = _number(row.get("items_done")), _number(row.get("total_items"))
    running = row.get("status") == "running"
    end = now if running else _number(row.get("finished_at"))
    rate = None
    if started is not None and end is not None and items is not None and end > started:
        rate = items / (end - started)
    fraction = items / total if items is not None and total is not None and total > 0 else None
    if fraction is None and row.get("status") == "done":
        fraction = 1.0
    eta = None
    if running and rate and total is not None and items is not None:
        eta = max(0.0, total - items) / rate
    return {"rate": rate, "eta": eta, "fraction": fraction}


def _number(value: Any) -> float | None:
    """``value`` if it is a number (not a bool), else None."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    return None


def _is_number(value: Any) -> bool:
    return _number(value) is not None


def _duration(seconds: Any) -> str:
    """``45s``, ``12m05s``, ``3h07m``, ``2d04h``; ``?`` for no number."""
    if not _is_number(seconds):
        return "?"
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def _table(rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def format_status(
    info: dict[str, Any],
    workers: list[dict[str, Any]],
    projects: list[dict[str, Any]],
) -> list[str]:
    """``dcproto status``'s lines: the server, then a table of workers and one of projects."""
    lines = []
    if "error" in info:
        lines.append(f"server    {info.get('connected_to', '?')}: {info['error']}")
    else:
        lines.append(
            f"server    {info.get('address', '?')} (reached at {info.get('connected_to', '?')}), "
            f"dcproto {info.get('version', '?')}, protocol {info.get('protocol', '?')}, "
            f"up {_duration(info.get('uptime'))}"
        )
        fingerprint = info.get("fingerprint")
        lines.append(
            f"tls       certificate {fingerprint}"
            if fingerprint
            else "tls       none (plain TCP)"
            if info.get("tls") is False
            else "tls       ?"
        )
        lines.append(f"you       {info.get('identity', '?')} ({info.get('role', '?')} token)")
        lines.append(
            f"load      workers {info.get('workers', '?')}, slots busy "
            f"{info.get('slots_busy', '?')} of {info.get('slots', '?')}, projects running "
            f"{info.get('projects_running', '?')}, creator connections {info.get('creators', '?')}"
        )
    lines.append("")
    if workers:
        rows: list[tuple[str, ...]] = [
            ("WORKER", "SLOTS", "BUSY", "HELD", "DONE", "LAST SEEN", "STATE", "CPU%", "RSS")
        ]
        for row in workers:
            usage: dict[str, Any] = row["usage"] if isinstance(row.get("usage"), dict) else {}
            cpu, rss = _number(usage.get("cpu_percent")), _number(usage.get("rss_bytes"))
            seen = row.get("last_seen")
            rows.append(
                (
                    str(row.get("name", "?")),
                    str(row.get("slots", "?")),
                    str(row.get("running", "?")),
                    str(row.get("held", "?")),
                    str(row.get("done", "?")),
                    f"{_duration(seen)} ago" if _is_number(seen) else "?",
                    "paused" if row.get("paused") else "running",
                    "-" if cpu is None else f"{cpu:.0f}",
                    "-" if rss is None else f"{rss / 2**20:.0f}M",
                )
            )
        lines += _table(rows)
    else:
        lines.append("no workers connected")
    lines.append("")
    if projects:
        rows = [("PROJECT", "NAME", "OWNER", "STATUS", "PROGRESS", "RATE", "ETA", "RETRIED")]
        for row in projects:
            items, total = row.get("items_done"), row.get("total_items")
            fraction = row.get("fraction")
            progress = f"{'?' if items is None else items}/{'?' if total is None else total}"
            if _is_number(fraction):
                progress += f" ({fraction:.0%})"
            rate, eta = row.get("rate"), row.get("eta")
            rows.append(
                (
                    str(row.get("project_id", "?")),
                    str(row.get("name", "?")),
                    str(row.get("owner", "?")),
                    str(row.get("status", "?")),
                    progress,
                    f"{rate:,.1f}/s" if _is_number(rate) else "-",
                    _duration(eta) if _is_number(eta) else "-",
                    str(row.get("tasks_reissued", 0) or 0),
                )
            )
        lines += _table(rows)
    else:
        lines.append("no projects")
    return lines


def tokens_command(args: argparse.Namespace) -> int:
    """Works whether the server runs or not: a running server picks the change up by itself
    (and closes a revoked token's connections)."""
    store = TokenStore(args.state_dir)
    if args.action == "add":
        token = store.add(args.name, args.role)
        record = read_record(args.state_dir)
        print(f"token {args.name} ({args.role}) added; it is shown only now.")
        if record is None:
            print(f"token: {token}")
            print("(no server has run on this state dir yet: start it to get a join line)")
        else:
            print("on the new member's machine, run:")
            print(f"  {record.join_line(args.name, token)}")
    elif args.action == "list":
        records = store.records()
        if args.json:
            _print_json(
                [{"name": r.name, "role": r.role, "created_at": r.created_at} for r in records]
            )
            return 0
        if not records:
            print("no tokens")
        for item in records:
            created = time.strftime("%Y-%m-%d %H:%M", time.localtime(item.created_at))
            print(f"{item.name}\t{item.role}\tcreated {created}")
    else:
        if not store.revoke(args.name):
            print(f"dcproto: no token named {args.name!r}", file=sys.stderr)
            return 1
        print(f"token {args.name} revoked; a running server closes its connections")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "server":
        from .server.main import main as server_main

        return server_main(argv[1:])
    if argv and argv[0] == "worker":
        from .worker.worker import main as worker_main

        return worker_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if args.command == "projects":
            return projects_command(args)
        if args.command == "workers":
            return workers_command(args)
        if args.command == "tokens":
            return tokens_command(args)
        if args.command == "status":
            return status_command(args)
        return users_command(args)
    except DcprotoError as exc:
        print(f"dcproto: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
