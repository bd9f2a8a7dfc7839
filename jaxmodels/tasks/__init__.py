"""Tasks: objective, metrics, data and samples per model family (`make_task(config)`)."""

import ml_collections

from jaxmodels.tasks.diffusion import Diffusion
from jaxmodels.tasks.lm import LanguageModeling
from jaxmodels.tasks.sequence import SequenceClassification, SequenceTokens

TASKS = {"diffusion": Diffusion, "lm": LanguageModeling, "sequence_tokens": SequenceTokens, "sequence_classification": SequenceClassification}


def make_task(config: ml_collections.ConfigDict):
    """The task named config.task, built from the whole experiment config."""
    if config.task not in TASKS:
        raise ValueError(f"unknown task {config.task!r}; valid: {sorted(TASKS)}")
    return TASKS[config.task](config)
