"""The embedded default: an in-process server and a local worker, used when no server is named.

Both live on the creator's background loop; the worker still runs user code in child
processes and talks to the server over TCP on 127.0.0.1, so the local path is the real path.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from ..connection import Endpoint
from ..server.server import Server
from ..trust.tokens import TokenStore
from ..worker.runner import default_slots
from ..worker.sandbox import Sandbox, SandboxOptions
from ..worker.worker import Worker, WorkerConfig
from .client import on_shutdown


@dataclass
class LocalCluster:
    endpoint: Endpoint
    server: Server
    worker: Worker
    worker_task: asyncio.Task[None]

    async def stop(self) -> None:
        self.worker.stop()
        try:
            await asyncio.wait_for(self.worker_task, 10)
        except (TimeoutError, Exception):
            self.worker_task.cancel()
        await self.server.stop()


_cluster: LocalCluster | None = None
_lock: asyncio.Lock | None = None


async def local_cluster(slots: int | None = None) -> LocalCluster:
    """The process's local cluster, started on first use with ``slots`` worker slots."""
    global _cluster, _lock
    if _lock is None:
        _lock = asyncio.Lock()
    async with _lock:
        if _cluster is not None:
            return _cluster
        # in memory, plain TCP on loopback: the embedded server lives and dies with this
        # process, and only this process holds its one token
        tokens = TokenStore(None)
        token = tokens.ensure_admin()
        assert token is not None
        server = Server(tokens=tokens, identity=None, state_dir=None)
        host, port = await server.start("127.0.0.1", 0)
        endpoint = Endpoint(host=host, port=port, token=token, insecure=True)
        worker = Worker(
            WorkerConfig(
                endpoint=endpoint,
                name="local",
                slots=slots or default_slots(),
            ),
            # the creator's own code on the creator's own machine, as the creator's user:
            # its tasks may read the creator's files (only the environment is scrubbed)
            sandbox=Sandbox(SandboxOptions(mode="off"), description="embedded: no sandbox"),
        )
        task = asyncio.create_task(worker.run())
        _cluster = LocalCluster(endpoint, server, worker, task)
        on_shutdown(_stop)
        return _cluster


async def _stop() -> None:
    global _cluster
    if _cluster is not None:
        cluster, _cluster = _cluster, None
        await cluster.stop()
