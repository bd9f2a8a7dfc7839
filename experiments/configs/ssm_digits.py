"""Sequential digits: scikit-learn's 8x8 digits read pixel by pixel (length 64, one feature) and
classified by a stack of S4D layers — the small cousin of S4's sequential MNIST (Gu et al. 2022,
"Efficiently Modeling Long Sequences with Structured State Spaces", §4; S4D: Gu et al. 2022, "On the
Parameterization and Initialization of Diagonal State Space Models"). Set model.mixer to "s4" or "lru"
for the other layers.

Setting: 4 residual blocks (S4D mixer + GELU + linear, then an MLP), d_model 64, N 64, mean pooling,
1500 training digits, evaluated on the whole fixed 297-digit test split.

Run:
    python -m jaxmodels.main --config experiments/configs/ssm_digits.py --workdir /tmp/ssm_digits
S4D vs S4 vs LRU with the table: python -m experiments.ssm_tasks --only digits

Result (experiments/results/ssm/results.md; 2-core CPU shared with other jobs, 150 steps x 50):
S4D 96.6% test accuracy in 122 s, LRU (r_min 0.5) 93.9% in 164 s; majority class 10.1%.
"""

import ml_collections
from ml_collections import config_dict

from experiments.configs import lm_tiny


def get_config() -> ml_collections.ConfigDict:
    c = lm_tiny.get_config()
    del c.sample  # the task prints labels vs predictions instead
    c.task = "sequence_classification"
    c.model = dict(name="sequence_classifier", num_classes=10, in_features=1, vocab_size=config_dict.placeholder(int),
                   d_model=64, num_layers=4, mixer="s4d", d_state=64, mlp_dim=128, norm_kind="layer",
                   pooling="mean", bidirectional=False, mixer_kwargs={}, dtype="float32", param_dtype="float32")
    c.data = dict(name="sklearn_digits", data_dir=config_dict.placeholder(str), global_batch_size=50, seed=0,
                  eval_batches=1)  # unused: evaluation reads the whole test split
    c.optimizer.update(learning_rate=3e-3, warmup_steps=50, weight_decay=0.01)
    c.train.update(num_steps=600, log_every=50, eval_every=200, checkpoint_every=200)
    return c
