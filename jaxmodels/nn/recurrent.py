"""Recurrent layers: a GRU over sequences (B, T, D), by `jax.lax.scan` over time."""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmodels.nn.diffusion import Linear


class GRU(nnx.Module):
    """Gated recurrent unit (Cho et al. 2014, eq. 5-8; the gate layout of PyTorch's nn.GRU), h_0 = 0:

        r_t = sigmoid(W_ir x_t + W_hr h_{t-1} + b_r),   u_t = sigmoid(W_iu x_t + W_hu h_{t-1} + b_u)
        n_t = tanh(W_in x_t + r_t ⊙ (W_hn h_{t-1} + b_hn)),   h_t = (1 - u_t) ⊙ n_t + u_t ⊙ h_{t-1}

    x: (B, T, in_dim) -> every h_t, (B, T, hidden_dim) in `dtype`. Causal: h_t depends on x_1..x_t only.
    """

    def __init__(self, in_dim: int, hidden_dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.hidden_dim, self.dtype = hidden_dim, dtype
        self.input = Linear(in_dim, 3 * hidden_dim, **kw)
        self.hidden = Linear(hidden_dim, 3 * hidden_dim, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 3:
            raise ValueError(f"x must be (batch, time, features), got shape {x.shape}")
        gates_x = self.input(x)  # (B, T, 3H): every input projection at once

        def step(h, gx):
            (xr, xu, xn), (hr, hu, hn) = jnp.split(gx, 3, axis=-1), jnp.split(self.hidden(h), 3, axis=-1)
            r, u = jax.nn.sigmoid(xr + hr), jax.nn.sigmoid(xu + hu)
            n = jnp.tanh(xn + r * hn)
            h = (1 - u) * n + u * h
            return h, h

        h0 = jnp.zeros((x.shape[0], self.hidden_dim), gates_x.dtype)
        _, hs = jax.lax.scan(step, h0, jnp.swapaxes(gates_x, 0, 1))
        return jnp.swapaxes(hs, 0, 1)
