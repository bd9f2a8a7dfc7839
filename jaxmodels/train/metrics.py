"""Metric writers: console, JSONL file and TensorBoard event files (tensorboardX, no TensorFlow)."""

import json
import math
import os

from tqdm.auto import tqdm

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


def truncate_jsonl(path: str, last_step: int) -> None:
    """Drop rows after `last_step` (written after the checkpoint a resumed run restarts from)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
    with open(path, "w") as f:
        f.writelines(rows)


class MetricWriter:
    """Writes each step's scalars to workdir/metrics.jsonl and workdir/tensorboard/; prints every
    `console_every` steps above the progress bar. Only process 0 writes (`enabled`)."""

    def __init__(self, workdir: str, *, start_step: int, console_every: int, enabled: bool = True):
        self.enabled, self.console_every = enabled, console_every
        self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
        if not enabled:
            return
        truncate_jsonl(self.jsonl_path, start_step)
        self._jsonl = open(self.jsonl_path, "a")
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=start_step + 1)

    def write(self, step: int, scalars: dict[str, float], *, prefix: str = "train") -> None:
        if not self.enabled:
            return
        row = {"step": step, **{f"{prefix}/{k}": float(v) for k, v in scalars.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        for k, v in scalars.items():
            if v is not None and math.isfinite(float(v)):
                self._tb.add_scalar(f"{prefix}/{k}", float(v), step)
        if prefix != "train" or step % self.console_every == 0:
            self.print(f"[{prefix} {step}] " + "  ".join(f"{k}={_fmt(v)}" for k, v in scalars.items()))

    def print(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def _fmt(v) -> str:
    v = float(v)
    return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
