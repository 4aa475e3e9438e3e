"""``dcproto-server``: the command line that prepares the state dir, the TLS identity and the
tokens, then runs :class:`~dcproto.server.server.Server` until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys
from pathlib import Path

from ..connection import install_uvloop
from ..errors import DcprotoError
from ..paths import default_state_dir
from ..trust.tls import ServerIdentity, load_identity, load_or_create_identity
from ..trust.tokens import ADMIN_TOKEN_FILE, TokenStore
from . import statedir
from .server import DEFAULT_HEARTBEAT, DEFAULT_HOST, DEFAULT_KEEP_FINISHED, DEFAULT_PORT, Server

log = logging.getLogger("dcproto.server")

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def join_host(host: str) -> str:
    """The address other machines should use to reach a server bound to ``host``."""
    if host in ("0.0.0.0", "::", ""):
        return socket.gethostname()
    return host


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dcproto-server",
        description="Run the dcproto coordinator server.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
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
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    return parser


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


async def serve(args: argparse.Namespace) -> int:
    state_dir: Path = args.state_dir
    lock = statedir.StateDirLock(state_dir)
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
        )
    except DcprotoError as exc:
        lock.release()
        print(f"dcproto-server: {exc}", file=sys.stderr)
        return 2
    try:
        host, port = await server.start(args.host, args.port)
    except OSError as exc:
        lock.release()
        print(f"dcproto-server: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
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
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    if args.insecure and args.host not in LOOPBACK:
        log.warning(
            "serving plain TCP on %s: tokens and data cross the network unprotected", args.host
        )
    install_uvloop()
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
