"""Loss functions as pure functions on arrays."""

import jax
import jax.numpy as jnp


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example cross entropy -log softmax(logits)[label], in float32 for any input dtype.

    logits: (..., num_classes) float; labels: (...) int in [0, num_classes). Returns (...) float32 nats.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {logits.shape} must be labels {labels.shape} + (num_classes,)")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels must be integer class ids, got {labels.dtype}")
    logits = logits.astype(jnp.float32)
    label_logits = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - label_logits
