"""Mamba language model (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State
Spaces", §3.4 and the reference `MambaLMHeadModel`): embedding -> residual RMSNorm Mamba blocks ->
final norm -> output head. Same calling convention as `jaxmodels.models.lm.DecoderLM`, so
`jaxmodels.models.lm.generate` decodes it (with the recurrent state as its cache)."""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmodels.models.base import Model, check_fields
from jaxmodels.models.lm import check_norm_and_head, output_logits
from jaxmodels.nn.layers import Embed, RMSNorm
from jaxmodels.nn.param import fan_in_init, param
from jaxmodels.nn.ssm import MambaBlock, ResidualBlock, mamba_dt_rank
from jaxmodels.ops.scan import IMPLEMENTATIONS as SCAN_IMPLEMENTATIONS


class MambaLM(Model):
    """tokens (batch, length) int32 -> logits (batch, length, vocab_size) float32.

    Embedding -> num_layers blocks x + Mamba(RMSNorm(x)) -> RMSNorm -> output head (`w_out`, or with
    `tie_embeddings` the embedding table transposed, as the reference `MambaLMHeadModel` does by default).
    `scalar_A`: every block's A is one scalar per channel (Mamba-2's restriction, `MambaBlock`), which the "ssd"
    scan implementation needs. `norm_eps`: the RMSNorms' epsilon (the reference and Hugging Face's
    `layer_norm_epsilon` use 1e-5).
    d_inner = expand · embed_dim; dt_rank "auto" = ceil(embed_dim / 16). The "cache" of a layer is
    its recurrent state ({"conv", "ssm"}, O(1) in the sequence length), so positions, cache_index and
    max_length are accepted for interface compatibility and not needed.
    """

    def __init__(self, *, vocab_size: int, num_layers: int, embed_dim: int, d_state: int = 16, d_conv: int = 4,
                 expand: int = 2, dt_rank: int | str = "auto", chunk_size: int | None = None,
                 scan_implementation: str | None = None, scalar_A: bool = False, norm_eps: float = 1e-6,
                 tie_embeddings: bool = False,
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dtype, self.norm_eps, self.tie_embeddings = dtype, norm_eps, tie_embeddings
        self.vocab_size, self.num_layers, self.embed_dim = vocab_size, num_layers, embed_dim
        self.d_state, self.d_conv, self.expand, self.dt_rank = d_state, d_conv, expand, dt_rank
        self.embed = Embed(vocab_size, embed_dim, **kw)
        self.blocks = nnx.List([
            ResidualBlock(MambaBlock(embed_dim, d_state=d_state, d_conv=d_conv, expand=expand, dt_rank=dt_rank,
                                     chunk_size=chunk_size, scan_implementation=scan_implementation,
                                     scalar_A=scalar_A, **kw),
                          embed_dim, norm_kind="rms", norm_eps=norm_eps, **kw)
            for _ in range(num_layers)])
        self.final_norm = RMSNorm(embed_dim, eps=norm_eps, **kw)
        if not tie_embeddings:
            self.w_out = param(rngs, fan_in_init(), (embed_dim, vocab_size), ("embed", "vocab"), param_dtype)

    @classmethod
    def check_config(cls, config) -> None:
        """config.model: the scan implementation, positive sizes, a bool scalar_A, norm_eps > 0 and a bool
        tie_embeddings."""
        check_fields(config, "config.model", {"scan_implementation": (None, *SCAN_IMPLEMENTATIONS)},
                     ("num_layers", "embed_dim", "d_state", "d_conv", "expand"))
        scalar_a = config.get("scalar_A", False)
        if not isinstance(scalar_a, bool):
            raise TypeError(f"config.model.scalar_A must be a bool, got {scalar_a!r}")
        check_norm_and_head(config)

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, cache: list[dict] | None = None,
                 cache_index: jax.Array | None = None, *, return_aux: bool = False,
                 segment_ids: jax.Array | None = None):
        """Without `cache`: the parallel (selective-scan) forward, returns logits (batch, length, vocab).
        With `cache` (from `init_cache`, or returned by a previous call): continues the recurrence over
        `tokens` (one token: the recurrent step; several: the parallel scan from the cached state) and
        returns (logits, new_cache). `positions` and `cache_index` are unused (the state carries them).
        With `return_aux` (the `DecoderLM` interface) the auxiliary losses come last: always {} here.
        `segment_ids` (packed documents, the `DecoderLM` interface) are accepted and unused: the recurrent state
        is NOT reset at document boundaries (the selective scan here has no reset input), so a document starts
        from the state the previous one left; the end-of-document token is the model's only cue to forget."""
        del positions, cache_index, segment_ids
        if return_aux:
            out = self(tokens, cache=cache)
            return (*out, {}) if cache is not None else (out, {})
        if tokens.ndim != 2:
            raise ValueError(f"MambaLM: tokens must be (batch, length) ids, got shape {tokens.shape}")
        x = self.embed(tokens)
        if cache is None:
            for block in self.blocks:
                x = block(x)
            return self._logits(x)
        if len(cache) != len(self.blocks):
            raise ValueError(f"MambaLM: cache has {len(cache)} layers, the model {len(self.blocks)}")
        new_cache = []
        for block, state in zip(self.blocks, cache):
            if tokens.shape[1] == 1:
                h, state = block.step(state, x[:, 0])
                x = h[:, None]
            else:
                x, state = block(x, state)
            new_cache.append(state)
        return self._logits(x), new_cache

    def _logits(self, x):
        return output_logits(self, self.final_norm(x))

    def train_flops_per_token(self, seq_len: int) -> float:
        """Model FLOPs of one training token (`train_flops_per_token`; independent of `seq_len`: the scan is
        linear in the length)."""
        del seq_len
        return train_flops_per_token(vocab_size=self.vocab_size, num_layers=self.num_layers, embed_dim=self.embed_dim,
                                     d_state=self.d_state, d_conv=self.d_conv, expand=self.expand,
                                     dt_rank=self.dt_rank)

    @property
    def has_cache(self) -> bool:
        """Always True: every layer decodes recurrently."""
        return True

    def init_cache(self, batch: int, max_length: int) -> list[dict]:
        """One zero recurrent state per layer; its size does not depend on max_length."""
        del max_length
        return [block.init_state(batch) for block in self.blocks]


def train_flops_per_token(*, vocab_size: int, num_layers: int, embed_dim: int, d_state: int = 16, d_conv: int = 4,
                          expand: int = 2, dt_rank: int | str = "auto") -> float:
    """Model FLOPs of one training token of MambaLM (forward + backward = 3 x forward), analytically.

    Matmuls: 6 * (parameters in matmuls): in_proj (d, 2 d_in), x_proj (d_in, R + 2N), dt_proj (R, d_in),
    out_proj (d_in, d) per layer and the output head (d, V); the embedding lookup excluded (as in
    `jaxmodels.models.lm.train_flops_per_token`). Per layer forward, elementwise work that scales with the
    model: the depthwise conv, 2 d_conv d_in, and the selective scan, 7 d_in N (Δ·A, Δ·B·u (2),
    Ā·h + B̄u (2), C·h (2); the exp and softplus are not counted). Sequence-length independent.
    """
    d_inner, rank = expand * embed_dim, mamba_dt_rank(embed_dim, dt_rank)
    layer_params = embed_dim * 2 * d_inner + d_inner * (rank + 2 * d_state) + rank * d_inner + d_inner * embed_dim
    matmul_params = num_layers * layer_params + embed_dim * vocab_size
    elementwise_fwd = num_layers * (2 * d_conv * d_inner + 7 * d_inner * d_state)
    return 6.0 * matmul_params + 3.0 * elementwise_fwd
