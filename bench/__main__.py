"""dcproto side by side with the tools a user would pick instead, in one run on this machine.

    pip install '.[bench]' && python -m bench [--reps 5] [--quick] [--only WORKLOAD]
                                            [--peers serial,pool,ppe,dask,ray] [--insecure]

dcproto runs its real path (a ``dcproto-server`` subprocess with durable state, one
``dcproto-worker --slots 2`` subprocess, the creator in this process, TLS on 127.0.0.1 with
the server's pinned self-signed certificate and a token per role; ``--insecure``: plain TCP,
see also ``python -m bench.tls_cost``); each
peer runs in a subprocess of its own (``bench.peers``) that is killed if it makes no progress
for ``--rep-timeout`` seconds. Prints one markdown table of medians and writes it to
``bench/results.md``, with every repetition in ``bench/results.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import queue
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench import report
from bench import workloads as w
from bench.peers import LABELS, MARK, PEERS

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ALL_PEERS = tuple(PEERS)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 5; quick 2)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, 2 repetitions")
    parser.add_argument(
        "--only",
        action="append",
        default=None,
        metavar="WORKLOAD",
        help=f"run only these workloads (repeat or comma-separate): {', '.join(w.WORKLOADS)}",
    )
    parser.add_argument(
        "--peers",
        default=",".join(ALL_PEERS),
        help=f"comma-separated peers to compare with (default: {','.join(ALL_PEERS)}; "
        "'none' for dcproto alone)",
    )
    parser.add_argument(
        "--rep-timeout",
        type=float,
        default=None,
        help="seconds without progress before a peer (or a dcproto project) counts as hung "
        "(default 150; quick 90)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="dcproto over plain TCP (server, worker and user --insecure) instead of TLS",
    )
    parser.add_argument("--out", type=Path, default=HERE, help="where results.md/json go")
    args = parser.parse_args(argv)
    if args.only:
        names = [n.strip() for item in args.only for n in item.split(",") if n.strip()]
        unknown = [n for n in names if n not in w.WORKLOADS]
        if unknown:
            parser.error(f"unknown workload(s) {unknown}; choose from {list(w.WORKLOADS)}")
        args.workloads = [n for n in w.WORKLOADS if n in names]
    else:
        args.workloads = list(w.WORKLOADS)
    peers = [] if args.peers.strip() == "none" else [p.strip() for p in args.peers.split(",")]
    unknown = [p for p in peers if p and p not in PEERS]
    if unknown:
        parser.error(f"unknown peer(s) {unknown}; choose from {list(ALL_PEERS)}")
    args.peer_list = [p for p in ALL_PEERS if p in peers]
    if args.reps is None:
        args.reps = 2 if args.quick else 5
    if args.reps < 1:
        parser.error("--reps must be at least 1")
    if args.rep_timeout is None:
        args.rep_timeout = 90.0 if args.quick else 150.0
    return args


# ---- dcproto, in this process ------------------------------------------------------------------


def run_dcproto(args: argparse.Namespace, sizes: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Every workload on one cluster; after a failure the cluster is replaced by a fresh one
    (new server, worker and state dir) so that one hang or crash does not spoil the rest.
    Each project is bounded by ``get_results(timeout=--rep-timeout)``."""
    from bench.dcproto_runner import DcprotoSystem
    from bench.harness import run_workload, warm_system

    out: dict[str, Any] = {"workloads": {}}
    remaining = [x for x in args.workloads if x != "startup"]
    for instance in range(1, 4):
        where = workdir / f"dcproto-{instance}"
        where.mkdir()
        system = DcprotoSystem(
            where, timeout=args.rep_timeout, user=f"bench{instance}", insecure=args.insecure
        )
        try:
            started = time.perf_counter()
            system.start()
            took = time.perf_counter() - started
            warm_system(system)
        except Exception as exc:
            error = f"start-up: {type(exc).__name__}: {exc}"
            log(f"dcproto: {error}")
            system.close()
            if instance == 1:
                out.update(error=error, logs=system.log_tail())
            for workload in remaining:
                out["workloads"][workload] = {"error": f"not run: {error}"}
            return out
        if instance == 1:
            out["startup_s"] = took
            out["token_setup_s"] = system.token_setup_s
        log(f"dcproto: up in {took:.2f} s")
        failed = False
        try:
            while remaining and not failed:
                workload = remaining.pop(0)
                log(f"dcproto: {workload}")

                def on_rep(rep: int, workload: str = workload) -> None:
                    log(f"dcproto: {workload} rep {rep + 1}/{args.reps} done")

                result = run_workload(system, workload, sizes, args.reps, on_rep)
                if "error" in result:
                    log(f"dcproto: {workload} failed: {result['error']}")
                    result["logs"] = system.log_tail()
                    failed = True
                out["workloads"][workload] = result
        finally:
            system.close()
        if not remaining:
            break
        log(f"dcproto: a fresh server and worker for {', '.join(remaining)}")
    return out


# ---- peers, each in a subprocess ----------------------------------------------------------------


def kill_tree(proc: subprocess.Popen[str]) -> None:
    """The peer, its process group and every descendant (Ray and Dask start their own)."""
    with contextlib.suppress(Exception):
        import psutil

        for child in psutil.Process(proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.kill()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def pump(proc: subprocess.Popen[str], lines: queue.Queue[str | None]) -> None:
    """The peer's ``@@bench`` lines into ``lines``; None at its end."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(MARK):
            lines.put(line[len(MARK) :])
    lines.put(None)


def run_peer(
    peer: str,
    workloads: list[str],
    args: argparse.Namespace,
    sizes: dict[str, Any],
    workdir: Path,
) -> dict[str, Any]:
    out: dict[str, Any] = {"workloads": {}}
    remaining = list(workloads)
    first = True
    attempts = 0
    while attempts < 3:
        attempts += 1
        cmd = [
            sys.executable, "-m", "bench.peers",
            "--peer", peer,
            "--workloads", ",".join(remaining),
            "--reps", str(args.reps),
            "--sizes", json.dumps(sizes),
        ]  # fmt: skip
        if not first:
            cmd.append("--no-startup")
        stderr = open(workdir / f"{peer}.log", "a")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL, text=True,
            cwd=ROOT, start_new_session=True,
        )  # fmt: skip
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=pump, args=(proc, lines), daemon=True).start()
        current: str | None = None
        finished = False
        problem: str | None = None
        while True:
            try:
                line = lines.get(timeout=args.rep_timeout)
            except queue.Empty:
                problem = f"no progress for {args.rep_timeout:g} s: killed"
                break
            if line is None:
                proc.wait()
                if not finished:
                    problem = f"the peer process exited with {proc.returncode}"
                break
            event = json.loads(line)
            kind = event["event"]
            if kind == "skip":
                out["skipped"] = event["reason"]
                log(f"{peer}: skipped ({event['reason']})")
                finished = True
            elif kind == "import":
                out.setdefault("import_s", event["seconds"])
            elif kind == "startup":
                out["startup_s"] = event["seconds"]
                log(f"{peer}: up" + (f" in {event['seconds']:.2f} s" if event["seconds"] else ""))
            elif kind == "begin":
                current = event["workload"]
                log(f"{peer}: {current}")
            elif kind == "rep":
                log(f"{peer}: {event['workload']} rep {event['rep'] + 1}/{args.reps} done")
            elif kind == "workload":
                result = event["result"]
                if "error" in result:
                    log(f"{peer}: {event['workload']} failed: {result['error']}")
                out["workloads"][event["workload"]] = result
                remaining.remove(event["workload"])
                current = None
            elif kind == "done":
                finished = True
        if finished:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(60)
        kill_tree(proc)
        stderr.close()
        if "skipped" in out or finished:
            break
        tail = (workdir / f"{peer}.log").read_text(errors="replace").splitlines()[-15:]
        if current is None and first and "startup_s" not in out:
            out["error"] = f"before its first workload: {problem}"
            out["logs"] = "\n".join(tail)
            log(f"{peer}: {out['error']}")
            break
        if current is not None:
            log(f"{peer}: {current}: {problem}")
            out["workloads"][current] = {
                "error": problem,
                "logs": "\n".join(tail),
                **out["workloads"].get(current, {}),
            }
            remaining.remove(current)
        first = False
        if not remaining:
            break
        log(f"{peer}: restarting for {', '.join(remaining)}")
    if remaining and "error" not in out and "skipped" not in out:
        for workload in remaining:
            out["workloads"][workload] = {"error": f"not run: after restarts, {problem}"}
    return out


def fresh_startup(system: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """``reps`` fresh interpreters, each timing its cold start (bench.startup_probe)."""
    reps: list[dict[str, float]] = []
    for rep in range(args.reps):
        cmd = [sys.executable, "-m", "bench.startup_probe", system]
        with open(workdir / f"startup-{system}.log", "a") as stderr:
            proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL, text=True,
                cwd=ROOT, start_new_session=True,
            )  # fmt: skip
            try:
                stdout, _ = proc.communicate(timeout=args.rep_timeout)
            except subprocess.TimeoutExpired:
                kill_tree(proc)
                return {"reps": reps, "error": f"rep {rep + 1}: no result in {args.rep_timeout} s"}
            kill_tree(proc)
        found = [line for line in stdout.splitlines() if line.startswith(MARK)]
        if not found:
            return {"reps": reps, "error": f"rep {rep + 1}: exited {proc.returncode}, no result"}
        reps.append(json.loads(found[0][len(MARK) :]))
    return {"reps": reps}


# ---- the run -----------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in ("dcproto", "dask", "distributed", "ray", "psutil"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[name] = importlib.metadata.version(name)
    return found


def notes(context: dict[str, Any]) -> list[str]:
    meta = context["meta"]
    cal = meta["calibration"]
    loads = meta["load_average_1min"]
    tagged: list[tuple[tuple[str, ...], str]] = [  # (the workloads it is about, or all: ())
        (
            (),
            "dcproto: a `dcproto-server` subprocess with durable state (SQLite in a temporary "
            "`--state-dir`), one `dcproto-worker connect 127.0.0.1:PORT --slots 2` subprocess, "
            "the creator (`Distribute(user_name=...)`) in the bench process; every job is a new "
            f"project. dcproto's connections: {meta['dcproto_transport']} on 127.0.0.1"
            + (
                ""
                if meta["dcproto_transport"] != "TLS"
                else " (the server's self-signed certificate, pinned by its fingerprint; a "
                "worker token and a creator token; `python -m bench.tls_cost` measures its cost)"
            )
            + ". Peers: serial loop; `multiprocessing.Pool(2)`; `ProcessPoolExecutor(2)`; "
            "Dask `LocalCluster(n_workers=2, threads_per_worker=1, processes=True)` + `Client`; "
            "Ray `ray.init(num_cpus=2)`; each peer in its own subprocess.",
        ),
        (
            (),
            "Start-up (launch until a first one-item result) is timed apart from the work; "
            "dcproto's includes making its two tokens once the server is up and waiting for the "
            "running server to pick them up (it looks every 0.5 s; "
            f"{context['systems'].get('dcproto', {}).get('token_setup_s', 0.0):.2f} s here); "
            "every system is then warmed once, and each workload once more on a tiny version "
            "of itself, before the timed repetitions. Every run's results are checked.",
        ),
        (
            ("overhead", "batched", "payload", "cpu"),
            "task_size 1: Pool `map(chunksize=1)`, PPE `map(chunksize=1)`, Dask `client.map` + "
            "`gather`, Ray one remote call per item. Batched: Pool/PPE `chunksize=10,000`, "
            "Dask/Ray one task per 10,000-item list. Dask batches return one opaque object per "
            "task: Dask serializes a returned list element by element, which made 20 batches of "
            "10,000 take 3.4 s instead of 0.05 s in a trial.",
        ),
        (
            ("cpu", "early-stop"),
            f"Work per item, calibrated at the start of the run: ~10 ms = {cal['cpu_loops']:,} "
            f"loop iterations, ~20 µs = {cal['stop_loops']:,}. Parallel efficiency = serial "
            "wall / (2 x wall) against the serial loop's median (the serial loop scores 0.50).",
        ),
        (
            ("latency",),
            "Latency: the peers submit one item and wait (Pool `apply`, PPE/Dask "
            "`submit().result()`, Ray `ray.get(f.remote(x))`); dcproto submits a one-item "
            "project each time.",
        ),
        (
            ("early-stop",),
            "Early stop: dcproto uses `stop_func`; Pool `imap_unordered` over 1,000-item chunks "
            f"and `terminate()` at the hit; PPE/Dask/Ray keep {w.WINDOW} chunks in flight and "
            "cancel the rest at the hit. The following row times a one-item job right after "
            "the answer (for Pool that includes terminating it and starting a new one).",
        ),
        (
            ("filter",),
            "Filter: dcproto uses `only_if_func` (task_size 10,000); the peers filter inside a "
            f"10,000-item chunk function (Pool `imap_unordered`; PPE/Dask/Ray {w.WINDOW} chunks "
            "in flight). dcproto's RSS is sampled every 50 ms with psutil: server, worker with "
            "its child processes, and the creator's growth over the run (the creator is the "
            "bench process itself).",
        ),
        (
            ("late-joiner",),
            f"Late joiner: each repetition starts 2 fresh worker slots, warms them on "
            f"{w.LATE_WARM} one-item `x + 1` tasks, submits {w.LATE_TASKS} one-item tasks that "
            f"each sleep {w.LATE_TASK_S:g} s (sleep, not spin: the figure is about scheduling "
            "whatever else loads the machine) and starts a third slot "
            f"{w.LATE_JOIN_S:g} s after the submit; timed from the submit to the last result "
            "(ideal about 4-5 s: 12 s of work on 2 slots for the first second, then on 3). "
            "dcproto: a fresh `dcproto-server` with two `dcproto-worker --slots 1` processes, "
            "a third started by a timer; the project a class through `Distribute` "
            "(`results_path` in a temporary dir); the late slot's count from the project's "
            "per-worker stats. Dask: a fresh `LocalCluster(n_workers=2, threads_per_worker=1, "
            "processes=True)`, `client.map`, `cluster.scale(3)` at the join; the count from "
            "`who_has`. Ray: see its cell note. Pool and PPE cannot add a process: the same "
            "tasks on their 2, so their ratio is not like for like; the serial loop does not "
            "run it.",
        ),
        (
            ("startup",),
            "Fresh start-up: a new interpreter per repetition; dcproto is the embedded default "
            "(`Distribute` without user_name, `local_workers=2`) from `Project()` to the first "
            "result; the peers from creating the pool / cluster / `ray.init` to the first "
            "result. Imports are not counted (they are in results.json).",
        ),
        (
            (),
            "1-minute load average along the run (the benchmark itself keeps about 2 busy; "
            "more means other work shared the machine): "
            + ", ".join(f"{k} {val:.1f}" for k, val in loads.items())
            + ".",
        ),
        ((), "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + "."),
    ]
    if loads["start"] > 1.0 or max(loads.values()) > 3.0:
        tagged.insert(
            0,
            (
                (),
                "**Other work was running on this machine during the run** (1-minute load "
                f"average {loads['start']:.1f} before the benchmark began, up to "
                f"{max(loads.values()):.1f} during it): expect noisy numbers, above all in "
                "the cpu and early-stop rows.",
            ),
        )
    selected = set(meta["workloads"])
    out = [text for about, text in tagged if not about or selected.intersection(about)]
    for name, system in context["systems"].items():
        if "skipped" in system:
            out.append(f"{LABELS[name]} was skipped: {system['skipped']}.")
        elif system.get("baseline_only"):
            out.append("The serial loop ran only as the CPU baseline (not in --peers).")
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = dict(w.QUICK_SIZES if args.quick else w.FULL_SIZES)
    began = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="dcproto-bench-")
    workdir = Path(tmp.name)
    # every process this run starts can import bench.workloads, and dcproto's named user lives
    # in a throwaway config dir
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    os.environ["DCPROTO_CONFIG_DIR"] = str(workdir / "config")
    calibration = w.configure(sizes["stop_target"])
    log(f"calibrated: {calibration}; logs in {workdir}")
    context: dict[str, Any] = {
        "meta": {
            "when": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "machine": f"{os.cpu_count()} CPUs, {platform.system()} {platform.machine()}",
            "command": shlex.join(["python", "-m", "bench", *(argv or sys.argv[1:])]),
            "reps": args.reps,
            "quick": args.quick,
            "workloads": args.workloads,
            "peers": args.peer_list,
            "sizes": sizes,
            "calibration": calibration,
            "versions": versions(),
            "rep_timeout_s": args.rep_timeout,
            "dcproto_transport": "plain TCP (--insecure)" if args.insecure else "TLS",
        },
        "systems": {},
    }
    main_workloads = [x for x in args.workloads if x != "startup"]
    loads = context["meta"]["load_average_1min"] = {"start": os.getloadavg()[0]}
    context["systems"]["dcproto"] = run_dcproto(args, sizes, workdir)
    loads["after dcproto"] = os.getloadavg()[0]
    peers = list(args.peer_list)
    if "cpu" in main_workloads and "serial" not in peers:
        peers.insert(0, "serial")  # the baseline of parallel efficiency
    for peer in peers:
        wanted = main_workloads if peer in args.peer_list else ["cpu"]
        result = run_peer(peer, wanted, args, sizes, workdir)
        if peer not in args.peer_list:
            result["baseline_only"] = True
        context["systems"][peer] = result
        loads[f"after {peer}"] = os.getloadavg()[0]
    if "startup" in args.workloads:
        for name, system in context["systems"].items():
            if name == "serial" or "skipped" in system:
                continue
            log(f"{name}: fresh start-up x {args.reps}")
            system["fresh_startup"] = fresh_startup(name, args, workdir)
    loads["end"] = os.getloadavg()[0]
    context["meta"]["total_s"] = time.perf_counter() - began
    context["notes"] = notes(context)
    text = report.render(context)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(text)
    (args.out / "results.json").write_text(json.dumps(context, indent=1, default=str) + "\n")
    print(text)
    log(f"done in {context['meta']['total_s']:.0f} s; wrote {args.out / 'results.md'}")
    with contextlib.suppress(OSError):
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
