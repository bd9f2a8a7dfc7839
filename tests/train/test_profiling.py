"""train.profile_steps: a jax.profiler trace of chosen steps in WORKDIR/profile/, the losses unchanged."""

import json

import pytest

from jaxmodels.train.config import ConfigError
from jaxmodels.train.loop import train_and_evaluate
from jaxmodels.train.profiling import check_profile_steps
from tests.tiny import tiny_config


def _losses(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_profile_steps_write_a_trace_and_leave_the_losses_unchanged(tmp_path):
    train_and_evaluate(tiny_config(train__profile_steps=(2, 3)), str(tmp_path / "profiled"))
    train_and_evaluate(tiny_config(), str(tmp_path / "plain"))
    traces = list((tmp_path / "profiled" / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    assert not (tmp_path / "plain" / "profile").exists()  # (0, 0), the default, traces nothing
    assert _losses(tmp_path / "profiled") == _losses(tmp_path / "plain")


@pytest.mark.parametrize("value", [(1,), (-1, 2), (1.5, 2), "1,2", None])
def test_profile_steps_must_be_a_start_and_a_count(value):
    with pytest.raises(ConfigError, match=r"config.train.profile_steps=.* is not valid; give \(start, count\)"):
        check_profile_steps(value)
