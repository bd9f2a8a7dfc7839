"""A tiny version of the default experiment for end-to-end tests (seconds on a CPU)."""

from experiments.configs import lm_tiny

TINY_OVERRIDES = {
    "model.num_layers": 1, "model.embed_dim": 32, "model.num_heads": 2, "model.num_kv_heads": 1,
    "model.head_dim": 16, "model.mlp_dim": 64, "data.seq_len": 32, "data.global_batch_size": 8,
    "data.eval_batches": 2, "train.num_steps": 8, "train.log_every": 4, "train.eval_every": 0,
    "train.checkpoint_every": 4, "optimizer.warmup_steps": 2, "sample.max_new_tokens": 8,
}


def apply_overrides(config, overrides: dict):
    """Set config fields by dotted path ("train.num_steps": 8), in place."""
    for path, value in overrides.items():
        node = config
        *parents, leaf = path.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def tiny_config(**overrides):
    """lm_tiny's config with TINY_OVERRIDES, then `overrides` ("train__num_steps" = train.num_steps)."""
    return apply_overrides(lm_tiny.get_config(),
                           {**TINY_OVERRIDES, **{k.replace("__", "."): v for k, v in overrides.items()}})


def cli_overrides(**overrides) -> list[str]:
    """The same overrides as command-line flags for jaxmodels.main."""
    merged = {**TINY_OVERRIDES, **{k.replace("__", "."): v for k, v in overrides.items()}}
    return [f"--config.{k}={v}" for k, v in merged.items()]
