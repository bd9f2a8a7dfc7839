"""The Task contract: everything the trainer (`jaxmodels.train.loop`) may ask of a task.

A task turns the experiment config into a model, batches and a loss. The trainer builds the model
abstractly, shards it, and drives one jitted step of `loss` over `train_batches`; it evaluates on
`eval_batches`, prints `baseline` beside the eval metrics, and ends with `sample`. A new family
subclasses `Task`, implements the four abstract members and overrides the defaults it needs. A task
never asks which model it holds: models answer for themselves (their FLOPs, their auxiliary losses).

Metrics and how they combine. `loss` returns per-batch metrics of three sorts:
  - means over the batch's examples (the default);
  - counts (e.g. num_tokens, num_bytes): sums over the batch, the weights of
  - weighted means, named in `metric_weights` with their count (e.g. bits_per_byte = nats / ln 2 / bytes
    weighs by num_bytes), for ratios whose denominator differs between batches (padding, bytes per token).
Eval combines its batches with `combine_metrics`: a weighted mean is Σ_b metric_b·count_b / Σ_b count_b, a count
the sum, the rest the plain mean. So eval over a whole split in unequal batches (a padded last batch) gives
exactly the one-batch figure, e.g. total nats / ln 2 / total bytes. Inside one train step the micro-batches
(train.grad_accum_steps) and the devices of a shard_map strategy are combined by plain means, of the gradient
as of the metrics: exact when they hold equal counts (an LM's training windows have no padding), close
otherwise; a train step's counts are then per micro-batch.
"""

import abc
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import ml_collections
from flax import nnx

from jaxmodels.models import make_model
from jaxmodels.nn.peft import PeftSpec


class Task(abc.ABC):
    """Base of every task; `config` is the whole experiment config (`experiments/configs/*.py`)."""

    # Weighted-mean metric -> the count metric that weighs it (see the module docstring); {}: every metric is a
    # mean over examples.
    metric_weights: Mapping[str, str] = {}
    # The least config.data.eval_batches the task takes (`train.config` checks it): 1, or 0 for a task that
    # evaluates on its whole eval split when it is 0.
    min_eval_batches: int = 1

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config

    def build_model(self, rngs: nnx.Rngs, peft: PeftSpec | None = None) -> nnx.Module:
        """The model of config.model (`jaxmodels.models.make_model`), parameters drawn from `rngs`, with the modules
        of the PEFT method `peft` if it adds some. The trainer calls it under `nnx.eval_shape` for shapes and again
        inside the jitted, sharded initialiser."""
        return make_model(self.config.model, rngs, peft)

    @abc.abstractmethod
    def loss(self, model: nnx.Module, batch: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(scalar float32 loss, metrics) of one batch shaped like `abstract_batch()`; a pure function of
        (model, batch), traced once inside the train and eval steps. metrics["loss"] is the loss; every metric
        is a float32 scalar: a mean over the batch's examples, or a count or weighted mean declared in
        `metric_weights` (module docstring), so that batches combine exactly (`combine_metrics`)."""

    @abc.abstractmethod
    def abstract_batch(self) -> Any:
        """The global batch as a pytree of `jax.ShapeDtypeStruct`s, examples on axis 0
        (config.data.global_batch_size of them); the train step is compiled for it."""

    @abc.abstractmethod
    def train_batches(self, start_step: int, process_index: int, process_count: int) -> Iterator[Any]:
        """This process's rows of every global batch from `start_step` on, as NumPy pytrees: a pure function of
        (data seed, step, process), so that a resumed run reads exactly the batches it would have read."""

    @abc.abstractmethod
    def eval_batches(self) -> list[Any]:
        """Fixed global batches (NumPy pytrees), at least one, whose metrics combined (`combine_metrics`) are the
        eval metrics, the same at every eval."""

    def combine_metrics(self, batches: Sequence[Mapping[str, float]]) -> dict[str, float]:
        """The metrics of several batches from each batch's `loss` metrics (host floats, every batch the same
        names): a metric in `metric_weights` is the mean weighted by its count (NaN when the counts sum to 0),
        a count the sum, any other metric the mean over batches. Subclasses may add metrics derived from the
        combined ones (e.g. a perplexity from the combined cross entropy)."""
        if not batches:
            raise ValueError("combine_metrics needs the metrics of at least one batch, got none")
        counts = set(self.metric_weights.values())
        totals = {name: math.fsum(b[name] for b in batches) for name in counts}
        out = {}
        for name in batches[0]:
            if name in counts:
                out[name] = totals[name]
            elif name in self.metric_weights:
                weight, total = self.metric_weights[name], totals[self.metric_weights[name]]
                out[name] = math.fsum(b[name] * b[weight] for b in batches) / total if total else math.nan
            else:
                out[name] = math.fsum(b[name] for b in batches) / len(batches)
        return out

    def baseline(self) -> dict[str, float]:
        """Reference numbers printed and logged beside the eval metrics (e.g. a unigram entropy, chance
        accuracy). Default: none."""
        return {}

    def sample(self, model: nnx.Module, seed: int) -> str:
        """A human-readable look at what the trained model does (generated text, predictions, sample
        statistics), printed at the end of a run. Default: nothing to show."""
        del model, seed
        return ""

    @property
    def tokens_per_example(self) -> int | None:
        """Tokens (sequence positions) in one example, for the tokens/s figure; None: not a sequence task."""
        return None

    def flops_per_example(self, model: nnx.Module) -> float | None:
        """Training FLOPs (forward + backward) of one example of `model` (possibly abstract, from
        `nnx.eval_shape`), for MFU; None: not counted. The count comes from the model itself: by default its
        `train_flops_per_example()` where it has one (DiT, ViT, Swin ...), else None."""
        count = getattr(model, "train_flops_per_example", None)
        return None if count is None else count()
