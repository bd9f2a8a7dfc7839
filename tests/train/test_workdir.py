"""A relative workdir works (orbax itself wants absolute checkpoint paths)."""

import os

from jaxmodels.train.loop import Trainer, train_and_evaluate
from tests.tiny import tiny_config


def test_relative_workdir_trains_checkpoints_and_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tiny_config(train__num_steps=2, train__checkpoint_every=2, sample__max_new_tokens=2)
    assert train_and_evaluate(config, "run")["final_step"] == 2
    assert os.path.isdir(tmp_path / "run" / "checkpoints")
    assert Trainer(config, "run").restore_or_init()[0] == 2
    config.train.num_steps = 3
    assert train_and_evaluate(config, "run")["start_step"] == 2
