"""Inference from a trained run: load its model from the workdir and continue text prompts.

    model, config = load_model("/tmp/lm_tiny")
    texts, stats = generate_text(model, run_tokenizer(config), ["def ", "class "], max_new_tokens=200,
                                 temperature=0.8)

`load_model` reads the run's config.json and restores only the parameters of a checkpoint (no optimizer
state) onto the default device; the workdir may be a URL (gs://...), read through etils.epath and orbax.
`generate_text` tokenizes, decodes prompts of equal token length as one batch, stops rows at the tokenizer's
EOS and never samples the padding ids of a vocabulary rounded up. The command line `python -m
jaxmodels.generate` (`jaxmodels/generate.py`) wraps both.
"""

import json

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from jaxmodels.data.lm import resolve_tokenizer
from jaxmodels.data.tokenizers import Tokenizer
from jaxmodels.models import make_model
from jaxmodels.ops.checks import one_of
from jaxmodels.ops.precision import DTYPES
from jaxmodels.tasks.lm import generate_text  # noqa: F401  (re-exported: inference's other half)
from jaxmodels.train.checkpoint import restore_params
from jaxmodels.train.finetune import fine_tune, model_builder
from jaxmodels.train.loop import init_rngs
from jaxmodels.train.paths import workdir_path


class LoadModelError(RuntimeError):
    """A workdir holds no model to load; the message names the workdir and what to do."""


def load_model(workdir, *, step: int | None = None, dtype=None) -> tuple[nnx.Module, ml_collections.ConfigDict]:
    """(model, config) of the training run in `workdir` (a local path or a URL such as gs://bucket/run).

    config: the run's saved config (WORKDIR/config.json). model: `jaxmodels.models.make_model(config.model)`
    built abstractly (`nnx.eval_shape`) and given the parameters of checkpoint `step` (None: the newest), read
    alone from the checkpoint's train state (orbax partial restore: the optimizer state is not read) onto
    the default device `jax.devices()[0]`. For a fine-tune run (config.peft), the checkpoint holds the adapters
    and the pre-trained parameters are read from its config.train.init_from (`jaxmodels.train.finetune`): the
    model is the adapted one (LoRA merged into the kernels, or with its PEFT modules).
    dtype: None keeps the run's dtypes; a name in `jaxmodels.ops.precision.DTYPES` or a jnp floating dtype
    casts the parameters to it as they are restored and makes the model compute in it (the returned config's
    model.param_dtype and model.dtype are set to it).
    Raises LoadModelError naming the workdir when it does not exist, holds no config.json or no checkpoint
    (train first), has no checkpoint of `step`, or the checkpoint cannot be read into the config's model.
    """
    path = workdir_path(workdir)
    if not path.exists():
        raise LoadModelError(f"no such workdir {path}; pass the --workdir of a training run")
    config_json = path / "config.json"
    if not config_json.exists():
        raise LoadModelError(f"workdir {path} has no config.json, so it holds no training run; train one first "
                             f"(python -m jaxmodels.main --config CONFIG --workdir {path})")
    config = ml_collections.ConfigDict(json.loads(config_json.read_text()))
    if dtype is not None:
        name = one_of("dtype", dtype if isinstance(dtype, str) else jnp.dtype(dtype).name, DTYPES)
        config.model.param_dtype = config.model.dtype = name
    manager = ocp.CheckpointManager(path / "checkpoints", options=ocp.CheckpointManagerOptions(create=False))
    try:
        steps = sorted(manager.all_steps())
        if not steps:
            raise LoadModelError(f"workdir {path} has no checkpoint yet; train first (python -m jaxmodels.main "
                                 f"--config CONFIG --workdir {path}), then generate")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise LoadModelError(f"workdir {path} has no checkpoint of step {step}; its checkpoints are of steps "
                                 f"{steps}")
        abstract = nnx.eval_shape(lambda: make_model(config.model, init_rngs(config)))
        fine = fine_tune(config, model_builder(config), lambda: init_rngs(config))
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        saved = fine.abstract_trainable if fine else nnx.state(abstract, nnx.Param).to_pure_dict()
        target = {"params": jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), saved)}
        try:
            restored = manager.restore(step, args=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
        except Exception as e:  # orbax raises many kinds; each means this checkpoint cannot give this model
            first_line = str(e).splitlines()[0][:300] if str(e) else ""
            raise LoadModelError(f"the checkpoint of step {step} in {path} cannot be read into the model of its "
                                 f"config.json ({type(e).__name__}: {first_line}); its checkpoints are of steps "
                                 f"{steps}") from e
    finally:
        manager.close()
    if fine:  # a fine-tune's checkpoints hold its adapters; the frozen base is read from train.init_from
        frozen = restore_params(config.train.init_from, fine.abstract_frozen)
        return nnx.merge(fine.graphdef, nnx.State(fine.combine(restored["params"], frozen))), config
    return nnx.merge(nnx.graphdef(abstract), nnx.State(restored["params"])), config


def run_tokenizer(config: ml_collections.ConfigDict) -> Tokenizer:
    """The tokenizer of a run's config (`jaxmodels.data.lm.resolve_tokenizer`: "byte" for configs that predate
    data.tokenizer; "bpe:VOCAB" is the one the run trained, read back from next to the data)."""
    return resolve_tokenizer(config.data)
