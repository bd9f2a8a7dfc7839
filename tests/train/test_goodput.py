"""Goodput: the summary splits the run's wall time into parts that never add up to more than it."""

import json

import pytest

from jaxmodels.train.goodput import PARTS, Goodput, goodput_text
from jaxmodels.train.loop import train_and_evaluate
from tests.tiny import tiny_config


def test_timing_adds_to_its_part_even_when_the_block_raises():
    goodput = Goodput()
    with goodput.timing("steps"):
        pass
    with pytest.raises(KeyError), goodput.timing("data"):
        raise KeyError
    summary = goodput.summary()
    assert summary["steps_s"] > 0 and summary["data_s"] > 0
    assert "goodput: " in goodput_text(summary) and "steps " in goodput_text(summary)


def test_summary_reports_goodput_parts_that_fit_in_the_wall_time(tmp_path):
    summary = train_and_evaluate(tiny_config(train__eval_every=4), str(tmp_path))
    goodput = summary["goodput"]
    parts = [goodput[f"{p}_s"] for p in PARTS]
    assert all(p > 0 for p in parts)  # every part happened in this run (eval at 0, 4 and 8; saves at 4 and 8)
    assert sum(parts) <= goodput["wall_s"]
    assert sum(parts) + goodput["other_s"] == pytest.approx(goodput["wall_s"])
    assert 0 < goodput["goodput"] <= 1 and goodput["goodput"] == goodput["steps_s"] / goodput["wall_s"]
    assert json.loads((tmp_path / "summary.json").read_text())["goodput"] == goodput
