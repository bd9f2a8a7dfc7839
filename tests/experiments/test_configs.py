"""Every experiment config trains end to end for a few steps on the CPU (shrunk by SMOKE overrides)."""

import importlib
import pathlib

import jax
import numpy as np
import pytest

from jaxmodels.train.loop import train_and_evaluate
from tests.tiny import apply_overrides

CONFIG_DIR = pathlib.Path(__file__).parents[2] / "experiments" / "configs"
ALL_CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem != "__init__")
RUN = {"train.num_steps": 4, "train.log_every": 2, "train.eval_every": 0, "train.checkpoint_every": 4,
       "optimizer.warmup_steps": 1, "data.eval_batches": 1}
# Config name -> overrides that shrink it to seconds; configs not listed here are covered by
# tests/models/test_attention_kinds.py (the attention kinds) or tests/train (lm_tiny, and the fine-tunes: configs
# with a peft section, which start from a checkpoint, in tests/train/test_peft_training.py).
SMOKE = {
    "lm_mamba": {"model.num_layers": 1, "model.embed_dim": 32, "data.seq_len": 32, "data.global_batch_size": 8,
                 "sample.max_new_tokens": 8},
    "lm_moe": {"model.num_layers": 2, "model.embed_dim": 32, "model.num_heads": 2, "model.num_kv_heads": 1,
               "model.head_dim": 16, "model.mlp_dim": 32, "model.moe.num_experts": 4, "data.seq_len": 32,
               "data.global_batch_size": 8, "sample.max_new_tokens": 8},
    "ssm_selective_copying": {"model.num_layers": 1, "model.embed_dim": 16, "data.seq_len": 40,
                              "data.num_tokens": 4, "data.global_batch_size": 8},
    "ssm_induction_heads": {"model.num_layers": 1, "model.embed_dim": 16, "data.seq_len": 24,
                            "data.global_batch_size": 8},
    "ssm_digits": {"model.num_layers": 1, "model.d_model": 16, "model.d_state": 8, "model.mlp_dim": 32,
                   "data.global_batch_size": 16},
    "diffusion_toy2d": {"model.hidden_dim": 16, "model.num_layers": 1, "data.global_batch_size": 16,
                        "sample.num_samples": 32, "sample.num_steps": 2},
    "cpc_digits": {"model.encoder_channels": (8, 8), "model.context_dim": 8, "data.global_batch_size": 8,
                   "sample.probe_examples": 200},
    "flow_toy2d": {"model.realnvp.hidden_dim": 8, "model.realnvp.num_couplings": 2, "data.global_batch_size": 16,
                   "sample.num_samples": 32},
    "flow_digits": {"model.realnvp.hidden_dim": 4, "model.realnvp.num_couplings": 1, "data.global_batch_size": 8,
                    "sample.num_samples": 8},
    "detr_shapes": {"model.image_size": 16, "model.hidden_dim": 16, "model.num_heads": 2, "model.mlp_dim": 16,
                    "model.num_encoder_layers": 1, "model.num_decoder_layers": 1, "model.num_queries": 3,
                    "model.backbone_channels": (8, 8), "data.shapes.image_size": 16, "data.shapes.num_train": 16,
                    "data.shapes.num_test": 4, "data.shapes.min_visible": 4, "data.global_batch_size": 4},
    "diffusion_digits": {"model.base_channels": 8, "model.num_groups": 4, "data.global_batch_size": 8,
                         "sample.num_samples": 10, "sample.num_steps": 1},
    "sam_shapes": {"data.shapes.image_size": 16, "data.shapes.num_train": 16, "data.shapes.num_test": 4,
                   "data.shapes.min_visible": 2, "data.global_batch_size": 4, "model.image_size": 16,
                   "model.patch_size": 4, "model.hidden_dim": 16, "model.depth": 1, "model.mlp_dim": 16,
                   "model.embed_dim": 16, "model.decoder_depth": 1, "model.decoder_num_heads": 2,
                   "model.decoder_mlp_dim": 16, "model.iou_head_hidden_dim": 16, "sample.num_images": 2},
    "image_classification": {"data.name": "digits", "model.image_size": 8, "model.swin.patch_size": 1,
                             "model.swin.window_size": 4, "model.swin.embed_dim": 8, "model.swin.depths": (2,),
                             "model.swin.num_heads": (2,), "data.global_batch_size": 8},
    "arcface_mnist": {"data.name": "digits", "model.channels": 4, "model.num_stages": 1, "model.feature_dim": 8,
                      "model.embed_dim": 8, "data.global_batch_size": 8, "verification.num_pairs": 50},
}


def test_every_non_attention_config_has_a_smoke_test():
    covered = {"lm_tiny"} | {n for n in ALL_CONFIGS
                             if importlib.import_module(f"experiments.configs.{n}").get_config().model.name
                             == "decoder_lm" and n.startswith("lm_")}
    assert set(ALL_CONFIGS) - covered <= set(SMOKE), sorted(set(ALL_CONFIGS) - covered - set(SMOKE))


@pytest.mark.parametrize("name", sorted(SMOKE))
def test_config_trains_a_few_steps(name, tmp_path):
    config = importlib.import_module(f"experiments.configs.{name}").get_config()
    apply_overrides(config, {**RUN, **SMOKE[name]})
    # One device: the meshes are tested in tests/train; here a config's model, task and data are.
    summary = train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
    assert summary["final_step"] == 4
    assert all(np.isfinite(v) for v in summary["eval_end"].values())
