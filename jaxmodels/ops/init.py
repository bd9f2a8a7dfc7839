"""Weight initialisers as pure functions: the variance-scaling family and the scales that depth and width need.

Every initialiser here has the JAX signature `init(key, shape, dtype=jnp.float32) -> array of shape and dtype`
(the one `jax.nn.initializers` and `jaxmodels.nn.param.param` use). It draws in float32 (float64 for a float64
dtype) and casts once at the end, so a bfloat16 parameter gets the same distribution rounded.

Axes. Our weights are laid out (in..., out...): a dense kernel is (in, out), an attention query (embed, heads,
head_dim), its output projection (heads, head_dim, embed), a convolution (height, width, in, out), an expert bank
(experts, in, out). Which dims are fan-in and fan-out is said by `in_axis` / `out_axis` (an int or a tuple of
ints) and `batch_axis` (dims that index independent matrices, e.g. experts), exactly as in
`jax.nn.initializers.variance_scaling`; every other dim is the receptive field of a convolution and multiplies
both fans. The defaults (-2, -1, ()) fit a dense or convolution kernel.

Variance. A weight of variance `scale / fan` keeps the variance of activations (fan_in) or of back-propagated
gradients (fan_out) constant through a linear map; fan_avg = (fan_in + fan_out) / 2 compromises between the two
(Glorot & Bengio 2010, eq. 10-12). This is the same argument that makes attention divide q·k by sqrt(head_dim).
"""

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxmodels.ops.checks import one_of, positive_int, real_in_range

Initializer = Callable[..., jax.Array]
Axes = int | Sequence[int]

FAN_MODES = ("fan_in", "fan_out", "fan_avg")
DISTRIBUTIONS = ("truncated_normal", "normal", "uniform")
MUP_LAYERS = ("input", "hidden", "output")
# Standard deviation of N(0, 1) truncated to [-2, 2]: sqrt(1 - 4 φ(2) / (2 Φ(2) - 1)).
TRUNCATED_NORMAL_STD = 0.87962566103423978


def _axes(name: str, axes: Axes, ndim: int) -> tuple[int, ...]:
    """`axes` as a tuple of non-negative dims of an `ndim`-D shape; ValueError for a dim out of range."""
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    if any(not -ndim <= a < ndim for a in axes):
        raise ValueError(f"{name}={axes} is out of range for a {ndim}-D shape")
    return tuple(a % ndim for a in axes)


def compute_fans(shape: Sequence[int], in_axis: Axes = -2, out_axis: Axes = -1,
                 batch_axis: Axes = ()) -> tuple[int, int]:
    """(fan_in, fan_out) of a weight of `shape`: the product of the `in_axis` dims (resp. `out_axis` dims) times
    the receptive field, the product of the dims named by none of `in_axis`, `out_axis`, `batch_axis`.

    E.g. (embed, heads, head_dim) with in_axis=0, out_axis=(1, 2) gives (embed, heads * head_dim); a convolution
    (3, 3, c_in, c_out) with the defaults gives (9 c_in, 9 c_out). Raises ValueError when an axis is out of range,
    named twice, or a fan is 0.
    """
    ndim = len(shape)
    fan_in_dims, fan_out_dims = _axes("in_axis", in_axis, ndim), _axes("out_axis", out_axis, ndim)
    named = fan_in_dims + fan_out_dims + _axes("batch_axis", batch_axis, ndim)
    if len(set(named)) != len(named):
        raise ValueError(f"in_axis={in_axis}, out_axis={out_axis} and batch_axis={batch_axis} must name "
                         f"distinct dims of shape {tuple(shape)}")
    receptive_field = math.prod(d for i, d in enumerate(shape) if i not in named)
    fan_in = math.prod(shape[i] for i in fan_in_dims) * receptive_field
    fan_out = math.prod(shape[i] for i in fan_out_dims) * receptive_field
    if min(fan_in, fan_out) < 1:
        raise ValueError(f"shape {tuple(shape)} has fan_in={fan_in} and fan_out={fan_out}; both must be >= 1")
    return fan_in, fan_out


def variance_scaling(scale: float, mode: str = "fan_in", distribution: str = "truncated_normal", *,
                     in_axis: Axes = -2, out_axis: Axes = -1, batch_axis: Axes = ()) -> Initializer:
    """Initialiser with zero mean and variance `scale / fan`, fan = fan_in, fan_out or (fan_in + fan_out) / 2
    (`mode`, fans by `compute_fans`).

    `distribution`: "normal" N(0, scale / fan); "uniform" U(-a, a) with a = sqrt(3 scale / fan); "truncated_normal"
    N(0, 1) truncated to [-2, 2] divided by its std 0.8796 and times sqrt(scale / fan), so its variance is exactly
    scale / fan and its values lie within ±2 sqrt(scale / fan) / 0.8796. Returns `init(key, shape, dtype)`.
    """
    scale = real_in_range("scale", scale, 0.0, include_low=False)
    one_of("mode", mode, FAN_MODES)
    one_of("distribution", distribution, DISTRIBUTIONS)

    def init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"dtype must be a floating dtype, got {jnp.dtype(dtype)}")
        fan_in, fan_out = compute_fans(shape, in_axis, out_axis, batch_axis)
        fan = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[mode]
        std = math.sqrt(scale / fan)
        draw_dtype = jnp.promote_types(dtype, jnp.float32)
        if distribution == "normal":
            x = jax.random.normal(key, shape, draw_dtype) * std
        elif distribution == "uniform":
            x = jax.random.uniform(key, shape, draw_dtype, -1.0, 1.0) * (math.sqrt(3.0) * std)
        else:
            x = jax.random.truncated_normal(key, -2.0, 2.0, shape, draw_dtype) * (std / TRUNCATED_NORMAL_STD)
        return x.astype(dtype)

    return init


def glorot(distribution: str = "truncated_normal", *, scale: float = 1.0, in_axis: Axes = -2, out_axis: Axes = -1,
           batch_axis: Axes = ()) -> Initializer:
    """Glorot/Xavier: variance scale * 2 / (fan_in + fan_out) (Glorot & Bengio 2010, eq. 12; their "normalized
    initialization", eq. 16, is `distribution="uniform"`, U(±sqrt(6 / (fan_in + fan_out))))."""
    return variance_scaling(scale, "fan_avg", distribution, in_axis=in_axis, out_axis=out_axis, batch_axis=batch_axis)


def he(distribution: str = "truncated_normal", mode: str = "fan_in", *, scale: float = 1.0, in_axis: Axes = -2,
       out_axis: Axes = -1, batch_axis: Axes = ()) -> Initializer:
    """He/Kaiming: variance scale * 2 / fan for ReLU networks (He et al. 2015, eq. 10 with fan_in, eq. 14 with
    fan_out); the 2 makes up for ReLU zeroing half of its input."""
    return variance_scaling(2.0 * real_in_range("scale", scale, 0.0, include_low=False), mode, distribution,
                            in_axis=in_axis, out_axis=out_axis, batch_axis=batch_axis)


def lecun(distribution: str = "truncated_normal", *, scale: float = 1.0, in_axis: Axes = -2, out_axis: Axes = -1,
          batch_axis: Axes = ()) -> Initializer:
    """LeCun: variance scale / fan_in, unit-variance outputs for unit-variance inputs (LeCun et al. 1998,
    "Efficient BackProp", §4.6). `jaxmodels.nn.param.fan_in_init`, the kernels' initialiser in nn/ and models/, is
    this with the truncated normal and in_axis the leading dims of the weight."""
    return variance_scaling(scale, "fan_in", distribution, in_axis=in_axis, out_axis=out_axis, batch_axis=batch_axis)


def residual_scale(num_layers: int, residual_branches_per_layer: int = 2) -> float:
    """Std factor 1 / sqrt(residual_branches_per_layer * num_layers) for the output projections of residual
    branches (attention W_o, MLP W_down), so the residual stream's variance stays O(1) at any depth: GPT-2
    (Radford et al. 2019, §2.3: "We scale the weights of residual layers at initialization by a factor of 1/sqrt(N)
    where N is the number of residual layers", 2 per block). Multiplies a std; pass its square as a variance `scale`."""
    positive_int("num_layers", num_layers)
    positive_int("residual_branches_per_layer", residual_branches_per_layer)
    return (residual_branches_per_layer * num_layers) ** -0.5


def depth_scaled_residual(num_layers: int, distribution: str = "truncated_normal", *, in_axis: Axes = -2,
                          out_axis: Axes = -1, batch_axis: Axes = ()) -> Initializer:
    """LeCun initialiser for a residual output projection scaled by `residual_scale(num_layers)`: variance
    1 / (2 num_layers fan_in) (GPT-2, Radford et al. 2019, §2.3). E.g. attention W_o (heads, head_dim, embed)
    takes in_axis=(0, 1), out_axis=2."""
    return lecun(distribution, scale=residual_scale(num_layers) ** 2, in_axis=in_axis, out_axis=out_axis,
                 batch_axis=batch_axis)


def t5_query(head_dim: int, distribution: str = "normal", *, in_axis: Axes = -2, out_axis: Axes = -1,
             batch_axis: Axes = ()) -> Initializer:
    """T5's query projection: variance 1 / (fan_in * head_dim) (Raffel et al. 2020; Mesh TensorFlow's
    "initialization to avoid scaling before softmax"). T5's attention omits the 1/sqrt(head_dim) of q·k and
    compensates here: q's std shrinks by 1/sqrt(head_dim), so the logits at initialisation have the variance
    of scaled attention with LeCun q. Every other T5 kernel is LeCun normal (`lecun("normal")`) and the
    embedding N(0, 1). For (embed, heads, head_dim) take in_axis=0, out_axis=(1, 2)."""
    return lecun(distribution, scale=1.0 / positive_int("head_dim", head_dim), in_axis=in_axis, out_axis=out_axis,
                 batch_axis=batch_axis)


class MuPScale(NamedTuple):
    """Per-layer multipliers of maximal update parametrisation relative to a base model of width_mult = 1:
    `init_variance` multiplies the LeCun variance 1 / fan_in, `adam_learning_rate` the base learning rate, and
    `multiplier` the layer's output in the forward pass (1: none)."""
    init_variance: float
    adam_learning_rate: float
    multiplier: float = 1.0


def mup_scale(layer: str, width_mult: float, *, output_multiplier: bool = False) -> MuPScale:
    """muP multipliers for a layer of a model `width_mult` = width / base_width times wider than the tuned base
    (Yang & Hu 2021, Tensor Programs IV; Yang et al. 2021, Tensor Programs V, Table 3 with Adam).

    "input" (embeddings, biases, norm gains: vector-like): init 1, learning rate 1; "hidden" (matrices whose fan-in
    and fan-out both grow with width): init 1 (LeCun already scales with 1/fan_in), learning rate 1 / width_mult;
    "output" (the readout, fan-out finite): init 1 / width_mult (variance 1/fan_in^2 up to the base's constant),
    learning rate 1 / width_mult.

    With `output_multiplier`, the readout is written as TP-V's equivalent formulation with an output multiplier
    (Table 8; the `mup` package's `MuReadout`): init width_mult (variance 1 / base_fan_in, constant in width),
    multiplier 1 / width_mult on its output, learning rate 1. For Adam, whose update size does not depend on the
    gradient's scale, both give the readout W' = W / width_mult of variance 1 / (width_mult fan_in) and update
    size lr / width_mult; the multiplier form also fits a readout tied to the input embedding, whose init and
    learning rate must then be the input's. The other layers are the same in both.

    muP also divides attention logits by head_dim instead of sqrt(head_dim), which is the attention op's `scale`
    argument, not an initialiser. E.g. the readout: `lecun(scale=mup_scale("output", m).init_variance)`.
    """
    one_of("layer", layer, MUP_LAYERS)
    width_mult = real_in_range("width_mult", width_mult, 0.0, include_low=False)
    if layer == "input":
        return MuPScale(1.0, 1.0)
    if layer == "hidden":
        return MuPScale(1.0, 1.0 / width_mult)
    if output_multiplier:
        return MuPScale(width_mult, 1.0, 1.0 / width_mult)
    return MuPScale(1.0 / width_mult, 1.0 / width_mult)
