"""Gated Attention Unit and its linear-time FLASH form (Hua et al. 2022, "Transformer Quality in Linear Time")."""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmodels.nn.layers import dense
from jaxmodels.nn.param import fan_in_init, param
from jaxmodels.ops.checks import one_of
from jaxmodels.ops.gau import SCORES, gau_attention, mixed_chunk_attention
from jaxmodels.ops.position import apply_rope

POSITIONS = ("rope", "relative_bias", None)


class GAU(nnx.Module):
    r"""Gated Attention Unit (Hua et al. 2022, §2), or FLASH (§3) with `chunk_size`.

    x: (B, T, D) -> (B, T, D); D = embed_dim, e = expansion_dim, s = shared_dim, φ = SiLU:

      U = φ(X W_u), V = φ(X W_v)       (B, T, e)   W_u, W_v: (D, e) ("embed", "mlp")
      Z = φ(X W_z)                     (B, T, s)   W_z: (D, s) ("embed", "head_dim")
      Q = γ_q ⊙ Z + β_q,  K = γ_k ⊙ Z + β_k        per-dim scales and offsets γ, β: (h, s) (None, "head_dim")
      O = (U ⊙ A V) W_o                            W_o: (e, D) ("mlp", "embed")

    with A from `jaxmodels.ops.gau.gau_attention` (relu² or softmax scores) when `chunk_size` is
    None, h = 2; or FLASH (§3): `mixed_chunk_attention` with chunks of `chunk_size` and h = 4
    scale/offset pairs making the quadratic and the linear queries and keys from the one Z.
    Like the library's `Attention`, the unit has no norm or residual of its own (the block adds
    them) and its dense layers have no biases.

    Positions (`position`): "rope" rotates every query and key by RoPE (Su et al. 2021) over the
    s dims, treating the h scaled copies of Z as heads of `jaxmodels.ops.position.apply_rope`;
    "relative_bias" adds a learned Toeplitz bias b[j - i] (the paper's pseudocode adds such a relative
    position bias to the scores), offsets clipped to ±max_relative_distance, (2R + 1,) (None,), over
    the whole sequence (GAU) or within each chunk (FLASH); None: neither.

    Init: kernels LeCun-normal (`fan_in_init`; W_o scaled by `out_scale` like `Attention`); γ = 1,
    β = 0 as in a LayerNorm (the paper likens them to LayerNorm's scale and offset), so Q = K = Z at
    first and the scores are not stuck on relu²'s flat zero; relative bias 0.
    Parameters are `param_dtype`; arithmetic runs in `dtype` with float32 accumulation and float32
    attention statistics.
    """

    LORA_PROJECTIONS = ("w_u", "w_v", "w_z", "w_o")  # kernels used only through `dense` (`nn.peft.lora_projections`)

    def __init__(self, embed_dim: int, expansion_dim: int | None = None, shared_dim: int = 128, *,
                 scores: str = "relu2", causal: bool, chunk_size: int | None = None, position: str | None = "rope",
                 max_relative_distance: int = 128, rope_base: float = 10000.0, out_scale: float = 1.0,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        expansion_dim = 2 * embed_dim if expansion_dim is None else expansion_dim
        one_of("scores", scores, SCORES)
        if chunk_size is not None and scores != "relu2":
            raise ValueError(f"FLASH mixed chunk attention (chunk_size={chunk_size}) uses relu2 scores, got {scores!r}")
        one_of("position", position, POSITIONS)
        if position == "rope" and shared_dim % 2:
            raise ValueError(f"RoPE rotates pairs of dims: shared_dim must be even, got {shared_dim}")
        self.scores, self.causal, self.chunk_size, self.position = scores, causal, chunk_size, position
        self.max_relative_distance, self.rope_base, self.dtype = max_relative_distance, rope_base, dtype
        init = fan_in_init()
        self.w_u = param(rngs, init, (embed_dim, expansion_dim), ("embed", "mlp"), param_dtype)
        self.w_v = param(rngs, init, (embed_dim, expansion_dim), ("embed", "mlp"), param_dtype)
        self.w_z = param(rngs, init, (embed_dim, shared_dim), ("embed", "head_dim"), param_dtype)
        self.w_o = param(rngs, fan_in_init(scale=out_scale**2), (expansion_dim, embed_dim), ("mlp", "embed"),
                         param_dtype)
        num_qk = 2 if chunk_size is None else 4  # (q, k) or (q_quad, k_quad, q_lin, k_lin)
        self.gamma = param(rngs, jax.nn.initializers.ones, (num_qk, shared_dim), (None, "head_dim"), param_dtype)
        self.beta = param(rngs, jax.nn.initializers.zeros, (num_qk, shared_dim), (None, "head_dim"), param_dtype)
        if position == "relative_bias":
            self.relative_bias = param(rngs, jax.nn.initializers.zeros, (2 * max_relative_distance + 1,), (None,),
                                       param_dtype)

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """x: (B, T, D); positions: (B, T) or (T,) int, used by RoPE. Returns (B, T, D) in `dtype`."""
        u = jax.nn.silu(dense(x, self.w_u.value, self.dtype))
        v = jax.nn.silu(dense(x, self.w_v.value, self.dtype))
        z = jax.nn.silu(dense(x, self.w_z.value, self.dtype))
        qk = z[:, :, None, :] * self.gamma.value.astype(self.dtype) + self.beta.value.astype(self.dtype)  # (B, T, h, s)
        if self.position == "rope":
            qk = apply_rope(qk, positions, base=self.rope_base)
        qk = [qk[:, :, i] for i in range(qk.shape[2])]
        if self.chunk_size is None:
            bias = self._relative_bias(x.shape[1])
            o = gau_attention(*qk, v, scores=self.scores, causal=self.causal, bias=bias)
        else:
            bias = self._relative_bias(self.chunk_size)
            o = mixed_chunk_attention(*qk, v, chunk_size=self.chunk_size, causal=self.causal, bias=bias)
        return dense(u * o, self.w_o.value, self.dtype)

    def _relative_bias(self, length: int) -> jax.Array | None:
        """(length, length) float32 Toeplitz bias b[clip(j - i)] for query i, key j; None without one."""
        if self.position != "relative_bias":
            return None
        r = self.max_relative_distance
        offsets = jnp.arange(length)[None, :] - jnp.arange(length)[:, None]
        return self.relative_bias.value.astype(jnp.float32)[jnp.clip(offsets, -r, r) + r]
