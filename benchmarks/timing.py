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


def trainer_step_times(trainer, steps: int, warmup: int, num_batches: int = 4):
    """Wall times in seconds of `steps` train steps of a `jaxmodels.train.loop.Trainer` from a fresh init, each
    synchronised with block_until_ready, after `warmup` untimed ones; the batches cycle through `num_batches` of the
    task's first training batches, made and sharded beforehand. Returns (times, final state, last metrics)."""
    state = trainer.init()
    source = trainer.task.train_batches(0, 0, 1)
    batches = [trainer.global_batch(next(source)) for _ in range(num_batches)]
    for i in range(warmup):
        state, metrics = trainer.train_step(state, batches[i % num_batches])
    jax.block_until_ready(state)
    times = []
    for i in range(steps):
        t = time.perf_counter()
        state, metrics = trainer.train_step(state, batches[i % num_batches])
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t)
    return times, state, metrics
