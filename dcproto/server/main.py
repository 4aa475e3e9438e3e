"""``dcproto-server``: the command line that prepares the state dir, the TLS identity and the
tokens, then runs :class:`~dcproto.server.server.Server` until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import shutil
import signal
import socket
import sys
from pathlib import Path

from .. import protocol as p
from ..connection import install_uvloop
from ..errors import DcprotoError
from ..logs import FORMATS, configure_logging
from ..paths import default_state_dir
from ..trust.tls import ServerIdentity, load_identity, load_or_create_identity
from ..trust.tokens import ADMIN_TOKEN_FILE, TokenStore
from . import statedir
from .admission import DEFAULT_MAX_UNAUTHENTICATED, DEFAULT_MAX_UNAUTHENTICATED_PER_ADDRESS
from .http_options import DEFAULT_HTTP_HOST, HttpListenError, HttpOptions
from .limits import (
    DEFAULT_MAX_CODE_BYTES,
    DEFAULT_MAX_PROJECTS_PER_CREATOR,
    DEFAULT_MAX_STORED_RESULT_BYTES,
)
from .scheduler import DEFAULT_MAX_SLOTS, DEFAULT_MAX_TASK_TIME, MAX_HELD_PER_SLOT
from .server import DEFAULT_HEARTBEAT, DEFAULT_HOST, DEFAULT_KEEP_FINISHED, DEFAULT_PORT, Server

log = logging.getLogger("dcproto.server")

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def join_host(host: str) -> str:
    """The address other machines should use to reach a server bound to ``host``."""
    if host in ("0.0.0.0", "::", ""):
        return socket.gethostname()
    return host


def version_text(prog: str) -> str:
    """``PROG X.Y.Z``: the installed distribution's version, else the package's own."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        number = version("dcproto")
    except PackageNotFoundError:
        from .. import __version__ as number
    return f"{prog} {number}"


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, but not an empty one (None, False) nor a second one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "(default" in text or action.default in (None, False):
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dcproto-server",
        description="Run the dcproto coordinator server.",
        formatter_class=_DefaultsFormatter,
    )
    parser.add_argument("--version", action="version", version=version_text("dcproto-server"))
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to bind")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port (0: any free)")
    parser.add_argument(
        "--state-dir", type=Path, default=default_state_dir(), help="where state is kept"
    )
    parser.add_argument(
        "--advertise",
        default=None,
        help="HOST[:PORT] other machines use to reach this server, for join lines "
        "(default: this host's name and --port)",
    )
    parser.add_argument("--tls-cert", type=Path, default=None, help="a CA-signed certificate")
    parser.add_argument("--tls-key", type=Path, default=None, help="the key of --tls-cert")
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="plain TCP, no TLS: anyone on the path reads and changes everything",
    )
    parser.add_argument(
        "--heartbeat",
        type=float,
        default=DEFAULT_HEARTBEAT,
        help="seconds between heartbeats on idle connections",
    )
    parser.add_argument(
        "--memory",
        action="store_true",
        help="keep projects in memory only: nothing survives a restart (tests, benchmarks)",
    )
    parser.add_argument(
        "--keep-finished",
        type=float,
        default=DEFAULT_KEEP_FINISHED,
        help="seconds a finished project's record and unfetched results are kept",
    )
    parser.add_argument(
        "--max-unauthenticated",
        type=_positive_int,
        default=DEFAULT_MAX_UNAUTHENTICATED,
        help="connections not logged in yet (TLS handshake included) kept open at once; "
        "past that the oldest of them is closed",
    )
    parser.add_argument(
        "--max-unauthenticated-per-address",
        type=_positive_int,
        default=DEFAULT_MAX_UNAUTHENTICATED_PER_ADDRESS,
        help="the same, from one address (an IPv6 /64 counts as one)",
    )
    # per-creator limits (a creator: the identity, i.e. the token's name, admins included);
    # a project's name needs none here: the protocol caps it at 200 characters
    parser.add_argument(
        "--max-projects-per-creator",
        type=_creator_limit,
        default=DEFAULT_MAX_PROJECTS_PER_CREATOR,
        help="running projects one creator may have at once; a Submit past it is refused "
        "(0: no limit)",
    )
    parser.add_argument(
        "--max-code-bytes",
        type=_creator_limit,
        default=DEFAULT_MAX_CODE_BYTES,
        help="bytes of a project's pickled code; a larger Submit is refused (0: no limit)",
    )
    parser.add_argument(
        "--max-stored-result-bytes",
        type=_creator_limit,
        default=DEFAULT_MAX_STORED_RESULT_BYTES,
        help="bytes of results one creator may have stored on the server, not yet fetched and "
        "released; a project whose result goes past it fails with reason 'quota', and Submits "
        "are refused until results are released (0: no limit)",
    )
    # per-worker bounds, whatever the worker announces or does
    parser.add_argument(
        "--max-slots",
        type=_slots,
        default=DEFAULT_MAX_SLOTS,
        help=f"slots one worker is credited with at most (1..{p.MAX_SLOTS}); it is given up to "
        f"{MAX_HELD_PER_SLOT} tasks per slot",
    )
    parser.add_argument(
        "--max-task-time",
        type=_seconds,
        default=DEFAULT_MAX_TASK_TIME,
        metavar="SECONDS",
        help="seconds a started task may stay unanswered, heartbeats or not, when its project "
        "sets no shorter task_timeout; then it is re-issued",
    )
    parser.add_argument(
        "--http-port",
        type=_port,
        default=None,
        help="serve the web dashboard and Prometheus /metrics on this port (0: any free); "
        "no HTTP without it",
    )
    parser.add_argument(
        "--http-host",
        default=DEFAULT_HTTP_HOST,
        help="address the dashboard binds; on anything but loopback every request needs an "
        "admin token, over HTTPS unless --insecure",
    )
    parser.add_argument(
        "--http-require-token",
        action="store_true",
        help="ask for an admin token on a loopback --http-host too (a shared machine, or a "
        "reverse proxy in front)",
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    parser.add_argument(
        "--log-format",
        choices=FORMATS,
        default="text",
        help="text lines, or one JSON object per line (ts, level, logger, message, fields)",
    )
    return parser


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number in 0..65535, not {text!r}")
    return value


def _slots(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= p.MAX_SLOTS:
        raise argparse.ArgumentTypeError(
            f"expected a whole number in 1..{p.MAX_SLOTS}, not {text!r}"
        )
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, not {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, not {text!r}")
    return value


def _creator_limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number (0: no limit), not {text!r}")
    return value


def raise_open_file_limit() -> None:
    """Raise the soft limit on open files (RLIMIT_NOFILE) to the hard one: the usual soft
    1024 is few for a server that holds a socket per worker and creator. Never fails."""
    try:
        import resource
    except ImportError:  # not on Unix
        return
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return
    # an unlimited hard limit is not a valid soft one everywhere (Linux: nr_open; macOS:
    # OPEN_MAX): try it, then smaller values
    wanted = [hard] if hard != resource.RLIM_INFINITY else [hard, 1 << 20, 1 << 16, 10240]
    for value in wanted:
        if value != resource.RLIM_INFINITY and value <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (value, hard))
        except (OSError, ValueError):
            continue
        soft = value
        break
    log.debug("open files limit: %s (hard: %s)", _limit(soft), _limit(hard))


def _limit(value: int) -> str:
    import resource

    return "unlimited" if value == resource.RLIM_INFINITY else str(value)


def _identity(args: argparse.Namespace, state_dir: Path) -> ServerIdentity | None:
    if args.insecure:
        return None
    if (args.tls_cert is None) != (args.tls_key is None):
        raise DcprotoError("--tls-cert and --tls-key go together")
    if args.tls_cert is not None:
        return load_identity(args.tls_cert, args.tls_key)
    names = [args.host, join_host(args.host)]
    if args.advertise:
        names.append(args.advertise.rsplit(":", 1)[0] if "]" not in args.advertise else "")
    return load_or_create_identity(state_dir, names)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_bind(host: str, port: int) -> None:
    """Raise OSError if ``host:port`` cannot be bound the way the server will bind it (every
    address ``host`` resolves to, SO_REUSEADDR on POSIX): so a server that cannot listen stops
    before it makes its state dir, keys and tokens. The sockets are closed again at once."""
    infos = socket.getaddrinfo(
        host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
    )
    for family, kind, proto, _, sockaddr in dict.fromkeys(infos):
        with socket.socket(family, kind, proto) as sock:
            if os.name == "posix":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(sockaddr)


def _new_dirs(path: Path) -> Path | None:
    """The outermost of ``path`` and its parents that does not exist yet; None if it does."""
    missing = None
    for candidate in (path, *path.parents):
        if candidate.exists():
            break
        missing = candidate
    return missing


async def serve(args: argparse.Namespace) -> int:
    state_dir: Path = args.state_dir
    # bind first: a server that cannot listen leaves nothing behind
    binds = [(args.host, args.port)]
    if args.http_port is not None:
        binds.append((args.http_host, args.http_port))
    for bind_host, bind_port in binds:
        try:
            check_bind(bind_host, bind_port)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            print(
                f"dcproto-server: cannot listen on {_address(bind_host, bind_port)}: {reason}",
                file=sys.stderr,
            )
            return 2
    # every file the server makes (database, WAL, keys, tokens) is private, whatever the umask
    os.umask(0o077)
    lock = statedir.StateDirLock(state_dir)
    created = _new_dirs(state_dir)
    try:
        statedir.prepare(state_dir)
        lock.acquire()
        identity = _identity(args, state_dir)
        tokens = TokenStore(state_dir)
        admin_token = tokens.ensure_admin()
        server = Server(
            tokens=tokens,
            identity=identity,
            state_dir=None if args.memory else state_dir,
            heartbeat=args.heartbeat,
            keep_finished=args.keep_finished,
            max_unauthenticated=args.max_unauthenticated,
            max_unauthenticated_per_address=args.max_unauthenticated_per_address,
            max_projects_per_creator=args.max_projects_per_creator,
            max_code_bytes=args.max_code_bytes,
            max_stored_result_bytes=args.max_stored_result_bytes,
            max_slots=args.max_slots,
            max_task_time=args.max_task_time,
            http=None
            if args.http_port is None
            else HttpOptions(
                host=args.http_host, port=args.http_port, require_token=args.http_require_token
            ),
        )
    except DcprotoError as exc:
        lock.release()
        if created is not None:  # a state dir this start made, left half-made
            shutil.rmtree(created, ignore_errors=True)
        print(f"dcproto-server: {exc}", file=sys.stderr)
        return 2
    try:
        host, port = await server.start(args.host, args.port)
    except OSError as exc:
        # taken since check_bind(): undo what this start made
        with contextlib.suppress(DcprotoError):
            server.store.close()
        lock.release()
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        reason = exc.strerror or str(exc)
        where = (
            _address(args.http_host, args.http_port)
            if isinstance(exc, HttpListenError)
            else _address(args.host, args.port)
        )
        print(f"dcproto-server: cannot listen on {where}: {reason}", file=sys.stderr)
        return 2
    address = args.advertise or f"{join_host(args.host)}:{port}"
    if ":" not in address.rsplit("]", 1)[-1]:
        address = f"{address}:{port}"
    record = statedir.ServerRecord(
        address=address,
        fingerprint=None if identity is None else identity.fingerprint,
        insecure=identity is None,
    )
    statedir.write_record(state_dir, record)
    # before the banner: whoever sees it may stop us at once, and must get a clean stop
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    print(f"dcproto server listening on {host}:{port}", flush=True)
    if server.http is not None:
        auth = "admin token required" if server.http.tokens_required else "no token on loopback"
        print(f"dashboard: {server.http.url} ({auth}; Prometheus metrics at /metrics)", flush=True)
    print(f"state dir: {state_dir}", flush=True)
    if identity is None:
        print("TLS is OFF (--insecure): use this on a trusted network only", flush=True)
    else:
        print(f"certificate fingerprint: {identity.fingerprint}", flush=True)
    if admin_token is not None:
        # shown once, to whoever started the server; kept in a 0600 file, never logged
        print(f"admin token kept in {state_dir / ADMIN_TOKEN_FILE}", flush=True)
        if sys.stdout.isatty():
            print(f"admin token (shown once): {admin_token}", flush=True)
    print(
        "to let someone join, run: dcproto tokens add NAME --role worker|creator|admin "
        f"--state-dir {state_dir}",
        flush=True,
    )
    await stop.wait()
    log.info("shutting down")
    await server.stop()
    lock.release()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    if args.insecure and args.host not in LOOPBACK:
        log.warning(
            "serving plain TCP on %s: tokens and data cross the network unprotected", args.host
        )
    raise_open_file_limit()
    install_uvloop()
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
