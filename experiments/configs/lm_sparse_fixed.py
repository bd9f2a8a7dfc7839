"""lm_tiny with Sparse Transformer fixed pattern, blocks of 16 with 4 summary cells (Child et al. 2019).

Reproduces: the attention kind on the project's tiny byte-level LM (4 layers, d=128, 128-byte
context, embedded py_stdlib corpus); not a published number.

Run:
    python -m jaxmodels.main --config experiments/configs/lm_sparse_fixed.py --workdir /tmp/lm_sparse_fixed

Expect: experiments/results/attention_kinds/ (eval bits/byte and step time of every kind, measured).
"""

from experiments.configs import lm_tiny


def get_config():
    c = lm_tiny.get_config()
    c.model.attention = lm_tiny.attention_config(kind="sparse_fixed", sparse_block=16, sparse_summary=4, block_size=16)
    return c
