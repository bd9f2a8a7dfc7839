r"""Normalising flows: NICE, RealNVP, Glow and a continuous normalising flow (FFJORD), one interface for all.

A flow maps data x (B, *input_shape) to a latent z of the same shape with a standard-normal prior, and

    log p(x) = log N(z; 0, I) + log |det dz/dx|                          (NICE eq. 1-2; RealNVP eq. 3)

Every model here is a `Flow`:

    z, log_det = flow.forward(x)           # log_det (B,): log |det dz/dx|
    x, log_det = flow.inverse(z)           # log |det dx/dz| = minus the forward's at that point
    flow.log_prob(x) -> (B,) nats          # the equation above
    flow.sample(key, n, temperature=1.0)   # z ~ N(0, T^2 I) through the inverse (Glow §5: T < 1 trades
                                           # diversity for quality)
    flow.initialize(x)                     # data-dependent start (Glow's actnorm), from a batch

`forward`, `inverse` and `log_prob` take `key=` for the continuous flow's Hutchinson estimator; the discrete flows
ignore it. The multi-scale flows (RealNVP §3.6, Glow §3.3) factor out half of the channels at every level; their
latent is put back together into x's shape (each factored half at the positions it came from), so the inverse
takes a latent of x's shape too.

  model     config.model.name   layers (`jaxmodels.nn.flows`)
  NICE      "nice"              additive couplings on alternating (odd/even) halves + diagonal scaling
  RealNVP   "realnvp"           vectors: affine couplings on alternating halves (MLPs); images: per scale 3
                                checkerboard couplings, squeeze, 3 channel couplings, factor out half; the last
                                scale 4 checkerboard couplings (conv ResNets)
  Glow      "glow"              L levels of: squeeze, K steps of (actnorm, LU 1x1 conv, affine coupling), factor out
                                half with a learned Gaussian prior (not after the last level)
  CNF       "cnf"               dz/dt = f(z, t) solved by diffrax from t = 0 (data) to t = 1 (latent);
                                log|det| = ∫ tr(df/dz) dt, exact (jacfwd) or Hutchinson's estimate (FFJORD)
"""

import math
from typing import Any

import diffrax
import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from jaxmodels.models.base import Model, check_fields
from jaxmodels.nn import flows as layers
from jaxmodels.ops import flows as F
from jaxmodels.ops.checks import one_of, positive_int, real_in_range


def _check_input_shape(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    shape = tuple(config.input_shape)
    if len(shape) not in (1, 3):
        raise ValueError(f"config.model.input_shape must be (D,) or (H, W, C), got {shape}")
    for i, d in enumerate(shape):
        positive_int(f"config.model.input_shape[{i}]", d)
    return shape


class Flow(Model):
    """Base of the flows: subclasses implement `forward` and `inverse`, and set `input_shape`."""

    input_shape: tuple[int, ...]

    def _check(self, x: jax.Array, name: str = "x") -> None:
        if x.shape[1:] != self.input_shape or x.ndim != len(self.input_shape) + 1:
            raise ValueError(f"{name} must be (batch, {', '.join(map(str, self.input_shape))}), got shape {x.shape}")

    def forward(self, x: jax.Array, *, key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """x (B, *input_shape) -> (z of x's shape, log |det dz/dx| (B,) float32)."""
        raise NotImplementedError

    def inverse(self, z: jax.Array, *, key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """z (B, *input_shape) -> (x of z's shape, log |det dx/dz| (B,) float32)."""
        raise NotImplementedError

    def log_prob(self, x: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        """log p(x) = log N(forward(x); 0, I) + log |det| in nats: x (B, *input_shape) -> (B,) float32."""
        z, log_det = self.forward(x, key=key)
        return F.standard_normal_log_prob(z) + log_det

    def sample(self, key: jax.Array, n: int, temperature: float = 1.0) -> jax.Array:
        """n samples (n, *input_shape) float32: inverse(z), z ~ N(0, temperature^2 I) (Glow §5)."""
        k_z, k_inverse = jax.random.split(key)
        z = temperature * jax.random.normal(k_z, (n, *self.input_shape), jnp.float32)
        return self.inverse(z, key=k_inverse)[0]

    def initialize(self, x: jax.Array) -> None:
        """Sets data-dependent parameters (Glow's actnorm, §3.1) from a batch x (B, *input_shape). Default: none."""
        del x


class Level(nnx.Module):
    """One level of a multi-scale flow: bijectors `pre`, an optional squeeze, bijectors `post`, and optionally
    factoring out half of the channels (RealNVP §3.6), whose density is N(0, I) or `prior`'s learned Gaussian."""

    def __init__(self, pre: list, post: list, *, squeeze: bool, split: bool, prior: Any = None):
        self.pre, self.post = nnx.List(pre), nnx.List(post)
        self.squeeze, self.split, self.prior = squeeze, split, prior

    def transform(self, h: jax.Array, *, inverse: bool = False,
                  initialize: bool = False) -> tuple[jax.Array, jax.Array]:
        """pre, squeeze, post (or their inverses in reverse order): (B, ...) -> (output, log_det (B,))."""
        log_det = jnp.zeros(h.shape[:1], jnp.promote_types(h.dtype, jnp.float32))
        if inverse:
            for b in reversed(self.post):
                h, ld = b(h, inverse=True)
                log_det += ld
            if self.squeeze:
                h = F.squeeze(h, inverse=True)[0]
            for b in reversed(self.pre):
                h, ld = b(h, inverse=True)
                log_det += ld
            return h, log_det
        for b in self.pre:
            h, ld = b.initialize(h) if initialize else b(h)
            log_det += ld
        if self.squeeze:
            h = F.squeeze(h)[0]
        for b in self.post:
            h, ld = b.initialize(h) if initialize else b(h)
            log_det += ld
        return h, log_det


class MultiScaleFlow(Flow):
    """A flow made of `Level`s (NICE and vector RealNVP: one level; image RealNVP and Glow: several)."""

    levels: nnx.List

    def _forward(self, x: jax.Array, initialize: bool) -> tuple[jax.Array, jax.Array]:
        self._check(x)
        log_det = jnp.zeros(x.shape[:1], jnp.promote_types(x.dtype, jnp.float32))
        h, factored = x, []
        for level in self.levels:
            h, ld = level.transform(h, initialize=initialize)
            log_det += ld
            if level.split:
                h, z = F.factor_out(h)
                if level.prior is not None:
                    z, ld = level.prior(z, h)
                    log_det += ld
                factored.append(z)
        for level in reversed(self.levels):  # the latent, put back together into x's shape
            if level.split:
                h = F.factor_in(h, factored.pop())
            if level.squeeze:
                h = F.squeeze(h, inverse=True)[0]
        return h, log_det

    def forward(self, x: jax.Array, *, key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        del key
        return self._forward(x, initialize=False)

    def inverse(self, z: jax.Array, *, key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        del key
        self._check(z, "z")
        factored, h = [], z
        for level in self.levels:  # take the latent apart as `_forward` put it together
            if level.squeeze:
                h = F.squeeze(h)[0]
            if level.split:
                h, part = F.factor_out(h)
                factored.append(part)
        log_det = jnp.zeros(z.shape[:1], jnp.promote_types(z.dtype, jnp.float32))
        for level in reversed(self.levels):
            if level.split:
                part = factored.pop()
                if level.prior is not None:
                    part, ld = level.prior(part, h, inverse=True)
                    log_det += ld
                h = F.factor_in(h, part)
            h, ld = level.transform(h, inverse=True)
            log_det += ld
        return h, log_det


class NICE(MultiScaleFlow):
    """NICE (Dinh, Krueger & Bengio 2014): `num_couplings` additive couplings on alternating odd/even halves of
    the flattened example (§5.1), each m() a ReLU MLP of `num_hidden` layers of `hidden_dim` (the paper's MNIST
    model: 4 couplings, 5 x 1000), then a diagonal scaling (§3.3). Volume-preserving but for the scaling.

    input_shape: (D,) or (H, W, C), D (or H·W·C) >= 2. Parameters:
    num_couplings · (D·h + (num_hidden - 1)(h² + h) + h + h·D + D) + D."""

    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict) -> None:
        """config.model: input_shape, positive sizes."""
        shape = _check_input_shape(config)
        check_fields(config, "config.model", positive=("num_couplings", "hidden_dim", "num_hidden"))
        if math.prod(shape) < 2:
            raise ValueError(f"config.model.input_shape={shape}: NICE couples two halves, it needs >= 2 dims")

    def __init__(self, *, input_shape=(8, 8, 1), num_couplings: int = 4, hidden_dim: int = 256, num_hidden: int = 3,
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.input_shape = tuple(input_shape)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        couplings = [layers.AdditiveCoupling(self.input_shape, mask="alternate", flip=bool(i % 2),
                                             hidden_dim=hidden_dim, num_hidden=num_hidden, **kw)
                     for i in range(num_couplings)]
        scaling = layers.DiagonalScaling(self.input_shape, param_dtype=param_dtype, rngs=rngs)
        self.levels = nnx.List([Level(couplings + [scaling], [], squeeze=False, split=False)])


class RealNVP(MultiScaleFlow):
    """RealNVP (Dinh, Sohl-Dickstein & Bengio 2017) with tanh-bounded log-scales.

    Vectors (input_shape (D,), D even; the 2-D densities of its Figure 1): `num_couplings` affine couplings on
    alternating halves, s and t from one MLP of `num_blocks` hidden layers of `hidden_dim`.
    Images (H, W, C), the multi-scale architecture of §3.6 / §4.1 with `num_scales` scales: each but the last
    is `num_couplings` checkerboard couplings (alternating), a squeeze, `num_couplings` channel couplings
    (alternating), and factoring out half of the channels (a standard-normal latent); the last scale is
    `num_couplings` + 1 checkerboard couplings. s and t: `CouplingConvNet` with `num_blocks` residual blocks of
    `hidden_dim` channels (the paper: 8 blocks of 64 features on CIFAR-10, batch norm, weight norm; none here).
    """

    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict) -> None:
        """config.model: input_shape (D even; or H, W divisible by 2^(num_scales-1) and at least 2 there)."""
        shape = _check_input_shape(config)
        check_fields(config, "config.model", positive=("num_scales", "num_couplings", "hidden_dim"))
        if len(shape) == 1 and shape[0] % 2:
            raise ValueError(f"config.model.input_shape={shape}: RealNVP on vectors needs an even D")
        factor = 2 ** (config.num_scales - 1)
        if len(shape) == 3 and (shape[0] % factor or shape[1] % factor or min(shape[:2]) // factor < 2):
            raise ValueError(f"config.model.input_shape={shape}: num_scales={config.num_scales} needs H and W "
                             f"divisible by {factor} and at least {2 * factor}")

    def __init__(self, *, input_shape=(8, 8, 1), num_scales: int = 2, num_couplings: int = 3, hidden_dim: int = 32,
                 num_blocks: int = 1, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.input_shape = tuple(input_shape)
        kw = dict(hidden_dim=hidden_dim, num_blocks=num_blocks, scale="tanh", dtype=dtype, param_dtype=param_dtype,
                  rngs=rngs)
        if len(self.input_shape) == 1:
            couplings = [layers.AffineCoupling(self.input_shape, mask="channel", flip=bool(i % 2), **kw)
                         for i in range(num_couplings)]
            self.levels = nnx.List([Level(couplings, [], squeeze=False, split=False)])
            return
        h, w, c = self.input_shape
        levels = []
        for _ in range(num_scales - 1):
            pre = [layers.AffineCoupling((h, w, c), mask="checkerboard", flip=bool(i % 2), **kw)
                   for i in range(num_couplings)]
            h, w, c = h // 2, w // 2, 4 * c
            post = [layers.AffineCoupling((h, w, c), mask="channel", flip=bool(i % 2), **kw)
                    for i in range(num_couplings)]
            levels.append(Level(pre, post, squeeze=True, split=True))
            c //= 2
        last = [layers.AffineCoupling((h, w, c), mask="checkerboard", flip=bool(i % 2), **kw)
                for i in range(num_couplings + 1)]
        levels.append(Level(last, [], squeeze=False, split=False))
        self.levels = nnx.List(levels)


class Glow(MultiScaleFlow):
    """Glow (Kingma & Dhariwal 2018, §3, Figure 2): `num_levels` levels, each a squeeze, `num_steps` steps of flow
    (actnorm, invertible 1x1 convolution in LU form, affine coupling of the channel halves with Glow's sigmoid
    scale and a `CouplingConvNet` of `hidden_dim` channels and `num_blocks` residual blocks: 0 is the paper's
    conv3x3-conv1x1-conv3x3), then, except after the last level, factoring out half of the channels with a
    learned Gaussian prior from the kept half (`GaussianPrior`; `learned_prior=False`: N(0, I)). The 1x1
    convolutions start from fixed random rotations, one seed per step. The paper's CIFAR-10 model: L = 3,
    K = 32, 512 channels. Call `initialize(x)` on a data batch before training (actnorm's data-dependent start).
    input_shape: (H, W, C), H and W divisible by 2^num_levels."""

    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict) -> None:
        """config.model: image input_shape with H, W divisible by 2^num_levels."""
        shape = _check_input_shape(config)
        check_fields(config, "config.model", positive=("num_levels", "num_steps", "hidden_dim"))
        factor = 2 ** config.num_levels
        if len(shape) != 3 or shape[0] % factor or shape[1] % factor:
            raise ValueError(f"config.model.input_shape={shape}: Glow with num_levels={config.num_levels} needs an "
                             f"image (H, W, C) with H and W divisible by {factor}")

    def __init__(self, *, input_shape=(8, 8, 1), num_levels: int = 2, num_steps: int = 4, hidden_dim: int = 64,
                 num_blocks: int = 0, learned_prior: bool = True, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.input_shape = tuple(input_shape)
        h, w, c = self.input_shape
        kw = dict(param_dtype=param_dtype, rngs=rngs)
        levels = []
        for level in range(num_levels):
            h, w, c = h // 2, w // 2, 4 * c
            steps = []
            for k in range(num_steps):
                steps += [layers.ActNorm(c, **kw),
                          layers.InvertibleConv1x1(c, seed=level * num_steps + k, param_dtype=param_dtype),
                          layers.AffineCoupling((h, w, c), mask="channel", hidden_dim=hidden_dim,
                                                num_blocks=num_blocks, scale="sigmoid", dtype=dtype, **kw)]
            split = level < num_levels - 1
            prior = layers.GaussianPrior(c // 2, dtype=dtype, **kw) if split and learned_prior else None
            levels.append(Level([], steps, squeeze=True, split=split, prior=prior))
            if split:
                c //= 2
        self.levels = nnx.List(levels)

    def initialize(self, x: jax.Array) -> None:
        """Runs `x` through the flow, setting each actnorm from the activations it receives (Glow §3.1)."""
        self._forward(x, initialize=True)


SOLVERS = {"euler": diffrax.Euler, "heun": diffrax.Heun, "midpoint": diffrax.Midpoint, "bosh3": diffrax.Bosh3,
           "tsit5": diffrax.Tsit5, "dopri5": diffrax.Dopri5}
# Evaluations of the dynamics per step of each solver (its stages; the first-same-as-last ones counted in full).
STAGES = {"euler": 1, "heun": 2, "midpoint": 2, "bosh3": 3, "tsit5": 6, "dopri5": 6}
TRACES = ("auto", "exact", "hutchinson")
NOISES = ("rademacher", "gaussian")
EXACT_TRACE_MAX_DIM = 2  # trace="auto": the exact trace up to this many dimensions, Hutchinson's above


class CNF(Flow):
    """A continuous normalising flow (Chen et al. 2018, §4; FFJORD, Grathwohl et al. 2019): dz/dt = f(z, t),
    f = `CNFDynamics` (ConcatSquash layers of `hidden_dims`, tanh), from the data at t = 0 to the latent at
    t = `time_length`, with

        log p(x) = log N(z(T); 0, I) + ∫_0^T tr(df/dz(t)) dt                      (Chen et al. Theorem 1)

    solved jointly by diffrax (`solver`, SOLVERS): `num_steps` fixed steps when rtol = 0, else an adaptive step
    (PID controller, rtol / atol) of at most `max_steps` steps. Gradients: diffrax's default
    RecursiveCheckpointAdjoint (backpropagation through the solver; reverse mode only). The trace is exact
    (`ops.flows.exact_divergence`, D jacfwd passes) or Hutchinson's unbiased estimate
    (`ops.flows.hutchinson_divergence`, one jvp with `noise` probes fixed over the solve, FFJORD eq. 7; it needs
    `key=`); `trace="auto"` is exact up to EXACT_TRACE_MAX_DIM dimensions. `num_function_evaluations` is the cost
    of one fixed-step solve. input_shape: any (flattened for the dynamics).
    """

    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict) -> None:
        """config.model: solver, trace, noise, positive sizes, rtol/atol >= 0."""
        _check_input_shape(config)
        check_fields(config, "config.model", {"solver": SOLVERS, "trace": TRACES, "noise": NOISES},
                     positive=("num_steps", "max_steps"))
        for i, d in enumerate(config.hidden_dims):
            positive_int(f"config.model.hidden_dims[{i}]", d)
        real_in_range("config.model.time_length", config.time_length, 0.0, include_low=False)
        real_in_range("config.model.rtol", config.rtol, 0.0)
        real_in_range("config.model.atol", config.atol, 0.0)

    def __init__(self, *, input_shape=(2,), hidden_dims=(64, 64, 64), solver: str = "heun", num_steps: int = 8,
                 rtol: float = 0.0, atol: float = 1e-5, max_steps: int = 1000, trace: str = "auto",
                 noise: str = "rademacher", time_length: float = 1.0, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        one_of("solver", solver, SOLVERS)
        one_of("trace", trace, TRACES)
        one_of("noise", noise, NOISES)
        self.input_shape = tuple(input_shape)
        self.solver, self.num_steps, self.rtol, self.atol, self.max_steps = solver, num_steps, rtol, atol, max_steps
        self.noise, self.time_length = noise, time_length
        dim = math.prod(self.input_shape)
        self.trace = ("exact" if dim <= EXACT_TRACE_MAX_DIM else "hutchinson") if trace == "auto" else trace
        self.dynamics = layers.CNFDynamics(dim, tuple(hidden_dims), dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    @property
    def num_function_evaluations(self) -> int:
        """Evaluations of f in one fixed-step solve (num_steps x the solver's stages, STAGES)."""
        return self.num_steps * STAGES[self.solver]

    def _solve(self, z: jax.Array, t0: float, t1: float, key: jax.Array | None,
               with_log_det: bool = True) -> tuple[jax.Array, jax.Array]:
        """Integrates (z, ∫ tr df/dz dt) from t0 to t1 (t1 < t0 runs backwards). Returns (z(t1), the integral)."""
        graphdef, state = nnx.split(self.dynamics)
        noise = None
        if with_log_det and self.trace == "hutchinson":
            if key is None:
                raise ValueError("trace='hutchinson' needs key= for its probe vectors")
            noise = (jax.random.rademacher(key, z.shape, z.dtype) if self.noise == "rademacher"
                     else jax.random.normal(key, z.shape, z.dtype))

        def vector_field(t, y, args):
            params, probe = args
            f = lambda h: nnx.merge(graphdef, params)(h, t)
            if not with_log_det:
                return f(y[0]), jnp.zeros_like(y[1])
            if probe is None:
                return F.exact_divergence(f, y[0])
            return F.hutchinson_divergence(f, y[0], probe)

        if self.rtol > 0:
            controller, dt0 = diffrax.PIDController(rtol=self.rtol, atol=self.atol), None
        else:
            controller, dt0 = diffrax.ConstantStepSize(), (t1 - t0) / self.num_steps
        y0 = (z, jnp.zeros(z.shape[:1], jnp.promote_types(z.dtype, jnp.float32)))
        solution = diffrax.diffeqsolve(diffrax.ODETerm(vector_field), SOLVERS[self.solver](), t0, t1, dt0, y0,
                                       args=(state, noise), stepsize_controller=controller,
                                       saveat=diffrax.SaveAt(t1=True), max_steps=self.max_steps)
        return solution.ys[0][-1], solution.ys[1][-1]

    def forward(self, x: jax.Array, *, key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        self._check(x)
        return self._solve(x, 0.0, self.time_length, key)

    def inverse(self, z: jax.Array, *, key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        self._check(z, "z")
        return self._solve(z, self.time_length, 0.0, key)

    def sample(self, key: jax.Array, n: int, temperature: float = 1.0) -> jax.Array:
        """n samples (n, *input_shape): the ODE backwards from z ~ N(0, temperature^2 I), without the trace."""
        z = temperature * jax.random.normal(key, (n, *self.input_shape), jnp.float32)
        return self._solve(z, self.time_length, 0.0, None, with_log_det=False)[0]
