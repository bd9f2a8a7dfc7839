"""The base of every complete architecture: built from a config section, which it validates itself."""

import ml_collections
from flax import nnx

from jaxmodels.nn.peft import HOOK_METHODS, PeftSpec
from jaxmodels.ops.checks import one_of, positive_int


class Model(nnx.Module):
    """A model of `jaxmodels.models.MODELS`: `Model(**config.model fields, rngs=...)` (`make_model`).

    `check_config(section)` validates the model's config section before anything is built or compiled,
    raising ValueError that names the field as the user wrote it ("config.model.num_heads=...").
    Checks that span sections (sequence length vs attention blocks, batch vs mesh) live in
    `jaxmodels.train.config`.
    `peft_methods`: the PEFT methods that add modules to the model (`nn.peft.HOOK_METHODS`), which it takes as
    its `peft` argument; `check_peft` says whether a config's PEFT fits the model.
    `lr_multipliers()`: per-parameter learning-rate multipliers for the optimizer, None by default.
    """

    peft_methods: tuple[str, ...] = ()

    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict) -> None:
        """Raise ValueError for an invalid field of this model's config section. Default: nothing to check
        beyond the constructor's own arguments."""
        del config

    def lr_multipliers(self):
        """None (every parameter learns at the optimizer's rate), or a pytree of the model's parameters' structure
        (`nnx.state(model, nnx.Param).to_pure_dict()`) with one real > 0 per leaf that multiplies that
        parameter's step (`jaxmodels.train.optimizer.make_optimizer`), e.g. muP's per-layer Adam learning rates.
        Reads only shapes and settings, so it works on an abstract model (`nnx.eval_shape`)."""
        return None

    @classmethod
    def check_peft(cls, config: ml_collections.ConfigDict, spec: PeftSpec) -> None:
        """Raise ValueError when this model (section config.model) cannot take the PEFT `spec` (config.peft): by
        default, a method that adds modules the model does not have (`peft_methods`). LoRA fits every model."""
        if spec.method in HOOK_METHODS and spec.method not in cls.peft_methods:
            raise ValueError(f"config.peft.method={spec.method!r} needs modules that config.model.name="
                             f"{config.name!r} does not have (it has {list(cls.peft_methods)}); 'lora' adapts any "
                             "model")


def check_fields(config: ml_collections.ConfigDict, prefix: str, choices: dict | None = None, positive=()) -> None:
    """Raise ValueError naming the field `{prefix}.{path}` for a value outside `choices` (path -> valid values,
    `ops.checks.one_of`) or a `positive` field (paths) that is not a positive int (`ops.checks.positive_int`).
    Paths are dotted, relative to `config`."""
    for path, valid in (choices or {}).items():
        one_of(f"{prefix}.{path}", _get(config, path), valid)
    for path in positive:
        positive_int(f"{prefix}.{path}", _get(config, path))


def _get(config, path: str):
    for part in path.split("."):
        config = config[part]
    return config
