"""experiments/mup.py at tiny size: both parts run and write their files; muP at its base width starts where
standard parametrisation does."""

import json
import math

import pytest

from experiments import mup


def test_mup_experiment_runs_at_tiny_size(tmp_path):
    results = mup.run(str(tmp_path), widths=(16,), base_width=16, lrs=(1e-2,), steps=1, num_layers=1,
                      coord_widths=(16,), coord_steps=1)
    for name in ("results.json", "results.md", "coord_check.png", "lr_transfer.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["lr_transfer"]) == set(mup.PARAMETRIZATIONS) and saved["lrs"] == [1e-2]
    standard, mu = (results["coordinate_check"][p][16] for p in mup.PARAMETRIZATIONS)
    assert list(standard) == ["embedding", "block_1", "logits"] and len(standard["logits"]) == 2  # steps 0 and 1
    # width 16 = the base: the same parameters, so the same embedding; the blocks differ by the attention divisor
    assert mu["embedding"][0] == standard["embedding"][0]
    assert all(math.isfinite(v) for p in saved["lr_transfer"].values() for v in p["16"]["eval_loss"])
    assert "| mup | 16 |" in (tmp_path / "results.md").read_text()


def test_best_lr_skips_diverged_runs():
    assert mup.best_lr([1e-3, 1e-2, 1e-1], [2.0, 1.5, float("nan")]) == 1e-2
    assert mup.best_lr([1e-3, 1e-2], [float("inf"), float("nan")]) is None
    with pytest.raises(ValueError, match="multiple of 4"):
        mup.model_fields(18)
