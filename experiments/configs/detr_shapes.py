"""DETR, or Deformable DETR with --config.model.deformable=True, on the generated shapes (32x32, 1-3 objects).

Reproduces: DETR's set prediction (Carion et al. 2020: Hungarian matching, CE with no-object weight 0.1 + 5 L1 +
2 GIoU, auxiliary decoding losses, AdamW with gradient clipping 0.1) and Deformable DETR's multi-scale deformable
attention in the encoder and the decoder's cross-attention (Zhu et al. 2021, single stage, no box refinement),
scored by pycocotools' COCO mAP, at toy scale: 32x32 images of 1-3 rectangles, ellipses and triangles
(`jaxmodels.data.shapes`), a 3-stage CNN backbone (strides 2, 4, 8), hidden_dim 64, 2 encoder and 3 decoder
layers, 8 queries. DETR reads the stride-8 map (4x4 tokens).

Run:
    python -m jaxmodels.main --config experiments/configs/detr_shapes.py --workdir /tmp/detr_shapes \
        [--config.model.deformable=True]

Deformable DETR's levels: num_feature_levels=2 (the stride-4 and stride-8 maps, 8x8 + 4x4 tokens) keeps a step
about 3 DETR steps on a CPU; 3 levels (16x16 + 8x8 + 4x4) cost ~13 DETR steps there (measured 2.7 s against 0.2 s).

Expect (shared 2-core CPU, deterministic): DETR 2400 steps (~8 min, 0.16-0.18 s a step) COCO mAP@[.5:.95] 0.128,
mAP@.5 0.296 on the 500 test images; Deformable DETR (--config.model.deformable=True
--config.train.num_steps=800, ~10 min, 0.4-0.6 s a step) 0.106 / 0.261,
already 0.19 mAP@.5 after 400 steps where DETR has 0.06. Neither is converged; the classes are the weak part
(class-agnostic mAP@.5 0.54 / 0.51). DETR on the 8x8 map (--config.model.backbone_channels='(32, 64)': the
stride-4 map, Deformable DETR's finest; --config.train.num_steps=800, ~9 min under heavy load) 0.047 / 0.152: the
deformable lead per step is not resolution. experiments/detection.py runs the three
(experiments/results/detection/results.md).
"""

import ml_collections
from ml_collections import config_dict

from experiments.configs import lm_tiny


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "detection"
    c.model = dict(name="detr", image_size=32, in_channels=3, num_classes=3, hidden_dim=64, num_heads=4, mlp_dim=128,
                   num_encoder_layers=2, num_decoder_layers=3, num_queries=8, backbone="cnn",
                   backbone_channels=(32, 64, 64), patch_size=4, deformable=False, num_feature_levels=2,
                   num_points=4, dtype="float32", param_dtype="float32")
    c.data = dict(name="shapes", global_batch_size=32, seed=0, eval_seed=1, eval_batches=4,
                  data_dir=config_dict.placeholder(str),
                  shapes=dict(image_size=32, min_shapes=1, max_shapes=3, min_size=0.25, max_size=0.6, min_visible=8,
                              num_train=10000, num_test=500, seed=0))
    c.detr = dict(eos_coef=0.1, class_weight=1.0, bbox_weight=5.0, giou_weight=2.0, aux_loss=True)
    c.optimizer = dict(learning_rate=5e-4, warmup_steps=200, schedule="cosine", min_lr_ratio=0.05, b1=0.9,
                       b2=0.999, eps=1e-8, weight_decay=1e-4, grad_clip_norm=0.1)
    c.update(lm_tiny.run_sections(num_steps=2400, log_every=100, eval_every=400, checkpoint_every=400))
    c.sample = dict(coco_split="test")
    return c
