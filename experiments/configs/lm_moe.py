"""lm_tiny with Switch-style mixture-of-experts MLPs in every other block.

Reproduces: the Switch Transformer recipe (Fedus et al. 2021) at the project's tiny byte-level
scale (4 layers, d=128, 128-byte context, embedded py_stdlib corpus): 8 SwiGLU experts of the
dense MLP's width in blocks 1 and 3 (GShard's and Switch's every-other-layer placement, Lepikhin
et al. 2020), top-1 routing with a float32 router, capacity factor 1.25 with the einsum
dispatch (overflow dropped), load-balancing loss weight 1e-2 (Switch) and router z-loss weight
1e-3 (ST-MoE, Zoph et al. 2022). Active parameters per token equal lm_tiny's (plus the 2 routers);
total parameters are ~3x. Not a published number.

Run:
    python -m jaxmodels.main --config experiments/configs/lm_moe.py --workdir /tmp/lm_moe

Expect (measured, experiments/results/moe/, `python -m experiments.moe_vs_dense --steps 300`: 300
steps of 32 x 128 bytes on a 2-core CPU shared with other jobs, load average ~10): eval 2.222
bits/byte against 2.154 for dense lm_tiny at equal active parameters (0.86M active, 2.92M total
vs 0.85M) and 2.131 for a dense model at equal total parameters (MLP width 1729) -- at this scale
and length the MoE has not caught up. The router balances quickly: the max expert load falls from
3.65x the uniform share at step 1 to ~1.4x, the dropped fraction from 29% to ~2.4%. Step time
(interleaved timing on the loaded CPU): 1.40 s MoE, 0.67 s dense equal-active, 2.59 s dense
equal-total; the MoE's 300 steps took 20 min there (the einsum dispatch, O(T E C d) per layer,
is the slower part on a CPU).
"""

from experiments.configs import lm_tiny


def get_config():
    c = lm_tiny.get_config()
    c.model.moe = lm_tiny.moe_config(num_experts=8, every=2, k=1, capacity_factor=1.25, dispatch="einsum",
                                     load_balancing_weight=1e-2, router_z_weight=1e-3)
    return c
