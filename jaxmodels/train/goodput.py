"""Goodput: where a run's wall time went, and the fraction of it that was training (as MaxText reports it).

The parts are disjoint intervals of the host's wall-clock time, so they never add up to more than
the wall time; `other_s` is the rest (building the trainer, restoring or initialising the state,
writing metrics, sampling). JAX dispatches asynchronously, so the host's intervals are not the
device's: the loop keeps one step in flight and waits for a step's metrics only after dispatching
the next one. See `train_and_evaluate` for where each part is measured.
"""

import contextlib
import time

PARTS = ("compile", "checkpoint", "data", "steps", "eval")


class Goodput:
    """Accumulates seconds per part (`PARTS`) from its creation, the start of the run."""

    def __init__(self):
        self.start = time.perf_counter()
        self.seconds = dict.fromkeys(PARTS, 0.0)

    @contextlib.contextmanager
    def timing(self, part: str):
        """Add the time spent in the `with` block to `part`."""
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[part] += time.perf_counter() - begin

    def summary(self) -> dict[str, float]:
        """wall_s, PART_s for each part, other_s (the rest of the wall time) and goodput = steps_s / wall_s."""
        wall = time.perf_counter() - self.start
        out = {"wall_s": wall, **{f"{k}_s": v for k, v in self.seconds.items()}}
        out["other_s"] = max(wall - sum(self.seconds.values()), 0.0)
        out["goodput"] = self.seconds["steps"] / wall
        return out


def goodput_text(goodput: dict[str, float]) -> str:
    """One line for the printed summary: wall time, each part with its share, and the goodput."""
    wall = goodput["wall_s"]
    parts = "  ".join(f"{k.removesuffix('_s')} {v:.1f} s ({v / wall:.0%})" for k, v in goodput.items()
                      if k.endswith("_s") and k != "wall_s")
    return f"goodput: {goodput['goodput']:.1%} of {wall:.1f} s wall time; {parts}"
