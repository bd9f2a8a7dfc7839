"""lm_tiny with softmax attention (Vaswani et al. 2017), RoPE (Su et al. 2021): the same model as lm_tiny.

Reproduces: the attention kind on the project's tiny byte-level LM (4 layers, d=128, 128-byte
context, embedded py_stdlib corpus); not a published number.

Run:
    python -m jaxmodels.main --config experiments/configs/lm_softmax.py --workdir /tmp/lm_softmax

Expect: experiments/results/attention_kinds/ (eval bits/byte and step time of every kind, measured).
"""

from experiments.configs import lm_tiny


def get_config():
    c = lm_tiny.get_config()
    c.model.attention = lm_tiny.attention_config(kind="softmax")
    return c
