"""Count the primes below two million, split over every core of this machine.

Run it with no server (it starts an embedded one):  python examples/primes.py
or on a named server: DCPROTO_USER=home python examples/primes.py
"""

import os
import time

from dcproto import Distribute

LIMIT = 2_000_000
CHUNK = 20_000


@Distribute(
    user_name=os.environ.get("DCPROTO_USER"),
    iterator=range(0, LIMIT, CHUNK),  # each item is the start of a chunk of numbers
    task_size=4,
    results_path="results/primes",
)
class Primes:
    @staticmethod
    def parallel_func(start):
        """How many primes lie in [start, start + CHUNK)."""
        count = 0
        for n in range(max(start, 2), start + CHUNK):
            if n % 2 == 0:
                count += n == 2
                continue
            d = 3
            while d * d <= n:
                if n % d == 0:
                    break
                d += 2
            else:
                count += 1
        return count


if __name__ == "__main__":
    started = time.perf_counter()
    project = Primes()
    results = project.get_results()
    elapsed = time.perf_counter() - started
    print(f"{sum(results.values())} primes below {LIMIT:,}")
    print(f"{len(results)} chunks in {elapsed:.2f} s; results in results/primes/")
