"""Mixture-of-experts feed-forward layer (Flax NNX) over the routing and dispatch of `jaxmodels.ops.moe`."""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmodels.nn.layers import MLP, dense
from jaxmodels.nn.param import fan_in_init, param
from jaxmodels.ops import moe
from jaxmodels.ops.checks import non_negative_int, one_of, positive_int
from jaxmodels.ops.dispatch import check_implementation


class MoEFeedForward(nnx.Module):
    """Sparsely gated mixture of SwiGLU experts replacing a Transformer's MLP (Shazeer et al. 2017;
    GShard, Lepikhin et al. 2020; Switch, Fedus et al. 2021). x: (batch, length, embed_dim) -> (y, aux).

    Router: logits = x W_router in float32 (ST-MoE's selective precision; the router weight is a
    float32 parameter (embed_dim, num_experts) with logical axes ("embed", "expert"), truncated
    normal with Switch's reduced scale 0.1). Experts: num_experts SwiGLU FFNs of width mlp_dim with
    weights (E, embed, mlp) / (E, mlp, embed) on logical axes ("expert", "embed", "mlp"). With
    num_shared > 0, an always-on SwiGLU of width num_shared * mlp_dim (DeepSeekMoE's shared experts,
    which concatenate into one wider MLP) is added to every token's output.

    routing:
      "top_k": softmax top-k (`ops.moe.top_k_routing`); `normalize` (default: k > 1) renormalises the
        k gates to sum 1: k=1 unnormalised is Switch (the gate p_i keeps the router in the task
        gradient), k=2 normalised is GShard.
      "noisy_top_k": Shazeer et al. 2017 noisy gating with a second float32 weight W_noise
        (zero-initialised as in the paper); noise is drawn from `key` when given (training) and left
        out when key is None (evaluation). Gates always sum to 1 over the k kept experts.
      "expert_choice": each expert takes ceil(T * capacity_factor / E) tokens (Zhou et al. 2022);
        only dispatch="einsum"; `k` is unused; its load-balancing loss is 0 (balanced by construction).
    dispatch:
      "einsum": capacity C = `expert_capacity(T, E, k, capacity_factor)` per expert over the T =
        batch * length tokens of the call; overflowing assignments are dropped in `priority` order.
      "dropless": sort + `grouped_matmul` (`implementation`), nothing is dropped.

    Returns y (batch, length, embed_dim) in `dtype` and aux, a dict of float32 values:
    load_balancing_loss, router_z_loss, dropped_fraction (of token-assignments; for expert choice,
    of tokens no expert took), routing_entropy (nats) scalars and expert_load (E,) fractions of the
    routed assignments. The caller adds the weighted losses to its objective (Switch uses 1e-2 for
    the load-balancing loss, ST-MoE 1e-3 for the z-loss).
    """

    ROUTINGS = ("top_k", "noisy_top_k", "expert_choice")
    DISPATCHES = ("einsum", "dropless")

    def __init__(self, embed_dim: int, mlp_dim: int, num_experts: int, *, k: int = 2, routing: str = "top_k",
                 normalize: bool | None = None, capacity_factor: float = 1.25, dispatch: str = "einsum",
                 priority: str = "slot", num_shared: int = 0, implementation: str | None = None,
                 out_scale: float = 1.0, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        one_of("routing", routing, self.ROUTINGS)
        one_of("dispatch", dispatch, self.DISPATCHES)
        if routing == "expert_choice" and dispatch != "einsum":
            raise ValueError(f"routing 'expert_choice' needs dispatch 'einsum', got {dispatch!r}")
        one_of("priority", priority, moe.PRIORITIES)
        check_implementation(implementation, moe.IMPLEMENTATIONS)
        positive_int("num_experts", num_experts)
        if routing != "expert_choice" and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_experts):
            raise ValueError(f"k must be an int in [1, num_experts={num_experts}], got {k!r}")
        if not capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0, got {capacity_factor!r}")
        if routing == "expert_choice" and capacity_factor > num_experts:
            raise ValueError(f"expert_choice needs capacity_factor <= num_experts = {num_experts} (each expert takes "
                             f"ceil(T * capacity_factor / E) of the T tokens), got {capacity_factor!r}")
        non_negative_int("num_shared", num_shared)
        self.embed_dim, self.num_experts, self.k = embed_dim, num_experts, k
        self.routing, self.capacity_factor = routing, capacity_factor
        self.normalize = (routing != "expert_choice" and k > 1) if normalize is None else normalize
        self.dispatch, self.priority, self.implementation, self.dtype = dispatch, priority, implementation, dtype
        E = num_experts
        self.router = param(rngs, fan_in_init(scale=0.1), (embed_dim, E), ("embed", "expert"), jnp.float32)
        if routing == "noisy_top_k":
            self.noise = param(rngs, jax.nn.initializers.zeros, (embed_dim, E), ("embed", "expert"), jnp.float32)
        self.w_gate = param(rngs, _expert_init(), (E, embed_dim, mlp_dim),
                            ("expert", "embed", "mlp"), param_dtype)
        self.w_up = param(rngs, _expert_init(), (E, embed_dim, mlp_dim), ("expert", "embed", "mlp"), param_dtype)
        self.w_down = param(rngs, _expert_init(out_scale**2), (E, mlp_dim, embed_dim), ("expert", "mlp", "embed"),
                            param_dtype)
        self.shared = (MLP(embed_dim, num_shared * mlp_dim, kind="swiglu", out_scale=out_scale, dtype=dtype,
                           param_dtype=param_dtype, rngs=rngs) if num_shared else None)

    def __call__(self, x: jax.Array, *, key: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        if x.ndim != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must be (batch, length, embed_dim={self.embed_dim}), got {x.shape}")
        batch, length, d = x.shape
        T, E = batch * length, self.num_experts
        tokens = x.reshape(T, d)
        logits = dense(tokens, self.router.value, jnp.float32)
        w = [v.value.astype(self.dtype) for v in (self.w_gate, self.w_up, self.w_down)]
        xd = tokens.astype(self.dtype)
        aux = {"router_z_loss": moe.router_z_loss(logits)}
        if self.routing == "expert_choice":
            capacity = moe.expert_capacity(T, E, 1, self.capacity_factor)  # <= T as capacity_factor <= E
            dispatch, combine, probs = moe.expert_choice_routing(logits, capacity)
            y = moe.moe_einsum(xd, dispatch, combine, *w)
            aux |= {"load_balancing_loss": jnp.zeros((), jnp.float32),
                    "dropped_fraction": moe.unrouted_fraction(dispatch),
                    "expert_load": jnp.sum(dispatch, axis=(0, 2), dtype=jnp.float32) / (E * capacity)}
        else:
            if self.routing == "noisy_top_k" and key is not None:
                noise_logits = dense(tokens, self.noise.value, jnp.float32)
                gates, experts, probs = moe.noisy_top_k_routing(logits, noise_logits, self.k, key=key)
            else:
                normalize = self.normalize or self.routing == "noisy_top_k"
                gates, experts, probs = moe.top_k_routing(logits, self.k, normalize=normalize)
            if self.dispatch == "einsum":
                capacity = moe.expert_capacity(T, E, self.k, self.capacity_factor)
                dispatch, combine = moe.capacity_dispatch(gates, experts, E, capacity, priority=self.priority)
                y = moe.moe_einsum(xd, dispatch, combine, *w)
                dropped = moe.dropped_fraction(dispatch, self.k)
            else:
                y = moe.moe_dropless(xd, gates, experts, *w, implementation=self.implementation)
                dropped = jnp.zeros((), jnp.float32)
            aux |= {"load_balancing_loss": moe.load_balancing_loss(probs, experts), "dropped_fraction": dropped,
                    "expert_load": moe.expert_load(experts, E)}
        aux["routing_entropy"] = moe.routing_entropy(probs)
        if self.shared is not None:
            y = y + self.shared(xd)
        return y.reshape(batch, length, d), aux


def _expert_init(scale: float = 1.0):
    """LeCun-normal over each expert's own fan-in (dim 1 of an (E, fan_in, fan_out) weight)."""
    per_expert = fan_in_init(scale=scale)
    def init(key, shape, dtype):
        return jax.vmap(lambda k: per_expert(k, shape[1:], dtype))(jax.random.split(key, shape[0]))

    return init
