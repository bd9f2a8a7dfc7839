"""Diffusion / flow matching on a 2-D toy distribution with a small residual MLP denoiser.

Reproduces: the 2-D demos of rectified flow (Liu et al. 2022, Fig. 1-3) and EDM / DDPM on the same
data — checkerboard, two moons or 8 Gaussians (`jaxmodels.data.toy2d`); objective "flow" (logit-normal
t), "edm" or "ddpm" (v target, cosine schedule, T = 1000). ~0.2M parameters.

Run:
    python -m jaxmodels.main --config experiments/configs/diffusion_toy2d.py --workdir /tmp/toy2d \
        --config.data.name=checkerboard --config.diffusion.objective=edm --config.sample.sampler=heun

Expect (2-core CPU, 3000 steps of batch 512, ~1.5 min; experiments/results/diffusion/results.md):
sliced W2 of 2000 samples to data within ~2x the data-vs-data floor (`baseline`) at 32+ steps.
The sweep over data x objective x steps is experiments/diffusion_toy.py.
"""

import dataclasses

import ml_collections
from ml_collections import config_dict

from experiments.configs import lm_tiny
from jaxmodels.train.loss_scaling import LossScaling


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "diffusion"
    c.model = dict(name="mlp_denoiser", in_features=2, hidden_dim=256, num_layers=3, frequency_dim=64,
                   num_classes=0, dtype="float32", param_dtype="float32")
    c.data = dict(name="checkerboard", global_batch_size=512, seed=0, eval_seed=1, eval_batches=4,
                  data_dir=config_dict.placeholder(str), pairs_path=config_dict.placeholder(str))
    # jaxmodels.tasks.diffusion.DiffusionSpec: the objective and its constants.
    c.diffusion = dict(objective="flow", prediction="v", min_snr_gamma=0.0, num_timesteps=1000,
                       beta_schedule="cosine", sigma_data=1.0, P_mean=-1.2, P_std=1.2, t_sampling="logit_normal",
                       logit_mean=0.0, logit_std=1.0, shift=1.0, time_scale=1000.0, label_dropout=0.1)
    c.optimizer = dict(learning_rate=2e-3, warmup_steps=100, schedule="cosine", min_lr_ratio=0.05, b1=0.9,
                       b2=0.99, eps=1e-8, weight_decay=0.0, grad_clip_norm=1.0)
    c.update(lm_tiny.run_sections(num_steps=3000, log_every=500, eval_every=1000, checkpoint_every=3000))
    c.precision = dataclasses.asdict(LossScaling())  # float16 loss scaling (see lm_tiny); float32 needs none
    # Sampler: ddpm -> "ddpm" | "ddim"; edm -> "heun" | "euler"; flow -> "euler" | "heun".
    c.sample = dict(sampler="euler", num_steps=32, num_samples=2000, guidance_scale=1.0)
    return c
