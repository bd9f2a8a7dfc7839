"""Sequence tasks of the state-space-model papers: token-to-token problems with a loss mask (selective
copying and induction heads, Gu & Dao 2023 §4.1) and sequence classification (sequential 8x8 digits,
the small cousin of S4's sequential MNIST, Gu et al. 2022 §4)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from jaxmodels.data import digits, synthetic
from jaxmodels.ops.losses import softmax_cross_entropy
from jaxmodels.tasks.base import Task
from jaxmodels.tasks.classification import padded_eval_batches, weighted_classification_loss

# data.name -> the data-section fields passed to its generator in jaxmodels.data.synthetic.
TOKEN_TASK_OPTIONS = {"selective_copying": ("seq_len", "num_tokens", "vocab_size"),
                      "induction_heads": ("seq_len", "vocab_size")}
# Models with the language-model interface tokens (batch, length) -> logits (batch, length, vocab).
CAUSAL_TOKEN_MODELS = ("decoder_lm", "mamba_lm", "sequence_tagger")


def masked_token_loss(model: nnx.Module, batch: dict) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Cross entropy and accuracy on the masked positions of a token-to-token batch.

    batch: {"inputs": int (B, L), "targets": int (B, L), "mask": bool (B, L)} (jaxmodels.data.synthetic);
    model(inputs) -> logits (B, L, V). With m = mask: loss = Σ m·CE / Σ m (nats), accuracy =
    Σ m·[argmax logits = target] / Σ m, both float32 scalars (0 when the mask is empty).
    Returns (loss, {"loss", "accuracy"}).
    """
    logits = model(batch["inputs"])
    if logits.shape[:2] != batch["targets"].shape:
        raise ValueError(f"model output {logits.shape} must be targets {batch['targets'].shape} + (vocab,)")
    mask = batch["mask"].astype(jnp.float32)
    count = jnp.maximum(jnp.sum(mask), 1.0)
    loss = jnp.sum(softmax_cross_entropy(logits, batch["targets"]) * mask) / count
    correct = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32)
    return loss, {"loss": loss, "accuracy": jnp.sum(correct * mask) / count}


class SequenceTokens(Task):
    """Token-to-token sequence problems with a loss mask: selective copying and induction heads
    (Gu & Dao 2023, "Mamba", §4.1, Tables 1-2), for any causal token model.

    Config sections used: model (`jaxmodels.models.make_model`; one of CAUSAL_TOKEN_MODELS: "decoder_lm"
    with any attention kind, "mamba_lm", or "sequence_tagger" for an S4D/S4/LRU stack; its vocab_size, and
    a sequence_tagger's num_classes, must equal data.vocab_size), data (name in TOKEN_TASK_OPTIONS,
    seq_len, vocab_size, num_tokens for selective copying, global_batch_size, seed, eval_seed,
    eval_batches). Metrics: masked loss and accuracy (`masked_token_loss`); `evaluate_lengths` measures
    length generalisation.
    """

    def __init__(self, config: ml_collections.ConfigDict):
        d, m = config.data, config.model
        if d.name not in TOKEN_TASK_OPTIONS:
            raise ValueError(f"config.data.name={d.name!r} is not a token task; valid: {sorted(TOKEN_TASK_OPTIONS)}")
        if m.name not in CAUSAL_TOKEN_MODELS:
            raise ValueError(f"config.model.name={m.name!r} cannot emit per-position logits; valid: "
                             f"{list(CAUSAL_TOKEN_MODELS)}")
        if m.vocab_size != d.vocab_size:
            raise ValueError(f"config.model.vocab_size={m.vocab_size} must equal config.data.vocab_size={d.vocab_size}")
        if m.name == "sequence_tagger" and m.num_classes != d.vocab_size:
            raise ValueError(f"config.model.num_classes={m.num_classes} must equal config.data.vocab_size="
                             f"{d.vocab_size} (the tagger predicts a token at each position)")
        super().__init__(config)

    loss = staticmethod(masked_token_loss)

    def _options(self, seq_len: int | None = None) -> dict:
        d = self.config.data
        options = {k: d[k] for k in TOKEN_TASK_OPTIONS[d.name]}
        if seq_len is not None:
            options["seq_len"] = seq_len
        return options

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        """The global batch: inputs, targets int32 and mask bool, each (global_batch_size, seq_len)."""
        shape = (self.config.data.global_batch_size, self.config.data.seq_len)
        return {"inputs": jax.ShapeDtypeStruct(shape, jnp.int32), "targets": jax.ShapeDtypeStruct(shape, jnp.int32),
                "mask": jax.ShapeDtypeStruct(shape, jnp.bool_)}

    @property
    def tokens_per_example(self) -> int:
        return self.config.data.seq_len

    def train_batches(self, start_step: int, process_index: int, process_count: int):
        d = self.config.data
        return synthetic.batches(d.name, start_step, seed=d.seed, global_batch_size=d.global_batch_size,
                                 process_index=process_index, process_count=process_count, **self._options())

    def eval_batches(self, seq_len: int | None = None, batch_size: int | None = None) -> list[dict]:
        """data.eval_batches fixed batches drawn with data.eval_seed (held out from training's data.seed),
        at `seq_len` (default data.seq_len) with `batch_size` rows (default data.global_batch_size)."""
        d = self.config.data
        if d.eval_seed == d.seed:
            raise ValueError(f"config.data.eval_seed must differ from config.data.seed={d.seed}")
        source = synthetic.batches(d.name, seed=d.eval_seed, global_batch_size=batch_size or d.global_batch_size,
                                   **self._options(seq_len))
        return [next(source) for _ in range(d.eval_batches)]

    def evaluate_lengths(self, model: nnx.Module, lengths, batch_size: int | None = None) -> dict[int, dict]:
        """Length generalisation: {length: {"loss", "accuracy"}} of `model` on `eval_batches(length,
        batch_size)` for each length (Mamba paper Table 2 trains induction heads at 256 and tests longer)."""
        graphdef, state = nnx.split(model)
        metrics = jax.jit(lambda s, b: masked_token_loss(nnx.merge(graphdef, s), b)[1])
        out = {}
        for length in lengths:
            values = [jax.device_get(metrics(state, b)) for b in self.eval_batches(length, batch_size)]
            out[int(length)] = {k: float(np.mean([v[k] for v in values])) for k in values[0]}
        return out

    def baseline(self) -> dict[str, float]:
        """Accuracy of a constant guess: 1 / (vocab_size - 2) data tokens (copying), 1 / (vocab_size - 1)
        ordinary tokens (induction heads)."""
        v = self.config.data.vocab_size
        return {"chance_accuracy": 1.0 / (v - 2 if self.config.data.name == "selective_copying" else v - 1)}

    def sample(self, model: nnx.Module, seed: int) -> str:
        """Targets and the model's predictions at the masked positions of the first eval example."""
        del seed  # deterministic: argmax predictions on a fixed example
        batch = self.eval_batches(batch_size=1)[0]
        predicted = np.asarray(jnp.argmax(model(jnp.asarray(batch["inputs"])), axis=-1))[0]
        mask = batch["mask"][0]
        return f"target:    {batch['targets'][0][mask].tolist()}\npredicted: {predicted[mask].tolist()}"


class SequenceClassification(Task):
    """Sequential digits: scikit-learn's 8x8 digits read pixel by pixel as length-64 sequences of one
    feature, classified by a `SequenceClassifier` (S4/S4D/LRU/Mamba stack; the setting of S4's sequential
    MNIST, Gu et al. 2022, at 64 instead of 784 steps). Evaluation is on the whole fixed test split.

    Config sections used: model ("sequence_classifier" with in_features=1, num_classes=10), data
    (name="sklearn_digits", data_dir, global_batch_size, seed). Metrics: loss, accuracy.
    """

    def __init__(self, config: ml_collections.ConfigDict):
        d, m = config.data, config.model
        if d.name != digits.NAME:
            raise ValueError(f"config.data.name={d.name!r}: sequence_classification reads {digits.NAME!r}")
        if m.name != "sequence_classifier":
            raise ValueError(f"config.model.name={m.name!r}: sequence_classification needs 'sequence_classifier'")
        if m.in_features != 1 or m.num_classes != digits.NUM_CLASSES:
            raise ValueError(f"config.model needs in_features=1 and num_classes={digits.NUM_CLASSES} for pixel "
                             f"sequences, got in_features={m.in_features}, num_classes={m.num_classes}")
        super().__init__(config)

    loss = staticmethod(weighted_classification_loss)

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        """The global batch: inputs float32 (B, 64, 1), labels int32 (B,), weights float32 (B,)."""
        b = self.config.data.global_batch_size
        return {"inputs": jax.ShapeDtypeStruct((b, 64, 1), jnp.float32),
                "labels": jax.ShapeDtypeStruct((b,), jnp.int32), "weights": jax.ShapeDtypeStruct((b,), jnp.float32)}

    @property
    def tokens_per_example(self) -> int:
        return 64

    def train_batches(self, start_step: int, process_index: int, process_count: int):
        d = self.config.data
        source = digits.batches("train", d.seed, d.global_batch_size, process_index, process_count,
                                start_step=start_step, view="sequence", data_dir=d.data_dir)
        return ({**b, "weights": np.ones(len(b["labels"]), np.float32)} for b in source)

    def eval_batches(self) -> list[dict]:
        """The whole test split (297 examples) in order, padded with weight-0 rows to whole batches
        (`padded_eval_batches`): the mean of the batch metrics is the exact test mean."""
        d = self.config.data
        images, labels, _ = digits.load_split("test", d.data_dir)
        return padded_eval_batches(digits.to_unit_range(images).reshape(len(labels), 64, 1), labels,
                                   d.global_batch_size)

    def baseline(self) -> dict[str, float]:
        """Accuracy of always guessing the test split's most frequent class."""
        _, labels, _ = digits.load_split("test", self.config.data.data_dir)
        return {"majority_accuracy": float(np.bincount(labels).max() / len(labels))}

    def sample(self, model: nnx.Module, seed: int) -> str:
        """Labels and predictions of the first 16 test digits."""
        del seed
        batch = self.eval_batches()[0]
        predicted = np.asarray(jnp.argmax(model(jnp.asarray(batch["inputs"][:16])), axis=-1))
        return f"label:     {batch['labels'][:16].tolist()}\npredicted: {predicted.tolist()}"
