"""Extra fixtures for the fault-injection suite (the ones of ``tests/conftest.py`` apply too).

* ``proxy(port)`` -- a TCP forwarder on 127.0.0.1 to a server port, which can be made to
  *blackhole* (stop forwarding, both ways or one way, while every socket stays open) and
  healed again;
* ``tmpfs`` -- a fresh 20 MB tmpfs mounted on a directory (needs root; skipped otherwise);
* ``ext4_disk`` -- a small ext4 file system on a loop device, mounted with
  ``errors=remount-ro``, that the kernel can be told to turn read-only under a running server.

Mounts are undone at teardown. Request these fixtures *before* ``make_server`` in a test's
arguments, so that they are set up first and torn down last (after the server is killed).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# ---- a TCP proxy that can blackhole -------------------------------------------------------------


class BlackholeProxy:
    """Forwards every connection accepted on ``127.0.0.1:<port>`` to ``127.0.0.1:target``.

    :meth:`blackhole` stops forwarding (in both directions, or in one) without closing
    anything, like a network partition: bytes stay in the kernel buffers (or in hand) and
    nobody sees a FIN or a RST. New connections are accepted and connected upstream, but
    nothing flows on them either.
    :meth:`heal` lets everything flow again (held bytes first)."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._to_server = threading.Event()  # set: client -> server bytes flow
        self._to_client = threading.Event()  # set: server -> client bytes flow
        self._to_server.set()
        self._to_client.set()
        self._closed = False
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.connections = 0
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    def blackhole(self, *, to_server: bool = True, to_client: bool = True) -> None:
        """Stop forwarding (by default both ways; or only towards the server or the client)."""
        if to_server:
            self._to_server.clear()
        if to_client:
            self._to_client.clear()

    def heal(self) -> None:
        self._to_server.set()
        self._to_client.set()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sockets, self._sockets = self._sockets, []
        self.heal()  # wake the pumps: they see _closed and stop
        with contextlib.suppress(OSError):
            self._listener.close()
        for sock in sockets:
            _close(sock)

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _close(downstream)
                continue
            with self._lock:
                if self._closed:
                    _close(downstream)
                    _close(upstream)
                    return
                self._sockets += [downstream, upstream]
                self.connections += 1
            for source, sink, flowing in (
                (downstream, upstream, self._to_server),
                (upstream, downstream, self._to_client),
            ):
                threading.Thread(
                    target=self._pump, args=(source, sink, flowing), name="proxy-pump", daemon=True
                ).start()

    def _pump(self, source: socket.socket, sink: socket.socket, flowing: threading.Event) -> None:
        try:
            while True:
                flowing.wait()
                data = source.recv(65536)
                if not data:
                    break
                flowing.wait()  # read just as the partition began: held until it heals
                if self._closed:
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            # one direction ended (EOF, reset): end the other one too, as a real close would
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


@pytest.fixture
def proxy() -> Iterator[Callable[[int], BlackholeProxy]]:
    """``proxy(port)`` starts a :class:`BlackholeProxy` to that server port; closed at teardown."""
    started: list[BlackholeProxy] = []

    def start(port: int) -> BlackholeProxy:
        forwarder = BlackholeProxy(port)
        started.append(forwarder)
        return forwarder

    yield start
    for forwarder in started:
        forwarder.close()


# ---- mounts -------------------------------------------------------------------------------------


def run_command(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)


def mount_options(path: Path) -> list[str] | None:
    """The mount options of the file system mounted exactly on ``path`` (None: not a mount)."""
    target = os.path.realpath(path)
    found = None
    with open("/proc/self/mounts", encoding="utf-8") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) >= 4 and fields[1].replace("\\040", " ") == target:
                found = fields[3].split(",")  # the last one mounted there wins
    return found


def is_read_only(path: Path) -> bool:
    """Whether writes to ``path``'s file system are refused (a ro mount, or a file system the
    kernel turned read-only after an error: ext4 on recent kernels sets its own emergency_ro
    flag, which /proc/mounts shows but statvfs does not)."""
    if os.statvfs(path).f_flag & os.ST_RDONLY:
        return True
    options = mount_options(path) or []
    return "ro" in options or "emergency_ro" in options  # ext4 after an error, on Linux >= 6.x


def _unmount(path: Path) -> None:
    if mount_options(path) is None:
        return
    if run_command(["umount", str(path)]).returncode != 0:
        run_command(["umount", "-l", str(path)])  # something still holds it: detach it anyway


def _require_root(what: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"{what} needs root (CAP_SYS_ADMIN to mount); running as uid {os.geteuid()}")


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 20 MB tmpfs mounted on a fresh directory; remounted rw and unmounted at teardown."""
    _require_root("mounting a tmpfs")
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    mounted = run_command(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount_point)])
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        if is_read_only(mount_point):
            run_command(["mount", "-o", "remount,rw", str(mount_point)])
        _unmount(mount_point)


@dataclass
class Ext4Disk:
    path: Path  # the mount point
    device: str  # /dev/loopN
    error_trigger: Path  # /sys/fs/ext4/loopN/trigger_fs_error

    def fail(self) -> None:
        """Report a file-system error: with errors=remount-ro the kernel aborts the journal and
        turns the file system read-only at once, whatever files are open for writing."""
        self.error_trigger.write_text("dcproto fault-injection test\n")

    def read_only(self) -> bool:
        return is_read_only(self.path)


@pytest.fixture
def ext4_disk(tmp_path: Path) -> Iterator[Ext4Disk]:
    """A 64 MB ext4 file system on a loop device, mounted with errors=remount-ro.

    Why not ``mount -o remount,ro`` on a tmpfs: the kernel refuses to remount a file system
    read-only while a process holds a file on it open for writing (EBUSY), and a running
    server always holds its SQLite database open. An ext4 error is how a disk really turns
    read-only under a running program."""
    _require_root("an ext4 loop device")
    for tool in ("mkfs.ext4", "losetup"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    image = tmp_path / "disk.img"
    with open(image, "wb") as handle:
        handle.truncate(64 * 1024 * 1024)
    made = run_command(["mkfs.ext4", "-q", "-F", str(image)])
    if made.returncode != 0:
        pytest.skip(f"mkfs.ext4 failed: {made.stderr.strip()}")
    attached = run_command(["losetup", "--find", "--show", str(image)])
    if attached.returncode != 0:
        pytest.skip(f"no loop device available: {attached.stderr.strip()}")
    device = attached.stdout.strip()
    mount_point = tmp_path / "ext4"
    mount_point.mkdir()
    try:
        mounted = run_command(["mount", "-o", "errors=remount-ro", device, str(mount_point)])
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount ext4 from {device}: {mounted.stderr.strip()}")
        trigger = Path("/sys/fs/ext4") / Path(device).name / "trigger_fs_error"
        if not trigger.exists():
            pytest.skip(f"this kernel has no {trigger} to make the file system fail")
        yield Ext4Disk(mount_point, device, trigger)
    finally:
        _unmount(mount_point)
        run_command(["losetup", "-d", device])
