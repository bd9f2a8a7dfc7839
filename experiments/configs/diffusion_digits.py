"""Class-conditional diffusion / flow matching on scikit-learn's 8x8 digits with a small UNet.

Reproduces: the class-conditional, classifier-free-guided setting of Ho & Salimans 2022 at toy scale
(1500 training digits in [-1, 1], 10 classes + a null label, label dropout 0.1). Objective "flow"
(rectified flow, logit-normal t, as SD3) by default; "edm" (Heun) and "ddpm" (v target, cosine; DDPM/DDIM)
by override. UNet: 16 -> 32 channels at 8x8 -> 4x4, no attention (a DiT-S-like DiT at batch 128 ran
1.25 s/step on the shared 2-core CPU, this UNet ~0.1 s), ~0.1M parameters.

Run:
    python -m experiments.main --config experiments/configs/diffusion_digits.py --workdir /tmp/digits \
        --config.diffusion.objective=edm --config.sample.sampler=heun

Expect (2-core CPU): see experiments/results/diffusion/results.md (experiments/diffusion_digits.py):
generated digits are classified as their conditioning label by the repo's digit classifier
(`jaxmodels.tasks.diffusion.fit_digit_classifier`) at a rate that rises with guidance.
"""

import ml_collections
from ml_collections import config_dict

from jaxmodels.parallel.sharding import DEFAULT_RULES


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "diffusion"
    c.model = dict(name="unet", in_channels=1, out_channels=1, base_channels=16, channel_mult=(1, 2),
                   num_res_blocks=1, attention_levels=(), num_heads=4, num_groups=8, num_classes=10,
                   context_dim=0, frequency_dim=128, upsample="nearest_conv", downsample="conv",
                   dtype="float32", param_dtype="float32")
    c.data = dict(name="digits", global_batch_size=64, seed=0, eval_seed=1, eval_batches=2,
                  data_dir=config_dict.placeholder(str), pairs_path=config_dict.placeholder(str))
    c.diffusion = dict(objective="flow", prediction="v", min_snr_gamma=0.0, num_timesteps=1000,
                       beta_schedule="cosine", sigma_data=0.5, P_mean=-1.2, P_std=1.2, t_sampling="logit_normal",
                       logit_mean=0.0, logit_std=1.0, shift=1.0, time_scale=1000.0, label_dropout=0.1)
    c.optimizer = dict(learning_rate=2e-3, warmup_steps=100, schedule="cosine", min_lr_ratio=0.05, b1=0.9,
                       b2=0.99, eps=1e-8, weight_decay=0.0, grad_clip_norm=1.0)
    c.train = dict(num_steps=800, seed=0, grad_accum_steps=1, log_every=200, eval_every=400,
                   checkpoint_every=800, keep_checkpoints=1, nan_policy="skip", peak_flops=0.0,
                   prng_impl="threefry2x32")
    c.mesh = dict(data=-1, fsdp=1, expert=1, tensor=1)
    c.sharding_rules = DEFAULT_RULES
    c.parallel = dict(strategy="replicated", collectives="ring")
    c.sample = dict(sampler="euler", num_steps=32, num_samples=200, guidance_scale=1.0)
    return c
