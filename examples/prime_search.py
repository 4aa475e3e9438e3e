"""Find a gap of at least 300 between consecutive primes above a trillion, and stop there.

Run it with no server (it starts an embedded one):  python examples/prime_search.py
or on a named server: DCPROTO_USER=home python examples/prime_search.py

The numbers above START are cut into chunks; each task sieves its chunks. The stop function
ends the whole project at the first gap found: the server hands out no more chunks and the
workers drop the ones they are running. The gap found is the first one *in time*, not
necessarily the lowest.
"""

import math
import os
import time

from dcproto import Distribute

START = 10**12
CHUNK = 1_000_000
GAP = 300


def small_primes(limit):
    """The primes up to ``limit``, by the sieve of Eratosthenes."""
    sieve = bytearray([1]) * (limit + 1)
    sieve[0:2] = b"\0\0"
    for n in range(2, math.isqrt(limit) + 1):
        if sieve[n]:
            sieve[n * n :: n] = bytes(len(range(n * n, limit + 1, n)))
    return [n for n in range(limit + 1) if sieve[n]]


@Distribute(
    user_name=os.environ.get("DCPROTO_USER"),
    iterator=lambda: (START + i * CHUNK for i in range(10**6)),  # far more than it will need
    task_size=1,
    stop_func="found",
    results_path="results/prime_search",
)
class PrimeGap:
    @staticmethod
    def parallel_func(low):
        """The first pair of consecutive primes in [low, low + CHUNK) at least GAP apart, or
        None. (A gap across two chunks is not looked for: chunks are far longer than gaps.)"""
        high = low + CHUNK
        is_prime = bytearray([1]) * CHUNK
        for p in small_primes(math.isqrt(high)):
            first = max(p * p, (low + p - 1) // p * p)
            is_prime[first - low :: p] = bytes(len(range(first - low, CHUNK, p)))
        previous = None
        for offset in range(CHUNK):
            if is_prime[offset]:
                if previous is not None and low + offset - previous >= GAP:
                    return (previous, low + offset)
                previous = low + offset
        return None

    @staticmethod
    def found(value):
        return value is not None


if __name__ == "__main__":
    started = time.perf_counter()
    project = PrimeGap()
    results = project.get_results()
    elapsed = time.perf_counter() - started
    ((low, (p, q)),) = results.items()
    print(f"{p:,} and {q:,} are consecutive primes {q - p} apart (chunk from {low:,})")
    print(f"{project.progress.tasks_done} chunks searched in {elapsed:.2f} s")
