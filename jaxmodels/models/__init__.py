"""Complete architectures, each constructible from a config section (`make_model`)."""

import jax.numpy as jnp
import ml_collections
from flax import nnx

from jaxmodels.models.autoencoder import KLAutoencoder
from jaxmodels.models.dit import DiT
from jaxmodels.models.lm import DecoderLM
from jaxmodels.models.mamba import MambaLM
from jaxmodels.models.mlp_denoiser import MLPDenoiser
from jaxmodels.models.mmdit import MMDiT
from jaxmodels.models.sequence_classifier import SequenceClassifier
from jaxmodels.models.sequence_tagger import SequenceTagger
from jaxmodels.models.unet import UNet

MODELS = {"decoder_lm": DecoderLM, "mamba_lm": MambaLM, "sequence_classifier": SequenceClassifier, "unet": UNet,
          "dit": DiT, "mmdit": MMDiT, "kl_autoencoder": KLAutoencoder,
          "mlp_denoiser": MLPDenoiser, "sequence_tagger": SequenceTagger}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def make_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
    """Build the model named config.name from the remaining fields of the config section.

    `dtype` (compute) and `param_dtype` are names from DTYPES (a precision policy: parameters
    stay in param_dtype, arithmetic runs in dtype with float32 statistics).
    """
    fields = dict(config)
    name = fields.pop("name")
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid: {sorted(MODELS)}")
    for k in ("dtype", "param_dtype"):
        if fields[k] not in DTYPES:
            raise ValueError(f"model.{k}={fields[k]!r} is not a dtype; valid: {sorted(DTYPES)}")
        fields[k] = DTYPES[fields[k]]
    return MODELS[name](**fields, rngs=rngs)
