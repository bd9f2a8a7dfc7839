"""Complete architectures, each constructible from a config section (`make_model`)."""

import ml_collections
from flax import nnx

from jaxmodels.models.autoencoder import KLAutoencoder
from jaxmodels.models.classifier import DigitClassifier
from jaxmodels.models.cpc import CPC
from jaxmodels.models.detr import DETR
from jaxmodels.models.dit import DiT
from jaxmodels.models.embedding import EmbeddingClassifier
from jaxmodels.models.flows import CNF, NICE, Glow, RealNVP
from jaxmodels.models.lm import DecoderLM
from jaxmodels.models.mamba import MambaLM
from jaxmodels.models.mlp_denoiser import MLPDenoiser
from jaxmodels.models.mmdit import MMDiT
from jaxmodels.models.sam import SAM
from jaxmodels.models.sequence_classifier import SequenceClassifier
from jaxmodels.models.sequence_tagger import SequenceTagger
from jaxmodels.models.swin import Swin
from jaxmodels.models.unet import UNet
from jaxmodels.models.vit import ViT
from jaxmodels.nn.peft import HOOK_METHODS, PeftSpec
from jaxmodels.ops.checks import one_of
from jaxmodels.ops.precision import DTYPES

MODELS = {"decoder_lm": DecoderLM, "mamba_lm": MambaLM, "sequence_classifier": SequenceClassifier, "unet": UNet,
          "dit": DiT, "mmdit": MMDiT, "kl_autoencoder": KLAutoencoder,
          "mlp_denoiser": MLPDenoiser, "sequence_tagger": SequenceTagger, "vit": ViT,
          "nice": NICE, "realnvp": RealNVP, "glow": Glow, "cnf": CNF, "cpc": CPC, "sam": SAM, "detr": DETR,
          "swin": Swin, "convnet": DigitClassifier, "embedding_classifier": EmbeddingClassifier}


def resolved_section(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The model section as its model takes it: a field named after a model of MODELS holds that model's own
    settings (e.g. config.model.glow.num_levels), so that one config can carry several models and
    `--config.model.name` chooses among them; the chosen model's sub-section is merged into the section (a field
    there wins) and the other models' sub-sections are dropped."""
    fields = {k: v for k, v in dict(config).items() if k not in MODELS}
    fields.update(dict(config.get(config.name) or {}))
    return ml_collections.ConfigDict(fields)

def check_model_config(config: ml_collections.ConfigDict) -> None:
    """Validate a model config section before anything is built: its name, its dtypes, and the model's own
    `check_config` (on `resolved_section`). Raises ValueError naming the field (config.model.X) and the valid
    choices."""
    one_of("config.model.name", config.name, MODELS)
    for k in ("dtype", "param_dtype"):
        one_of(f"config.model.{k}", config[k], DTYPES)
    MODELS[config.name].check_config(resolved_section(config))


def make_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs, peft: PeftSpec | None = None) -> nnx.Module:
    """Build the model named config.name from the remaining fields of the config section (`resolved_section`).

    `dtype` (compute) and `param_dtype` are names from DTYPES (a precision policy: parameters
    stay in param_dtype, arithmetic runs in dtype with float32 statistics).
    `peft` (config.peft as a PeftSpec; None: none): a method that adds modules (`nn.peft.HOOK_METHODS`) is passed
    to the model as its `peft` argument (`Model.check_peft` says whether it has them); LoRA changes nothing here.
    """
    one_of("model.name", config.name, MODELS)
    fields = dict(resolved_section(config))
    name = fields.pop("name")
    for k in ("dtype", "param_dtype"):
        fields[k] = DTYPES[one_of(f"model.{k}", fields[k], DTYPES)]
    if peft is not None and peft.method in HOOK_METHODS:
        fields["peft"] = peft
    return MODELS[name](**fields, rngs=rngs)
