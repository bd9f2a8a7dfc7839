"""The two-way Transformer of Segment Anything's mask decoder (Kirillov et al. 2023, §3 and App. A, Figure 14):
a small set of prompt/output tokens and a grid of image embeddings update each other, so that tokens read the
image and the image reads the prompts. Usable by any decoder that queries an image with a few tokens.

Tokens are (B, T, dim), image embeddings channels-last (B, h, w, dim), flattened to (B, h·w, dim) inside; the
positional encodings are added to the queries and keys of every attention, never to the values (App. A).
Parameters are `param_dtype`, arithmetic `dtype`, LayerNorms and softmax statistics float32.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmodels.nn.diffusion import Linear
from jaxmodels.nn.layers import LayerNorm, dense
from jaxmodels.nn.param import param, zeros_init
from jaxmodels.ops.attention import dot_product_attention
from jaxmodels.ops.checks import positive_int
from jaxmodels.ops.init import lecun

# PyTorch's nn.LayerNorm default, which Segment Anything's decoder uses.
LAYER_NORM_EPS = 1e-5


class MLPHead(nnx.Module):
    """A ReLU MLP of `num_layers` linear layers with biases, in_dim -> hidden_dim ... -> out_dim (Segment Anything's
    `MLP`: the mask decoder's hypernetworks, its IoU head, and with two layers the two-way block's MLP).
    x: (..., in_dim) -> (..., out_dim) in `dtype`.

    With `num_stacked` = K the module holds K independent MLPs (the hypernetworks, one per mask token) with
    stacked parameters, kernels (K, a, b): x (..., K, in_dim) -> (..., K, out_dim), MLP k applied to x[..., k, :]
    (one einsum per layer instead of K small MLPs). Kernels LeCun normal over each MLP's fan-in, biases zero.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, *, num_stacked: int | None = None,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        positive_int("num_layers", num_layers)
        positive_int("num_stacked", num_stacked, allow_none=True)
        lead, lead_axes = ((), ()) if num_stacked is None else ((num_stacked,), (None,))
        init = lecun(in_axis=-2, out_axis=-1, batch_axis=tuple(range(len(lead))))
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.num_stacked, self.dtype = num_stacked, dtype
        self.kernels = nnx.List([param(rngs, init, (*lead, a, b), (*lead_axes, "embed", "mlp"), param_dtype)
                                 for a, b in zip(dims[:-1], dims[1:])])
        self.biases = nnx.List([param(rngs, zeros_init, (*lead, b), (*lead_axes, "mlp"), param_dtype)
                                for b in dims[1:]])

    def __call__(self, x: jax.Array) -> jax.Array:
        in_dim = self.kernels[0].value.shape[-2]
        stacked = () if self.num_stacked is None else (self.num_stacked,)
        if x.ndim < 1 + len(stacked) or x.shape[x.ndim - 1 - len(stacked):] != (*stacked, in_dim):
            raise ValueError(f"x must be (..., {', '.join(map(str, (*stacked, in_dim)))}), got shape {x.shape}")
        spec = "...i,io->...o" if self.num_stacked is None else "...ki,kio->...ko"
        for i, (kernel, bias) in enumerate(zip(self.kernels, self.biases)):
            x = dense(x, kernel.value, self.dtype, spec) + bias.value.astype(self.dtype)
            if i < len(self.kernels) - 1:
                x = jax.nn.relu(x)
        return x


class DownsampledAttention(nnx.Module):
    """Multi-head attention with separate query, key and value inputs whose projections map dim to
    dim / downsample_rate (Segment Anything's `Attention`: the token-image cross-attentions use rate 2 to save
    compute, App. A). Projections and output with biases; softmax(QKᵀ/√d_head) V per head.

    q: (B, T, dim); k, v: (B, S, dim). Returns (B, T, dim) in `dtype`.
    """

    def __init__(self, dim: int, num_heads: int, downsample_rate: int = 1, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        positive_int("downsample_rate", downsample_rate)
        internal = dim // downsample_rate
        if dim % downsample_rate or internal % num_heads:
            raise ValueError(f"dim ({dim}) / downsample_rate ({downsample_rate}) must be an integer divisible by "
                             f"num_heads ({num_heads})")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dim, self.num_heads = dim, num_heads
        self.q_proj, self.k_proj, self.v_proj = (Linear(dim, internal, **kw) for _ in range(3))
        self.out_proj = Linear(internal, dim, logical_axes=("mlp", "embed"), **kw)

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        if q.ndim != 3 or k.ndim != 3 or k.shape != v.shape or q.shape[0] != k.shape[0] \
                or q.shape[-1] != self.dim or k.shape[-1] != self.dim:
            raise ValueError(f"q must be (batch, T, {self.dim}) and k, v (batch, S, {self.dim}) of one shape, got "
                             f"q {q.shape}, k {k.shape}, v {v.shape}")
        heads = lambda x: x.reshape(*x.shape[:2], self.num_heads, -1)
        out = dot_product_attention(heads(self.q_proj(q)), heads(self.k_proj(k)), heads(self.v_proj(v)))
        return self.out_proj(out.reshape(*out.shape[:2], -1))


class TwoWayAttentionBlock(nnx.Module):
    """One block of the two-way Transformer (Segment Anything App. A, Figure 14), four steps, each followed by a
    LayerNorm, with queries = tokens (B, T, dim) and keys = image embeddings (B, S, dim):

      1. token self-attention: queries += SelfAttn(q=k=queries + query_pe, v=queries); in the first block
         (`skip_first_layer_pe`) queries = SelfAttn(queries) instead (no positions, no residual: the tokens
         already hold their prompt encodings);
      2. token-to-image cross-attention: queries += Attn(q=queries + query_pe, k=keys + key_pe, v=keys);
      3. MLP on the tokens (ReLU, width mlp_dim): queries += MLP(queries);
      4. image-to-token cross-attention: keys += Attn(q=keys + key_pe, k=queries + query_pe, v=queries).

    The cross-attentions project to dim / downsample_rate (`DownsampledAttention`). Returns (queries, keys) in
    `dtype`, the shapes of the inputs. query_pe: (B, T, dim); key_pe: (B, S, dim) or (S, dim).
    """

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, *, downsample_rate: int = 2,
                 skip_first_layer_pe: bool = False, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.skip_first_layer_pe = skip_first_layer_pe
        self.self_attn = DownsampledAttention(dim, num_heads, **kw)
        self.cross_attn_token_to_image = DownsampledAttention(dim, num_heads, downsample_rate, **kw)
        self.cross_attn_image_to_token = DownsampledAttention(dim, num_heads, downsample_rate, **kw)
        self.mlp = MLPHead(dim, mlp_dim, dim, 2, **kw)
        self.norm1, self.norm2, self.norm3, self.norm4 = (LayerNorm(dim, eps=LAYER_NORM_EPS, **kw) for _ in range(4))

    def __call__(self, queries: jax.Array, keys: jax.Array, query_pe: jax.Array,
                 key_pe: jax.Array) -> tuple[jax.Array, jax.Array]:
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q = queries + query_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nnx.Module):
    """Segment Anything's two-way Transformer (App. A): `depth` `TwoWayAttentionBlock`s (the first skips the
    positions in its self-attention), then a final token-to-image attention, queries += Attn(q=queries +
    point_embedding, k=keys + image_pe, v=keys), and a LayerNorm of the queries.

    image_embedding: (B, h, w, dim); image_pe: (h, w, dim) or (B, h, w, dim), the dense positional encoding;
    point_embedding: (B, T, dim), the tokens, which are also their own positional encoding at every layer.
    Returns (queries (B, T, dim), keys (B, h·w, dim)) in `dtype`: the updated tokens and image embeddings.
    """

    def __init__(self, depth: int, dim: int, num_heads: int, mlp_dim: int, *, downsample_rate: int = 2,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        positive_int("depth", depth)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dim = dim
        self.layers = nnx.List([TwoWayAttentionBlock(dim, num_heads, mlp_dim, downsample_rate=downsample_rate,
                                                     skip_first_layer_pe=i == 0, **kw) for i in range(depth)])
        self.final_attn_token_to_image = DownsampledAttention(dim, num_heads, downsample_rate, **kw)
        self.norm_final_attn = LayerNorm(dim, eps=LAYER_NORM_EPS, **kw)

    def __call__(self, image_embedding: jax.Array, image_pe: jax.Array,
                 point_embedding: jax.Array) -> tuple[jax.Array, jax.Array]:
        if image_embedding.ndim != 4 or image_embedding.shape[-1] != self.dim:
            raise ValueError(f"image_embedding must be (batch, h, w, {self.dim}), got shape {image_embedding.shape}")
        b, h, w, _ = image_embedding.shape
        if image_pe.shape not in ((h, w, self.dim), (b, h, w, self.dim)):
            raise ValueError(f"image_pe must be {(h, w, self.dim)} or {(b, h, w, self.dim)}, got shape "
                             f"{image_pe.shape}")
        if point_embedding.ndim != 3 or point_embedding.shape[0] != b or point_embedding.shape[-1] != self.dim:
            raise ValueError(f"point_embedding must be ({b}, tokens, {self.dim}), got shape {point_embedding.shape}")
        keys = image_embedding.reshape(b, h * w, self.dim)
        key_pe = image_pe.reshape(*image_pe.shape[:-3], h * w, self.dim).astype(keys.dtype)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        q, k = queries + point_embedding, keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys
