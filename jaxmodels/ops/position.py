"""Position encodings: rotary (RoFormer, Su et al. 2021) and sinusoidal (Vaswani et al. 2017)."""

import jax
import jax.numpy as jnp
import numpy as np


def rope_frequencies(head_dim: int, base: float = 10000.0) -> jax.Array:
    """Inverse frequencies θ_i = base^(-2i/d), i = 0 .. d/2 - 1 (Su et al. 2021, eq. 15, 0-indexed).

    Returns (head_dim // 2,) float32, computed in float64 and rounded once.
    """
    if head_dim % 2:
        raise ValueError(f"head_dim must be even (dims are rotated in pairs), got {head_dim}")
    return jnp.asarray(base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim), jnp.float32)


def apply_rope(x: jax.Array, positions: jax.Array, *, base: float = 10000.0, interleaved: bool = False) -> jax.Array:
    """Rotary position embedding (Su et al. 2021, eq. 34): rotate each pair of dims of the token at
    position m by the angle m·θ_i, so that <rope(q, m), rope(k, n)> depends on m - n only.

    x: (B, L, N, H) with H even; positions: (B, L) or (L,) integer (or float) positions.
    Pairs: by default rotate-half, (i, i + H/2) (GPT-NeoX / LLaMA); with `interleaved=True`,
    (2i, 2i + 1) (the RoFormer paper / GPT-J). The two are the same map up to a fixed permutation
    of the head dim, but weights trained with one need that permutation to be used with the other.
    Angles and the rotation are computed in float32 (the rotation in float64 for float64 x);
    returns x's shape and dtype.
    """
    x = jnp.asarray(x)
    positions = jnp.asarray(positions)
    if x.ndim != 4:
        raise ValueError(f"x must be 4-D (batch, length, heads, head_dim), got shape {x.shape}")
    if positions.shape not in ((x.shape[1],), x.shape[:2]):
        raise ValueError(f"positions must have shape (L,) = {x.shape[1:2]} or (B, L) = {x.shape[:2]}, "
                         f"got {positions.shape}")
    theta = rope_frequencies(x.shape[-1], base)
    angles = positions.astype(jnp.float32)[..., None, None] * theta  # ([B,] L, 1, H/2)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        rotated = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(x.shape)
    else:
        x1, x2 = jnp.split(xf, 2, axis=-1)
        rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


def sinusoidal_embedding(positions: jax.Array, dim: int, base: float = 10000.0) -> jax.Array:
    """Sinusoidal position encoding (Vaswani et al. 2017, §3.5): sin(p·θ_i) and cos(p·θ_i) with
    θ_i = base^(-2i/dim), i = 0 .. dim/2 - 1 (the frequencies of `rope_frequencies`).

    Layout: sin on the first half of the last axis, cos on the second half (tensor2tensor, DDPM),
    not the paper's interleaving PE(p, 2i) = sin, PE(p, 2i+1) = cos; the two differ by a fixed
    permutation of the features.
    positions: (...) integer or float (e.g. diffusion timesteps). Returns (..., dim) float32.
    """
    if dim % 2:
        raise ValueError(f"dim must be even (sin and cos halves), got {dim}")
    angles = jnp.asarray(positions).astype(jnp.float32)[..., None] * rope_frequencies(dim, base)
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
