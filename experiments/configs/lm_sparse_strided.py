"""lm_tiny with Sparse Transformer strided pattern, stride 16, block-sparse compute (Child et al. 2019).

Reproduces: the attention kind on the project's tiny byte-level LM (4 layers, d=128, 128-byte
context, embedded py_stdlib corpus); not a published number.

Run:
    python -m jaxmodels.main --config experiments/configs/lm_sparse_strided.py --workdir /tmp/lm_sparse_strided

Expect: experiments/results/attention_kinds/ (eval bits/byte and step time of every kind, measured).
"""

from experiments.configs import lm_tiny


def get_config():
    c = lm_tiny.get_config()
    c.model.attention = lm_tiny.attention_config(kind="sparse_strided", sparse_block=16, block_size=16)
    return c
