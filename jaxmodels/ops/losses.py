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


def info_nce(scores: jax.Array) -> jax.Array:
    """InfoNCE with in-batch negatives (van den Oord et al. 2018, CPC, eq. 4): row i scores N candidates of which
    the one on the diagonal is the positive, so L_N = mean_i [logsumexp_j scores[i, j] - scores[i, i]].

    log N - L_N is the lower bound on the mutual information I(x; c) (eq. 5, §2.3), tight only as N grows; it
    is at most log N. `scores[i, j]` is log f_k(x_j, c_i), e.g. z_j^T W_k c_i (eq. 3).

    scores: (N, N) float. Returns the loss, a float32 scalar in nats (>= 0).
    """
    if scores.ndim != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"scores must be a square (N, N) matrix with positives on the diagonal, got {scores.shape}")
    return jnp.mean(softmax_cross_entropy(scores, jnp.arange(scores.shape[0])))


def info_nce_with_negatives(positive_scores: jax.Array, negative_scores: jax.Array) -> jax.Array:
    """InfoNCE with explicit negatives (van den Oord et al. 2018, CPC, eq. 4), e.g. drawn from other time steps
    (cross-time) or other sequences: each positive competes with its own K negatives, N = K + 1 candidates,
    L_N = mean [logsumexp(positive, negatives) - positive]; log N - L_N <= I(x; c) (eq. 5, §2.3).

    positive_scores: (...) float; negative_scores: (..., K) float, K >= 1. Returns a float32 scalar in nats.
    """
    if negative_scores.shape[:-1] != positive_scores.shape or negative_scores.ndim < 1 or not negative_scores.shape[-1]:
        raise ValueError(f"negative_scores must be positive_scores {positive_scores.shape} + (K,) with K >= 1, "
                         f"got {negative_scores.shape}")
    scores = jnp.concatenate([positive_scores[..., None], negative_scores], axis=-1)
    return jnp.mean(softmax_cross_entropy(scores, jnp.zeros(positive_scores.shape, jnp.int32)))
