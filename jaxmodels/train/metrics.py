"""The metric writer (console and trackers) and the device peak FLOP/s table for MFU."""

from tqdm.auto import tqdm

from jaxmodels.train.trackers import Tracker

# bf16 dense peak per chip, from vendor datasheets (dense, no sparsity); override with train.peak_flops.
PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
}


def device_peak_flops(device_kind: str, override: float = 0.0) -> float | None:
    """Peak FLOP/s of one device: the override if > 0, else the table entry, else None (unknown)."""
    if override > 0:
        return override
    return PEAK_FLOPS.get(device_kind)


class MetricWriter:
    """Sends each step's scalars to the trackers (`jaxmodels.train.trackers`: metrics.jsonl, TensorBoard,
    W&B ...) under "PREFIX/NAME" keys, and prints every `console_every` steps above the progress bar.
    Only process 0 prints (`enabled`) and has trackers."""

    def __init__(self, trackers: list[Tracker], *, console_every: int, enabled: bool = True):
        self.trackers, self.console_every, self.enabled = trackers, console_every, enabled

    def log_config(self, config: dict) -> None:
        for tracker in self.trackers:
            tracker.log_config(config)

    def write(self, step: int, scalars: dict[str, float], *, prefix: str = "train") -> None:
        row = {f"{prefix}/{k}": float(v) for k, v in scalars.items()}
        for tracker in self.trackers:
            tracker.write(step, row)
        if prefix != "train" or step % self.console_every == 0:
            self.print(f"[{prefix} {step}] " + "  ".join(f"{k}={_fmt(v)}" for k, v in scalars.items()))

    def print(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


def _fmt(v) -> str:
    v = float(v)
    return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
