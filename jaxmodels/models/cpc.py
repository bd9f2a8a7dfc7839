"""Contrastive Predictive Coding (van den Oord, Li & Vinyals 2018, §2, Figure 1): an encoder, an autoregressive
context network and one linear prediction per step ahead.

    z_t = g_enc(x)_t       strided 1-D convolutions over the signal (B, L, C): T = L / prod(strides) steps
    c_t = g_ar(z_<=t)      a GRU (the paper's) or a stack of causal 1-D convolutions
    f_k(x_{t+k}, c_t) = exp(z_{t+k}^T W_k c_t),  k = 1..num_predictions       (eq. 3)

The InfoNCE loss of these scores is the task's (`jaxmodels.tasks.cpc`); the representation for downstream tasks
is the context averaged over time (the paper's image experiments mean-pool theirs, §3.2).
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from jaxmodels.models.base import Model, check_fields
from jaxmodels.nn.conv import Conv1D
from jaxmodels.nn.diffusion import Linear
from jaxmodels.nn.recurrent import GRU
from jaxmodels.ops.checks import one_of, positive_int

CONTEXTS = ("gru", "causal_conv")


class CPC(Model):
    """CPC's networks. x: (B, L, in_channels) float.

    encoder: len(encoder_channels) convolutions (kernel encoder_kernels[i], stride encoder_strides[i], no padding)
      with ReLU after each but the last, to z (B, T, encoder_channels[-1]).
    context: "gru", a GRU of context_dim; or "causal_conv", context_layers causal convolutions of kernel
      context_kernel and context_dim channels with ReLU between: c (B, T, context_dim), c_t seeing z_1..z_t.
    predictors: W_k, k = 1..num_predictions, linear maps context_dim -> z_dim without bias.

    __call__(x) -> (z, c); predictions(c) -> (B, T, num_predictions, z_dim), W_k c_t at [:, t, k - 1];
    representation(x) -> (B, context_dim), c averaged over time.
    """

    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict) -> None:
        """config.model: the encoder's three lists of one length, a known context, positive sizes."""
        check_fields(config, "config.model", {"context": CONTEXTS},
                     positive=("in_channels", "context_dim", "context_kernel", "context_layers", "num_predictions"))
        lists = {k: tuple(config[k]) for k in ("encoder_channels", "encoder_kernels", "encoder_strides")}
        if len({len(v) for v in lists.values()}) != 1 or not lists["encoder_channels"]:
            raise ValueError(f"config.model.encoder_channels, encoder_kernels and encoder_strides must be non-empty "
                             f"and of one length, got {lists}")
        for name, values in lists.items():
            for i, v in enumerate(values):
                positive_int(f"config.model.{name}[{i}]", v)

    def __init__(self, *, in_channels: int = 1, encoder_channels=(64, 64), encoder_kernels=(8, 1),
                 encoder_strides=(8, 1), context: str = "gru", context_dim: int = 64, context_kernel: int = 2,
                 context_layers: int = 2, num_predictions: int = 3, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        one_of("context", context, CONTEXTS)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        channels = (in_channels, *encoder_channels)
        self.encoder = nnx.List([Conv1D(a, b, k, stride=s, **kw) for a, b, k, s in
                                 zip(channels[:-1], channels[1:], encoder_kernels, encoder_strides)])
        self.z_dim, self.context_kind = channels[-1], context
        if context == "gru":
            self.context = nnx.List([GRU(self.z_dim, context_dim, **kw)])
        else:
            dims = (self.z_dim, *[context_dim] * context_layers)
            self.context = nnx.List([Conv1D(a, b, context_kernel, causal=True, **kw)
                                     for a, b in zip(dims[:-1], dims[1:])])
        self.predictors = nnx.List([Linear(context_dim, self.z_dim, use_bias=False, **kw)
                                    for _ in range(num_predictions)])

    def encode(self, x: jax.Array) -> jax.Array:
        """z = g_enc(x): (B, L, in_channels) -> (B, T, z_dim)."""
        for i, conv in enumerate(self.encoder):
            x = conv(x)
            if i < len(self.encoder) - 1:
                x = jax.nn.relu(x)
        return x

    def contexts(self, z: jax.Array) -> jax.Array:
        """c = g_ar(z): (B, T, z_dim) -> (B, T, context_dim), causal in t."""
        for i, layer in enumerate(self.context):
            z = layer(z)
            if i < len(self.context) - 1:
                z = jax.nn.relu(z)
        return z

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        z = self.encode(x)
        return z, self.contexts(z)

    def predictions(self, c: jax.Array) -> jax.Array:
        """W_k c_t for every t and k: (B, T, context_dim) -> (B, T, num_predictions, z_dim)."""
        return jnp.stack([w(c) for w in self.predictors], axis=2)

    def representation(self, x: jax.Array) -> jax.Array:
        """The features of a sequence for a downstream (linear) classifier: mean_t c_t, (B, context_dim)."""
        return jnp.mean(self(x)[1], axis=1)
