"""Per-position classifier on a stack of state-space layers: `SequenceClassifier` without the pooling,
so a causal S4D / S4 / LRU / Mamba stack can be trained on token-to-token tasks (selective copying,
induction heads: Gu & Dao 2023, §4.1, where S4D is the LTI baseline of Mamba)."""

import jax
import jax.numpy as jnp

from jaxmodels.models.sequence_classifier import SequenceClassifier
from jaxmodels.nn.layers import dense


class SequenceTagger(SequenceClassifier):
    """x (batch, length) int token ids or (batch, length, in_features) float -> logits (batch, length,
    num_classes) float32.

    The layers of `SequenceClassifier` (encoder -> residual mixer blocks -> final norm -> linear head),
    with the head applied at every position instead of after pooling. Causal: the output at position t
    depends on x[:, :t + 1] only, so `bidirectional` is not accepted (nor `pooling`, which it has none of).
    For a token-to-token task set num_classes = vocab_size.
    """

    def __init__(self, **kwargs):
        for name in ("pooling", "bidirectional"):
            if name in kwargs:
                raise TypeError(f"SequenceTagger is causal and does not pool: it takes no {name!r} argument")
        super().__init__(**kwargs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self._encode(x)
        for block in self.blocks:
            h = block(h)
        h = self.final_norm(h)
        logits = dense(h, self.w_head.value, self.dtype, "bld,dc->blc") + self.b_head.value.astype(self.dtype)
        return logits.astype(jnp.float32)
