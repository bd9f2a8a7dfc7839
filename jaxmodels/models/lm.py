"""Decoder-only Transformer language model (GPT-style, with RoPE, RMSNorm, SwiGLU, GQA; optionally
mixture-of-experts MLPs in every k-th block)."""

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmodels.models.base import Model, check_fields
from jaxmodels.nn.attention import (
    GAU_KINDS,
    LOGIT_SCALED_KINDS,
    AttentionSpec,
    Cache,
    prefix_error,
    segments_error,
    spec_from_config,
)
from jaxmodels.nn.layers import MLP, NORMS, Embed, dense, make_norm
from jaxmodels.nn.param import fan_in_init, param
from jaxmodels.nn.peft import HOOK_METHODS, PeftSpec, Prefix, peft_spec_from_config
from jaxmodels.nn.transformer import MoESpec, TransformerBlock, moe_spec_from_config
from jaxmodels.ops.checks import non_negative_int, one_of, positive_int, real_in_range, values_in_range
from jaxmodels.ops.init import mup_scale
from jaxmodels.ops.moe import moe_flops_per_token
from jaxmodels.ops.position import segment_positions, sinusoidal_embedding

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
PARAMETRIZATIONS = ("standard", "mup")


class DecoderLM(Model):
    """tokens (batch, length) int32 -> logits (batch, length, vocab_size) float32.

    Embedding -> num_layers pre-norm Transformer blocks -> final norm -> output head: a separate
    (embed_dim, vocab_size) matrix `w_out`, or with `tie_embeddings` the embedding table transposed (Press &
    Wolf 2017, "Using the Output Embedding to Improve Language Models"; no `w_out` then). `norm_eps` is the
    epsilon of every block norm and the final norm (Llama checkpoints use 1e-5 or 1e-6).
    `attention` (an AttentionSpec or its config section) selects the attention kind and positions.
    `remat` selects activation rematerialisation per block (REMAT_POLICIES); it trades compute
    for memory and does not change results.
    `moe` (a MoESpec or its config section; None or num_experts=0: dense) makes the MLP of every
    moe.every-th block a mixture of experts. `model(tokens, return_aux=True)` then also returns
    the routers' statistics combined over the MoE blocks (`combine_moe_aux`), whose "moe_loss" the
    objective adds (`jaxmodels.tasks.lm.next_token_loss`).
    `peft` (an `nn.peft.PeftSpec` or its config section; None: none) adds the modules of a PEFT method that has
    them (`peft_methods`), created after every other parameter: "prefix" a `Prefix` (`prefix`) whose keys and
    values every layer's attention sees first; "prompt" `prompt` (prompt_length, embed_dim) embeddings prepended
    to the tokens' (the logits are the tokens' only; positions count the prompt; no packed documents); "adapter"
    Houlsby adapters in every block (`TransformerBlock`). Without, the model is unchanged.
    `parametrization` "mup" (with `mup_base_width`, the embed_dim of the base model whose hyperparameters were tuned):
    maximal update parametrisation (`mup_layer`, `lr_multipliers`; Yang et al. 2021, Tensor Programs V, Table 3 for
    Adam, the readout as Table 8) at width_mult = embed_dim / mup_base_width: attention logits q·k / head_dim, the
    logits times 1 / width_mult with `w_out` of variance 1 / mup_base_width, hidden matrices' Adam learning rates
    / width_mult. Widen the model by scaling embed_dim, num_heads * head_dim and mlp_dim together. "standard"
    (default) ignores mup_base_width.
    """

    peft_methods = HOOK_METHODS
    LORA_PROJECTIONS = ("w_out",)  # used only through `dense` (`nn.peft.lora_projections`); embed/embedding is not

    def __init__(self, *, vocab_size: int, num_layers: int, embed_dim: int, num_heads: int, num_kv_heads: int,
                 head_dim: int, mlp_dim: int, mlp_kind: str = "swiglu", norm_kind: str = "rms", norm_eps: float = 1e-6,
                 tie_embeddings: bool = False, attention: AttentionSpec | Mapping | None = None,
                 moe: MoESpec | Mapping | None = None, remat: str = "none", dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, peft: PeftSpec | Mapping | None = None,
                 parametrization: str = "standard", mup_base_width: int = 0, rngs: nnx.Rngs):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat {remat!r}; valid: {sorted(REMAT_POLICIES)}")
        if not isinstance(attention, AttentionSpec):
            attention = spec_from_config(attention)
        self.parametrization, self.width_mult = parametrization, mup_width_mult(parametrization, embed_dim,
                                                                               mup_base_width)
        if parametrization == "mup":
            attention = mup_attention(attention)
        if not isinstance(moe, MoESpec):
            moe = moe_spec_from_config(moe)
        if not isinstance(peft, PeftSpec):
            peft = peft_spec_from_config(peft)
        self.attention, self.moe, self.dtype, self.remat, self.peft = attention, moe, dtype, remat, peft
        self.vocab_size, self.num_layers, self.embed_dim, self.mlp_dim = vocab_size, num_layers, embed_dim, mlp_dim
        self.num_heads, self.num_kv_heads, self.head_dim, self.mlp_kind = num_heads, num_kv_heads, head_dim, mlp_kind
        self.norm_kind, self.norm_eps, self.tie_embeddings = norm_kind, norm_eps, tie_embeddings
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embed = Embed(vocab_size, embed_dim, **kw)
        self.blocks = nnx.List([
            TransformerBlock(embed_dim=embed_dim, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                             mlp_dim=mlp_dim, num_layers=num_layers, mlp_kind=mlp_kind, norm_kind=norm_kind,
                             norm_eps=norm_eps, attention=attention, kind=attention.layer_kind(layer, num_layers),
                             layer=layer, moe=moe, **kw)
            for layer in range(num_layers)])
        self.final_norm = make_norm(norm_kind, embed_dim, eps=norm_eps, **kw)
        if attention.position == "learned":  # GPT-2's learned absolute positions, N(0, 0.02²)
            self.position_table = param(rngs, jax.nn.initializers.normal(0.02), (attention.max_positions, embed_dim),
                                        (None, "embed"), param_dtype)
        if not tie_embeddings:
            readout = self._readout_scale().init_variance  # 1 in standard parametrisation
            self.w_out = param(rngs, fan_in_init(scale=readout), (embed_dim, vocab_size), ("embed", "vocab"),
                               param_dtype)
        self.num_prompt = peft.prompt_length if peft.method == "prompt" else 0
        if peft.method == "prefix":
            self.prefix = Prefix(num_layers=num_layers, length=peft.prefix_length, num_kv_heads=num_kv_heads,
                                 head_dim=head_dim, embed_dim=embed_dim, hidden=peft.prefix_hidden,
                                 param_dtype=param_dtype, rngs=rngs)
        elif peft.method == "prompt":  # N(0, 1) as the token embeddings
            self.prompt = param(rngs, jax.nn.initializers.normal(1.0), (self.num_prompt, embed_dim), (None, "embed"),
                                param_dtype)
        elif peft.method == "adapter":
            for block in self.blocks:
                block.add_adapters(peft.adapter_dim, **kw)

    @classmethod
    def check_config(cls, config) -> None:
        """config.model: kinds, positive sizes, num_heads a multiple of num_kv_heads, the attention and moe
        sections (`AttentionSpec`, `MoESpec`), experts only in blocks that have an MLP and in at least one
        block when moe.num_experts > 0, an even head_dim for RoPE / ReRoPE, norm_eps > 0 and a bool
        tie_embeddings (both optional: sections written before they existed use the defaults)."""
        check_fields(config, "config.model", {"mlp_kind": MLP.KINDS, "norm_kind": tuple(NORMS),
                                              "remat": tuple(REMAT_POLICIES)},
                     ("num_layers", "embed_dim", "num_heads", "num_kv_heads", "head_dim", "mlp_dim"))
        check_norm_and_head(config)
        if config.num_heads % config.num_kv_heads:
            raise ValueError(f"config.model.num_heads={config.num_heads} must be a multiple of "
                             f"config.model.num_kv_heads={config.num_kv_heads}")
        try:
            attention, moe = spec_from_config(config.attention), moe_spec_from_config(config.get("moe"))
        except ValueError as e:
            raise ValueError(f"config.model.{e}") from None
        if moe.num_experts and attention.kind in GAU_KINDS:
            raise ValueError(f"config.model.moe.num_experts={moe.num_experts} needs blocks with an MLP, but "
                             f"config.model.attention.kind={attention.kind!r} has none; set "
                             "config.model.moe.num_experts=0")
        if moe.num_experts and not moe.num_moe_layers(config.num_layers):
            raise ValueError(f"config.model.moe.num_experts={moe.num_experts} but no block is an MoE: "
                             f"config.model.num_layers={config.num_layers} < config.model.moe.every={moe.every}; "
                             "lower moe.every, add layers, or set moe.num_experts=0 for a dense model")
        if attention.position in ("rope", "rerope") and config.head_dim % 2:
            raise ValueError(f"config.model.head_dim={config.head_dim} must be even: "
                             f"config.model.attention.position={attention.position!r} rotates pairs of dims")
        check_parametrization(config, attention, moe)

    @classmethod
    def check_peft(cls, config, spec: PeftSpec) -> None:
        """`Model.check_peft`, and prefix tuning needs softmax attention in every layer, without ALiBi or ReRoPE
        (`nn.attention.prefix_error`)."""
        super().check_peft(config, spec)
        if spec.method != "none" and config.get("parametrization", "standard") == "mup":
            raise ValueError(f"config.peft.method={spec.method!r} does not fit config.model.parametrization='mup': "
                             "muP's learning rates of adapter parameters are not defined here; fine-tune in "
                             "standard parametrisation or set config.peft.method='none'")
        attention = spec_from_config(config.attention)
        error = spec.method == "prefix" and prefix_error(attention.kind, attention.position)
        if error:
            raise ValueError(f"config.peft.method='prefix' does not fit config.model.attention: {error}")

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 cache: list[Cache] | None = None, cache_index: jax.Array | None = None, *, return_aux: bool = False,
                 segment_ids: jax.Array | None = None):
        """tokens (B, T) int32 -> logits (B, T, vocab_size) float32.

        Without `cache`: causal forward over the whole sequence, returns logits.
        With `cache` (from `init_cache`): tokens are at positions cache_index.., returns (logits, cache).
        With `return_aux`, the MoE statistics (`combine_moe_aux`; {} for a dense model) come last:
        (logits, aux) or (logits, cache, aux).
        segment_ids (B, T) int (no cache): the row packs several documents (ids 1, 2, ... per document, 0 for
        padding); a token attends only to its own document, and positions (when not given) restart at 0 at each
        document's first token (`ops.position.segment_positions`), so each document's logits are those it gets
        alone. Attention kinds that cannot mask other documents raise ValueError naming the kind
        (`nn.attention.segments_error`)."""
        if segment_ids is not None:
            if cache is not None:
                raise ValueError("segment_ids are for a whole-sequence forward; decoding with a cache takes one "
                                 "sequence per row")
            if jnp.shape(segment_ids) != tokens.shape:
                raise ValueError(f"segment_ids must have the tokens' shape {tokens.shape}, got "
                                 f"{jnp.shape(segment_ids)}")
            error = segments_error(self.attention.kind, self.attention.position)
            if error:
                raise ValueError(f"DecoderLM: {error}")
            if positions is None:
                positions = segment_positions(segment_ids)
        if positions is None:
            start = 0 if cache_index is None else cache_index
            positions = jnp.broadcast_to(start + jnp.arange(tokens.shape[1]), tokens.shape)
        x = self.embed(tokens)
        if self.num_prompt:
            if segment_ids is not None:
                raise ValueError("prompt tuning's soft prompt is one per row: it cannot be prepended to each of "
                                 "several packed documents (segment_ids)")
            positions = positions + self.num_prompt
            if cache is None:
                prompt = jnp.broadcast_to(self.prompt.value.astype(x.dtype), (x.shape[0], *self.prompt.value.shape))
                x = jnp.concatenate([prompt, x], axis=1)
                positions = jnp.concatenate([jnp.broadcast_to(jnp.arange(self.num_prompt), prompt.shape[:2]),
                                             positions], axis=1)
            else:
                cache_index = cache_index + self.num_prompt  # the prompt fills the first slots (`init_cache`)
        x = self._add_positions(x, positions, x.shape[1] + (0 if cache is None else cache_index))
        prefixes = self._prefixes()
        layer_aux = []
        if cache is None:
            block_fn = _block_forward
            if REMAT_POLICIES[self.remat] is not None:
                block_fn = nnx.remat(_block_forward, policy=REMAT_POLICIES[self.remat])
            for block, prefix in zip(self.blocks, prefixes):
                x, aux = block_fn(block, x, positions, segment_ids, prefix)
                layer_aux.append(aux)
            out = (self._logits(x[:, self.num_prompt:] if self.num_prompt else x),)
        else:
            new_cache = []
            for block, layer_cache, prefix in zip(self.blocks, cache, prefixes):
                x, layer_cache, aux = block(x, positions, layer_cache, cache_index, prefix=prefix)
                new_cache.append(layer_cache)
                layer_aux.append(aux)
            out = (self._logits(x), new_cache)
        if return_aux:
            out += (combine_moe_aux([a for a in layer_aux if a is not None], self.moe),)
        return out[0] if len(out) == 1 else out

    def train_flops_per_token(self, seq_len: int) -> float:
        """Model FLOPs of one training token at sequence length `seq_len` (`train_flops_per_token`: forward +
        backward, causal attention at half the score matrix, MoE blocks at their active parameters)."""
        return train_flops_per_token(vocab_size=self.vocab_size, num_layers=self.num_layers, embed_dim=self.embed_dim,
                                     num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                                     mlp_dim=self.mlp_dim, mlp_kind=self.mlp_kind, seq_len=seq_len, moe=self.moe)

    def _add_positions(self, x, positions, length):
        """x (B, T, D) plus the absolute position embeddings of `positions` (B, T), if the model has them."""
        if self.attention.position == "sinusoidal":
            return x + sinusoidal_embedding(positions, x.shape[-1]).astype(x.dtype)
        if self.attention.position == "learned":
            return x + self._learned_positions(positions, length)
        return x

    def _prefixes(self) -> list[tuple[jax.Array, jax.Array] | None]:
        """Each layer's prefix-tuning (keys, values) in the compute dtype, or None per layer without prefixes."""
        if self.peft.method != "prefix":
            return [None] * self.num_layers
        kv = self.prefix().astype(self.dtype)
        return [(kv[i, 0], kv[i, 1]) for i in range(self.num_layers)]

    def _learned_positions(self, positions, length):
        """Rows `positions` of the learned table; `length` (static when it can be) is checked against its size."""
        if isinstance(length, int) and length > self.attention.max_positions:
            raise ValueError(f"sequence of {length} tokens is longer than the {self.attention.max_positions} learned "
                             "positions (attention.max_positions)")
        return self.position_table.value[positions].astype(self.dtype)

    def _logits(self, x):
        logits = output_logits(self, self.final_norm(x))
        multiplier = self._readout_scale().multiplier
        return logits if multiplier == 1.0 else logits * multiplier  # muP's 1 / width_mult (Table 8)

    def _readout_scale(self):
        """muP's scale of the readout (`ops.init.mup_scale`, Table 8's output multiplier); (1, 1, 1) when standard."""
        return mup_scale("output", self.width_mult, output_multiplier=True)

    def lr_multipliers(self) -> dict | None:
        """None in standard parametrisation; with muP, the pure dict of the parameters (`nnx.state(self,
        nnx.Param).to_pure_dict()`) holding each one's Adam learning-rate multiplier
        `mup_scale(mup_layer(path, ndim), width_mult, output_multiplier=True).adam_learning_rate`: 1 / width_mult
        for the blocks' matrices, 1 for everything else (TP-V Tables 3 and 8)."""
        if self.parametrization == "standard":
            return None
        params = nnx.state(self, nnx.Param).to_pure_dict()
        return jax.tree_util.tree_map_with_path(
            lambda path, p: mup_scale(mup_layer(path, len(p.shape)), self.width_mult,
                                      output_multiplier=True).adam_learning_rate, params)

    @property
    def has_cache(self) -> bool:
        """Whether every layer has a cached (KV cache) or recurrent form for decoding."""
        return all(block.has_cache for block in self.blocks)

    def init_cache(self, batch: int, max_length: int) -> list[Cache]:
        """One empty cache per layer (KV cache or recurrent state), for sequences up to max_length tokens. With
        prompt tuning, the caches are prompt_length slots longer and hold the soft prompt's keys and values (or
        recurrent state) already: a call with the cache then starts at cache_index 0 as without."""
        length = max_length + self.num_prompt
        if self.attention.position == "learned" and length > self.attention.max_positions:
            prompt = f" (+ {self.num_prompt} soft-prompt positions)" if self.num_prompt else ""
            raise ValueError(f"max_length={max_length}{prompt} is longer than the {self.attention.max_positions} "
                             "learned positions (attention.max_positions)")
        cache = [block.init_cache(batch, length) for block in self.blocks]
        if not self.num_prompt:
            return cache
        positions = jnp.broadcast_to(jnp.arange(self.num_prompt), (batch, self.num_prompt))
        x = jnp.broadcast_to(self.prompt.value.astype(self.dtype), (batch, *self.prompt.value.shape))
        x = self._add_positions(x, positions, self.num_prompt)
        filled = []
        for block, layer_cache in zip(self.blocks, cache):
            x, layer_cache, _ = block(x, positions, layer_cache, 0)
            filled.append(layer_cache)
        return filled


def mup_width_mult(parametrization: str, embed_dim: int, mup_base_width: int) -> float:
    """muP's width_mult = embed_dim / mup_base_width (1.0 in standard parametrisation, where mup_base_width is
    ignored); ValueError naming the argument for an unknown parametrization or, with "mup", a mup_base_width that
    is not a positive int."""
    one_of("parametrization", parametrization, PARAMETRIZATIONS)
    if parametrization == "standard":
        return 1.0
    return embed_dim / positive_int("mup_base_width", mup_base_width)


def mup_attention(attention: AttentionSpec) -> AttentionSpec:
    """`attention` with muP's logits q·k / head_dim (Tensor Programs V: q and k become correlated during training,
    so q·k grows like head_dim by the law of large numbers, not like sqrt(head_dim)) in place of the default
    q·k / sqrt(head_dim); ValueError when attention.logit_divisor is "none" (T5's scheme) or the kind's scores
    take no divisor (not in LOGIT_SCALED_KINDS)."""
    if attention.kind not in LOGIT_SCALED_KINDS:
        raise ValueError(f"parametrization='mup' divides attention logits by head_dim, which needs attention.kind in "
                         f"{list(LOGIT_SCALED_KINDS)}, got {attention.kind!r}")
    if attention.logit_divisor == "none":
        raise ValueError("parametrization='mup' divides attention logits by head_dim, but attention.logit_divisor="
                         "'none' asks for none; leave logit_divisor at 'sqrt_head_dim' (muP replaces it) or "
                         "'head_dim'")
    return dataclasses.replace(attention, logit_divisor="head_dim")


def mup_layer(path, ndim: int) -> str:
    """The muP role (`ops.init.MUP_LAYERS`) of the DecoderLM parameter at `path` (a key path into its pure dict of
    params) with `ndim` dims: "hidden" for a matrix inside the blocks (attention and MLP kernels: fan-in and fan-out
    both grow with width), "output" for the readout `w_out`, "input" for the rest (token embedding, learned
    positions, norm gains: one width dim)."""
    top = getattr(path[0], "key", None)
    if top == "blocks" and ndim >= 2:
        return "hidden"
    return "output" if top == "w_out" else "input"


def check_parametrization(config, attention: AttentionSpec, moe: MoESpec) -> None:
    """config.model.parametrization (PARAMETRIZATIONS, default "standard") and, with "mup", mup_base_width (a
    positive int), an attention whose logits muP can divide by head_dim (`mup_attention`) and no MoE (a router is a
    readout inside the blocks, which `mup_layer` does not tell apart); ValueError naming the field otherwise."""
    parametrization = config.get("parametrization", "standard")
    try:
        mup_width_mult(parametrization, config.embed_dim, config.get("mup_base_width", 0))
        if parametrization == "mup":
            mup_attention(attention)
    except (ValueError, TypeError) as e:
        raise type(e)(f"config.model.{e}") from None
    if parametrization == "mup" and moe.num_experts:
        raise ValueError(f"config.model.parametrization='mup' does not support mixture-of-experts blocks "
                         f"(config.model.moe.num_experts={moe.num_experts}): set moe.num_experts=0")


def check_norm_and_head(config) -> None:
    """config.model.norm_eps (a real > 0, default 1e-6) and config.model.tie_embeddings (a bool, default False) of
    a language model (DecoderLM, MambaLM); ValueError / TypeError naming the field otherwise."""
    real_in_range("config.model.norm_eps", config.get("norm_eps", 1e-6), 0, include_low=False)
    tie = config.get("tie_embeddings", False)
    if not isinstance(tie, bool):
        raise TypeError(f"config.model.tie_embeddings must be a bool, got {tie!r}")


def output_logits(model: nnx.Module, x: jax.Array) -> jax.Array:
    """The output head of a language model with `embed` (an `Embed`), `dtype`, `tie_embeddings` and, untied,
    `w_out` (embed_dim, vocab_size): x (batch, length, embed_dim) -> logits (batch, length, vocab_size) float32.
    Tied, the head is the embedding table (vocab_size, embed_dim) transposed."""
    if model.tie_embeddings:
        return dense(x, model.embed.embedding.value, model.dtype, "bld,vd->blv").astype(jnp.float32)
    return dense(x, model.w_out.value, model.dtype, "bld,dv->blv").astype(jnp.float32)


def _block_forward(block, x, positions, segment_ids, prefix):
    x, _, aux = block(x, positions, segment_ids=segment_ids, prefix=prefix)
    return x, aux


def combine_moe_aux(layer_aux: list[dict[str, jax.Array]], moe: MoESpec) -> dict[str, jax.Array]:
    """The statistics of the MoE blocks (`MoEFeedForward`'s aux dicts, one per MoE block) as one
    dict of float32 values; {} when there are none.

    load_balancing_loss, router_z_loss, dropped_fraction, routing_entropy: means over the blocks.
    max_expert_load: max over blocks and experts of E * (fraction of assignments to the expert):
      1 when perfectly balanced, E when one expert takes everything.
    expert_load: (num_moe_blocks, E) the fractions themselves.
    moe_loss: the auxiliary objective moe.load_balancing_weight * load_balancing_loss +
      moe.router_z_weight * router_z_loss (Switch's α = 1e-2, ST-MoE's 1e-3), averaged over blocks
      so that the weights do not depend on the number of MoE blocks.
    """
    if not layer_aux:
        return {}
    out = {name: jnp.mean(jnp.stack([a[name] for a in layer_aux]))
           for name in ("load_balancing_loss", "router_z_loss", "dropped_fraction", "routing_entropy")}
    out["expert_load"] = jnp.stack([a["expert_load"] for a in layer_aux])
    out["max_expert_load"] = moe.num_experts * jnp.max(out["expert_load"])
    out["moe_loss"] = (moe.load_balancing_weight * out["load_balancing_loss"]
                       + moe.router_z_weight * out["router_z_loss"])
    return out


def train_flops_per_token(*, vocab_size: int, num_layers: int, embed_dim: int, num_heads: int, num_kv_heads: int,
                          head_dim: int, mlp_dim: int, mlp_kind: str, seq_len: int, causal: bool = True,
                          moe: MoESpec | Mapping | None = None) -> float:
    """Model FLOPs of one training token (forward + backward = 3 x forward), counted analytically.

    Matmuls: 6 * (parameters in matmuls), the embedding lookup excluded, the output head included
    (Kaplan et al. 2020, C = 6N). Attention scores and values: 2 matmuls of 2 * heads * head_dim
    * seq_len FLOPs per token per layer forward; causal attention counted at half the full score
    matrix. Rematerialisation is not counted (model FLOPs, not hardware FLOPs).
    MoE blocks (`moe`) count their ACTIVE parameters only: the router (embed_dim x E) and the k
    routed + num_shared shared SwiGLU experts a token uses (`ops.moe.moe_flops_per_token`), not the
    E - k idle experts, nor capacity padding or dropped slots.
    """
    if not isinstance(moe, MoESpec):
        moe = moe_spec_from_config(moe)
    attn_params = embed_dim * head_dim * (2 * num_heads + 2 * num_kv_heads)
    mlp_params = embed_dim * mlp_dim * (3 if mlp_kind == "swiglu" else 2)
    num_moe = moe.num_moe_layers(num_layers)
    matmul_params = num_layers * attn_params + (num_layers - num_moe) * mlp_params + embed_dim * vocab_size
    moe_fwd = num_moe * (moe_flops_per_token(embed_dim, mlp_dim, moe.k, moe.num_shared)
                         + 2 * embed_dim * moe.num_experts)
    attn_fwd = num_layers * 2 * 2 * num_heads * head_dim * seq_len * (0.5 if causal else 1.0)
    return 6.0 * matmul_params + 3.0 * (attn_fwd + moe_fwd)


def sample_logits(logits: jax.Array, key: jax.Array, temperature: float, top_k: int | None,
                  top_p: float | None = None, vocab_limit: int | None = None) -> jax.Array:
    """Draw token ids (batch,) int32 from logits (batch, vocab) float: ids >= `vocab_limit` are excluded, then
    the logits are divided by `temperature`, restricted to the `top_k` most likely, then to the nucleus of
    mass `top_p`, and sampled. The order of the warpers is Hugging Face transformers' (`TemperatureLogitsWarper`,
    `TopKLogitsWarper`, `TopPLogitsWarper`).

    temperature: a real number >= 0 (Python scalar); 0 is greedy (argmax over the ids below vocab_limit).
    top_k: None or 0 (off: the whole vocabulary, as the CLI's `sample.top_k=0`) or an int in [1, vocab].
    top_p: None or 1.0 (off) or a real in (0, 1): nucleus sampling (Holtzman et al. 2020, "The Curious Case of
      Neural Text Degeneration", sec. 3.1): the smallest set of most likely tokens whose probability mass
      reaches top_p, i.e. token i is kept when the tokens more likely than it hold less than top_p (tokens tied
      with the least likely kept one are kept too); the draw is from the renormalised set.
    vocab_limit: None (the whole vocabulary) or an int in [1, vocab]: ids >= vocab_limit (the padding of a
      vocabulary rounded up, `jaxmodels.data.tokenizers.padded_vocab_size`) are never drawn, greedy included.
    Raises ValueError / TypeError (at trace time) for values outside these ranges.
    """
    vocab = logits.shape[-1]
    temperature = real_in_range("temperature", temperature, 0)
    top_k = check_top_k(top_k, vocab)
    top_p = check_top_p(top_p)
    vocab_limit = check_vocab_limit(vocab_limit, vocab)
    if vocab_limit < vocab:
        logits = jnp.where(jnp.arange(vocab) < vocab_limit, logits, -jnp.inf)
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        logits = _nucleus(logits, top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _nucleus(logits: jax.Array, top_p: float) -> jax.Array:
    """logits (batch, vocab) float32 with every token outside the nucleus of mass `top_p` set to -inf."""
    descending = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(descending, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # of the tokens more likely than each one
    kept = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)  # >= 1: the most likely token has 0 before it
    threshold = jnp.take_along_axis(descending, kept - 1, axis=-1)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def check_top_k(top_k, vocab_size: int, name: str = "top_k") -> int:
    """top_k as an int, 0 for off (None or 0); ValueError / TypeError naming `name` unless it is in
    [0, vocab_size]."""
    top_k = non_negative_int(name, 0 if top_k is None else top_k)
    if top_k > vocab_size:
        raise ValueError(f"{name} must be at most the vocabulary size {vocab_size} (0 or None: off), got {top_k}")
    return top_k


def check_top_p(top_p, name: str = "top_p") -> float:
    """top_p as a float, 1.0 for off (None or 1.0); ValueError / TypeError naming `name` unless it is a real
    number in (0, 1]."""
    return 1.0 if top_p is None else real_in_range(name, top_p, 0, 1, include_low=False)


def check_vocab_limit(vocab_limit, vocab_size: int, name: str = "vocab_limit") -> int:
    """vocab_limit as an int, vocab_size for None; ValueError / TypeError naming `name` unless it is an int in
    [1, vocab_size]."""
    if vocab_limit is None:
        return vocab_size
    positive_int(name, vocab_limit)
    if vocab_limit > vocab_size:
        raise ValueError(f"{name} must be at most the model's vocabulary size {vocab_size} (None: all of it), "
                         f"got {vocab_limit}")
    return vocab_limit


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k", "top_p",
                                             "eos_id", "vocab_limit", "use_cache"))
def _generate(graphdef, state, prompt, key, *, max_new_tokens, temperature, top_k, top_p, eos_id, vocab_limit,
              use_cache):
    model = nnx.merge(graphdef, state)
    batch, prompt_len = prompt.shape
    total = prompt_len + max_new_tokens
    keys = jax.random.split(key, max_new_tokens)
    # Positions a row never reaches (after an early exit) already hold what it would have produced: EOS.
    tokens = jnp.full((batch, total), 0 if eos_id is None else eos_id, jnp.int32).at[:, :prompt_len].set(prompt)
    done = jnp.zeros((batch,), bool)  # rows that produced EOS; always False without eos_id

    def emit(tokens, done, t, logits):
        """Draw the token of step t (at position prompt_len + t) from logits (batch, vocab)."""
        nxt = sample_logits(logits, keys[t], temperature, top_k, top_p, vocab_limit)
        if eos_id is not None:
            nxt = jnp.where(done, eos_id, nxt)
            done = done | (nxt == eos_id)
        return tokens.at[:, prompt_len + t].set(nxt), done

    def running(carry):
        t, _, done = carry[:3]
        return (t < max_new_tokens) & ~jnp.all(done)

    if use_cache:
        logits, cache = model(prompt, cache=model.init_cache(batch, total), cache_index=jnp.int32(0))
        tokens, done = emit(tokens, done, 0, logits[:, -1])

        def step(carry):
            t, tokens, done, cache = carry
            pos = prompt_len + t - 1  # position of the token being fed
            logits, cache = model(jax.lax.dynamic_slice_in_dim(tokens, pos, 1, axis=1), cache=cache, cache_index=pos)
            tokens, done = emit(tokens, done, t, logits[:, -1])
            return t + 1, tokens, done, cache

        return jax.lax.while_loop(running, step, (jnp.int32(1), tokens, done, cache))[1]

    def step_nocache(carry):
        t, tokens, done = carry
        pos = prompt_len + t - 1  # last filled position; causal masking ignores the tail
        logits = model(tokens)
        return t + 1, *emit(tokens, done, t, jax.lax.dynamic_index_in_dim(logits, pos, axis=1, keepdims=False))

    return jax.lax.while_loop(running, step_nocache, (jnp.int32(0), tokens, done))[1]


def _generate_arguments(model, prompt, *, max_new_tokens, temperature, top_k, top_p, eos_id, vocab_limit,
                        use_cache) -> tuple[jax.Array, dict]:
    """`generate`'s arguments checked: (prompt int32, the static keyword arguments of `_generate`)."""
    prompt = jnp.asarray(prompt)
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be (batch, prompt_len >= 1) token ids, got shape {prompt.shape}")
    if not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise TypeError(f"prompt must hold integer token ids, got {prompt.dtype}")
    values_in_range("prompt", prompt, 0, model.vocab_size)
    positive_int("max_new_tokens", max_new_tokens)
    vocab_limit = check_vocab_limit(vocab_limit, model.vocab_size)
    if eos_id is not None:
        non_negative_int("eos_id", eos_id)
        if eos_id >= vocab_limit:
            raise ValueError(f"eos_id must be an id in [0, {vocab_limit}) (vocab_limit, or the model's vocabulary "
                             f"size), got {eos_id}")
    static = dict(max_new_tokens=max_new_tokens, temperature=real_in_range("temperature", temperature, 0),
                  top_k=check_top_k(top_k, model.vocab_size), top_p=check_top_p(top_p), eos_id=eos_id,
                  vocab_limit=vocab_limit, use_cache=use_cache and model.has_cache)
    return prompt.astype(jnp.int32), static


def generate(model: DecoderLM, prompt: jax.Array, key: jax.Array, *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos_id: int | None = None, vocab_limit: int | None = None, use_cache: bool = True) -> jax.Array:
    """Autoregressive sampling. prompt (batch, prompt_len) int -> tokens (batch, prompt_len + max_new_tokens) int32,
    the prompt followed by the new tokens.

    With `use_cache` (and a model whose layers all have a cached form, `model.has_cache`; other
    kinds silently decode without), the prompt is processed once and each new token attends to cached keys and
    values (O(L) per token); without, every step recomputes the full causal forward (O(L^2)),
    which is the reference the cached path must equal. Step t draws with key split(key)[t] (`sample_logits`).

    prompt: integer ids in [0, model.vocab_size), at least one per row (ValueError otherwise; a traced prompt's
      ids cannot be checked). max_new_tokens: an int >= 1. temperature, top_k, top_p, vocab_limit: as in
      `sample_logits` (top_k None or 0, top_p None or 1.0, vocab_limit None: off).
    eos_id: None, or the id in [0, vocab_limit) that ends a sequence: a row that produced it produces only
      eos_id afterwards, and decoding stops as soon as every row has (a `lax.while_loop`: the remaining steps
      are not run), with the same tokens as decoding to the end and replacing each row's tokens after its
      first eos_id by eos_id.
    """
    prompt, static = _generate_arguments(model, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                                         top_k=top_k, top_p=top_p, eos_id=eos_id, vocab_limit=vocab_limit,
                                         use_cache=use_cache)
    graphdef, state = nnx.split(model)
    return _generate(graphdef, state, prompt, key, **static)


def compile_generate(model: DecoderLM, prompt: jax.Array, key: jax.Array, *, max_new_tokens: int,
                     temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                     eos_id: int | None = None, vocab_limit: int | None = None,
                     use_cache: bool = True) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """`generate` compiled ahead of time for `prompt`'s shape and dtype, `key`'s kind and these settings (checked
    as `generate` checks them): returns run(prompt, key) -> tokens, equal to generate(model, prompt, key, ...),
    which runs the compiled decode only, so that its time excludes compilation. `run` takes prompts of the
    same shape and keys of the same kind, and `model`'s parameters as they were at compilation."""
    prompt, static = _generate_arguments(model, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                                         top_k=top_k, top_p=top_p, eos_id=eos_id, vocab_limit=vocab_limit,
                                         use_cache=use_cache)
    graphdef, state = nnx.split(model)
    compiled = _generate.lower(graphdef, state, prompt, key, **static).compile()
    return lambda prompt, key: compiled(state, jnp.asarray(prompt, jnp.int32), key)
