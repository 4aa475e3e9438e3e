"""How a worker's child processes are started so that user code sees as little as possible.

* :func:`probe` looks once, at worker start, at what this machine offers (a working
  bubblewrap, whether the worker runs as root and must drop to an unprivileged account) and
  returns a :class:`Sandbox`; with ``mode="required"`` it raises :class:`SandboxUnavailable`
  when no sandbox can be had.
* :func:`launch` gives the argv, environment, working directory, ``preexec_fn`` and the
  descriptors to pass for one child process, under that sandbox.

In every mode a child gets an environment built from an allow-list (no token, no
``DCPROTO_*`` but its output dir) and a private home, ``child_dir``, which is also its cwd,
its ``TMPDIR`` and its XDG dirs. A worker running as root drops its children to ``nobody``.

With bubblewrap the child also gets a read-only view of the system with empty /tmp, /home,
/root (and the worker's config and state dirs hidden), in which only what the interpreter needs
is mounted back read-only and only ``child_dir`` and ``output_dir`` are writable; its own pid,
IPC and UTS namespaces, no network unless allowed, no capabilities, and a new session.

bubblewrap keeps a monitor process outside the sandbox, which dies of the SIGUSR1 the runner
uses to abandon a task, so the process the runner starts is a small forwarder (``_FORWARDER``):
it runs bwrap, passes SIGUSR1 on to the sandboxed child, and exits the way the child did. A
SIGKILL of the forwarder takes bwrap and the whole sandbox with it (``--die-with-parent``).
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import platformdirs

from ..errors import DcprotoError
from ..paths import OUTPUT_DIR_ENV

SANDBOX_MODES = ("auto", "required", "off")
UNPRIVILEGED_USER = "nobody"
PROBE_TIMEOUT = 30.0  # seconds for the one trial child of probe()

# the only variables of the worker's environment a child inherits (besides LC_* and PYTHON*)
_ALLOWED_ENV = frozenset({"PATH", "LANG", "TZ", "TERM"})
_DENIED_PYTHON_ENV = frozenset({"PYTHONSTARTUP", "PYTHONINSPECT"})  # would run code at start
# replaced by empty directories inside the sandbox (the volunteer's files, other users' temp)
_HIDDEN_ROOTS = ("/tmp", "/var/tmp", "/home", "/root", "/run/user")


class SandboxUnavailable(DcprotoError):
    """``--sandbox required`` on a machine where no sandbox can be set up."""


@dataclass(frozen=True)
class SandboxOptions:
    mode: str = "auto"  # auto | required | off
    allow_network: bool = False
    max_disk: int | None = None  # bytes for one task's output dir (a size-capped tmpfs)


@dataclass(frozen=True)
class Sandbox:
    """What :func:`probe` found, for every child of this worker."""

    options: SandboxOptions
    bwrap: str | None = None  # a bubblewrap that works here, or None: no namespaces
    run_as: tuple[int, int] | None = None  # (uid, gid) to drop to: the worker runs as root
    pid_namespace: bool = False  # children see only their own processes
    description: str = "no sandbox"  # one line for the worker's start-up log
    setpriv: str | None = None  # util-linux setpriv, to drop to run_as inside bwrap


@dataclass
class Launch:
    argv: list[str]
    env: dict[str, str]
    cwd: str
    pass_fds: tuple[int, ...] = ()
    preexec_fn: Callable[[], None] | None = None
    extra: dict[str, str] = field(default_factory=dict)


# -- probe ---------------------------------------------------------------------------------


def probe(options: SandboxOptions) -> Sandbox:
    """What sandbox this machine gives children, checked by starting one trial child."""
    if options.mode not in SANDBOX_MODES:
        raise ValueError(f"sandbox mode must be one of {', '.join(SANDBOX_MODES)}")
    run_as = _unprivileged_ids() if os.geteuid() == 0 else None
    setpriv = shutil.which("setpriv") if run_as is not None else None
    bwrap: str | None = None
    why_not = "off"
    if options.mode != "off":
        bwrap, why_not = _working_bwrap()
        if bwrap is not None:
            sandbox = Sandbox(options, bwrap, run_as, True, setpriv=setpriv)
            problem = _trial_child(sandbox)
            if problem is None:
                return replace(sandbox, description=_describe(sandbox))
            bwrap, why_not = None, f"bubblewrap cannot start the interpreter: {problem}"
        if options.mode == "required":
            raise SandboxUnavailable(
                f"--sandbox required, but no sandbox can be set up here: {why_not} (install "
                "bubblewrap, e.g. apt-get install bubblewrap, or choose --sandbox auto)"
            )
    user = None
    if run_as is not None:
        # without a mount namespace nobody must reach the interpreter where it lies
        problem = _trial_child(Sandbox(options, None, run_as))
        if problem is not None:
            run_as = None
            user = f"running as root: {UNPRIVILEGED_USER} cannot start the interpreter ({problem})"
    sandbox = Sandbox(options, None, run_as)
    return replace(sandbox, description=_describe(sandbox, why_not, user))


def _unprivileged_ids() -> tuple[int, int]:
    try:
        user = pwd.getpwnam(UNPRIVILEGED_USER)
    except KeyError:
        return (65534, 65534)  # the customary nobody/nogroup
    for group_name in ("nobody", "nogroup"):
        with contextlib.suppress(KeyError):
            return (user.pw_uid, grp.getgrnam(group_name).gr_gid)
    return (user.pw_uid, user.pw_gid)


def _working_bwrap() -> tuple[str | None, str]:
    """A bubblewrap that can set up our namespaces here, or None and why not."""
    path = shutil.which("bwrap")
    if path is None:
        return None, "bubblewrap not found"
    mounts = ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
    argv = [path, *mounts, *_namespace_args(allow_network=False, root=os.geteuid() == 0), "true"]
    try:
        done = subprocess.run(argv, capture_output=True, timeout=PROBE_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"bubblewrap does not run: {exc}"
    if done.returncode != 0:
        said = done.stderr.decode(errors="replace").strip().splitlines()
        return None, f"bubblewrap does not work here: {said[-1] if said else done.returncode}"
    return path, "bubblewrap"


def _trial_child(sandbox: Sandbox) -> str | None:
    """Start the interpreter as a child would be, importing the child module: None if it
    works, else what went wrong."""
    base = Path(tempfile.mkdtemp(prefix="dcproto-probe-"))
    try:
        base.chmod(0o711)  # a dropped child must reach its home
        start = launch(
            sandbox,
            child_dir=base / "home",
            output_dir=base / "out",
            argv=[sys.executable, "-c", "import dcproto.worker.child"],
        )
        done = subprocess.run(
            start.argv,
            env=start.env,
            cwd=start.cwd,
            preexec_fn=start.preexec_fn,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=PROBE_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if done.returncode == 0:
        return None
    said = done.stderr.decode(errors="replace").strip().splitlines()
    return said[-1] if said else f"exit status {done.returncode}"


def _describe(sandbox: Sandbox, why_not: str = "", user: str | None = None) -> str:
    if user is not None:
        pass
    elif sandbox.run_as is not None:
        user = f"running as {UNPRIVILEGED_USER}"
    else:
        name = _user_name(os.geteuid())
        user = f"running as {name}" + ("" if sandbox.bwrap else f" (tasks can read {name}'s files)")
    if sandbox.bwrap is None:
        return f"sandbox: none ({why_not}): environment scrubbed, private HOME; {user}"
    parts = ["read-only system", "private /tmp"]
    parts.append("network allowed" if sandbox.options.allow_network else "no network")
    parts.append("no home")
    if sandbox.options.max_disk is not None:
        parts.append(f"output capped at {sandbox.options.max_disk} bytes")
    return f"sandbox: bubblewrap ({', '.join(parts)}; {user})"


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


# -- launch --------------------------------------------------------------------------------


def launch(
    sandbox: Sandbox,
    *,
    child_dir: Path,
    output_dir: Path,
    argv: list[str],
    pass_fds: tuple[int, ...] = (),
) -> Launch:
    """How to start ``argv`` as one child: creates ``child_dir`` (its home, cwd and temp dir)
    and ``output_dir``, owned by the account it runs as."""
    child_dir, output_dir = Path(os.path.abspath(child_dir)), Path(os.path.abspath(output_dir))
    env = child_env(child_dir, output_dir)
    _make_dirs(sandbox, child_dir, output_dir)
    if sandbox.bwrap is None:
        if sandbox.run_as is not None:
            _check_reachable(child_dir, sandbox.run_as)
        preexec = _dropper(*sandbox.run_as) if sandbox.run_as is not None else None
        return Launch(list(argv), env, str(child_dir), tuple(pass_fds), preexec)
    command = list(argv)
    if sandbox.run_as is not None:
        command = [*_drop_command(sandbox), *command]
    wrapped = [
        sandbox.bwrap,
        *_mount_args(sandbox, child_dir, output_dir),
        *_namespace_args(sandbox.options.allow_network, sandbox.run_as is not None),
        "--chdir",
        str(child_dir),
        "--",
        *command,
    ]
    forwarder = [sys.executable, "-I", "-S", "-c", _FORWARDER, *wrapped]
    return Launch(forwarder, env, str(child_dir), tuple(pass_fds), None, {"bwrap": sandbox.bwrap})


def child_env(child_dir: Path, output_dir: Path) -> dict[str, str]:
    """The worker's environment through the allow-list, with every per-user dir in
    ``child_dir``: no token, no ``DCPROTO_*`` but the output dir."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name in _ALLOWED_ENV
        or name.startswith("LC_")
        or (name.startswith("PYTHON") and name not in _DENIED_PYTHON_ENV)
    }
    env.setdefault("PATH", os.defpath)
    env.update(
        {
            "HOME": str(child_dir),
            "XDG_CONFIG_HOME": str(child_dir / ".config"),
            "XDG_DATA_HOME": str(child_dir / ".local" / "share"),
            "XDG_CACHE_HOME": str(child_dir / ".cache"),
            "XDG_STATE_HOME": str(child_dir / ".local" / "state"),
            # these two must exist: child_dir itself, so that a fresh home is an empty dir
            "XDG_RUNTIME_DIR": str(child_dir),
            "TMPDIR": str(child_dir),
            OUTPUT_DIR_ENV: str(output_dir),
        }
    )
    return env


def _make_dirs(sandbox: Sandbox, child_dir: Path, output_dir: Path) -> None:
    # the XDG dirs inside child_dir are left to whoever uses them to create
    for path in (child_dir, output_dir):
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.chmod(0o700)  # XDG_RUNTIME_DIR must be; the rest are private all the same
        if sandbox.run_as is not None:
            os.chown(path, *sandbox.run_as)


def _check_reachable(path: Path, ids: tuple[int, int]) -> None:
    """A dropped child without a mount namespace must be able to walk to its home."""
    uid, gid = ids
    for parent in path.parents:
        st = parent.stat()
        bit = 0o100 if st.st_uid == uid else 0o010 if st.st_gid == gid else 0o001
        if not st.st_mode & bit:
            raise SandboxUnavailable(
                f"{parent} is not searchable by uid {uid}: the child's home {path} must be "
                "(chmod o+x the directories above it)"
            )


def _dropper(uid: int, gid: int) -> Callable[[], None]:
    def drop() -> None:  # runs in the forked child, before exec
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)

    return drop


def _drop_command(sandbox: Sandbox) -> list[str]:
    """What drops to ``run_as`` inside bwrap, which runs as root (bwrap's own --uid would
    need a user namespace, whose "nobody" is still root to the files outside)."""
    assert sandbox.run_as is not None
    uid, gid = map(str, sandbox.run_as)
    if sandbox.setpriv is not None:
        drop = [sandbox.setpriv, "--reuid", uid, "--regid", gid, "--clear-groups"]
        return [*drop, "--bounding-set", "-all", "--inh-caps", "-all", "--"]
    code = f"import os,sys;os.setgroups([]);os.setgid({gid});os.setuid({uid});"
    code += "os.execv(sys.argv[1],sys.argv[1:])"
    return [sys.executable, "-I", "-S", "-c", code]


def _namespace_args(allow_network: bool, root: bool) -> list[str]:
    # not --unshare-all: as root it adds a user namespace, where we could not drop to nobody
    args = ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    if not allow_network:
        args.append("--unshare-net")
    args += ["--die-with-parent", "--new-session", "--cap-drop", "ALL"]
    if root:  # for the drop to nobody, which clears them; bwrap must enter nobody's home
        for cap in ("CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP", "CAP_DAC_READ_SEARCH"):
            args += ["--cap-add", cap]
    return args


def _mount_args(sandbox: Sandbox, child_dir: Path, output_dir: Path) -> list[str]:
    max_disk = sandbox.options.max_disk
    size = ["--size", str(max_disk)] if max_disk is not None else []
    args = ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    args += ["--perms", "1777", "--tmpfs", "/dev/shm"]  # POSIX semaphores (multiprocessing)
    secrets = _real_dirs(_secret_dirs())
    # the roots, the worker's secrets and the runner's workdir (other children's files)
    hidden = _outermost(
        _real_dirs([*_HIDDEN_ROOTS, *secrets, str(child_dir.parent), str(output_dir.parent)])
    )
    for path in hidden:
        if path == "/tmp":
            args += ["--perms", "1777", *size, "--tmpfs", path]
        else:
            args += ["--tmpfs", path]
    rebound = _outermost(
        path for path in _real_dirs(_interpreter_paths()) if _under_any(path, hidden)
    )
    made: set[str] = set()

    def make_parents(path: str) -> None:
        # bwrap would make them 0700 root, which nobody cannot walk through
        if _under_any(str(Path(path).parent), rebound):
            return  # they are there, from the host
        for root in hidden:
            if _under_any(path, [root]):
                ancestors = Path(path).relative_to(root).parents
                for ancestor in reversed([root / part for part in ancestors][:-1]):
                    if str(ancestor) not in made:
                        made.add(str(ancestor))
                        args.extend(["--perms", "0755", "--dir", str(ancestor)])

    for path in rebound:
        make_parents(path)
        args += ["--ro-bind", path, path]
    for path in secrets:  # inside what was mounted back: hide again
        if _under_any(path, rebound):
            args += ["--tmpfs", path]
    make_parents(str(child_dir))
    args += ["--bind", str(child_dir), str(child_dir)]
    make_parents(str(output_dir))
    if max_disk is None:
        args += ["--bind", str(output_dir), str(output_dir)]
    else:  # a tmpfs of that size: the child cannot fill the volunteer's disk
        perms = "0777" if sandbox.run_as is not None else "0700"
        args += ["--perms", perms, *size, "--tmpfs", str(output_dir)]
    return args


def _secret_dirs() -> list[str]:
    """The worker's config dir (tokens in users.toml) and dcproto's data dir (a server's
    state dir with its admin token, by default)."""
    from ..users import config_path  # users imports the network stack: only when needed

    return [
        str(config_path().parent),
        platformdirs.user_config_dir("dcproto"),
        platformdirs.user_data_dir("dcproto"),
        platformdirs.user_cache_dir("dcproto"),
    ]


def _interpreter_paths() -> list[str]:
    """Where the child's interpreter, its stdlib, site-packages and dcproto lie."""
    paths = [
        sys.prefix,
        sys.exec_prefix,
        sys.base_prefix,
        sys.base_exec_prefix,
        os.path.dirname(os.path.realpath(sys.executable)),
        str(Path(__file__).resolve().parents[1]),  # the dcproto package
    ]
    # sys.path[0] is the worker's script dir or cwd, which a `python -c` child does not get
    paths += [entry for entry in sys.path[1:] if entry]
    return paths


def _real_dirs(paths: Iterable[str]) -> list[str]:
    found = []
    for path in paths:
        real = os.path.realpath(path)
        if real != "/" and os.path.exists(real) and real not in found:
            found.append(real)
    return found


def _under_any(path: str, roots: Iterable[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def _outermost(paths: Iterable[str]) -> list[str]:
    """The paths not inside another of them, parents first."""
    kept: list[str] = []
    for path in sorted(set(paths), key=len):
        if not _under_any(path, kept):
            kept.append(path)
    return kept


# Run as `python -I -S -c _FORWARDER bwrap ARGS...`: starts bwrap, passes SIGUSR1 on to the
# sandboxed command (bwrap's monitor would die of it) and exits as the command did.
_FORWARDER = r"""
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker decides when children stop
init = []  # host pid of bwrap's pid 1, whose child is the command
pending = []

def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:  # no CONFIG_PROC_CHILDREN: look for them
        found = []
        for name in os.listdir("/proc"):
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    if int(f.read().rpartition(b")")[2].split()[1]) == pid:
                        found.append(int(name))
            except (OSError, ValueError, IndexError):
                pass
        return found

def handles(pid, signum):
    # a child still starting would die of the signal: the runner's abandon pipe tells it
    # what it missed before each task, so a signal it cannot take yet is not sent
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line[:7] in ("SigCgt:", "SigIgn:") and int(line[7:], 16) >> (signum - 1) & 1:
                    return True
    except (OSError, ValueError):
        pass
    return False

def forward(signum, frame):
    if not init:
        pending.append(signum)
        return
    for pid in children(init[0]):
        if handles(pid, signum):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

signal.signal(signal.SIGUSR1, forward)
r, w = os.pipe()
os.set_inheritable(w, True)
pid = os.posix_spawn(sys.argv[1], [sys.argv[1], "--info-fd", str(w), *sys.argv[2:]], os.environ)
os.close(w)
info = b""
while b"}" not in info:
    chunk = os.read(r, 4096)
    if not chunk:
        break
    info += chunk
os.close(r)
_, found, rest = info.partition(b'"child-pid":')
if found:
    init.append(int(rest.split(b",")[0].split(b"}")[0]))
    for signum in pending:
        forward(signum, None)
_, status = os.waitpid(pid, 0)
code = os.waitstatus_to_exitcode(status)
# bwrap says the command died of signal N with 128 + N: die of it too, as a plain child would
signum = -code if code < 0 else code - 128 if code > 128 else 0
if signum:
    try:
        signal.signal(signum, signal.SIG_DFL)
    except (OSError, ValueError):
        pass
    try:
        os.kill(os.getpid(), signum)
    except (OSError, ValueError):
        pass
os._exit(code if code >= 0 else 128 - code)
"""
