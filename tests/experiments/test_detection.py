"""experiments/detection.py's pieces that need no training: the variants' configs, the recorded command, and the
hand-written reading kept by --merge."""

import argparse

import jax.numpy as jnp
import pytest
from flax import nnx

from experiments import detection
from jaxmodels.models import make_model


def encoder_tokens(config) -> list[tuple[int, int]]:
    """The (H, W) of each map the variant's Transformer reads, from an abstract model (nothing is computed)."""
    levels = nnx.eval_shape(lambda: make_model(config.model, nnx.Rngs(0)).feature_levels(jnp.zeros((1, 32, 32, 3))))
    return [tuple(m.shape[1:3]) for m in levels]


@pytest.mark.parametrize("variant, expected", [("detr", [(4, 4)]), ("deformable", [(8, 8), (4, 4)]),
                                               ("detr_8x8", [(8, 8)])])
def test_variants_read_the_maps_they_say(variant, expected):
    config = detection.variant_config(variant, 800, 6, small=False)
    assert encoder_tokens(config) == expected
    assert config.train.num_steps == 800 and config.train.checkpoint_every == 134  # 6 checkpoints, the last at 800


def test_detr_8x8_reads_the_deformable_runs_finest_map():
    finest = detection.variant_config("deformable", 8, 1, small=False).model.backbone_channels[:2]
    assert tuple(detection.variant_config("detr_8x8", 8, 1, small=False).model.backbone_channels) == tuple(finest)


def test_command_names_only_the_chosen_runs():
    args = argparse.Namespace(detr_steps=2400, deformable_steps=800, detr_8x8_steps=800, evals=6, merge=True,
                              variants=["detr_8x8"])
    assert detection.command(args) == ("python -m experiments.detection --detr-8x8-steps 800 --variants detr_8x8 "
                                       "--evals 6 --merge")
    args.variants, args.merge = list(detection.VARIANTS), False
    assert detection.command(args) == ("python -m experiments.detection --detr-steps 2400 --deformable-steps 800 "
                                       "--detr-8x8-steps 800 --evals 6")


def test_reading_section_is_kept_up_to_the_figures():
    text = "# title\n\n| table |\n\n## Reading (by hand)\n\n- a point\n  more\n\n![curves](curves.png)\n"
    assert detection.reading_section(text) == "## Reading (by hand)\n\n- a point\n  more\n"
    assert detection.reading_section("# no reading\n![curves](curves.png)\n") == ""
