import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.train.checkpoint import Checkpointer, CheckpointError, restore_params


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


def test_restore_params_of_a_chosen_step(tmp_path):
    ck = Checkpointer(str(tmp_path / "checkpoints"), every=2, keep=3)
    for s in range(1, 7):
        ck.save(s, _state(s))
    ck.wait()
    abstract = _abstract()["params"]
    for step, value in ((None, 6), (4, 4), (2, 2)):
        np.testing.assert_array_equal(restore_params(tmp_path, abstract, step=step)["blocks"][0]["w"], value)
    with pytest.raises(ValueError, match=r"no checkpoint of step 3; it has steps \[2, 4, 6\]"):
        restore_params(tmp_path, abstract, step=3)


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


def _unreadable(tmp_path):
    return sorted(p.name for p in (tmp_path / "unreadable").iterdir())


@pytest.mark.parametrize("damage", ["corrupt", "remove_item", "empty_step"])
def test_an_unreadable_newest_step_is_moved_aside_and_training_goes_on(tmp_path, damage):
    directory = tmp_path / "checkpoints"
    ck = Checkpointer(str(directory), every=1, keep=5, unreadable_dir=str(tmp_path / "unreadable"))
    for s in (1, 2, 3):
        ck.save(s, _state(s))
    ck.close()
    if damage == "corrupt":
        _corrupt(directory / "3")
    elif damage == "remove_item":  # the reported case: rm -r checkpoints/40/default
        shutil.rmtree(directory / "3" / "default")
    else:
        shutil.rmtree(directory / "3")
        os.makedirs(directory / "3")
    ck = Checkpointer(str(directory), every=1, keep=5, unreadable_dir=str(tmp_path / "unreadable"))
    step, state = ck.restore_latest(_abstract())
    assert step == 2 and int(state["step"]) == 2  # one damaged step does not condemn the older ones
    assert _unreadable(tmp_path) == ["3"]  # kept for inspection, never deleted
    assert ck.save(3, _state(3))  # no "checkpoint for step 3 already exists" crash loop
    ck.wait()
    assert Checkpointer(str(directory), every=1, keep=5).restore_latest(_abstract())[0] == 3
    ck.close()


def test_a_second_unreadable_copy_of_a_step_gets_its_own_name(tmp_path):
    directory = tmp_path / "checkpoints"
    for _ in range(2):
        ck = Checkpointer(str(directory), every=1, keep=5, unreadable_dir=str(tmp_path / "unreadable"))
        ck.save(1, _state(1))
        ck.save(2, _state(2))
        ck.close()
        _corrupt(directory / "2")
        ck = Checkpointer(str(directory), every=1, keep=5, unreadable_dir=str(tmp_path / "unreadable"))
        assert ck.restore_latest(_abstract())[0] == 1
        ck.close()
    assert _unreadable(tmp_path) == ["2", "2.1"]
