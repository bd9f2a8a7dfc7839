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
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jaxmodels.data.tokenizers import Tokenizer, make_tokenizer
from jaxmodels.models import make_model
from jaxmodels.models.lm import compile_generate
from jaxmodels.ops.checks import one_of
from jaxmodels.ops.precision import DTYPES
from jaxmodels.train.loop import init_rngs
from jaxmodels.train.paths import workdir_path


class LoadModelError(RuntimeError):
    """A workdir holds no model to load; the message names the workdir and what to do."""


def load_model(workdir, *, step: int | None = None, dtype=None) -> tuple[nnx.Module, ml_collections.ConfigDict]:
    """(model, config) of the training run in `workdir` (a local path or a URL such as gs://bucket/run).

    config: the run's saved config (WORKDIR/config.json). model: `jaxmodels.models.make_model(config.model)`
    built abstractly (`nnx.eval_shape`) and given the parameters of checkpoint `step` (None: the newest), read
    alone from the checkpoint's train state (orbax partial restore: the optimizer state is not read) onto
    the default device `jax.devices()[0]`.
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
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = {"params": jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                                         nnx.state(abstract, nnx.Param).to_pure_dict())}
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
    return nnx.merge(nnx.graphdef(abstract), nnx.State(restored["params"])), config


def run_tokenizer(config: ml_collections.ConfigDict) -> Tokenizer:
    """The tokenizer of a run's config: config.data.tokenizer ("byte" for configs that predate the field)."""
    # MERGE: replace with jaxmodels.data.lm.resolve_tokenizer(config.data) (resolves "bpe:VOCAB" as training did).
    return make_tokenizer(config.data.get("tokenizer", "byte"))


def generate_text(model: nnx.Module, tokenizer: Tokenizer, prompts: list[str], *, seed: int = 0,
                  max_new_tokens: int, temperature: float, top_k: int = 0,
                  top_p: float = 1.0) -> tuple[list[str], dict[str, float]]:
    """Continue each prompt with `jaxmodels.models.lm.generate`; returns (texts, stats).

    texts[i]: prompts[i]'s tokens followed by its new tokens up to (not including) the tokenizer's EOS, decoded
    together by `tokenizer` (as the training run's sample is: `LanguageModeling.sample`).
    Batching: prompts of equal token length form a group, decoded as one batch (no padding, so exact for every
    model kind); groups are numbered g = 0, 1, ... in the order their length first occurs in `prompts`, and
    group g draws with key `jax.random.key(seed + g)`. So one prompt with `seed` reproduces the run's sample
    (`jax.random.key(config.train.seed)`), and a prompt whose group is g gives the same text alone with seed
    seed + g when its group holds only it. Rows stop at the tokenizer's EOS (`eos_id`; bytes have none), and
    ids >= tokenizer.vocab_size (the model's padded vocabulary) are never sampled.
    temperature, top_k (0: off), top_p (1.0: off): as in `jaxmodels.models.lm.sample_logits`.
    stats: new_tokens (generated, each row's EOS counted, nothing after it), seconds (decoding, compilation
    excluded: each group is compiled ahead of time), tokens_per_second (new_tokens / seconds),
    compile_seconds, groups.
    Raises ValueError for no prompts, a prompt that encodes to no tokens, or a tokenizer whose vocabulary is
    larger than the model's (and as `generate` does for the settings).
    """
    if not prompts:
        raise ValueError("prompts must hold at least one prompt, got none")
    if tokenizer.vocab_size > model.vocab_size:
        raise ValueError(f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} ids but the model only "
                         f"{model.vocab_size}; load the model with the tokenizer its run was trained with")
    ids = [tokenizer.encode(p) for p in prompts]
    for i, x in enumerate(ids):
        if not x:
            raise ValueError(f"prompts[{i}]={prompts[i]!r} encodes to no tokens; give each prompt some text")
    groups: dict[int, list[int]] = {}  # token length -> indices of its prompts, in order of first occurrence
    for i, x in enumerate(ids):
        groups.setdefault(len(x), []).append(i)
    eos_id = tokenizer.eos_id
    settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                    eos_id=eos_id, vocab_limit=tokenizer.vocab_size)
    texts, new_tokens, seconds, compile_seconds = [""] * len(prompts), 0, 0.0, 0.0
    for g, (length, members) in enumerate(groups.items()):
        prompt, key = np.asarray([ids[i] for i in members], np.int32), jax.random.key(seed + g)
        start = time.perf_counter()
        run = compile_generate(model, prompt, key, **settings)
        compile_seconds += time.perf_counter() - start
        start = time.perf_counter()
        tokens = np.asarray(jax.device_get(run(prompt, key)))
        seconds += time.perf_counter() - start
        for i, row in zip(members, tokens):
            new = row[length:].tolist()
            stop = new.index(eos_id) if eos_id in new else len(new)
            new_tokens += min(stop + 1, len(new))
            texts[i] = tokenizer.decode(ids[i] + new[:stop])
    stats = dict(new_tokens=new_tokens, seconds=seconds, tokens_per_second=new_tokens / seconds,
                 compile_seconds=compile_seconds, groups=len(groups))
    return texts, stats
