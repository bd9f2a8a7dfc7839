"""lm_tiny with FLASH-Quad: GAU blocks with quadratic relu^2 attention (Hua et al. 2022, "Transformer Quality in
Linear Time").

Reproduces: the attention kind on the project's tiny byte-level LM (4 layers, d=128, 128-byte
context, embedded py_stdlib corpus); not a published number. GAU blocks replace attention + MLP; 8 of them at
expansion 256 and shared dim 64 keep lm_tiny's parameter count.

Run:
    python -m jaxmodels.main --config experiments/configs/lm_gau.py --workdir /tmp/lm_gau

Expect: experiments/results/attention_kinds/ (eval bits/byte and step time of every kind, measured).
"""

from experiments.configs import lm_tiny


def get_config():
    c = lm_tiny.get_config()
    c.model.attention = lm_tiny.attention_config(kind="gau")
    # One GAU replaces attention + MLP (the paper doubles the layer count): 8 GAU layers,
    # expansion e = 2d = 256 (mlp_dim), shared dim s = 64 (head_dim); ~0.9M parameters like lm_tiny.
    c.model.update(num_layers=8, mlp_dim=256, head_dim=64)
    return c
