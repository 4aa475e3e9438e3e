"""A TCP relay that delays every byte by a fixed time each way: a far volunteer on a machine
whose kernel has no netem.

``DelayRelay(("127.0.0.1", port), delay=0.05)`` listens on 127.0.0.1 and forwards each
connection to the target; bytes that arrive at time t leave at t + delay, in order, whatever
the load (the delay is added, not a bandwidth cap). A round trip through it takes at least
``2 * delay``. TLS passes through untouched. Run it alone with
``python -m bench.relay TARGET_PORT DELAY_MS``, which prints the port it listens on.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections import deque

CHUNK = 1 << 16


class DelayRelay:
    def __init__(self, target: tuple[str, int], delay: float) -> None:
        self.target = target
        self.delay = delay
        self.port = 0
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._link, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.cancel()
        await asyncio.gather(*self._links, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> DelayRelay:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._links.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            self._links.discard(task)
            return
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
            )
        except asyncio.CancelledError:
            pass  # the relay is closing
        finally:
            for w in (writer, up_writer):
                w.close()
            self._links.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Forward ``reader`` to ``writer``, each chunk ``delay`` seconds after it came."""
        pending: deque[tuple[float, bytes]] = deque()
        arrived = asyncio.Event()
        done = False

        async def release() -> None:
            while True:
                while not pending:
                    if done:
                        return
                    arrived.clear()
                    await arrived.wait()
                due, data = pending[0]
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                pending.popleft()
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(release())
        try:
            while data := await reader.read(CHUNK):
                pending.append((time.monotonic() + self.delay, data))
                arrived.set()
        except OSError:
            pass
        finally:
            done = True
            arrived.set()
            with contextlib.suppress(Exception):
                await sender
            with contextlib.suppress(Exception):
                writer.write_eof()


async def _main(port: int, delay_ms: float) -> None:
    relay = DelayRelay(("127.0.0.1", port), delay_ms / 1000)
    print(await relay.start(), flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(_main(int(sys.argv[1]), float(sys.argv[2])))
