"""lm_tiny with local band (1 block of 16 each side) + 1 global block, Longformer/BigBird style (Beltagy et al. 2020).

Reproduces: the attention kind on the project's tiny byte-level LM (4 layers, d=128, 128-byte
context, embedded py_stdlib corpus); not a published number.

Run:
    python -m jaxmodels.main --config experiments/configs/lm_local_global.py --workdir /tmp/lm_local_global

Expect: experiments/results/attention_kinds/ (eval bits/byte and step time of every kind, measured).
"""

from experiments.configs import lm_tiny


def get_config():
    c = lm_tiny.get_config()
    c.model.attention = lm_tiny.attention_config(kind="local_global", sparse_block=16, window_blocks=1, global_blocks=1,
                                                 block_size=16)
    return c
