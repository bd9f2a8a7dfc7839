"""Tasks: objective, metrics, data and samples per model family (`make_task(config)`)."""

import ml_collections

from jaxmodels.ops.checks import one_of
from jaxmodels.tasks.base import Task
from jaxmodels.tasks.classification import ImageClassification
from jaxmodels.tasks.cpc import CPCTask
from jaxmodels.tasks.detection import Detection
from jaxmodels.tasks.diffusion import Diffusion
from jaxmodels.tasks.embedding import EmbeddingVerification
from jaxmodels.tasks.flows import FlowLikelihood
from jaxmodels.tasks.lm import LanguageModeling
from jaxmodels.tasks.segmentation import PromptableSegmentation
from jaxmodels.tasks.sequence import SequenceClassification, SequenceTokens

__all__ = ["TASKS", "Task", "make_task"]

TASKS: dict[str, type[Task]] = {"diffusion": Diffusion, "lm": LanguageModeling, "sequence_tokens": SequenceTokens,
                                "sequence_classification": SequenceClassification, "flow": FlowLikelihood,
                                "cpc": CPCTask, "segmentation": PromptableSegmentation,
                                "detection": Detection, "classification": ImageClassification,
                                "embedding": EmbeddingVerification}


def make_task(config: ml_collections.ConfigDict) -> Task:
    """The task named config.task, built from the whole experiment config."""
    return TASKS[one_of("config.task", config.task, TASKS)](config)
