"""Loss curves from a run's metrics.jsonl:  python -m jaxmodels.train.plot WORKDIR [--out loss.png]

WORKDIR and --out may be local paths or URLs (gs://bucket/run): they are read and written through etils.epath.
"""

import argparse
import io
import json

import matplotlib
from etils import epath

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def read_metrics(path) -> list[dict]:
    """The rows of a metrics.jsonl (a local path or a URL)."""
    return [json.loads(line) for line in epath.Path(path).read_text().splitlines() if line.strip()]


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_loss(rows: list[dict], out, title: str = "") -> str:
    """Train loss (bits/byte when the task reports it) and eval points vs step, with the
    unigram-entropy baseline if present. Writes a PNG to `out` (a local path or a URL) and returns its path."""
    key = "bits_per_byte" if any("train/bits_per_byte" in r for r in rows) else "loss"
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(*series(rows, f"train/{key}"), lw=1, alpha=0.8, label=f"train {key}")
    steps, values = series(rows, f"eval/{key}")
    if steps:
        ax.plot(steps, values, "o-", label=f"eval {key}")
    _, base = series(rows, "eval/unigram_entropy_bits_per_byte")
    if base and key == "bits_per_byte":
        ax.axhline(base[-1], color="gray", ls="--", label="unigram entropy")
    ax.set_xlabel("step")
    ax.set_ylabel(key.replace("_", " "))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    epath.Path(out).write_bytes(png.getvalue())
    return str(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("workdir", help="run directory containing metrics.jsonl")
    p.add_argument("--out", default=None, help="PNG path (default: WORKDIR/loss.png)")
    args = p.parse_args(argv)
    workdir = epath.Path(args.workdir)
    out = plot_loss(read_metrics(workdir / "metrics.jsonl"), args.out or workdir / "loss.png", title=workdir.name)
    print(out)


if __name__ == "__main__":
    main()
