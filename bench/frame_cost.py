"""What one frame of a one-item task costs to encode and decode: ``python -m bench.frame_cost``.

The three frames every one-item task crosses the server with (the Task pushed to a worker, the
worker's Result, the TaskDone relayed to the creator), built as the real path builds them, and
timed through the sans-I/O layer alone: ``encode`` (validation included) and ``decode``
(msgpack, then validation). Set beside the server's CPU per task (``bench.cpu_per_task``), it
bounds what sending several tasks or results per frame could save: at most these figures.
"""

from __future__ import annotations

import argparse
import pickle
import sys
import timeit

from dcproto import protocol as p

STATS = {"run": 1e-6, "exec": 5e-5, "service": 0.003, "held": 0.001}


def frames() -> list[p.Message]:
    items = pickle.dumps(range(7, 8), protocol=pickle.HIGHEST_PROTOCOL)
    payload = pickle.dumps([8], protocol=pickle.HIGHEST_PROTOCOL)
    project_id = "0123456789abcdef0123456789abcdef"
    relayed = {**STATS, "worker": "worker-1", "attempt": 1, "round_trip": 0.002}
    return [
        p.Task(task_id=1, project_id=project_id, attempt=1, items=items),
        p.Result(
            task_id=1,
            attempt=1,
            outcome="ok",
            payload=payload,
            n_items=1,
            n_kept=1,
            error=None,
            stats=dict(STATS),
            files=[],
            credit=1,
        ),
        p.TaskDone(
            project_id=project_id,
            seq=0,
            items=items,
            payload=payload,
            n_items=1,
            n_kept=1,
            files=[],
            stats=relayed,
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.frame_cost", description=__doc__)
    parser.add_argument("--number", type=int, default=20_000)
    args = parser.parse_args(argv)
    n = args.number
    server = 0.0  # what the server itself does per task: encode Task and TaskDone, decode Result
    print(f"{'frame':10} {'bytes':>6} {'encode µs':>10} {'decode µs':>10}")
    for message in frames():
        body = p.encode(message)[p.HEADER.size :]
        encode = min(timeit.repeat(lambda m=message: p.encode(m), number=n, repeat=3)) / n * 1e6
        decode = min(timeit.repeat(lambda b=body: p.decode(b), number=n, repeat=3)) / n * 1e6
        server += decode if isinstance(message, p.Result) else encode
        print(f"{type(message).__name__:10} {len(body):6} {encode:10.1f} {decode:10.1f}")
    print(
        f"per one-item task, the server encodes a Task and a TaskDone and decodes a Result: "
        f"{server:.1f} µs"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
