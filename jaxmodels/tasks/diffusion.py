"""Diffusion and flow-matching training of denoisers on 2-D toys, 8x8 digits or synthetic latents, and sampling.

One task, three objectives of `jaxmodels.ops.diffusion` (config.diffusion.objective):

  "ddpm"  DDPM (Ho et al. 2020) on a T-step beta schedule, eps / x0 / v target (Salimans & Ho 2022),
          optional min-SNR-gamma weighting (Hang et al. 2023); samplers "ddpm" (ancestral) and "ddim" (eta = 0).
  "edm"   EDM (Karras et al. 2022): preconditioned denoiser, ln sigma ~ N(P_mean, P_std^2), lambda(sigma)
          weighting; samplers "heun" and "euler" on EDM's rho = 7 grid.
  "flow"  rectified flow / conditional flow matching (Liu et al. 2022; Lipman et al. 2023) with uniform or
          logit-normal t (SD3, Esser et al. 2024); samplers "euler" and "heun"; reflow (Liu et al. 2022, §2.3)
          by training on coupled (noise, sample) pairs stored in data.pairs_path.

Networks are called as net(x, c, labels) (`MLPDenoiser`, `UNet`, `DiT`) with the noise conditioning c of
`noise_conditioning`: the integer DDPM timestep, time_scale·ln(sigma)/4 (EDM's c_noise) or time_scale·t, all
spanning roughly [0, 1000] as the sinusoidal timestep embedding expects. Class-conditional models are trained
with label dropout to the null label num_classes (classifier-free guidance, Ho & Salimans 2022) and sampled with
`cfg_denoiser` at any guidance scale.

Randomness of the loss comes from the batch: train and eval batches carry one uint32 seed per example, a pure
function of (data seed, step), so the loss is a pure function of (model, batch) and independent of sharding.
"""

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from jaxmodels.data import digits, toy2d
from jaxmodels.models.classifier import DigitClassifier
from jaxmodels.ops import diffusion as D
from jaxmodels.ops.checks import one_of
from jaxmodels.ops.losses import softmax_cross_entropy
from jaxmodels.tasks.base import Task
from jaxmodels.tasks.fit import fit
from jaxmodels.tasks.metrics import frechet_distance

OBJECTIVES = ("ddpm", "edm", "flow")
SAMPLERS = {"ddpm": ("ddpm", "ddim"), "edm": ("heun", "euler"), "flow": ("euler", "heun")}
IMAGE_DATA = ("digits", "synthetic_latents")
DATA = tuple(toy2d.SAMPLERS) + IMAGE_DATA
TOY_MODELS = ("mlp_denoiser",)
IMAGE_MODELS = ("unet", "dit")


@dataclasses.dataclass(frozen=True)
class DiffusionSpec:
    """The objective's constants (config.diffusion plus the model's num_classes); hashable, so it can key
    compiled samplers. Fields are those of config.diffusion (see `experiments/configs/diffusion_toy2d.py`)."""
    objective: str = "flow"
    prediction: str = "eps"
    min_snr_gamma: float = 0.0
    num_timesteps: int = 1000
    beta_schedule: str = "cosine"
    sigma_data: float = 0.5
    P_mean: float = -1.2
    P_std: float = 1.2
    t_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0
    time_scale: float = 1000.0
    label_dropout: float = 0.1
    num_classes: int = 0

    def __post_init__(self):
        for name, valid in (("objective", OBJECTIVES), ("prediction", D.DDPM_TARGETS),
                            ("t_sampling", D.T_SAMPLINGS), ("beta_schedule", D.BETA_SCHEDULES)):
            one_of(f"config.diffusion.{name}", getattr(self, name), valid)
        if not 0.0 <= self.label_dropout <= 1.0:
            raise ValueError(f"config.diffusion.label_dropout must be in [0, 1], got {self.label_dropout}")
        if self.min_snr_gamma < 0 or self.sigma_data <= 0 or self.time_scale <= 0 or self.num_timesteps < 1:
            raise ValueError("config.diffusion needs min_snr_gamma >= 0, sigma_data > 0, time_scale > 0 and "
                             f"num_timesteps >= 1, got {self.min_snr_gamma}, {self.sigma_data}, {self.time_scale}, "
                             f"{self.num_timesteps}")

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "DiffusionSpec":
        fields = dict(config.diffusion)
        unknown = set(fields) - {f.name for f in dataclasses.fields(cls)} | ({"num_classes"} & set(fields))
        if unknown:
            raise ValueError(f"config.diffusion has unknown fields {sorted(unknown)}; valid: "
                             f"{sorted(f.name for f in dataclasses.fields(cls) if f.name != 'num_classes')}")
        return cls(**fields, num_classes=int(config.model.get("num_classes", 0)))

    def alphas_cumprod(self) -> jax.Array:
        """(num_timesteps,) abar_t of the DDPM schedule."""
        return D.alphas_cumprod(D.beta_schedule(self.beta_schedule, self.num_timesteps))


def noise_conditioning(spec: DiffusionSpec, level: jax.Array) -> jax.Array:
    """What the network sees of the noise level, (B,) float32: the DDPM timestep t in 0..T-1 as is, EDM's
    c_noise = ln(sigma)/4 (given as `level`) times time_scale, or the flow time t in [0, 1] times time_scale."""
    level = jnp.asarray(level, jnp.float32)
    return level if spec.objective == "ddpm" else spec.time_scale * level


def network_fn(model: nnx.Module, spec: DiffusionSpec):
    """(x (B, ...), level (B,), labels (B,) int | None) -> (B, ...) float32: the model on the objective's own
    noise level (DDPM timestep, EDM c_noise, flow t), conditioned through `noise_conditioning`."""
    return lambda x, level, labels: model(x, noise_conditioning(spec, level), labels)


def _draw_levels(spec: DiffusionSpec, keys: jax.Array) -> jax.Array:
    """One noise level per example key (B,) -> (B,): DDPM timestep int32, EDM sigma or flow t float32."""
    if spec.objective == "ddpm":
        return jax.vmap(lambda k: jax.random.randint(k, (), 0, spec.num_timesteps))(keys)
    if spec.objective == "edm":
        return jax.vmap(lambda k: D.edm_sigma_sample(k, (), spec.P_mean, spec.P_std))(keys)
    if spec.t_sampling == "uniform":
        u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys)
    else:
        u = jax.vmap(lambda k: D.logit_normal_timesteps(k, (), spec.logit_mean, spec.logit_std))(keys)
    return D.shift_timesteps(u, spec.shift)


def example_randomness(spec: DiffusionSpec, batch: dict) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """(levels (B,), noise (B, ...) float32, labels after dropout (B,) | None) drawn from batch["seed"] (B,) uint32.

    Example i's key k_i = jax.random.key(seed_i) splits into (k_level, k_noise, k_drop): the level from k_level
    (`_draw_levels`), eps = normal(k_noise) unless the batch holds "noise" (reflow pairs), and the label replaced
    by the null label num_classes with probability label_dropout from k_drop (`ops.diffusion.drop_labels`).
    """
    x0 = batch["inputs"]
    keys = jax.vmap(lambda s: jax.random.split(jax.random.key(s), 3))(batch["seed"])
    levels = _draw_levels(spec, keys[:, 0])
    if "noise" in batch:
        noise = batch["noise"]
    else:
        noise = jax.vmap(lambda k: jax.random.normal(k, x0.shape[1:], jnp.float32))(keys[:, 1]).astype(x0.dtype)
    labels = batch.get("labels")
    if labels is not None and spec.label_dropout > 0:
        labels = jax.vmap(lambda k, y: D.drop_labels(k, y[None], spec.label_dropout, spec.num_classes)[0])(
            keys[:, 2], labels)
    return levels, noise, labels


def diffusion_loss(model: nnx.Module, batch: dict, *, spec: DiffusionSpec) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean over the batch of the objective's per-example loss (`ops.diffusion.ddpm_loss`, `edm_loss` or
    `flow_matching_loss`) at the levels and noise of `example_randomness`.

    batch: {"inputs": float32 (B, ...) data x0, "seed": uint32 (B,), optional "labels": int32 (B,),
    optional "noise": float32 (B, ...) (reflow's coupled noise)}. Returns (loss f32, {"loss"}).
    """
    x0 = batch["inputs"]
    levels, noise, labels = example_randomness(spec, batch)
    net = network_fn(model, spec)
    if spec.objective == "ddpm":
        per_example = D.ddpm_loss(lambda x, t: net(x, t, labels), x0, None, spec.alphas_cumprod(),
                                  target=spec.prediction, min_snr_gamma=spec.min_snr_gamma or None, t=levels,
                                  noise=noise)
    elif spec.objective == "edm":
        denoiser = D.edm_denoiser(lambda x, c: net(x, c, labels), spec.sigma_data)
        per_example = D.edm_loss(denoiser, x0, None, sigma_data=spec.sigma_data, sigma=levels, noise=noise)
    else:
        per_example = D.flow_matching_loss(lambda x, t: net(x, t, labels), x0, None, t=levels, noise=noise)
    loss = jnp.mean(per_example)
    return loss, {"loss": loss}


def sample(model: nnx.Module, spec: DiffusionSpec, noise: jax.Array, labels: jax.Array | None = None, *,
           sampler: str, num_steps: int, guidance_scale: float = 1.0, key: jax.Array | None = None) -> jax.Array:
    """Samples from noise (B, ...) standard normal with `sampler` in `num_steps` network evaluations per step
    (Heun: two, except EDM's last): "ddpm" / "ddim" on `spaced_timesteps` of the DDPM schedule, EDM "heun" /
    "euler" on `edm_sigmas(num_steps)`, flow "euler" / "heun" on `flow_timesteps(num_steps, shift)`.

    labels: (B,) int classes for a class-conditional model (None: unconditional or null label);
    guidance_scale w: classifier-free guidance uncond + w (cond - uncond) (`cfg_denoiser`; w = 1 is the plain
    conditional model, and then one network call per evaluation). key: required by "ddpm".
    Returns (B, ...) float32 samples.
    """
    if sampler not in SAMPLERS[spec.objective]:
        raise ValueError(f"sampler {sampler!r} does not fit objective {spec.objective!r}; valid: "
                         f"{list(SAMPLERS[spec.objective])}")
    net = network_fn(model, spec)
    if spec.objective == "flow":
        def conditional(x, t, y):
            return net(x, t, y)
    elif spec.objective == "ddpm":
        table = spec.alphas_cumprod()

        def conditional(x, sigma, y):
            return D.denoiser_from_model(lambda xt, c: net(xt, c, y), prediction=spec.prediction, path="vp",
                                         noise_conditioning=lambda s: D.sigma_to_timestep(s, table))(x, sigma)
    else:
        def conditional(x, sigma, y):
            return D.edm_denoiser(lambda xs, c: net(xs, c, y), spec.sigma_data)(x, sigma)

    if labels is None or (isinstance(guidance_scale, (int, float)) and guidance_scale == 1.0):
        fn = lambda x, s: conditional(x, s, labels)
    else:
        fn = D.cfg_denoiser(conditional, labels, spec.num_classes, guidance_scale)
    if spec.objective == "flow":
        return D.rectified_flow_sample(fn, noise, D.flow_timesteps(num_steps, spec.shift), solver=sampler)
    if spec.objective == "edm":
        return D.edm_sample(fn, noise, D.edm_sigmas(num_steps), solver=sampler)
    steps = spec.alphas_cumprod()[D.spaced_timesteps(spec.num_timesteps, num_steps)]
    if sampler == "ddpm":
        return D.ddpm_sample(fn, noise, steps, key=key)
    return D.ddim_sample(fn, noise, steps, eta=0.0)


@functools.lru_cache(maxsize=64)
def _compiled_sampler(graphdef, spec: DiffusionSpec, sampler: str, num_steps: int, guided: bool):
    def run(state, noise, labels, guidance_scale, key):
        return sample(nnx.merge(graphdef, state), spec, noise, labels, sampler=sampler, num_steps=num_steps,
                      guidance_scale=guidance_scale if guided else 1.0, key=key)
    return jax.jit(run)


def generate(model: nnx.Module, spec: DiffusionSpec, key: jax.Array, shape, labels=None, *, sampler: str,
             num_steps: int, guidance_scale: float = 1.0) -> np.ndarray:
    """Jitted `sample` from noise of `shape` drawn with `key`, compiled once per (model structure, spec, sampler,
    num_steps); for a class-conditional model the guidance scale is a traced argument (every scale, 1 included,
    runs the two-branch `cfg_denoiser`), so sweeping it does not recompile. Returns float32 NumPy of `shape`."""
    k_noise, k_sample = jax.random.split(key)
    graphdef, state = nnx.split(model)
    run = _compiled_sampler(graphdef, spec, sampler, int(num_steps), labels is not None)
    noise = jax.random.normal(k_noise, tuple(shape), jnp.float32)
    labels = None if labels is None else jnp.asarray(labels, jnp.int32)
    return np.asarray(run(state, noise, labels, jnp.float32(guidance_scale), k_sample))


# ----------------------------------------------------------------------------------------------
# Sample quality of digits: a classifier's accuracy and the Fréchet distance of its features
# ----------------------------------------------------------------------------------------------


def fit_digit_classifier(data_dir: str | None = None, *, seed: int = 0, num_steps: int = 600, batch_size: int = 64,
                         learning_rate: float = 2e-3) -> DigitClassifier:
    """Trains a `DigitClassifier` (initialised from `seed`) by `fit` on `num_steps` batches of `batch_size` from
    the digits train split (`digits.batches` of `seed`): mean cross entropy, AdamW with weight decay 1e-4 and a
    cosine decay of `learning_rate` to 0 over `num_steps` (~97% test accuracy with the defaults). Returns the
    trained model."""

    def loss_fn(model, batch):
        return jnp.mean(softmax_cross_entropy(model(batch["inputs"]), batch["labels"])), {}

    optimizer = optax.adamw(optax.cosine_decay_schedule(learning_rate, num_steps), weight_decay=1e-4)
    batches = digits.batches("train", seed, batch_size, data_dir=data_dir)
    return fit(DigitClassifier(rngs=nnx.Rngs(seed)), loss_fn, batches, num_steps=num_steps, optimizer=optimizer)


def digit_sample_metrics(classifier: DigitClassifier, samples: np.ndarray, labels: np.ndarray,
                         reference: np.ndarray) -> dict[str, float]:
    """Quality of generated digits (B, 8, 8, 1) in [-1, 1] conditioned on `labels` (B,): the classifier's
    accuracy w.r.t. the conditioning labels, and the Fréchet distance between its features of the samples
    and of `reference` real digits (N, 8, 8, 1) (`frechet_distance`)."""
    samples = np.clip(np.asarray(samples, np.float32), -1.0, 1.0)
    features = jax.jit(classifier.features)
    logits = np.asarray(classifier.head(features(jnp.asarray(samples))))
    return {"accuracy": float(np.mean(np.argmax(logits, -1) == np.asarray(labels))),
            "frechet_distance": frechet_distance(np.asarray(features(jnp.asarray(samples))),
                                                 np.asarray(features(jnp.asarray(reference))))}


# ----------------------------------------------------------------------------------------------
# The task
# ----------------------------------------------------------------------------------------------


def example_seeds(seed: int, step: int, global_batch_size: int) -> np.ndarray:
    """The global batch's per-example uint32 loss seeds at `step`: a pure function of (seed, step)."""
    return np.random.default_rng([seed, step, 0x5EED]).integers(0, 2**32, global_batch_size, dtype=np.uint32)


class Diffusion(Task):
    """Trains a denoiser by config.diffusion.objective (see the module docstring) and samples from it.

    Config sections used: model (`make_model`: "mlp_denoiser" for the 2-D toys, "unet" or "dit" for images;
    num_classes 10 makes a digits model class-conditional), data (name: a toy of `toy2d.SAMPLERS`,
    "digits" or "synthetic_latents" (standard-normal latents of the model's input_size x input_size x
    in_channels with random labels, for benchmarks); global_batch_size, seed, eval_seed, eval_batches,
    data_dir, pairs_path: an .npz of reflow pairs {"inputs", "noise"[, "labels"]} to train on instead),
    diffusion (`DiffusionSpec`), sample (sampler, num_steps, num_samples, guidance_scale).
    """

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        d, m = config.data, config.model
        one_of("config.data.name", d.name, DATA)
        models = TOY_MODELS if d.name in toy2d.SAMPLERS else IMAGE_MODELS
        if m.name not in models:
            raise ValueError(f"config.model.name={m.name!r} does not fit data {d.name!r}; valid: {list(models)}")
        self.spec = DiffusionSpec.from_config(config)
        if d.name in toy2d.SAMPLERS and self.spec.num_classes:
            raise ValueError(f"config.model.num_classes={self.spec.num_classes}: the 2-D toys have no labels, set 0")
        if d.name == "digits" and self.spec.num_classes not in (0, digits.NUM_CLASSES):
            raise ValueError(f"config.model.num_classes must be 0 or {digits.NUM_CLASSES} for digits, "
                             f"got {self.spec.num_classes}")
        if d.get("pairs_path") and self.spec.objective != "flow":
            raise ValueError("config.data.pairs_path (reflow pairs) needs config.diffusion.objective='flow', "
                             f"got {self.spec.objective!r}")
        one_of(f"config.sample.sampler (objective {self.spec.objective!r})", config.sample.sampler,
               SAMPLERS[self.spec.objective])
        if d.eval_seed == d.seed:
            raise ValueError(f"config.data.eval_seed must differ from config.data.seed={d.seed}")

    def loss(self, model: nnx.Module, batch: dict) -> tuple[jax.Array, dict[str, jax.Array]]:
        """`diffusion_loss` of the configured objective."""
        return diffusion_loss(model, batch, spec=self.spec)

    @property
    def example_shape(self) -> tuple[int, ...]:
        name, m = self.config.data.name, self.config.model
        if name in toy2d.SAMPLERS:
            return (m.in_features,)
        if name == "digits":
            return (8, 8, 1)
        return (m.input_size, m.input_size, m.in_channels)

    @property
    def conditional(self) -> bool:
        return self.spec.num_classes > 0

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        """The global batch: inputs float32 (B, *example_shape), seed uint32 (B,), labels int32 (B,) for a
        class-conditional model, noise float32 like inputs when training on reflow pairs."""
        b = self.config.data.global_batch_size
        batch = {"inputs": jax.ShapeDtypeStruct((b, *self.example_shape), jnp.float32),
                 "seed": jax.ShapeDtypeStruct((b,), jnp.uint32)}
        if self.conditional:
            batch["labels"] = jax.ShapeDtypeStruct((b,), jnp.int32)
        if self.config.data.get("pairs_path"):
            batch["noise"] = jax.ShapeDtypeStruct((b, *self.example_shape), jnp.float32)
        return batch

    def _batch(self, seed: int, step: int, process_index: int, process_count: int, split: str,
               pairs: bool) -> dict:
        """This process's rows of the global batch of (seed, step); from the reflow pairs when `pairs`."""
        d = self.config.data
        b = d.global_batch_size
        rows = slice(process_index * b // process_count, (process_index + 1) * b // process_count)
        if pairs:
            stored = _load_pairs(d.pairs_path)
            idx = np.random.default_rng([seed, step]).integers(0, len(stored["inputs"]), b)[rows]
            out = {k: stored[k][idx] for k in ("inputs", "noise", "labels") if k in stored}
        elif d.name in toy2d.SAMPLERS:
            out = {"inputs": np.asarray(toy2d.sample(d.name, jax.random.fold_in(jax.random.key(seed), step), b))[rows]}
        elif d.name == "synthetic_latents":
            rng = np.random.default_rng([seed, step])
            out = {"inputs": rng.standard_normal((b, *self.example_shape), np.float32)[rows],
                   "labels": rng.integers(0, max(self.spec.num_classes, 1), b).astype(np.int32)[rows]}
        else:
            out = digits.batch(split, seed, step, b, process_index, process_count, data_dir=d.data_dir)
        if not self.conditional:
            out.pop("labels", None)
        out["seed"] = example_seeds(seed, step, b)[rows]
        return out

    def train_batches(self, start_step: int, process_index: int, process_count: int):
        d = self.config.data
        pairs = bool(d.get("pairs_path"))
        return (self._batch(d.seed, step, process_index, process_count, "train", pairs)
                for step in itertools.count(start_step))

    def eval_batches(self) -> list[dict]:
        """data.eval_batches fixed batches of data.eval_seed (the test split for digits; fresh samples for the
        toys), with fixed loss seeds, so that eval losses are comparable across steps and runs. When training
        on reflow pairs the eval batches still hold data, with independent standard-normal "noise" (the
        ordinary flow-matching loss)."""
        d = self.config.data
        split = "test" if d.name == "digits" else "train"
        batches = [self._batch(d.eval_seed, i, 0, 1, split, pairs=False) for i in range(d.eval_batches)]
        if d.get("pairs_path"):
            for i, b in enumerate(batches):
                b["noise"] = np.random.default_rng([d.eval_seed, i, 1]).standard_normal(b["inputs"].shape, np.float32)
        return batches

    def _reference(self, n: int) -> np.ndarray:
        d = self.config.data
        if d.name in toy2d.SAMPLERS:
            return np.asarray(toy2d.sample(d.name, d.eval_seed + 1, n))
        images, _, _ = digits.load_split("test", d.data_dir)
        return digits.to_unit_range(images)

    def baseline(self) -> dict[str, float]:
        """Toys: the sliced W2 between two independent data samples of sample.num_samples points (the
        finite-sample floor of `sample`'s distance). Digits: the pixel-space Fréchet distance between the train
        and test splits."""
        d, n = self.config.data, self.config.sample.num_samples
        if d.name in toy2d.SAMPLERS:
            other = np.asarray(toy2d.sample(d.name, d.eval_seed + 2, n))
            return {"data_sliced_w2": float(toy2d.sliced_wasserstein2(self._reference(n), other, jax.random.key(0)))}
        if d.name == "digits":
            train, _, _ = digits.load_split("train", d.data_dir)
            return {"data_pixel_frechet": frechet_distance(digits.to_unit_range(train).reshape(len(train), -1),
                                                           self._reference(0).reshape(-1, 64))}
        return {}

    def sample(self, model: nnx.Module, seed: int) -> str:
        """Draws sample.num_samples samples with the configured sampler; summarises their distance to data:
        sliced W2 and MMD^2 to fresh toy samples, or the pixel-space Fréchet distance to the digits test split
        (classes cycling 0..9), or the samples' mean and std for synthetic latents."""
        s, d = self.config.sample, self.config.data
        n = s.num_samples
        labels = np.arange(n) % self.spec.num_classes if self.conditional else None
        x = generate(model, self.spec, jax.random.key(seed), (n, *self.example_shape), labels, sampler=s.sampler,
                     num_steps=s.num_steps, guidance_scale=s.guidance_scale)
        head = f"{n} samples, {self.spec.objective} / {s.sampler}, {s.num_steps} steps"
        if d.name in toy2d.SAMPLERS:
            ref = self._reference(n)
            sw2 = float(toy2d.sliced_wasserstein2(x, ref, jax.random.key(0)))
            return f"{head}: sliced W2 to data {sw2:.4f}, MMD^2 {float(toy2d.mmd_squared(x, ref)):.5f}"
        if d.name == "digits":
            fd = frechet_distance(np.clip(x, -1, 1).reshape(n, -1), self._reference(0).reshape(-1, 64))
            return f"{head}, guidance {s.guidance_scale}: pixel Fréchet distance to the test split {fd:.3f}"
        return f"{head}: mean {x.mean():.3f}, std {x.std():.3f}"


@functools.lru_cache(maxsize=4)
def _load_pairs(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        pairs = {k: np.asarray(f[k]) for k in f.files}
    if "inputs" not in pairs or "noise" not in pairs or pairs["inputs"].shape != pairs["noise"].shape:
        raise ValueError(f"reflow pairs {path!r} need arrays 'inputs' and 'noise' of one shape, got "
                         f"{ {k: v.shape for k, v in pairs.items()} }")
    return pairs
