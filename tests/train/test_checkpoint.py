import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.train.checkpoint import Checkpointer, CheckpointError


def _state(v):
    return {"step": jnp.int32(v), "params": {"blocks": {0: {"w": jnp.full((3, 2), float(v))}}}}


def _abstract():
    return jax.eval_shape(lambda: _state(0))


def _corrupt(step_dir):
    """Overwrite every data file of a saved step with garbage."""
    for root, _, files in os.walk(step_dir):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"\x00garbage")


def test_keep_n_interval_and_restore(tmp_path):
    ck = Checkpointer(str(tmp_path), every=2, keep=2)
    for s in range(1, 8):
        ck.save(s, _state(s))
    ck.save_final(7, _state(7))
    assert ck.manager.all_steps() == [6, 7]
    step, state = ck.restore_latest(_abstract())
    assert step == 7
    np.testing.assert_array_equal(state["params"]["blocks"][0]["w"], 7.0)


def test_corrupt_latest_falls_back_to_previous(tmp_path, caplog):
    ck = Checkpointer(str(tmp_path), every=1, keep=3)
    ck.save(1, _state(1))
    ck.save(2, _state(2))
    ck.wait()
    _corrupt(tmp_path / "2")
    with caplog.at_level(logging.WARNING):
        step, state = Checkpointer(str(tmp_path), every=1, keep=3).restore_latest(_abstract())
    assert step == 1 and int(state["step"]) == 1
    assert "step 2 is unreadable" in caplog.text


def test_all_corrupt_is_a_clear_error(tmp_path):
    ck = Checkpointer(str(tmp_path), every=1, keep=3)
    ck.save(1, _state(1))
    ck.wait()
    _corrupt(tmp_path / "1")
    with pytest.raises(CheckpointError, match="could be restored"):
        Checkpointer(str(tmp_path), every=1, keep=3).restore_latest(_abstract())


def test_empty_directory_restores_nothing(tmp_path):
    assert Checkpointer(str(tmp_path), every=1, keep=1).restore_latest(_abstract()) == (None, None)
