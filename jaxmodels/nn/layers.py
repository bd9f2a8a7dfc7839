"""Basic Flax NNX layers: norms, MLPs, embedding. Parameters are float32 by default
(`param_dtype`); arithmetic runs in `dtype` with float32 statistics and accumulation."""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmodels.nn.param import fan_in_init, ones_init, param, zeros_init
from jaxmodels.nn.peft import LoraKernel
from jaxmodels.ops.checks import one_of


class RMSNorm(nnx.Module):
    """y = x / sqrt(mean(x^2) + eps) * scale (Zhang & Sennrich 2019). x: (..., dim)."""

    def __init__(self, dim: int, *, eps: float = 1e-6, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.eps, self.dtype = eps, dtype
        self.scale = param(rngs, ones_init, (dim,), ("norm",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale.value.astype(jnp.float32)).astype(self.dtype)


class LayerNorm(nnx.Module):
    """y = (x - mean) / sqrt(var + eps) * scale + bias (Ba et al. 2016). x: (..., dim)."""

    def __init__(self, dim: int, *, eps: float = 1e-6, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.eps, self.dtype = eps, dtype
        self.scale = param(rngs, ones_init, (dim,), ("norm",), param_dtype)
        self.bias = param(rngs, zeros_init, (dim,), ("norm",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale.value.astype(jnp.float32) + self.bias.value.astype(jnp.float32)).astype(self.dtype)


NORMS = {"rms": RMSNorm, "layer": LayerNorm}


def make_norm(kind: str, dim: int, **kwargs) -> nnx.Module:
    """The norm named `kind` ("rms" or "layer")."""
    return NORMS[one_of("norm", kind, sorted(NORMS))](dim, **kwargs)


def dense(x: jax.Array, kernel: jax.Array | LoraKernel, dtype, spec: str = "...i,ij->...j") -> jax.Array:
    """einsum(spec, x, kernel) with both operands cast to `dtype`; result in `dtype`. A `LoraKernel` (LoRA
    unfolded, `nn.peft`) adds its low-rank update: einsum(spec, x, W) + scale (dropout(x) A) B.

    Accelerators accumulate bf16 products in float32 anyway. Asking for a float32 result
    (preferred_element_type) would also make the backward pass multiply a float32 cotangent,
    i.e. run the gradient matmuls in float32/TF32 (README, "Benchmarks", measures what that costs).
    """
    if isinstance(kernel, LoraKernel):
        return jnp.einsum(spec, x.astype(dtype), kernel.w.astype(dtype)) + kernel.update(x, dtype, spec)
    return jnp.einsum(spec, x.astype(dtype), kernel.astype(dtype))


class MLP(nnx.Module):
    """Position-wise feed-forward block. x: (..., embed_dim) -> (..., embed_dim).

    kind "swiglu": down(silu(x W_gate) * (x W_up)) (Shazeer 2020, "GLU Variants");
    kind "gelu": down(gelu(x W_up)) (Vaswani et al. 2017 with GELU, Hendrycks & Gimpel 2016).
    `out_scale` shrinks the output projection's init (GPT-2's 1/sqrt(2 * num_layers)).
    """

    KINDS = ("swiglu", "gelu")
    LORA_PROJECTIONS = ("w_up", "w_gate", "w_down")  # kernels used only through `dense` (`nn.peft.lora_projections`)

    def __init__(self, embed_dim: int, mlp_dim: int, *, kind: str = "swiglu", out_scale: float = 1.0,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.kind, self.dtype = one_of("kind", kind, self.KINDS), dtype
        self.w_up = param(rngs, fan_in_init(), (embed_dim, mlp_dim), ("embed", "mlp"), param_dtype)
        if kind == "swiglu":
            self.w_gate = param(rngs, fan_in_init(), (embed_dim, mlp_dim), ("embed", "mlp"), param_dtype)
        self.w_down = param(rngs, fan_in_init(scale=out_scale**2), (mlp_dim, embed_dim), ("mlp", "embed"), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        up = dense(x, self.w_up.value, self.dtype)
        if self.kind == "swiglu":
            h = jax.nn.silu(dense(x, self.w_gate.value, self.dtype)) * up
        else:
            h = jax.nn.gelu(up)
        return dense(h, self.w_down.value, self.dtype)


class Embed(nnx.Module):
    """Token embedding table (vocab_size, embed_dim), N(0, 1) init. ids (...,) -> (..., embed_dim)."""

    def __init__(self, vocab_size: int, embed_dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.dtype = dtype
        self.embedding = param(rngs, jax.nn.initializers.normal(1.0), (vocab_size, embed_dim), ("vocab", "embed"),
                               param_dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding.value, ids, axis=0).astype(self.dtype)
