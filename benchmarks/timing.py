"""Device-synchronised timing shared by the benchmarks."""

import statistics
import time

import jax


def median_time(fn, *args, warmup: int = 2, iters: int = 10) -> float:
    """Median wall time in seconds of `fn(*args)`, each call synchronised with block_until_ready,
    after `warmup` untimed calls (compilation, autotuning, allocation)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)
