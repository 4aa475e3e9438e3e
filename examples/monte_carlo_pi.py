"""Estimate pi by throwing random points at a square, split over every core of this machine.

Run it with no server (it starts an embedded one):  python examples/monte_carlo_pi.py
or on a named server: DCPROTO_USER=home python examples/monte_carlo_pi.py

Each item is the seed of one batch of points, so the estimate is the same on every run and on
any number of workers.
"""

import math
import os
import random
import time

from dcproto import Distribute

BATCHES = 400
POINTS_PER_BATCH = 50_000


@Distribute(
    user_name=os.environ.get("DCPROTO_USER"),
    iterator=range(BATCHES),  # each item seeds one batch
    task_size=10,
    results_path="results/monte_carlo_pi",
)
class MonteCarloPi:
    @staticmethod
    def parallel_func(seed):
        """How many of POINTS_PER_BATCH random points in the unit square fall in the circle."""
        rng = random.Random(seed)
        inside = 0
        for _ in range(POINTS_PER_BATCH):
            x, y = rng.random(), rng.random()
            inside += x * x + y * y <= 1.0
        return inside


if __name__ == "__main__":
    started = time.perf_counter()
    hits = MonteCarloPi().get_results()
    elapsed = time.perf_counter() - started
    points = BATCHES * POINTS_PER_BATCH
    estimate = 4 * sum(hits.values()) / points
    print(f"pi ~ {estimate:.6f} from {points:,} points (error {abs(estimate - math.pi):.2e})")
    print(f"{len(hits)} batches in {elapsed:.2f} s; results in results/monte_carlo_pi/")
