"""Flax layers of normalising flows: each owns its parameters and calls a bijector of `jaxmodels.ops.flows`.

Every layer here is a `Bijector`: `layer(x, inverse=False) -> (y, log_det (B,))` with the convention of
`ops.flows` (log |det J| of the map applied, float32), and `layer.initialize(x)`, the data-dependent start
(Glow's actnorm, §3.1) that sets the layer's parameters from a batch and is a no-op elsewhere.

  layer               op                                        paper
  AdditiveCoupling    ops.flows.additive_coupling               NICE (Dinh et al. 2014) eq. 4-7
  DiagonalScaling     ops.flows.diagonal_scaling                NICE §3.3
  AffineCoupling      ops.flows.affine_coupling                 RealNVP (Dinh et al. 2017) eq. 6-9; Glow §3.3
  ActNorm             ops.flows.actnorm (+ actnorm_init)        Glow (Kingma & Dhariwal 2018) §3.1
  InvertibleConv1x1   ops.flows.invertible_conv_1x1 (LU)        Glow §3.2
  GaussianPrior       ops.flows.gaussian_log_prob's mean/scale  Glow §3.3 / code: learned prior of a factored half

and the networks of the couplings: `CouplingMLP` (vectors, NICE / RealNVP on 2-D data) and `CouplingConvNet`
(images: RealNVP's ResNet, Glow's conv3x3-conv1x1-conv3x3). Their last layer starts at zero, so that every
coupling starts as the identity (Glow §3.3, "zero initialization").
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmodels.nn.conv import Conv2D
from jaxmodels.nn.diffusion import Linear
from jaxmodels.nn.param import param, zeros_init
from jaxmodels.ops import flows as F
from jaxmodels.ops.checks import one_of

MASKS = ("checkerboard", "channel", "alternate")
SCALES = ("tanh", "sigmoid")


class Bijector(nnx.Module):
    """Base of the layers here: `__call__(x, inverse=False) -> (y, log_det (B,))`; `initialize(x)` sets
    data-dependent parameters from a batch x (B, ...) and returns the layer's output on it (default: no
    parameters to set)."""

    def initialize(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self(x)


class CouplingMLP(nnx.Module):
    """x (B, ...) -> ((B, ...) * num_outputs): a ReLU MLP on the flattened example, `num_hidden` hidden layers of
    `hidden_dim`, the output layer zero-initialised; with num_outputs = 2 it returns (shift, raw log-scale)."""

    def __init__(self, features: int, hidden_dim: int, num_hidden: int, *, num_outputs: int = 1, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        dims = [features] + [hidden_dim] * num_hidden
        self.hidden = nnx.List([Linear(a, b, **kw) for a, b in zip(dims[:-1], dims[1:])])
        self.out = Linear(dims[-1], num_outputs * features, zero_init=True, **kw)
        self.num_outputs = num_outputs

    def __call__(self, x: jax.Array):
        h = x.reshape(x.shape[0], -1)
        for layer in self.hidden:
            h = jax.nn.relu(layer(h))
        out = self.out(h).astype(x.dtype)
        parts = [p.reshape(x.shape) for p in jnp.split(out, self.num_outputs, axis=-1)]
        return parts[0] if self.num_outputs == 1 else tuple(parts)


class CouplingConvNet(nnx.Module):
    """x (B, H, W, C) -> (shift, raw log-scale), each (B, H, W, C): conv3x3 (C -> hidden) - ReLU - conv1x1 - ReLU,
    then `num_blocks` residual blocks h + conv3x3(ReLU(conv3x3(ReLU(h)))), then a zero-initialised conv3x3
    (hidden -> 2C). num_blocks = 0 is Glow's coupling network NN() (§3.3, without its actnorm); num_blocks > 0 a
    small version of RealNVP's ResNet s and t (§4.1, without batch norm)."""

    def __init__(self, channels: int, hidden_dim: int, num_blocks: int, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv_in = Conv2D(channels, hidden_dim, 3, **kw)
        self.conv_mid = Conv2D(hidden_dim, hidden_dim, 1, **kw)
        self.blocks = nnx.List([nnx.List([Conv2D(hidden_dim, hidden_dim, 3, **kw),
                                          Conv2D(hidden_dim, hidden_dim, 3, **kw)]) for _ in range(num_blocks)])
        self.conv_out = Conv2D(hidden_dim, 2 * channels, 3, zero_init=True, **kw)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = jax.nn.relu(self.conv_mid(jax.nn.relu(self.conv_in(x))))
        for first, second in self.blocks:
            h = h + second(jax.nn.relu(first(jax.nn.relu(h))))
        shift, raw = jnp.split(self.conv_out(jax.nn.relu(h)).astype(x.dtype), 2, axis=-1)
        return shift, raw


def coupling_mask(kind: str, event_shape: tuple[int, ...], flip: bool) -> jax.Array:
    """The binary mask b of a coupling over examples of `event_shape`: "checkerboard" (RealNVP §3.4, spatial,
    (H, W, 1)), "channel" (first / second half of the last axis, (C,)), or "alternate" (NICE §5.1: odd and even
    entries of the flattened example, `event_shape`); `flip` swaps the halves."""
    one_of("mask", kind, MASKS)
    if kind == "checkerboard":
        return F.checkerboard_mask(*event_shape[:2], flip=flip)
    if kind == "channel":
        return F.channel_mask(event_shape[-1], flip=flip)
    parity = np.arange(int(np.prod(event_shape))).reshape(event_shape) % 2
    return jnp.asarray(parity == int(flip), jnp.float32)


class AdditiveCoupling(Bijector):
    """NICE's additive coupling (`ops.flows.additive_coupling`) with the mask `coupling_mask(mask, event_shape,
    flip)` and m = `CouplingMLP(hidden_dim, num_hidden)`; log-det 0. x: (B, *event_shape)."""

    def __init__(self, event_shape: tuple[int, ...], *, mask: str = "alternate", flip: bool = False,
                 hidden_dim: int = 256, num_hidden: int = 3, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.event_shape, self.mask, self.flip = tuple(event_shape), mask, flip
        self.net = CouplingMLP(int(np.prod(event_shape)), hidden_dim, num_hidden, dtype=dtype,
                               param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, inverse: bool = False) -> tuple[jax.Array, jax.Array]:
        return F.additive_coupling(x, coupling_mask(self.mask, self.event_shape, self.flip), self.net,
                                   inverse=inverse)


class DiagonalScaling(Bijector):
    """NICE's diagonal scaling layer (`ops.flows.diagonal_scaling`, §3.3): y = exp(log_scale) ⊙ x with one
    learned log-scale per dimension of the example, started at 0. x: (B, *event_shape)."""

    def __init__(self, event_shape: tuple[int, ...], *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.log_scale = param(rngs, zeros_init, tuple(event_shape), (None,) * len(event_shape), param_dtype)

    def __call__(self, x: jax.Array, inverse: bool = False) -> tuple[jax.Array, jax.Array]:
        return F.diagonal_scaling(x, self.log_scale.value, inverse=inverse)


class AffineCoupling(Bijector):
    """RealNVP's affine coupling (`ops.flows.affine_coupling`) with the mask `coupling_mask(mask, event_shape,
    flip)`; (t, raw) from `CouplingMLP` (vectors) or `CouplingConvNet` (images, num_blocks residual blocks), and
    the log-scale bounded as

        "tanh"     s = scale ⊙ tanh(raw), a learned per-channel scale started at 1 (RealNVP's code)
        "sigmoid"  s = log sigmoid(raw + 2), a scale in (0, 1) started near 0.88 (Glow's code, §3.3)

    x: (B, *event_shape); event_shape (D,) or (H, W, C)."""

    def __init__(self, event_shape: tuple[int, ...], *, mask: str = "checkerboard", flip: bool = False,
                 hidden_dim: int = 64, num_blocks: int = 1, scale: str = "tanh", dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        one_of("scale", scale, SCALES)
        self.event_shape, self.mask, self.flip, self.scale_kind = tuple(event_shape), mask, flip, scale
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if len(event_shape) == 1:
            self.net = CouplingMLP(event_shape[0], hidden_dim, max(num_blocks, 1), num_outputs=2, **kw)
        else:
            self.net = CouplingConvNet(event_shape[-1], hidden_dim, num_blocks, **kw)
        self.scale = (param(rngs, lambda k, s, d: jnp.ones(s, d), (event_shape[-1],), ("norm",), param_dtype)
                      if scale == "tanh" else None)

    def _shift_and_log_scale(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
        shift, raw = self.net(h)
        if self.scale_kind == "tanh":
            return shift, self.scale.value.astype(h.dtype) * jnp.tanh(raw)
        return shift, jax.nn.log_sigmoid(raw + 2.0)

    def __call__(self, x: jax.Array, inverse: bool = False) -> tuple[jax.Array, jax.Array]:
        return F.affine_coupling(x, coupling_mask(self.mask, self.event_shape, self.flip), self._shift_and_log_scale,
                                 inverse=inverse)


class ActNorm(Bijector):
    """Glow's actnorm (`ops.flows.actnorm`, §3.1): per-channel y = exp(log_scale) ⊙ x + bias, started at the
    identity; `initialize(x)` sets (bias, log_scale) so that the output on x has zero mean and unit variance per
    channel (`ops.flows.actnorm_init`). x: (B, ..., channels)."""

    def __init__(self, channels: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.bias = param(rngs, zeros_init, (channels,), ("norm",), param_dtype)
        self.log_scale = param(rngs, zeros_init, (channels,), ("norm",), param_dtype)

    def __call__(self, x: jax.Array, inverse: bool = False) -> tuple[jax.Array, jax.Array]:
        return F.actnorm(x, self.bias.value, self.log_scale.value, inverse=inverse)

    def initialize(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        bias, log_scale = F.actnorm_init(x)
        self.bias.value, self.log_scale.value = (bias.astype(self.bias.value.dtype),
                                                 log_scale.astype(self.log_scale.value.dtype))
        return self(x)


class InvertibleConv1x1(Bijector):
    """Glow's invertible 1x1 convolution in LU form (`ops.flows.invertible_conv_1x1`, §3.2): W = P L (U + diag(s))
    from a random rotation (`invertible_conv_1x1_init`); P and sign(s) stay fixed, L, U and log|s| are trained.

    P and sign(s) are static data of the layer (tuples), so the rotation is drawn from `seed`, a static int,
    eagerly even when the layer is built under a trace (the trainer builds models inside `jax.jit`); the
    parameters then start from it whatever the rngs. x: (B, ..., channels)."""

    def __init__(self, channels: int, *, seed: int = 0, param_dtype=jnp.float32):
        with jax.ensure_compile_time_eval():
            p, l, u, s = (np.asarray(a) for a in F.invertible_conv_1x1_init(jax.random.key(seed), channels))
        self.permutation = tuple(int(i) for i in np.argmax(p, axis=1))  # P[i, permutation[i]] = 1
        self.sign = tuple(float(v) for v in np.sign(s))
        self.lower = nnx.Param(jnp.asarray(l, param_dtype), logical_axes=(None, None))
        self.upper = nnx.Param(jnp.asarray(u, param_dtype), logical_axes=(None, None))
        self.log_abs_s = nnx.Param(jnp.asarray(np.log(np.abs(s)), param_dtype), logical_axes=("norm",))

    def __call__(self, x: jax.Array, inverse: bool = False) -> tuple[jax.Array, jax.Array]:
        c = len(self.permutation)
        p = jnp.eye(c, dtype=jnp.float32)[jnp.asarray(self.permutation)]
        s = jnp.asarray(self.sign, jnp.float32) * jnp.exp(self.log_abs_s.value.astype(jnp.float32))
        return F.invertible_conv_1x1(x, p, self.lower.value.astype(jnp.float32),
                                     self.upper.value.astype(jnp.float32), s, inverse=inverse)


class GaussianPrior(nnx.Module):
    """Glow's learned prior of a factored-out half z given the kept half h (Glow's code, `split2d`): a
    zero-initialised conv3x3 gives (mean, log_scale) of z ~ N(mean, exp(log_scale)^2), started at N(0, I).
    Written as a bijector of z to a standard-normal latent, so that every latent of a flow is N(0, I):

        forward  eps = (z - mean) exp(-log_scale),  log_det = -sum(log_scale)
        inverse  z = mean + exp(log_scale) eps       (sampling at temperature T scales eps, Glow §5)

    h, z: (B, H, W, C) each."""

    def __init__(self, channels: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.conv = Conv2D(channels, 2 * channels, 3, zero_init=True, dtype=dtype, param_dtype=param_dtype,
                           rngs=rngs)

    def __call__(self, z: jax.Array, h: jax.Array, inverse: bool = False) -> tuple[jax.Array, jax.Array]:
        mean, log_scale = jnp.split(self.conv(h).astype(z.dtype), 2, axis=-1)
        log_det = -jnp.sum(log_scale.astype(jnp.promote_types(z.dtype, jnp.float32)).reshape(z.shape[0], -1), axis=1)
        if inverse:
            return mean + jnp.exp(log_scale) * z, -log_det
        return (z - mean) * jnp.exp(-log_scale), log_det


class ConcatSquashLinear(nnx.Module):
    """FFJORD's time-conditioned linear layer (Grathwohl et al. 2019, code `ConcatSquashLinear`):

        y = (W x + b) ⊙ sigmoid(W_g t + b_g) + W_b t.

    x: (B, in_dim); t: a scalar time. Returns (B, out_dim) in `dtype`."""

    def __init__(self, in_dim: int, out_dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear = Linear(in_dim, out_dim, **kw)
        self.gate = Linear(1, out_dim, logical_axes=(None, "mlp"), **kw)
        self.hyper_bias = Linear(1, out_dim, use_bias=False, logical_axes=(None, "mlp"), **kw)

    def __call__(self, x: jax.Array, t: jax.Array) -> jax.Array:
        t = jnp.reshape(t, (1, 1)).astype(x.dtype)
        return self.linear(x) * jax.nn.sigmoid(self.gate(t)) + self.hyper_bias(t)


class CNFDynamics(nnx.Module):
    """The dynamics f(z, t) of a continuous normalising flow (FFJORD's toy network): `ConcatSquashLinear` layers
    features -> hidden_dims... -> features with tanh between them. z: (B, ...) flattened per example; t: scalar.
    Returns f of z's shape."""

    def __init__(self, features: int, hidden_dims: tuple[int, ...], *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        dims = [features, *hidden_dims, features]
        self.layers = nnx.List([ConcatSquashLinear(a, b, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                for a, b in zip(dims[:-1], dims[1:])])

    def __call__(self, z: jax.Array, t: jax.Array) -> jax.Array:
        h = z.reshape(z.shape[0], -1)
        for i, layer in enumerate(self.layers):
            h = layer(h, t)
            if i < len(self.layers) - 1:
                h = jnp.tanh(h)
        return h.reshape(z.shape).astype(z.dtype)
