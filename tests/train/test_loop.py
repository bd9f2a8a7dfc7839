import json
import os
import shutil

import jax
import numpy as np
import pytest

from jaxmodels.train.loop import NonFiniteLossError, train_and_evaluate
from tests.tiny import tiny_config


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_loss_decreases_and_beats_unigram_entropy(tmp_path):
    cfg = tiny_config(train__num_steps=200, optimizer__warmup_steps=20, optimizer__learning_rate=1e-2,
                      data__seq_len=64, data__global_batch_size=16)
    s = train_and_evaluate(cfg, str(tmp_path))
    start, end = s["eval_start"]["bits_per_byte"], s["eval_end"]["bits_per_byte"]
    assert start > 7.0  # near log2(256) = 8 at init
    assert end < s["baseline"]["unigram_entropy_bits_per_byte"] - 0.7
    assert isinstance(s["sample"], str) and s["sample"].startswith("def ")
    for name in ("metrics.jsonl", "summary.json", "config.json"):
        assert os.path.exists(tmp_path / name)
    assert os.listdir(tmp_path / "tensorboard")
    row = json.loads(open(tmp_path / "metrics.jsonl").readlines()[5])
    for key in ("loss", "learning_rate", "grad_norm", "tokens_per_s", "step_time_s"):
        assert f"train/{key}" in row


def test_resume_reproduces_the_uninterrupted_loss_curve_bit_exactly(tmp_path):
    cfg = tiny_config(train__num_steps=12)
    train_and_evaluate(cfg, str(tmp_path))
    full = _losses(tmp_path)
    # Lose everything after step 4, as if the run had died just after saving it.
    for step in ("8", "12"):
        shutil.rmtree(tmp_path / "checkpoints" / step)
    s = train_and_evaluate(cfg, str(tmp_path))
    assert s["start_step"] == 4 and s["final_step"] == 12
    resumed = _losses(tmp_path)
    assert sorted(resumed) == list(range(1, 13))  # no duplicated or missing rows
    assert resumed == full  # bit-exact on CPU


@pytest.mark.devices(8)
def test_one_device_and_eight_device_mesh_agree(tmp_path):
    losses, memory = {}, {}
    for name, devices, mesh, strategy in [("one", jax.devices()[:1], dict(data=-1, fsdp=1, tensor=1), "replicated"),
                                          ("mesh", jax.devices(), dict(data=2, fsdp=2, tensor=2), "fsdp")]:
        cfg = tiny_config(train__num_steps=6, parallel__strategy=strategy)
        cfg.mesh = mesh
        memory[name] = train_and_evaluate(cfg, str(tmp_path / name), devices=devices)["memory_per_device"]
        losses[name] = _losses(tmp_path / name)
    assert losses["one"].keys() == losses["mesh"].keys()
    np.testing.assert_allclose(list(losses["one"].values()), list(losses["mesh"].values()), rtol=2e-5)
    # params + AdamW moments are sharded 4 ways (fsdp x tensor) where dims divide: far less per device
    assert memory["mesh"]["arguments_gib"] < 0.5 * memory["one"]["arguments_gib"]


def test_nan_policy_halt_names_the_step(tmp_path):
    cfg = tiny_config(train__nan_policy="halt", optimizer__learning_rate=1e30, optimizer__grad_clip_norm=0.0,
                      optimizer__warmup_steps=0, optimizer__schedule="constant")
    with pytest.raises(NonFiniteLossError, match=r"at step \d+"):
        train_and_evaluate(cfg, str(tmp_path))


def test_nan_policy_skip_keeps_training(tmp_path):
    cfg = tiny_config(optimizer__learning_rate=1e30, optimizer__grad_clip_norm=0.0, optimizer__warmup_steps=0,
                      optimizer__schedule="constant")
    s = train_and_evaluate(cfg, str(tmp_path))
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert any(r.get("train/nonfinite") == 1 for r in rows) and s["final_step"] == 8
    assert np.isfinite(s["eval_end"]["loss"])


def test_prng_impl_selects_the_initialisation_generator(tmp_path):
    from jaxmodels.train.config import validate_config
    from jaxmodels.train.loop import Trainer
    params = {}
    for impl in ("threefry2x32", "rbg"):
        params[impl] = Trainer(tiny_config(train__prng_impl=impl), str(tmp_path / impl)).init()["params"]
    a, b = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(p)]) for p in params.values())
    assert a.shape == b.shape and np.all(np.isfinite(b))
    assert not np.allclose(a, b)  # a different generator, so different draws
    assert abs(np.std(a) - np.std(b)) < 0.1 * np.std(a)  # of the same distributions
    with pytest.raises(ValueError, match="config.train.prng_impl='philox' is not valid"):
        validate_config(tiny_config(train__prng_impl="philox"), num_devices=1)
