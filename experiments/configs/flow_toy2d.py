"""A normalising flow on a 2-D density by maximum likelihood: RealNVP (default) or a continuous flow (FFJORD).

Reproduces: the 2-D density demos of RealNVP (Dinh et al. 2017, Figure 1) and FFJORD (Grathwohl et al. 2019,
Figure 2) at toy scale, on two moons, checkerboard or 8 Gaussians (`jaxmodels.data.toy2d`): RealNVP with 8
affine couplings on alternating coordinates (MLPs 2 x 64), or, with --config.model.name=cnf, a CNF with three
ConcatSquash layers of 64 (tanh), Heun with 8 fixed steps, exact trace (2-D). Both sub-sections live in
config.model: the chosen name picks its own (`jaxmodels.models.resolved_section`).

Run:
    python -m jaxmodels.main --config experiments/configs/flow_toy2d.py --workdir /tmp/flow_toy2d \
        --config.data.name=two_moons [--config.model.name=cnf]

Expect (shared 2-core CPU, 1500 steps of batch 256; RealNVP ~1-2 min, CNF 4-9 min): eval NLL in nats per
point two moons 1.72 / 1.71 (RealNVP / CNF), checkerboard 2.04 / 2.18, 8 Gaussians 0.86 / 0.35; samples at the
data-vs-data sliced-W2 floor but RealNVP's on 8 Gaussians. experiments/flows.py draws the density heat maps and
samples (experiments/results/flows/results.md).
"""

import ml_collections
from ml_collections import config_dict

from experiments.configs import lm_tiny


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "flow"
    c.model = dict(name="realnvp", input_shape=(2,), dtype="float32", param_dtype="float32",
                   realnvp=dict(num_scales=1, num_couplings=8, hidden_dim=64, num_blocks=2),
                   cnf=dict(hidden_dims=(64, 64, 64), solver="heun", num_steps=8, rtol=0.0, atol=1e-5, max_steps=1000,
                            trace="auto", noise="rademacher", time_length=1.0))
    c.data = dict(name="two_moons", global_batch_size=256, seed=0, eval_seed=1, eval_batches=4,
                  data_dir=config_dict.placeholder(str))
    # jaxmodels.tasks.flows: the map of dequantised images to the flow's space (unused by the 2-D toys).
    c.flow = dict(preprocess="logit", alpha=0.05)
    c.optimizer = dict(learning_rate=2e-3, warmup_steps=100, schedule="cosine", min_lr_ratio=0.05, b1=0.9,
                       b2=0.99, eps=1e-8, weight_decay=0.0, grad_clip_norm=1.0)
    c.update(lm_tiny.run_sections(num_steps=1500, log_every=500, eval_every=500, checkpoint_every=1500))
    c.sample = dict(num_samples=2000, temperature=1.0)
    return c
