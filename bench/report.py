"""The one markdown table (medians; ratio dcproto / peer in every peer cell) and its notes."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench import workloads as w
from bench.peers import LABELS

HIGHER, LOWER = "higher", "lower"
X = "\u00d7"  # the multiplication sign


@dataclass(frozen=True)
class Row:
    workload: str
    label: str
    better: str
    value: Callable[[dict[str, Any], dict[str, Any]], float | None]
    fmt: Callable[[float], str]
    ratio: bool = True
    text: Callable[[dict[str, Any]], str | None] | None = None  # a cell that is not a number


def _median(system: dict[str, Any], workload: str, key: str) -> float | None:
    found = system.get("workloads", {}).get(workload, {}).get("median", {})
    return found.get(key)


def _num(digits: int) -> Callable[[float], str]:
    return lambda v: f"{v:,.{digits}f}"


def _ratio(r: float) -> str:
    if r >= 100:
        return f"{r:,.0f}"
    if r >= 10:
        return f"{r:.1f}"
    if r >= 0.1:
        return f"{r:.2f}"
    return f"{r:.2g}"


def _efficiency(context: dict[str, Any]) -> Callable[[dict[str, Any], dict[str, Any]], Any]:
    def value(system: dict[str, Any], _: dict[str, Any]) -> float | None:
        serial = _median(context["systems"].get("serial", {}), "cpu", "wall_s")
        wall = _median(system, "cpu", "wall_s")
        if serial is None or wall is None:
            return None
        return serial / (w.SLOTS * wall)

    return value


def _rss_text(n: int) -> Callable[[dict[str, Any]], str | None]:
    def text(system: dict[str, Any]) -> str | None:
        keys = ("server_peak_mb", "worker_peak_mb")
        parts = [_median(system, "filter", f"{n}.{k}") for k in keys]
        growth = _median(system, "filter", f"{n}.creator_growth_mb")
        if None in parts or growth is None:
            return None
        return f"{parts[0]:.0f} / {parts[1]:.0f} / +{growth:.1f}"

    return text


def rows(context: dict[str, Any]) -> list[Row]:
    s = context["meta"]["sizes"]

    def get(workload: str, key: str) -> Callable[[dict[str, Any], dict[str, Any]], Any]:
        return lambda system, _: _median(system, workload, key)

    def startup_run(system: dict[str, Any], _: dict[str, Any]) -> float | None:
        return system.get("startup_s")

    def startup_fresh(system: dict[str, Any], _: dict[str, Any]) -> float | None:
        runs = [r["startup_s"] for r in system.get("fresh_startup", {}).get("reps", [])]
        return statistics.median(runs) if runs else None

    out = [
        Row("start-up", "launch → first result, in this run (s)", LOWER, startup_run, _num(2)),
        Row(
            "overhead",
            f"{s['overhead']:,} {X} `x + 1`, task_size 1: tasks/s",
            HIGHER,
            get("overhead", "tasks_per_s"),
            _num(0),
        ),
        Row(
            "batched",
            f"{s['batched']:,} {X} `x + 1`, task_size {s['batched_task_size']:,}: items/s",
            HIGHER,
            get("batched", "items_per_s"),
            _num(0),
        ),
        Row(
            "cpu",
            f"{s['cpu']} {X} ~10 ms pure Python: parallel efficiency",
            HIGHER,
            _efficiency(context),
            _num(2),
        ),
        Row(
            "latency",
            f"{s['latency']} one-item jobs in sequence: median round trip (ms)",
            LOWER,
            get("latency", "median_ms"),
            _num(2),
        ),
        Row("latency", "… p99 round trip (ms)", LOWER, get("latency", "p99_ms"), _num(2)),
        Row(
            "latency",
            "… median, as users write it (dcproto: a class in the script, `results_path` set)",
            LOWER,
            get("latency", "as_written_median_ms"),
            _num(2),
        ),
        Row(
            "payload",
            f"{s['payload']} {X} 100 KiB results: MB/s",
            HIGHER,
            get("payload", "mb_per_s"),
            _num(0),
        ),
        Row(
            "early-stop",
            f"stop at item {s['stop_target']:,} of range(10**9), task_size "
            f"{s['stop_task_size']:,}: submit → answer (s)",
            LOWER,
            get("early-stop", "answer_s"),
            _num(2),
        ),
        Row(
            "early-stop",
            "… answer → a following one-item job's result (ms)",
            LOWER,
            lambda system, _: (
                None if (v := _median(system, "early-stop", "free_again_s")) is None else v * 1000
            ),
            _num(1),
        ),
    ]
    for n in s["filter"]:
        out.append(
            Row(
                "filter",
                f"range({n:,}), keep 1 in {w.FILTER_KEEP_EVERY:,}: items/s",
                HIGHER,
                get("filter", f"{n}.items_per_s"),
                _num(0),
            )
        )
    for n in s["filter"]:
        out.append(
            Row(
                "filter",
                f"range({n:,}): peak RSS MB, server / worker+children / creator growth",
                LOWER,
                lambda system, _: None,
                str,
                ratio=False,
                text=_rss_text(n),
            )
        )
    out += [
        Row(
            "late-joiner",
            f"{w.LATE_TASKS} {X} {w.LATE_TASK_S:g} s sleep after {w.LATE_WARM} tiny tasks on 2 "
            f"slots, a 3rd slot joins {w.LATE_JOIN_S:g} s after the submit: submit → all "
            "results (s)",
            LOWER,
            get("late-joiner", "wall_s"),
            _num(2),
        ),
        Row(
            "late-joiner",
            f"… tasks the late slot ran (of {w.LATE_TASKS})",
            HIGHER,
            get("late-joiner", "late_tasks"),
            lambda v: f"{v:g}",
            ratio=False,
        ),
    ]
    out.append(
        Row(
            "startup",
            "fresh process: create → first result (s); dcproto: embedded default",
            LOWER,
            startup_fresh,
            _num(2),
        )
    )
    return out


def _problem(system: dict[str, Any], workload: str) -> tuple[str, str] | None:
    """(what failed, why) for this cell, if anything did."""
    if workload == "startup":
        error = system.get("fresh_startup", {}).get("error")
        return ("fresh start-up", error) if error else None
    found = system.get("workloads", {}).get(workload)
    if found is None or workload == "start-up":
        return ("the system", system["error"]) if system.get("error") else None
    return (workload, found["error"]) if found.get("error") else None


def _aside(system: dict[str, Any], workload: str) -> str | None:
    """How this system ran ``workload`` its own way, or why it could not."""
    found = system.get("workloads", {}).get(workload, {})
    if "unsupported" in found:
        return f"not run: {found['unsupported']}"
    return found.get("note")


def _letter(i: int) -> str:
    return chr(ord("a") + i) if i < 26 else f"z{i - 25}"


def table(context: dict[str, Any]) -> tuple[str, list[str]]:
    """The markdown table and the footnotes it refers to."""
    systems = [
        name
        for name in ("dcproto", "serial", "pool", "ppe", "dask", "ray")
        if name in context["systems"] and "skipped" not in context["systems"][name]
    ]
    selected = context["meta"]["workloads"]
    notes: list[str] = []
    asides: list[str] = []  # the cell notes, [a], [b], ...

    def note(name: str, problem: tuple[str, str]) -> str:
        text = f"{LABELS[name]}, {problem[0]}: {problem[1]}"
        if text not in notes:
            notes.append(text)
        return f"[{notes.index(text) + 1}]"

    def aside(name: str, workload: str) -> str:
        text = _aside(context["systems"][name], workload)
        if text is None:
            return ""
        text = f"{LABELS[name]}, {workload}: {text}"
        if text not in asides:
            asides.append(text)
        return f" [{_letter(asides.index(text))}]"

    header = ["workload", "metric", "better", *(LABELS[name] for name in systems)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    dc = context["systems"].get("dcproto", {})
    for row in rows(context):
        if row.workload not in selected and row.workload != "start-up":
            continue
        if row.workload == "cpu" and "serial" not in context["systems"]:
            continue
        base = row.value(dc, context)
        cells = []
        for name in systems:
            system = context["systems"][name]
            if row.text is not None:
                cells.append(row.text(system) or "—")
                continue
            value = row.value(system, context)
            problem = _problem(system, row.workload)
            if value is None:
                cell = f"failed {note(name, problem)}" if problem else "—"
                cells.append(cell + aside(name, row.workload))
                continue
            cell = row.fmt(value)
            if problem:  # some repetitions finished before the error
                cell += f" {note(name, problem)}"
            if row.ratio and name != "dcproto" and base is not None and value > 0:
                cell += f" ({X}{_ratio(base / value)})"
            cells.append(cell + aside(name, row.workload))
        lines.append(f"| {row.workload} | {row.label} | {row.better} | " + " | ".join(cells) + " |")
    if asides:
        lines += ["", "Cell notes:", ""]
        lines += [f"- [{_letter(i)}] {text}" for i, text in enumerate(asides)]
    return "\n".join(lines), notes


def render(context: dict[str, Any]) -> str:
    meta = context["meta"]
    body, problems = table(context)
    out = [
        "# dcproto side by side",
        "",
        f"{meta['when']}, {meta['machine']}; medians of {meta['reps']} repetition"
        + ("s" if meta["reps"] != 1 else "")
        + (" (--quick: smaller sizes)" if meta["quick"] else "")
        + f"; {w.SLOTS} worker slots everywhere. Run: `{meta['command']}`.",
        "",
        body,
        "",
        f"({X}r) in a peer's cell is dcproto ÷ that peer: on a *higher* row r > 1 means dcproto is "
        "better, on a *lower* row r < 1 means dcproto is better.",
        "",
    ]
    if problems:
        out += ["Errors:", ""]
        out += [f"{i}. {text}" for i, text in enumerate(problems, 1)]
        out.append("")
    out += ["Notes:", ""]
    out += [f"- {note}" for note in context["notes"]]
    return "\n".join(out) + "\n"
