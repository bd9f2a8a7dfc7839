"""The Task contract: everything the trainer (`jaxmodels.train.loop`) may ask of a task.

A task turns the experiment config into a model, batches and a loss. The trainer builds the model
abstractly, shards it, and drives one jitted step of `loss` over `train_batches`; it evaluates on
`eval_batches`, prints `baseline` beside the eval metrics, and ends with `sample`. A new family
subclasses `Task`, implements the four abstract members and overrides the defaults it needs. A task
never asks which model it holds: models answer for themselves (their FLOPs, their auxiliary losses).
"""

import abc
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
from flax import nnx

from jaxmodels.models import make_model


class Task(abc.ABC):
    """Base of every task; `config` is the whole experiment config (`experiments/configs/*.py`)."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        """The model of config.model (`jaxmodels.models.make_model`), parameters drawn from `rngs`. The trainer
        calls it under `nnx.eval_shape` for shapes and again inside the jitted, sharded initialiser."""
        return make_model(self.config.model, rngs)

    @abc.abstractmethod
    def loss(self, model: nnx.Module, batch: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(scalar float32 loss, metrics) of one batch shaped like `abstract_batch()`; a pure function of
        (model, batch), traced once inside the train and eval steps. metrics["loss"] is the loss; every metric
        is a mean over the batch's examples, so that it averages correctly over devices and micro-batches."""

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
        """Fixed global batches (NumPy pytrees) whose mean metrics are the eval metrics, the same at every eval."""

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
        `nnx.eval_shape`), for MFU; None: not counted. The count comes from the model itself."""
        del model
        return None
