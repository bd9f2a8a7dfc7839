"""An image embedding network trained through a classification head, the face-recognition recipe: ArcFace (Deng et
al. 2019, "Additive Angular Margin Loss for Deep Face Recognition"), CosFace (Wang et al. 2018) or a plain softmax
classifier; at test time the head is dropped and two images are compared by the cosine of their embeddings
(verification: same identity or not, for identities never seen in training).

x (B, H, W, C) -> the ConvNet trunk (`models.classifier.DigitClassifier`: 3x3 convolutions in num_stages
stride-2 stages, global pool, feature_dim features) -> linear map to embed_dim = the embedding e (the trunk's
output layer) -> head:
  "arcface"  s·cos(θ_y + m) for the label's class, s·cos θ_j for the others (`ops.losses.arcface_logits`), with
             cos θ_j = e·W_j / (|e| |W_j|) (`ops.losses.cosine_logits`): embeddings and class centres on the sphere
  "cosface"  s·(cos θ_y - m) for the label's class, s·cos θ_j otherwise (`ops.losses.cosface_logits`)
  "softmax"  e W + b, the plain linear softmax classifier (margin and scale unused)
trained with softmax cross entropy. `embed(x)` is the L2-normalised e for every head.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmodels.models.base import Model, check_fields
from jaxmodels.models.classifier import DigitClassifier
from jaxmodels.nn.param import fan_in_init, param, zeros_init
from jaxmodels.ops.checks import real_in_range
from jaxmodels.ops.losses import arcface_logits, cosface_logits, cosine_logits

HEADS = ("arcface", "cosface", "softmax")


class EmbeddingClassifier(Model):
    """Embedding network with a margin (or plain) softmax head (module docstring).

    in_channels, channels, num_stages, feature_dim: the ConvNet trunk (`DigitClassifier`); embed_dim: D;
    num_classes: the training identities; head: one of HEADS; scale s and margin m of the margin heads
    (ArcFace's faces: s = 64, m = 0.5; CosFace's: s = 64, m = 0.35).

    __call__(x (B, H, W, C)) -> the embedding e (B, D) float32; embed(x) -> e / |e|, unit L2 norm.
    classify(e, labels (B,) int) -> (B, num_classes) float32 training logits, the margin applied to each label's
      class; classify(e) -> the logits without margin (s·cos θ, or the linear logits of "softmax"), whose argmax is
      the predicted identity.
    """

    @classmethod
    def check_config(cls, config) -> None:
        """config.model: head one of HEADS, positive sizes, scale > 0 and margin in [0, π/2]."""
        check_fields(config, "config.model", {"head": HEADS},
                     ("in_channels", "channels", "num_stages", "feature_dim", "embed_dim", "num_classes"))
        real_in_range("config.model.scale", config.scale, 0, include_low=False)
        real_in_range("config.model.margin", config.margin, 0, math.pi / 2)

    def __init__(self, *, in_channels: int = 1, channels: int = 32, num_stages: int = 1, feature_dim: int = 128,
                 embed_dim: int = 64, num_classes: int, head: str = "arcface", scale: float = 16.0,
                 margin: float = 0.5, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        if head not in HEADS:
            raise ValueError(f"head={head!r} is not valid; choose one of {list(HEADS)}")
        self.head, self.scale, self.margin = head, real_in_range("scale", scale, 0, include_low=False), margin
        # The trunk's output layer (feature_dim -> embed_dim) is the embedding layer.
        self.trunk = DigitClassifier(in_channels=in_channels, channels=channels, num_stages=num_stages,
                                     feature_dim=feature_dim, num_classes=embed_dim, dtype=dtype,
                                     param_dtype=param_dtype, rngs=rngs)
        self.class_weights = param(rngs, fan_in_init(), (embed_dim, num_classes), ("embed", "vocab"), param_dtype)
        if head == "softmax":
            self.class_bias = param(rngs, zeros_init, (num_classes,), ("vocab",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """The embedding e (before normalisation), (B, embed_dim) float32."""
        return self.trunk(x)

    def embed(self, x: jax.Array) -> jax.Array:
        e = self(x)
        return e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)

    def classify(self, e: jax.Array, labels: jax.Array | None = None) -> jax.Array:
        if self.head == "softmax":
            return e @ self.class_weights.value.astype(jnp.float32) + self.class_bias.value.astype(jnp.float32)
        cosine = cosine_logits(e, self.class_weights.value)
        if labels is None:
            return self.scale * cosine
        if self.head == "arcface":
            return arcface_logits(cosine, labels, scale=self.scale, margin=self.margin)
        return cosface_logits(cosine, labels, scale=self.scale, margin=self.margin)
