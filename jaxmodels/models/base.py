"""The base of every complete architecture: built from a config section, which it validates itself."""

import ml_collections
from flax import nnx

from jaxmodels.ops.checks import one_of, positive_int


class Model(nnx.Module):
    """A model of `jaxmodels.models.MODELS`: `Model(**config.model fields, rngs=...)` (`make_model`).

    `check_config(section)` validates the model's config section before anything is built or compiled,
    raising ValueError that names the field as the user wrote it ("config.model.num_heads=...").
    Checks that span sections (sequence length vs attention blocks, batch vs mesh) live in
    `jaxmodels.train.config`.
    """

    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict) -> None:
        """Raise ValueError for an invalid field of this model's config section. Default: nothing to check
        beyond the constructor's own arguments."""
        del config


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
