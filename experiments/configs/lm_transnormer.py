"""lm_tiny with TransNormer (Qin et al. 2022): DiagAttention in the lower half, NormAttention in the upper half.

Reproduces: the attention kind on the project's tiny byte-level LM (4 layers, d=128, 128-byte
context, embedded py_stdlib corpus); not a published number.

Run:
    python -m jaxmodels.main --config experiments/configs/lm_transnormer.py --workdir /tmp/lm_transnormer

Expect: experiments/results/attention_kinds/ (eval bits/byte and step time of every kind, measured).
"""

from experiments.configs import lm_tiny


def get_config():
    c = lm_tiny.get_config()
    c.model.attention = lm_tiny.attention_config(kind="transnormer", chunk_size=32)
    return c
