"""Pre-norm Transformer block (Xiong et al. 2020): x + attn(norm(x)), then x + mlp(norm(x)); or,
for the GAU kinds, x + gau(norm(x)) alone (Hua et al. 2022: one GAU replaces attention and MLP).
With a mixture-of-experts spec (`MoESpec`) the MLP of every k-th block is a `MoEFeedForward`."""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmodels.nn.attention import GAU_KINDS, Attention, AttentionSpec, Cache, prefix_error, segments_error
from jaxmodels.nn.gau import GAU
from jaxmodels.nn.layers import MLP, make_norm
from jaxmodels.nn.moe import MoEFeedForward
from jaxmodels.nn.peft import Adapter
from jaxmodels.nn.spec import spec_from_section
from jaxmodels.ops import moe as moe_ops
from jaxmodels.ops.checks import one_of
from jaxmodels.ops.init import residual_scale


@dataclasses.dataclass(frozen=True)
class MoESpec:
    """Which blocks' MLPs are sparse mixtures of experts, and how they route; the `model.moe` section
    of a config (Shazeer et al. 2017; GShard, Lepikhin et al. 2020; Switch, Fedus et al. 2021).

    num_experts: E experts per MoE block; 0 = a dense model (no MoE block, nothing else changes).
    every: the MLP of blocks every-1, 2*every-1, ... is an MoE (Switch and GShard: every=2, every
      other block); every=1 makes every block an MoE.
    k: experts per token (Switch: 1; GShard: 2). Each expert is a SwiGLU FFN of width model.mlp_dim,
      so a token's active expert FLOPs are k (+ num_shared) times a dense SwiGLU block's.
    routing: "top_k" (softmax top-k, `ops.moe.top_k_routing`; gates renormalised for k > 1). The
      other routers of `MoEFeedForward` are not offered in a causal LM: expert choice lets a token's
      routing depend on later tokens (not causal), and noisy top-k needs a per-step key that the
      loss does not take.
    capacity_factor: slots per expert = ceil(T k capacity_factor / E) for dispatch "einsum"
      (Switch: 1.25 in training); overflowing assignments are dropped (the residual carries them).
      The same capacity applies when decoding (T = batch tokens per step).
    dispatch: "einsum" (GShard/Switch capacity form) or "dropless" (MegaBlocks sort +
      grouped matmul with `implementation`, nothing dropped).
    num_shared: always-on shared experts (DeepSeekMoE), 0 for none.
    implementation: the grouped matmul of dispatch "dropless" (None or one of `ops.moe.IMPLEMENTATIONS`).
    load_balancing_weight: α of Switch's load-balancing loss (1e-2 in the paper).
    router_z_weight: weight of ST-MoE's router z-loss (1e-3 in Zoph et al. 2022).
    """

    num_experts: int = 0
    every: int = 1
    k: int = 1
    routing: str = "top_k"
    capacity_factor: float = 1.25
    dispatch: str = "einsum"
    num_shared: int = 0
    implementation: str | None = None
    load_balancing_weight: float = 1e-2
    router_z_weight: float = 1e-3

    ROUTINGS = ("top_k",)

    def __post_init__(self):
        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        if not is_int(self.num_experts) or self.num_experts < 0:
            raise ValueError(f"moe.num_experts must be an int >= 0 (0 = dense), got {self.num_experts!r}")
        if not is_int(self.every) or self.every < 1:
            raise ValueError(f"moe.every must be an int >= 1, got {self.every!r}")
        if not is_int(self.num_shared) or self.num_shared < 0:
            raise ValueError(f"moe.num_shared must be an int >= 0, got {self.num_shared!r}")
        for name, choices in (("routing", self.ROUTINGS), ("dispatch", MoEFeedForward.DISPATCHES),
                              ("implementation", (None, *moe_ops.IMPLEMENTATIONS))):
            one_of(f"moe.{name}", getattr(self, name), choices)
        if self.num_experts and (not is_int(self.k) or not 1 <= self.k <= self.num_experts):
            raise ValueError(f"moe.k={self.k!r} must be an int in [1, moe.num_experts={self.num_experts}]")
        if not self.capacity_factor > 0:
            raise ValueError(f"moe.capacity_factor must be > 0, got {self.capacity_factor!r}")
        for name in ("load_balancing_weight", "router_z_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"moe.{name} must be >= 0, got {getattr(self, name)!r}")

    def is_moe_layer(self, layer: int) -> bool:
        """Whether block `layer` (0-based) has an MoE MLP: layers every-1, 2*every-1, ..."""
        return self.num_experts > 0 and (layer + 1) % self.every == 0

    def num_moe_layers(self, num_layers: int) -> int:
        return num_layers // self.every if self.num_experts else 0


def moe_spec_from_config(moe: dict | None) -> MoESpec:
    """MoESpec from a config section (a dict / ConfigDict of its fields); None gives a dense model."""
    return spec_from_section(MoESpec, moe, "moe")


class TransformerBlock(nnx.Module):
    """x: (batch, length, embed_dim) -> same. Output projections are initialised with
    std scaled by 1/sqrt(2 * num_layers) (GPT-2, Radford et al. 2019) so the residual stream's
    variance stays O(1) with depth.

    `kind` is this layer's attention kind (`AttentionSpec.layer_kind`). For "gau" / "flash_gau" the
    block is a GAU with expansion mlp_dim and shared dim head_dim, relu² scores, RoPE or no
    positions, and FLASH's chunks of attention.chunk_size for "flash_gau".

    With `moe` (an MoESpec) and `moe.is_moe_layer(layer)`, the MLP is a `MoEFeedForward` of
    moe.num_experts SwiGLU experts of width mlp_dim (mlp_kind applies to the dense blocks only).

    `norm_eps` is the epsilon of the block's two norms (RMSNorm or LayerNorm).

    `add_adapters` adds Houlsby adapters (`nn.peft.Adapter`) on the output of the attention (or GAU) and of the
    MLP, before each residual sum.

    Call: (x, positions, cache=None, cache_index=None, segment_ids=None, prefix=None) -> (x, cache, aux); aux is
    the MoE layer's dict of float32 statistics (`MoEFeedForward`), None for a dense block. segment_ids (B, T) int:
    packed documents, attention stays within each (`Attention`); GAU blocks cannot (ValueError). prefix: prefix
    tuning's (keys, values) of this layer (`Attention`).
    """

    def __init__(self, *, embed_dim: int, num_heads: int, num_kv_heads: int, head_dim: int, mlp_dim: int,
                 num_layers: int, mlp_kind: str = "swiglu", norm_kind: str = "rms", norm_eps: float = 1e-6,
                 attention: AttentionSpec = AttentionSpec(), kind: str | None = None, layer: int = 0,
                 moe: MoESpec = MoESpec(), dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        out_scale = residual_scale(num_layers)  # GPT-2's 1/sqrt(2 num_layers) on the residual outputs
        kind = self.kind = kind or attention.kind
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attn_norm = make_norm(norm_kind, embed_dim, eps=norm_eps, **kw)
        if kind in GAU_KINDS:
            if moe.is_moe_layer(layer):
                raise ValueError(f"attention.kind={kind!r} has no MLP to replace with experts; use moe.num_experts=0")
            self.attn = GAU(embed_dim, mlp_dim, head_dim, causal=True,
                            chunk_size=attention.chunk_size if kind == "flash_gau" else None,
                            position="rope" if attention.position == "rope" else None,
                            rope_base=attention.rope_base, out_scale=out_scale, **kw)
            self.mlp = None
        else:
            self.attn = Attention(embed_dim, num_heads, num_kv_heads, head_dim, spec=attention, kind=kind,
                                  feature_seed=layer, out_scale=out_scale, **kw)
            self.mlp_norm = make_norm(norm_kind, embed_dim, eps=norm_eps, **kw)
            if moe.is_moe_layer(layer):
                self.mlp = MoEFeedForward(embed_dim, mlp_dim, moe.num_experts, k=moe.k, routing=moe.routing,
                                          capacity_factor=moe.capacity_factor, dispatch=moe.dispatch,
                                          num_shared=moe.num_shared, implementation=moe.implementation,
                                          out_scale=out_scale, **kw)
            else:
                self.mlp = MLP(embed_dim, mlp_dim, kind=mlp_kind, out_scale=out_scale, **kw)
        self.attn_adapter, self.mlp_adapter = nnx.data(None), nnx.data(None)  # `add_adapters` may set them
        self.embed_dim = embed_dim

    def add_adapters(self, bottleneck: int, **kwargs) -> None:
        """Add Houlsby adapters of width `bottleneck` after the attention (or GAU) and the MLP; `kwargs`: dtype,
        param_dtype, rngs of `Adapter`. Zero-initialised: the block computes what it did before."""
        self.attn_adapter = Adapter(self.embed_dim, bottleneck, **kwargs)
        if self.mlp is not None:
            self.mlp_adapter = Adapter(self.embed_dim, bottleneck, **kwargs)

    @property
    def has_cache(self) -> bool:
        return self.mlp is not None and self.attn.has_cache

    def init_cache(self, batch: int, max_length: int) -> Cache:
        return self.attn.init_cache(batch, max_length)

    def __call__(self, x: jax.Array, positions: jax.Array, cache: Cache | None = None,
                 cache_index: jax.Array | None = None, segment_ids: jax.Array | None = None,
                 prefix: tuple[jax.Array, jax.Array] | None = None) -> tuple[jax.Array, Cache | None, dict | None]:
        if self.mlp is None:
            if cache is not None:
                raise ValueError("GAU blocks have no cached form; decode without a cache")
            if segment_ids is not None:
                raise ValueError(segments_error(self.kind, "none"))
            if prefix is not None:
                raise ValueError(prefix_error(self.kind, "none"))
            return x + _adapted(self.attn_adapter, self.attn(self.attn_norm(x), positions)), None, None
        h, cache = self.attn(self.attn_norm(x), positions, cache, cache_index, segment_ids, prefix)
        x = x + _adapted(self.attn_adapter, h)
        aux = None
        if isinstance(self.mlp, MoEFeedForward):
            h, aux = self.mlp(self.mlp_norm(x))
        else:
            h = self.mlp(self.mlp_norm(x))
        return x + _adapted(self.mlp_adapter, h), cache, aux


def _adapted(adapter: Adapter | None, h: jax.Array) -> jax.Array:
    return h if adapter is None else adapter(h)
