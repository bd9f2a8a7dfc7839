"""Class-conditional diffusion / flow matching on scikit-learn's 8x8 digits with a small UNet.

Reproduces: the class-conditional, classifier-free-guided setting of Ho & Salimans 2022 at toy scale
(1500 training digits in [-1, 1], 10 classes + a null label, label dropout 0.1). Objective "flow"
(rectified flow, logit-normal t, as SD3) by default; "edm" (Heun) and "ddpm" (v target, cosine; DDPM/DDIM)
by override. UNet: 16 -> 32 channels at 8x8 -> 4x4, no attention (a DiT-S-like DiT at batch 128 ran
1.25 s/step on the shared 2-core CPU, this UNet ~0.1 s), ~0.1M parameters.

Run:
    python -m jaxmodels.main --config experiments/configs/diffusion_digits.py --workdir /tmp/digits \
        --config.diffusion.objective=edm --config.sample.sampler=heun

Expect (2-core CPU): see experiments/results/diffusion/results.md (experiments/diffusion_digits.py):
generated digits are classified as their conditioning label by the repo's digit classifier
(`jaxmodels.tasks.diffusion.fit_digit_classifier`) at a rate that rises with guidance.
"""

import ml_collections

from experiments.configs import diffusion_toy2d


def get_config() -> ml_collections.ConfigDict:
    """diffusion_toy2d's objective, optimiser, mesh and sampler sections with a UNet on the digits."""
    c = diffusion_toy2d.get_config()
    c.model = dict(name="unet", in_channels=1, out_channels=1, base_channels=16, channel_mult=(1, 2),
                   num_res_blocks=1, attention_levels=(), num_heads=4, num_groups=8, num_classes=10,
                   context_dim=0, frequency_dim=128, upsample="nearest_conv", downsample="conv",
                   dtype="float32", param_dtype="float32")
    c.data.update(name="digits", global_batch_size=64, eval_batches=2)
    c.diffusion.sigma_data = 0.5
    c.train.update(num_steps=800, log_every=200, eval_every=400, checkpoint_every=800)
    c.sample.num_samples = 200
    return c
