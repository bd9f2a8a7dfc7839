"""A small residual MLP denoiser for low-dimensional (2-D toy) data, conditioned on a noise level and a class.

The network of 2-D diffusion / flow-matching demos (e.g. the toy experiments of Lipman et al. 2023 and
Liu et al. 2022): x (B, F) -> (B, F), with the noise conditioning embedded as in DDPM (sinusoid + MLP,
`jaxmodels.nn.diffusion.TimestepEmbedding`) and added to every residual block's input.
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmodels.models.base import Model, check_fields
from jaxmodels.nn.diffusion import LabelEmbedding, Linear, TimestepEmbedding


class MLPDenoiser(Model):
    """Residual MLP: with c = TimestepEmbedding(t) [+ LabelEmbedding(labels)] (B, hidden_dim),

        h = W_in x;   num_layers times: h = h + W_2 silu(W_1 (silu(h) + c));   out = W_out silu(h),

    W_out zero-initialised (the network outputs 0 at init, as ADM's conv_out).

    in_features: F; hidden_dim: width; num_layers: residual blocks; frequency_dim: width of the sinusoid
    (the conditioning t should span ~[0, 1000], e.g. DDPM timesteps or 1000·t for t in [0, 1]);
    num_classes: 0 for an unconditional model, else labels (B,) int in [0, num_classes], label
    num_classes (or labels=None) being the null label of classifier-free guidance.

    __call__(x (B, F), t (B,) float or int, labels (B,) int | None) -> (B, F) float32.
    Parameters: `mlp_denoiser_parameter_count`.
    """

    @classmethod
    def check_config(cls, config) -> None:
        """config.model: positive sizes."""
        check_fields(config, "config.model", positive=("in_features", "hidden_dim", "num_layers", "frequency_dim"))

    def __init__(self, *, in_features: int = 2, hidden_dim: int = 256, num_layers: int = 3, frequency_dim: int = 64,
                 num_classes: int = 0, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        for name, v in (("in_features", in_features), ("hidden_dim", hidden_dim), ("num_layers", num_layers),
                        ("frequency_dim", frequency_dim)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if frequency_dim % 2:
            raise ValueError(f"frequency_dim must be even (sin and cos halves), got {frequency_dim}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.in_features, self.num_classes = in_features, num_classes
        self.input = Linear(in_features, hidden_dim, logical_axes=(None, "embed"), **kw)
        self.time_embed = TimestepEmbedding(hidden_dim, frequency_dim=frequency_dim, **kw)
        self.label_embed = LabelEmbedding(num_classes, hidden_dim, **kw) if num_classes else None
        self.fc1 = nnx.List([Linear(hidden_dim, hidden_dim, **kw) for _ in range(num_layers)])
        self.fc2 = nnx.List([Linear(hidden_dim, hidden_dim, logical_axes=("mlp", "embed"), **kw)
                             for _ in range(num_layers)])
        self.output = Linear(hidden_dim, in_features, zero_init=True, logical_axes=("embed", None), **kw)

    def __call__(self, x: jax.Array, t: jax.Array, labels: jax.Array | None = None) -> jax.Array:
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"x must be (batch, {self.in_features}), got shape {x.shape}")
        if jnp.shape(t) != x.shape[:1]:
            raise ValueError(f"t must be (batch,) = {x.shape[:1]}, got shape {jnp.shape(t)}")
        c = self.time_embed(t)
        if self.label_embed is not None:
            c = c + self.label_embed(jnp.full(x.shape[:1], self.num_classes, jnp.int32) if labels is None else labels)
        elif labels is not None:
            raise ValueError("labels given to a model built with num_classes=0")
        h = self.input(x)
        for fc1, fc2 in zip(self.fc1, self.fc2):
            h = h + fc2(jax.nn.silu(fc1(jax.nn.silu(h) + c.astype(h.dtype))))
        return self.output(jax.nn.silu(h)).astype(jnp.float32)


def mlp_denoiser_parameter_count(*, in_features: int = 2, hidden_dim: int = 256, num_layers: int = 3,
                                 frequency_dim: int = 64, num_classes: int = 0) -> int:
    """Number of parameters of `MLPDenoiser` with these arguments, counted by hand."""
    h = hidden_dim
    time = frequency_dim * h + h + h * h + h
    labels = (num_classes + 1) * h if num_classes else 0
    return (in_features * h + h) + time + labels + num_layers * 2 * (h * h + h) + (h * in_features + in_features)
