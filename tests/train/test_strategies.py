"""Data-parallel strategies on 8 fake CPU devices: the single-device losses, 1/D optimiser state, clear errors."""

import tempfile

import jax
import numpy as np
import pytest

from jaxmodels.parallel.sharding import DEFAULT_RULES
from jaxmodels.train.config import validate_config
from jaxmodels.train.loop import Trainer
from tests.tiny import tiny_config

STEPS = 4
BATCH = dict(data__global_batch_size=16)  # 2 rows per device; zero accumulates 2 micro-batches of 1
# strategy -> overrides on 8 devices ("single": 1 device, replicated)
RUNS = {
    "single": {},
    "replicated": dict(mesh__data=8),
    "zero": dict(mesh__data=8, parallel__strategy="zero", train__grad_accum_steps=2),
    "fsdp": dict(mesh__data=1, mesh__fsdp=8, parallel__strategy="fsdp"),
}


def _train(name: str):
    """(per-step metrics of STEPS steps, per-device memory) of the Trainer for RUNS[name]."""
    devices = jax.devices()[:1] if name == "single" else jax.devices()
    trainer = Trainer(tiny_config(**BATCH, **RUNS[name]), tempfile.mkdtemp(), devices)
    memory = trainer.compile_train_step()
    state, batches, metrics = trainer.init(), trainer.task.train_batches(0, 0, 1), []
    for _ in range(STEPS):
        state, m = trainer.train_step(state, trainer.global_batch(next(batches)))
        metrics.append(jax.device_get(m))
    return metrics, memory


@pytest.mark.devices(8)
def test_strategies_match_single_device_training_and_shard_the_optimizer_state():
    # One test, not one per strategy: each Trainer costs ~7 s of CPU compilation, and pytest-xdist
    # would build the single-device reference once per worker.
    runs = {name: _train(name) for name in RUNS}
    single, single_memory = runs["single"]
    assert min(m["grad_norm"] for m in single) > 1.0  # every step clipped: the norm must span all shards
    for strategy in ("replicated", "zero", "fsdp"):
        metrics, memory = runs[strategy]
        for key in ("loss", "grad_norm", "learning_rate", "nonfinite"):
            np.testing.assert_allclose([m[key] for m in metrics], [m[key] for m in single], rtol=2e-5,
                                       err_msg=f"{strategy}: {key}")
        ratio = memory["opt_state_gib"] / single_memory["opt_state_gib"]
        if strategy == "replicated":
            assert ratio == 1.0 and memory["params_gib"] == single_memory["params_gib"]
        elif strategy == "zero":  # 1/8 up to the padding of each leaf to a multiple of 8; parameters whole
            assert 1 / 8 <= ratio < 1 / 8 * 1.01 and memory["params_gib"] == single_memory["params_gib"]
        else:  # 1/8, but the norms' scales ("norm" axis) are replicated
            assert 1 / 8 <= ratio < 1 / 8 * 1.05
            np.testing.assert_allclose(memory["params_gib"] / single_memory["params_gib"], ratio, rtol=1e-3)
        # XLA's arguments = what we say is stored + this device's 2 batch rows of 33 int32 tokens and 33 segment ids
        # + the step counter
        stored = (memory["params_gib"] + memory["opt_state_gib"]) * 2**30 + 2 * 2 * 33 * 4 + 4
        np.testing.assert_allclose(memory["arguments_gib"] * 2**30, stored, rtol=1e-3, err_msg=strategy)


@pytest.mark.parametrize("overrides,match", [
    (dict(parallel__strategy="ddp"), r"config.parallel.strategy='ddp' is not valid; choose one of \['replicated'"),
    (dict(parallel__collectives="tree"), r"config.parallel.collectives='tree' is not valid; choose one of \['ring'"),
    (dict(mesh__data=2, mesh__fsdp=4), r"strategy='replicated' keeps the parameters whole.*config.mesh.fsdp=4"),
    (dict(mesh__data=-1, mesh__fsdp=2, parallel__strategy="zero"), r"'zero' keeps.*config.mesh.fsdp=2"),
    (dict(mesh__data=4, mesh__tensor=2, parallel__strategy="zero"), r"'zero'.*tensor.*config.mesh.tensor=2"),
    (dict(parallel__strategy="fsdp"), r"'fsdp' shards.*config.mesh.fsdp=1"),
    (dict(mesh__data=1, mesh__fsdp=-1, parallel__strategy="fsdp", sharding_rules=tuple(
        (name, None if axes == "fsdp" else axes) for name, axes in DEFAULT_RULES)), r"config.sharding_rules to map"),
])
def test_inconsistent_strategy_and_mesh_are_rejected(overrides, match):
    with pytest.raises(ValueError, match=match):
        validate_config(tiny_config(**overrides), num_devices=8)


def test_degenerate_sizes_are_accepted():
    validate_config(tiny_config(mesh__data=1, mesh__fsdp=-1, parallel__strategy="fsdp"), num_devices=1)
    validate_config(tiny_config(parallel__strategy="zero"), num_devices=1)


@pytest.mark.devices(8)
def test_resuming_with_another_strategy_names_the_change(tmp_path):
    from jaxmodels.train.checkpoint import CheckpointError
    from jaxmodels.train.loop import train_and_evaluate
    run = dict(train__num_steps=2, train__checkpoint_every=2, data__global_batch_size=16, mesh__data=8)
    train_and_evaluate(tiny_config(**run, parallel__strategy="zero"), str(tmp_path))
    with pytest.raises(CheckpointError, match=r"parallel.strategy: 'zero' -> 'replicated'"):
        train_and_evaluate(tiny_config(**run, parallel__strategy="replicated"), str(tmp_path))


def test_a_failed_restore_names_the_config_change(tmp_path):
    from jaxmodels.train.checkpoint import CheckpointError
    from jaxmodels.train.loop import train_and_evaluate
    run = dict(train__num_steps=2, train__checkpoint_every=2)
    train_and_evaluate(tiny_config(**run), str(tmp_path))
    with pytest.raises(CheckpointError, match=r"model.embed_dim: 32 -> 48"):
        train_and_evaluate(tiny_config(**run, model__embed_dim=48), str(tmp_path))
