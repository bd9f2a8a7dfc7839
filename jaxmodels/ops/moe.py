"""Mixture-of-experts routing, dispatch, expert computation, auxiliary losses and expert parallelism.

A sparsely gated MoE layer (Shazeer et al. 2017, "Outrageously Large Neural Networks") sends each
token to a few of E expert feed-forward networks chosen by a router and adds their outputs weighted
by the router's gates: y_t = Σ_{i ∈ chosen(t)} g_{t,i} E_i(x_t).

  piece                     functions
  routers                   top_k_routing (Switch top-1, Fedus et al. 2021; GShard top-2, Lepikhin et al.
                            2020), noisy_top_k_routing (Shazeer et al. 2017), expert_choice_routing
                            (Zhou et al. 2022)
  capacity, token dropping  expert_capacity, capacity_dispatch (dispatch/combine (T, E, C) tensors of the
                            einsum formulation; slot-major priority or V-MoE batch prioritized routing),
                            dropped_fraction, unrouted_fraction
  experts                   swiglu_experts ((E, C, d) buffers), moe_einsum (capacity form),
                            sort_by_expert + grouped_matmul + moe_dropless (dropless form, Gale et al.
                            2022 "MegaBlocks")
  losses and metrics        load_balancing_loss (Switch), router_z_loss (ST-MoE), expert_load,
                            routing_entropy
  expert parallelism        expert_parallel_moe (all-to-all inside `jax.shard_map`, GShard §2.2)
  cost                      moe_flops_per_token

Shapes: tokens are flattened to x (T, d); E experts, each a SwiGLU FFN with hidden width f
(Shazeer 2020, "GLU Variants": down(silu(x W_gate) * (x W_up))); k experts per token; C slots
(capacity) per expert. Router logits, probabilities, gates and losses are float32; expert
arithmetic runs in the dtype of x (pass the weights in the same dtype).
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxmodels.ops.checks import check_grouped_operands, concrete, one_of, positive_int, values_in_range
from jaxmodels.ops.dispatch import check_implementation, fall_back
from jaxmodels.ops.kernels import grouped_matmul as pallas_gmm

IMPLEMENTATIONS = ("reference", "ragged_dot", "pallas")  # of `grouped_matmul`
PRIORITIES = ("slot", "gate")


class TokenChoice(NamedTuple):
    """The routing of token-choice routers. gates: (T, k) float32 weights of the chosen experts,
    experts: (T, k) int32 their indices (distinct per token, ordered by decreasing router score),
    probs: (T, E) float32 the router's full softmax (for the load-balancing loss and entropy)."""

    gates: jax.Array
    experts: jax.Array
    probs: jax.Array


# ----------------------------------------------------------------------------------------------
# argument checks (trace time: shapes are static)
# ----------------------------------------------------------------------------------------------


def _check_logits(logits, name="logits"):
    if logits.ndim != 2:
        raise ValueError(f"{name} must be (num_tokens, num_experts), got shape {logits.shape}")
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise TypeError(f"{name} must be floating point, got {logits.dtype}")


def _check_k(k, num_experts):
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_experts:
        raise ValueError(f"k must be an int in [1, num_experts={num_experts}], got {k!r}")


def _check_routing(gates, experts, num_experts):
    if gates.ndim != 2 or gates.shape != experts.shape:
        raise ValueError(f"gates and experts must both be (num_tokens, k), got {gates.shape} and {experts.shape}")
    _check_expert_ids(experts, num_experts)
    _check_k(gates.shape[1], num_experts)


def _check_expert_ids(experts, num_experts):
    """Integer expert ids, in [0, num_experts) where they are concrete (`checks.values_in_range`)."""
    positive_int("num_experts", num_experts)
    if not jnp.issubdtype(experts.dtype, jnp.integer):
        raise TypeError(f"experts must be integer expert indices, got {experts.dtype}")
    values_in_range("experts", experts, 0, num_experts)


def _drop_invalid(experts, num_experts):
    """Expert ids with those outside [0, E) (possible only under a trace, where they cannot be refused) replaced
    by E, which no expert's count or group includes: such assignments are dropped."""
    return jnp.where((experts >= 0) & (experts < num_experts), experts, num_experts)


def _check_expert_weights(x, w_gate, w_up, w_down):
    E, d, f = w_gate.shape if w_gate.ndim == 3 else (None, None, None)
    if E is None or w_up.shape != (E, d, f) or w_down.shape != (E, f, d) or x.shape[-1] != d:
        raise ValueError(f"expected w_gate, w_up (E, d, f), w_down (E, f, d) with d = x.shape[-1] = {x.shape[-1]}; "
                         f"got {w_gate.shape}, {w_up.shape}, {w_down.shape}")
    return E


# ----------------------------------------------------------------------------------------------
# routers
# ----------------------------------------------------------------------------------------------


def top_k_routing(logits: jax.Array, k: int, *, normalize: bool = False) -> TokenChoice:
    """Softmax top-k gating: p = softmax(logits), keep the k largest p_{t,i}.

    k = 1, normalize=False is the Switch Transformer router (Fedus et al. 2021, eq. 1-2: the gate is
    p_{t,i} of the one chosen expert); k = 2, normalize=True is GShard's top-2 gating (Lepikhin et
    al. 2020, Algorithm 1: g1, g2 divided by g1 + g2). `normalize` renormalises the k gates to sum 1.

    Args:
      logits: (T, E) router logits (computed in float32).
      k: experts per token, 1 <= k <= E.

    Returns:
      TokenChoice(gates (T, k) float32, experts (T, k) int32, probs (T, E) float32).
    """
    _check_logits(logits)
    _check_k(k, logits.shape[1])
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    gates, experts = lax.top_k(probs, k)
    if normalize:
        gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
    return TokenChoice(gates, experts.astype(jnp.int32), probs)


def noisy_top_k_routing(logits: jax.Array, noise_logits: jax.Array, k: int, *, key: jax.Array) -> TokenChoice:
    """Noisy top-k gating (Shazeer et al. 2017, §2.1, eq. 3-5).

    H(x) = x W_g + StandardNormal() * softplus(x W_noise); G(x) = softmax(KeepTopK(H(x), k)), i.e.
    the softmax over the k kept entries (the others are -inf). Equal to `top_k_routing(H, k,
    normalize=True)`; `probs` is the full softmax of H. The paper adds the noise in training only:
    for evaluation call `top_k_routing(logits, k, normalize=True)`.

    Args:
      logits: (T, E) clean logits x W_g.
      noise_logits: (T, E) x W_noise; softplus of it is the per-token, per-expert noise scale.
      k: experts per token, 1 <= k <= E.
      key: PRNG key of the standard normal noise (same key, same routing).

    Returns:
      TokenChoice(gates (T, k) float32 summing to 1, experts (T, k) int32, probs (T, E) float32).
    """
    _check_logits(logits)
    if noise_logits.shape != logits.shape:
        raise ValueError(f"noise_logits must have the shape of logits {logits.shape}, got {noise_logits.shape}")
    noise = jax.random.normal(key, logits.shape, jnp.float32)
    h = logits.astype(jnp.float32) + noise * jax.nn.softplus(noise_logits.astype(jnp.float32))
    return top_k_routing(h, k, normalize=True)


def expert_choice_routing(logits: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing", §3.1).

    S = softmax(logits) over experts (T, E); each expert i takes the `capacity` tokens with the
    largest S_{t,i} (G, I = TopK(Sᵀ, capacity)), so every expert processes exactly `capacity`
    tokens, while a token may be taken by 0 to E experts. Ties go to the earlier token.

    Args:
      logits: (T, E) router logits.
      capacity: tokens per expert, 1 <= capacity <= T (the paper's k = T * c / E for capacity
        factor c: `expert_capacity(T, E, 1, c)`).

    Returns:
      dispatch (T, E, C) bool: dispatch[t, i, c] iff token t fills slot c of expert i;
      combine (T, E, C) float32: dispatch * S_{t,i}, the weight of that slot's output for token t;
      probs (T, E) float32: S.
    """
    _check_logits(logits)
    T = logits.shape[0]
    if isinstance(capacity, bool) or not isinstance(capacity, int) or not 1 <= capacity <= T:
        raise ValueError(f"expert-choice capacity must be an int in [1, num_tokens={T}], got {capacity!r}")
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    gates, tokens = lax.top_k(probs.T, capacity)  # (E, C)
    dispatch = jax.nn.one_hot(tokens, T, dtype=jnp.bool_).transpose(2, 0, 1)  # (T, E, C)
    combine = jnp.where(dispatch, gates[None], 0.0)
    return dispatch, combine, probs


# ----------------------------------------------------------------------------------------------
# capacity and token dropping
# ----------------------------------------------------------------------------------------------


def expert_capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float) -> int:
    """Slots per expert C = ceil(k * T * capacity_factor / E) (Switch Transformer §2.2, eq. 3;
    GShard's expert capacity with k assignments per token).

    capacity_factor = 1 gives room for a perfectly balanced routing; E / k gives C = T, where no
    token-choice assignment can be dropped. The product is rounded to 9 decimals before the ceiling,
    so 1.25 * 8 / 10 is 1, not 2. Raises `checks.positive_int`'s errors for num_tokens, num_experts and k,
    and ValueError when C < 1 (no expert could take any token).
    """
    for name, v in (("num_tokens", num_tokens), ("num_experts", num_experts), ("k", k)):
        positive_int(name, v)
    capacity = math.ceil(round(k * num_tokens * float(capacity_factor) / num_experts, 9))
    if capacity < 1:
        raise ValueError(f"expert capacity ceil(k * T * capacity_factor / E) = ceil({k} * {num_tokens} * "
                         f"{capacity_factor} / {num_experts}) = {capacity} < 1: raise capacity_factor")
    return capacity


def capacity_dispatch(gates: jax.Array, experts: jax.Array, num_experts: int, capacity: int, *,
                      priority: str = "slot") -> tuple[jax.Array, jax.Array]:
    """Dispatch and combine tensors of the einsum formulation, dropping what exceeds the capacity
    (GShard, Lepikhin et al. 2020, Algorithm 1; Switch Transformer §2.2).

    The T * k token-assignments (t, j) -> experts[t, j] claim their expert's slots in priority order;
    an assignment whose expert already has `capacity` earlier ones is dropped (its token then gets
    nothing from that expert; the residual connection carries it). The order is slot-major:
      priority="slot" (GShard/Switch): all first choices (j = 0) in token order t = 0, 1, ..., then
        all second choices in token order, and so on;
      priority="gate" (batch prioritized routing, Riquelme et al. 2021 "V-MoE", §3.1): the same,
        with tokens ordered by decreasing priority score max_j gates[t, j] (ties: earlier token first).
    An assignment's slot is its rank among the earlier assignments to the same expert.

    Args:
      gates: (T, k) float gate weights. experts: (T, k) int expert indices (distinct per token) in [0, E):
        refused (ValueError) when concrete; under a trace an id outside is dropped (it claims no slot).
      num_experts: E. capacity: C >= 1 slots per expert.
      priority: "slot" or "gate".

    Returns:
      dispatch (T, E, C) bool: dispatch[t, i, c] iff token t fills slot c of expert i;
      combine (T, E, C) float32: gates[t, j] at the slot of each kept assignment (t, j), else 0.
    """
    _check_routing(gates, experts, num_experts)
    one_of("priority", priority, PRIORITIES)
    positive_int("capacity", capacity)
    T, k = gates.shape
    gates = gates.astype(jnp.float32)
    if priority == "gate":
        order = jnp.argsort(-jnp.max(gates, axis=1), stable=True)
    else:
        order = jnp.arange(T)
    onehot = jax.nn.one_hot(experts[order].T, num_experts, dtype=jnp.int32)  # (k, T, E), slot-major
    rank = jnp.cumsum(onehot.reshape(k * T, num_experts), axis=0).reshape(k, T, num_experts) - 1
    position = jnp.sum(rank * onehot, axis=-1).T  # (T, k) in priority order
    position = jnp.zeros_like(position).at[order].set(position)
    slot = jax.nn.one_hot(position, capacity, dtype=jnp.float32)  # all zero where position >= C: dropped
    expert = jax.nn.one_hot(experts, num_experts, dtype=jnp.float32)
    dispatch = jnp.einsum("tke,tkc->tec", expert, slot) > 0
    combine = jnp.einsum("tk,tke,tkc->tec", gates, expert, slot)
    return dispatch, combine


def dropped_fraction(dispatch: jax.Array, k: int) -> jax.Array:
    """Fraction of the T * k token-assignments that `capacity_dispatch` dropped.

    dispatch: (T, E, C) bool. Returns a float32 scalar, 1 - (kept assignments) / (T * k).
    """
    T = dispatch.shape[0]
    return 1.0 - jnp.sum(dispatch, dtype=jnp.float32) / (T * k)


def unrouted_fraction(dispatch: jax.Array) -> jax.Array:
    """Fraction of tokens that no expert processes (expert-choice routing's analogue of dropping).

    dispatch: (T, E, C) bool. Returns a float32 scalar.
    """
    return jnp.mean(~jnp.any(dispatch, axis=(1, 2)), dtype=jnp.float32)


# ----------------------------------------------------------------------------------------------
# experts: capacity (einsum) form and dropless (grouped matmul) form
# ----------------------------------------------------------------------------------------------


def swiglu_experts(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """E SwiGLU experts applied to their own buffers: y_i = (silu(x_i W_gate,i) * x_i W_up,i) W_down,i
    (Shazeer 2020). x: (E, C, d); w_gate, w_up: (E, d, f); w_down: (E, f, d). Returns (E, C, d) in
    x's dtype."""
    E = _check_expert_weights(x, w_gate, w_up, w_down)
    if x.ndim != 3 or x.shape[0] != E:
        raise ValueError(f"x must be (E, C, d) with E = {E} experts, got {x.shape}")
    h = jax.nn.silu(jnp.einsum("ecd,edf->ecf", x, w_gate)) * jnp.einsum("ecd,edf->ecf", x, w_up)
    return jnp.einsum("ecf,efd->ecd", h, w_down)


def moe_einsum(x: jax.Array, dispatch: jax.Array, combine: jax.Array, w_gate: jax.Array, w_up: jax.Array,
               w_down: jax.Array) -> jax.Array:
    """MoE layer in the einsum (capacity) form of GShard / Mesh-TensorFlow.

    x_e = einsum("td,tec->ecd", x, dispatch) fills the (E, C, d) expert buffers, the experts run on
    them (`swiglu_experts`), and y = einsum("ecd,tec->td", expert_out, combine) adds each token's
    outputs weighted by its gates. Dropped assignments contribute nothing.

    Args:
      x: (T, d). dispatch: (T, E, C) bool. combine: (T, E, C) float gate weights.
      w_gate, w_up: (E, d, f); w_down: (E, f, d).

    Returns:
      (T, d) in x's dtype.
    """
    if dispatch.shape != combine.shape or dispatch.ndim != 3 or dispatch.shape[:2] != (x.shape[0], w_gate.shape[0]):
        raise ValueError(f"dispatch and combine must be (T, E, C) = ({x.shape[0]}, {w_gate.shape[0]}, C), "
                         f"got {dispatch.shape} and {combine.shape}")
    buffers = jnp.einsum("td,tec->ecd", x, dispatch.astype(x.dtype))
    out = swiglu_experts(buffers, w_gate, w_up, w_down)
    return jnp.einsum("ecd,tec->td", out, combine.astype(x.dtype))


def sort_by_expert(experts: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array]:
    """Order of the token-assignments grouped by expert, and the group sizes (MegaBlocks §5.1).

    experts: (T, k) int in [0, E) (refused with ValueError when concrete). Assignment (t, j) is flattened to
    a = t * k + j. Returns order (T * k,) int32, a stable argsort of the flattened experts (within an expert,
    token order), and group_sizes (E,) int32, the number of assignments per expert. Under a trace, ids outside
    [0, E) sort after every group and count in none (`grouped_matmul` gives zeros for those rows).
    """
    _check_expert_ids(experts, num_experts)
    flat = _drop_invalid(experts.reshape(-1), num_experts)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    return order, jnp.bincount(flat, length=num_experts).astype(jnp.int32)


def inverse_permutation(order: jax.Array) -> jax.Array:
    """(n,) int32 inverse of the permutation `order`: inverse[order[i]] = i."""
    n = order.shape[0]
    return jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32), unique_indices=True)


@jax.custom_vjp
def permute_rows(x: jax.Array, order: jax.Array, inverse: jax.Array) -> jax.Array:
    """x[order] for a permutation `order` of x's rows (inverse = `inverse_permutation(order)`).

    The gradient is the gather g[inverse], not the scatter-add autodiff would make of the gather
    (scatters are several times slower than gathers on the GPU).
    """
    return x[order]


def _permute_rows_fwd(x, order, inverse):
    return x[order], (order, inverse)


def _permute_rows_bwd(residuals, g):
    order, inverse = residuals
    return g[inverse], None, None


permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)


def _grouped_matmul_reference(x_sorted, w, group_sizes):
    """Per-group masked einsum: row m uses w[g(m)], g(m) the group whose range holds m; rows past
    sum(group_sizes) are zero. O(M E d f): a test oracle, not for speed. Products accumulate in float32
    (float64 for float64 inputs), forward and backward, and the result is rounded to x_sorted's dtype once, so
    that the oracle is not the less accurate side of a bf16 comparison (summed in bf16, its weight gradient was
    4 bf16 ulps from float64 where the kernels were within 1)."""
    acc_dtype = jnp.promote_types(x_sorted.dtype, jnp.float32)
    group = jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(x_sorted.shape[0]), side="right")
    mask = jax.nn.one_hot(group, w.shape[0], dtype=acc_dtype)  # (M, E); all zero past the last group
    every_group = jnp.einsum("md,edf->emf", x_sorted, w, preferred_element_type=acc_dtype)  # each row times each w[e]
    return jnp.einsum("me,emf->mf", mask, every_group).astype(x_sorted.dtype)


def _checked_group_sizes(group_sizes, num_rows):
    """group_sizes, refused unless each is >= 0 and they sum to <= num_rows (when concrete); traced ones with
    negative sizes raised to 0 and the running sum cut at num_rows."""
    sizes = concrete(group_sizes)
    if sizes is not None and (sizes.min(initial=0) < 0 or sizes.sum() > num_rows):
        raise ValueError(f"group_sizes must be >= 0 and sum to at most M = {num_rows} rows, got {sizes.tolist()}")
    ends = jnp.minimum(jnp.cumsum(jnp.maximum(group_sizes, 0)), num_rows)
    return jnp.diff(ends, prepend=0).astype(group_sizes.dtype)


def grouped_matmul(x_sorted: jax.Array, w: jax.Array, group_sizes: jax.Array, *,
                   implementation: str | None = None) -> jax.Array:
    """Grouped (ragged) matmul: rows [s_i, s_i + group_sizes[i]) of x_sorted times w[i], with
    s_i = Σ_{j<i} group_sizes[j] (MegaBlocks' block-sparse expert computation, Gale et al. 2022).

    Args:
      x_sorted: (M, d) rows grouped by expert. w: (E, d, f). group_sizes: (E,) int32, each >= 0, sum <= M;
        rows past the sum give zeros. Sizes breaking this are refused (ValueError) when concrete; under a
        trace a negative size counts as 0 and the groups are cut at row M.
      implementation: one of `IMPLEMENTATIONS` or None. "reference": per-group masked einsum, the test
        oracle; "ragged_dot": `jax.lax.ragged_dot`; "pallas":
        `jaxmodels.ops.kernels.grouped_matmul.pallas_grouped_matmul`, tiled Pallas kernels (interpreted
        off the GPU), which falls back to "ragged_dot" with a one-time warning on inputs it does not cover
        (`pallas_gmm.supports`). None: "pallas" on the GPU where `pallas_gmm.supports` the shapes
        (benchmarks/results/grouped_matmul.json compares it with ragged_dot), else "ragged_dot".

    Returns:
      (M, f) in x_sorted's dtype.
    """
    check_implementation(implementation, IMPLEMENTATIONS)
    check_grouped_operands(x_sorted, w, group_sizes)
    group_sizes = _checked_group_sizes(group_sizes, x_sorted.shape[0])
    if implementation is None:
        on_gpu = jax.default_backend() == "gpu"
        implementation = "pallas" if on_gpu and pallas_gmm.supports(x_sorted, w) is None else "ragged_dot"
    reason = pallas_gmm.supports(x_sorted, w) if implementation == "pallas" else None
    if reason:
        implementation = fall_back("grouped_matmul", "pallas", reason, "ragged_dot")
    if implementation == "pallas":
        return pallas_gmm.pallas_grouped_matmul(x_sorted, w, group_sizes)
    if implementation == "reference":
        return _grouped_matmul_reference(x_sorted, w, group_sizes)
    return lax.ragged_dot(x_sorted, w, group_sizes.astype(jnp.int32))


def moe_dropless(x: jax.Array, gates: jax.Array, experts: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                 w_down: jax.Array, *, implementation: str | None = None) -> jax.Array:
    """Dropless MoE layer (MegaBlocks, Gale et al. 2022): no capacity, no dropped tokens.

    Sort the T * k token-assignments by expert (`sort_by_expert`), gather their tokens, run each
    expert's SwiGLU on its contiguous group with three `grouped_matmul`s, scatter the outputs back
    to (T, k, d) and add them weighted by the gates: y_t = Σ_j gates[t, j] E_{experts[t, j]}(x_t).

    Args:
      x: (T, d). gates: (T, k) float. experts: (T, k) int in [0, E): refused (ValueError) when concrete; under
        a trace an assignment to an id outside is dropped (it contributes nothing, `sort_by_expert`).
      w_gate, w_up: (E, d, f); w_down: (E, f, d).
      implementation: passed to `grouped_matmul`.

    Returns:
      (T, d) in x's dtype.
    """
    E = _check_expert_weights(x, w_gate, w_up, w_down)
    _check_routing(gates, experts, E)
    if x.ndim != 2 or gates.shape[0] != x.shape[0]:
        raise ValueError(f"x must be (T, d) with T = gates.shape[0] = {gates.shape[0]}, got {x.shape}")
    T, k = gates.shape
    order, group_sizes = sort_by_expert(experts, E)
    inverse = inverse_permutation(order)
    x_assignments = jnp.broadcast_to(x[:, None], (T, k, x.shape[1])).reshape(T * k, -1)  # row t * k + j = x_t
    xs = permute_rows(x_assignments, order, inverse)
    gmm = lambda a, w: grouped_matmul(a, w, group_sizes, implementation=implementation)
    h = jax.nn.silu(gmm(xs, w_gate)) * gmm(xs, w_up)
    y = permute_rows(gmm(h, w_down), inverse, order).reshape(T, k, -1)
    return jnp.einsum("tkd,tk->td", y, gates.astype(x.dtype))


# ----------------------------------------------------------------------------------------------
# auxiliary losses and metrics (float32)
# ----------------------------------------------------------------------------------------------


def load_balancing_loss(probs: jax.Array, experts: jax.Array) -> jax.Array:
    """Switch Transformer load-balancing loss N Σ_i f_i P_i (Fedus et al. 2021, §2.2, eq. 4-6).

    P_i = mean_t probs[t, i] (differentiable); f_i = fraction of the T * k token-assignments routed
    to expert i (before capacity dropping; for k = 1 the paper's "fraction of tokens dispatched to
    expert i"). For k > 1 this f sums to 1, so the loss is 1 at a uniform routing for every k; it is
    the Hugging Face / flaxformer top-k generalisation divided by k. Minimum 1 when f and P are uniform.

    Args:
      probs: (T, E) router softmax. experts: (T, k) int chosen experts.

    Returns:
      float32 scalar.
    """
    _check_logits(probs, "probs")
    if experts.ndim != 2 or experts.shape[0] != probs.shape[0]:
        raise ValueError(f"experts must be (T, k) with T = {probs.shape[0]}, got {experts.shape}")
    E = probs.shape[1]
    f = expert_load(experts, E)
    P = jnp.mean(probs.astype(jnp.float32), axis=0)
    return E * jnp.sum(f * P)


def router_z_loss(logits: jax.Array) -> jax.Array:
    """ST-MoE router z-loss (Zoph et al. 2022, eq. 5): mean_t (log Σ_i exp(logits[t, i]))².

    logits: (T, E). Returns a float32 scalar; it keeps the router's logits small (bf16-safe)."""
    _check_logits(logits)
    z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    return jnp.mean(jnp.square(z))


def expert_load(experts: jax.Array, num_experts: int) -> jax.Array:
    """Histogram of expert indices as fractions: (E,) float32 summing to 1.

    experts: int array of any shape (e.g. (T, k) token choices, counted before capacity dropping), in [0, E):
    refused (ValueError) when concrete; under a trace an id outside counts for no expert, and the fractions
    then sum to less than 1."""
    _check_expert_ids(experts, num_experts)
    counts = jnp.bincount(_drop_invalid(experts.reshape(-1), num_experts), length=num_experts)
    return counts.astype(jnp.float32) / experts.size


def routing_entropy(probs: jax.Array) -> jax.Array:
    """Mean over tokens of the router distribution's entropy -Σ_i p_i log p_i (nats), float32 scalar.

    probs: (T, E). log E for a uniform router, 0 for a one-hot one."""
    _check_logits(probs, "probs")
    p = probs.astype(jnp.float32)
    return jnp.mean(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1))


# ----------------------------------------------------------------------------------------------
# expert parallelism
# ----------------------------------------------------------------------------------------------


def expert_parallel_moe(x: jax.Array, gates: jax.Array, experts: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                        w_down: jax.Array, *, axis_name: str, capacity: int, priority: str = "slot") -> jax.Array:
    """Expert-parallel MoE layer, to be called inside `jax.shard_map` over the mesh axis `axis_name`
    of n devices (GShard, Lepikhin et al. 2020, §2.2 and Figure 3).

    Each device holds T_local tokens (with their routing, computed locally) and E / n consecutive
    experts (device p owns experts p E/n, ..., (p+1) E/n - 1). It fills per-expert buffers of
    `capacity` slots from its own tokens (`capacity_dispatch`, the local tokens forming one GShard
    "group"), `lax.all_to_all` sends each buffer to the device owning its expert, the local experts
    run on the (n * capacity) rows they received, a second all_to_all returns the outputs, and each
    device combines them for its tokens. The result equals `moe_einsum` applied to each device's
    tokens with the same capacity (hence the unsharded layer when nothing is dropped).

    Args:
      x: (T_local, d). gates: (T_local, k) float. experts: (T_local, k) int in [0, E).
      w_gate, w_up: (E / n, d, f) local experts; w_down: (E / n, f, d).
      axis_name: the expert mesh axis. capacity: slots per expert per source device.
      priority: token-dropping order, see `capacity_dispatch`.

    Returns:
      (T_local, d) in x's dtype.
    """
    n = lax.axis_size(axis_name)
    E_local = _check_expert_weights(x, w_gate, w_up, w_down)
    E = n * E_local
    dispatch, combine = capacity_dispatch(gates, experts, E, capacity, priority=priority)
    buffers = jnp.einsum("td,tec->ecd", x, dispatch.astype(x.dtype))  # (E, C, d), expert-major
    d = x.shape[1]
    received = lax.all_to_all(buffers.reshape(n, E_local, capacity, d), axis_name, 0, 0)  # (source, E_l, C, d)
    local_in = received.transpose(1, 0, 2, 3).reshape(E_local, n * capacity, d)
    local_out = swiglu_experts(local_in, w_gate, w_up, w_down)
    back = local_out.reshape(E_local, n, capacity, d).transpose(1, 0, 2, 3)  # (destination, E_l, C, d)
    out = lax.all_to_all(back, axis_name, 0, 0).reshape(E, capacity, d)  # (owner * E_l + local, C, d)
    return jnp.einsum("ecd,tec->td", out, combine.astype(x.dtype))


def moe_flops_per_token(d_model: int, d_ff: int, k: int, num_shared: int = 0) -> int:
    """Useful forward FLOPs per token of the expert matmuls: (k + num_shared) SwiGLU experts of width
    d_ff, each three d_model x d_ff matmuls at 2 FLOPs per multiply-add: 6 d_model d_ff (k + num_shared).

    Excludes the router (2 d_model E), the gating arithmetic, and capacity padding or dropped
    slots (work that is done but not useful). Multiply by 3 for forward + backward.
    """
    return 6 * d_model * d_ff * (k + num_shared)
