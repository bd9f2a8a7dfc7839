"""Fine-tuning through the one train step (config.peft; jaxmodels/train/finetune.py): only the adapters train and
hold optimizer state, the frozen base stays bit-identical, checkpoints hold only the adapters and a resumed run reads
the base from train.init_from again; the lm_tiny_lora config end to end, its LoRA exported for Hugging Face peft;
ZeRO gives the replicated step's adapters; errors that name the field."""

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from experiments.configs import lm_tiny_lora
from jaxmodels.inference import load_model
from jaxmodels.interop.hf import main as hf_main
from jaxmodels.models import make_model
from jaxmodels.train.checkpoint import CheckpointError, save_params
from jaxmodels.train.config import ConfigError, validate_config
from jaxmodels.train.loop import Trainer, init_rngs, train_and_evaluate
from tests.nn.test_peft import dot_output_shapes
from tests.tiny import TINY_OVERRIDES, apply_overrides, tiny_config


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(path, params): a params checkpoint of the tiny model (a random init serves as a pre-trained base here)."""
    config = tiny_config()
    params = nnx.state(make_model(config.model, init_rngs(config)), nnx.Param).to_pure_dict()
    path = tmp_path_factory.mktemp("base")
    save_params(path, params)
    return str(path), jax.tree.map(np.asarray, params)


def _config(init_from, **overrides):
    """lm_tiny_lora shrunk like tests/tiny.py, fine-tuning from `init_from`; overrides "peft__rank" = peft.rank."""
    return apply_overrides(lm_tiny_lora.get_config(), {
        **TINY_OVERRIDES, "train.init_from": init_from, "train.num_steps": 2, "train.checkpoint_every": 2,
        "train.trackers": ("jsonl",), "optimizer.warmup_steps": 0, "peft.rank": 4, "peft.prefix_length": 4,
        "peft.prefix_hidden": 8, **{k.replace("__", "."): v for k, v in overrides.items()}})


def _np(tree):
    return jax.tree.map(np.asarray, tree)


def _one_step(config, workdir, devices):
    """(the step's memory (`compile_train_step`), state before, state after one step) of a fresh run."""
    trainer = Trainer(config, str(workdir), devices=devices)
    memory = trainer.compile_train_step()
    _, state = trainer.restore_or_init()
    before = _np(state)
    state, _ = trainer.train_step(state, trainer.global_batch(next(trainer.task.train_batches(0, 0, 1))))
    return memory, before, _np(state)


@pytest.mark.parametrize("overrides", [dict(peft__base_dtype="bfloat16"), dict(peft__method="prefix")],
                         ids=["lora_bf16_base", "prefix"])
def test_a_step_trains_only_the_adapters_and_leaves_the_base_bit_identical(base, tmp_path, overrides):
    path, params = base
    memory, before, after = _one_step(_config(path, **overrides), tmp_path, jax.devices()[:1])
    dtype = np.dtype(overrides.get("peft__base_dtype", "float32"))
    for frozen, pretrained, new in zip(*(jax.tree.leaves(t) for t in (before["frozen"], params, after["frozen"]))):
        np.testing.assert_array_equal(frozen, pretrained.astype(dtype))  # read from init_from, in peft.base_dtype
        np.testing.assert_array_equal(new, frozen)
    moved = {jax.tree_util.keystr(k): not np.array_equal(a, b) for (k, a), b in
             zip(jax.tree_util.tree_flatten_with_path(before["params"])[0], jax.tree.leaves(after["params"]))}
    assert all(v for k, v in moved.items() if "lora_a" not in k)  # with B = 0, A's first gradient is 0
    adapters = sum(x.size for x in jax.tree.leaves(before["params"]))
    assert 0 < adapters < sum(x.size for x in jax.tree.leaves(params)) / 20
    assert sum(x.size for x in jax.tree.leaves(before["opt_state"]) if x.ndim) == 2 * adapters  # Adam's mu and nu
    assert memory["frozen_gib"] > 10 * memory["params_gib"]


@pytest.mark.devices(2)
def test_zero_over_two_devices_gives_the_replicated_steps_adapters(base, tmp_path):
    path, _ = base
    _, _, replicated = _one_step(_config(path), tmp_path / "one", jax.devices()[:1])
    _, _, zero = _one_step(_config(path, parallel__strategy="zero", mesh__data=2), tmp_path / "zero",
                           jax.devices()[:2])
    for a, b in zip(jax.tree.leaves(replicated["params"]), jax.tree.leaves(zero["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_the_lora_config_runs_end_to_end_checkpoints_the_adapters_resumes_and_exports(base, tmp_path, capsys):
    path, params = base
    run = tmp_path / "run"
    summary = train_and_evaluate(_config(path), str(run), devices=jax.devices()[:1])
    assert summary["final_step"] == 2 and all(np.isfinite(v) for v in summary["eval_end"].values())
    saved = ocp.PyTreeCheckpointHandler().metadata(run / "checkpoints" / "2" / "default").tree
    assert sorted(saved) == ["opt_state", "params", "step"]
    assert sorted(saved["params"]["blocks"]["0"]["attn"]) == ["w_q", "w_v"]  # orbax names keys by strings

    trainer = Trainer(_config(path, train__num_steps=3), str(run), devices=jax.devices()[:1])
    step, state = trainer.restore_or_init()
    assert step == 2
    for a, b in zip(jax.tree.leaves(_np(state["frozen"])), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    loaded = nnx.state(load_model(run)[0], nnx.Param).to_pure_dict()  # generate's loader: the LoRA merged
    for a, b in zip(jax.tree.leaves(_np(trainer.model_params(state))), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(CheckpointError, match=r"train.init_from: '.*' -> '/elsewhere'"):
        Trainer(_config("/elsewhere", train__num_steps=3), str(run), devices=jax.devices()[:1]).restore_or_init()

    hf_main(["export", "--workdir", str(run), "--out", str(tmp_path / "hf")])
    assert "as a Hugging Face peft adapter" in capsys.readouterr().out
    adapter = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["target_modules"]) == (4, ["q_proj", "v_proj"])


def test_bad_fine_tune_configs_are_named(base, tmp_path):
    path, _ = base
    with pytest.raises(ConfigError, match=r"config.peft.method='lora' fine-tunes a pre-trained model, but "
                                          r"config.train.init_from is not set"):
        validate_config(_config(""), num_devices=1)
    with pytest.raises(ConfigError, match=r"config.peft has unknown fields \['ranks'\]"):
        config = _config(path)
        config.peft.ranks = 4
        validate_config(config, num_devices=1)
    with pytest.raises(ConfigError, match=r"config.peft.method='prefix' does not fit config.model.attention: "
                                          r"attention kind 'linear'"):
        validate_config(_config(path, peft__method="prefix", model__attention__kind="linear"), num_devices=1)
    with pytest.raises(ConfigError, match=r"config.peft.targets='attn/w_z' matches no parameter; the kernels are: "
                                          r"blocks/\*/attn/w_k, blocks/\*/attn/w_o, blocks/\*/attn/w_q"):
        Trainer(_config(path, peft__targets="attn/w_z"), str(tmp_path), devices=jax.devices()[:1])
    with pytest.raises(ConfigError, match=r"config.peft.rank=32 is larger than the layers it adapts allow: "
                                          r"blocks/0/attn/w_v \(32, 1, 16\) \(min\(in, out\) = 16\)"):
        Trainer(_config(path, peft__rank=32), str(tmp_path), devices=jax.devices()[:1])
    with pytest.raises(ConfigError, match=r"config.train.init_from=.*do not fit the model .*blocks/0/mlp/w_down: "
                                          r"\(64, 32\) in the checkpoint, \(48, 32\) in the model"):
        Trainer(_config(path, model__mlp_dim=48), str(tmp_path), devices=jax.devices()[:1]).restore_or_init()
    with pytest.raises(ConfigError, match=r"config.peft.dropout=0.1 needs every LoRA target unfolded, but DecoderLM "
                                          r"uses embed/embedding otherwise than as a projection"):
        Trainer(_config(path, peft__targets="attn/w_q|embed", peft__dropout=0.1), str(tmp_path),
                devices=jax.devices()[:1])
    with pytest.raises(ConfigError, match=r"config.peft.dropout must be a real number in \[0, 1\), got 1.0"):
        validate_config(_config(path, peft__dropout=1.0), num_devices=1)


def _kernel_shaped_dots(trainer) -> set[tuple[int, ...]]:
    """The adapted kernels' shapes (dims sorted) that some dot_general of the compiled train step's jaxpr outputs."""
    kernels = {tuple(sorted(t.shape)) for t in trainer.fine_tune.targets}
    jaxpr = jax.make_jaxpr(trainer.train_step)(trainer.abstract_state, trainer.abstract_batch).jaxpr
    return kernels & {tuple(sorted(s)) for s in dot_output_shapes(jaxpr)}


def test_the_unfolded_step_forms_no_kernel_gradient_equals_the_folded_one_and_its_dropout_draws(base, tmp_path):
    """The train step of lm_tiny_lora: unfolded (the default), no dot_general gives a frozen kernel's shape, as
    folded (peft.unfolded=False) the weight gradients do; both give the same adapters after a step (B moves: with
    B = 0, A's first gradient is 0); with peft.dropout B's step differs, and is the same again for the same seed."""
    path, _ = base
    devices = jax.devices()[:1]
    steps = {}
    for name, overrides in [("unfolded", {}), ("folded", dict(peft__unfolded=False)),
                            ("dropout", dict(peft__dropout=0.5))]:
        trainer = Trainer(_config(path, **overrides), str(tmp_path / name), devices=devices)
        if name != "dropout":
            assert bool(_kernel_shaped_dots(trainer)) == (name == "folded")
        _, state = trainer.restore_or_init()
        batch = trainer.global_batch(next(trainer.task.train_batches(0, 0, 1)))
        steps[name] = _np(trainer.train_step(state, batch)[0]["params"])
    leaves = {k: jax.tree.leaves(v) for k, v in steps.items()}
    for unfolded, folded in zip(leaves["unfolded"], leaves["folded"]):
        np.testing.assert_allclose(unfolded, folded, rtol=1e-5, atol=1e-6)
    moved = [not np.allclose(u, d, atol=1e-6) for u, d in zip(leaves["unfolded"], leaves["dropout"])]
    assert any(moved)
