"""Contrastive Predictive Coding on scikit-learn's 8x8 digits read row by row, then a linear probe.

Reproduces: CPC (van den Oord et al. 2018, §2; the image setting of §3.2 reduced to rows of a digit) at toy
scale: each digit is a 64-pixel signal; a stride-8 convolution encodes each row (z_t, 64 features, then a 1x1
convolution), a GRU of 64 summarises rows 1..t (c_t), and W_k c_t predicts the rows k = 1, 2, 3 ahead
among the rows of every digit of the batch (cross-time and in-batch negatives, N = 64 x 8 = 512;
--config.cpc.negatives=batch for in-batch only, N = 64; --config.model.context=causal_conv for a causal
convolutional context). At the end (`sample`), a logistic-regression probe on the frozen mean context: its
test accuracy against the same probe on a randomly initialised network.

Run:
    python -m jaxmodels.main --config experiments/configs/cpc_digits.py --workdir /tmp/cpc_digits

Expect (shared 2-core CPU, 1500 steps of batch 64, ~4 min): eval MI bound log N - L ~1.8 nats (k = 1, 2, 3:
2.3, 1.6, 1.4; log N = 6.24); probe test accuracy 0.97 (random encoders 0.96) with all labels, 0.79 (random
0.67) with 100. experiments/cpc.py runs the variants (experiments/results/cpc/results.md).
"""

import ml_collections
from ml_collections import config_dict

from experiments.configs import lm_tiny


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "cpc"
    c.model = dict(name="cpc", in_channels=1, encoder_channels=(64, 64), encoder_kernels=(8, 1),
                   encoder_strides=(8, 1), context="gru", context_dim=64, context_kernel=2, context_layers=2,
                   num_predictions=3, dtype="float32", param_dtype="float32")
    c.data = dict(name="digits", global_batch_size=64, seed=0, eval_seed=1, eval_batches=4,
                  data_dir=config_dict.placeholder(str))
    c.cpc = dict(negatives="batch_and_time")
    c.optimizer = dict(learning_rate=2e-3, warmup_steps=100, schedule="cosine", min_lr_ratio=0.05, b1=0.9,
                       b2=0.99, eps=1e-8, weight_decay=0.0, grad_clip_norm=1.0)
    c.update(lm_tiny.run_sections(num_steps=1500, log_every=250, eval_every=500, checkpoint_every=1500))
    c.sample = dict(probe_examples=0)
    return c
