"""The loss plot: python -m jaxmodels.train.plot WORKDIR writes WORKDIR/loss.png."""

import json

from jaxmodels.train.plot import main


def test_plot_writes_a_png_into_the_workdir(tmp_path):
    rows = [{"step": s, "train/loss": 6.0 - s / 10} for s in range(1, 11)] + [{"step": 10, "eval/loss": 5.1}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    main([str(tmp_path)])
    assert (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG")
