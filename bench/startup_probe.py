"""Cold start in a fresh interpreter: from creating the system to its first result.

    python -m bench.startup_probe SYSTEM

dcproto is the embedded default (no user_name): from ``Project()`` to the first result. The
peers: from creating the Pool / executor / cluster / ``ray.init`` to the first result of one
submitted item. Import time is measured apart. Prints one ``@@bench {json}`` line.
"""

from __future__ import annotations

import json
import sys
import time

from bench import workloads as w

MARK = "@@bench "


def main() -> int:
    system = sys.argv[1]
    started = time.perf_counter()
    if system == "dcproto":
        from dcproto import Distribute

        imported = time.perf_counter()

        @Distribute(iterator=[0], task_size=1, local_workers=w.SLOTS)
        class FirstResult:
            parallel_func = staticmethod(w.plus_one)

        begin = time.perf_counter()
        results = FirstResult().get_results(timeout=120)
        first = time.perf_counter()
        assert results == {0: 1}, results
    else:
        from bench.peers import PEERS

        peer = PEERS[system]()
        imported = time.perf_counter()
        begin = time.perf_counter()
        peer.start()  # up to the first result of one item, as in the bench run
        first = time.perf_counter()
    print(
        MARK + json.dumps({"import_s": imported - started, "startup_s": first - begin}),
        flush=True,
    )
    if system != "dcproto":
        peer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
