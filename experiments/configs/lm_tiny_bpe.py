"""lm_tiny on byte-level BPE tokens (2048 ids) instead of bytes: the same model, corpus, steps and batches.

Compares: bits/byte of a BPE tokenizer against bytes (lm_tiny) on the same embedded corpus (the Python standard
library's source, tfds builder `py_stdlib`) with the same 4-layer, d=128 Transformer. The tokenizer (GPT-2's
byte-level BPE, `jaxmodels.data.tokenizers.train_bpe`, 2048 ids with an end-of-document token) is trained on
the corpus's train split on first use; model.vocab_size=0 takes its vocabulary (2048, already a multiple of
128). Documents end with the end-of-document token and do not attend to each other; a 128-token window holds
more text than lm_tiny's 128 bytes (a BPE token stands for one or more bytes), and the larger embedding and
output head add 0.46M parameters. bits/byte counts the nats of every target token over the UTF-8 bytes it
stands for, so the two figures are comparable (`jaxmodels.tasks.lm.next_token_loss`). Not a published number.

Run:
    python -m jaxmodels.main --config experiments/configs/lm_tiny_bpe.py --workdir /tmp/lm_tiny_bpe

Expect: eval bits/byte against lm_tiny's and the wall time, both on a named machine: to be filled in by a run.
"""

from experiments.configs import lm_tiny


def get_config():
    c = lm_tiny.get_config()
    c.data.tokenizer = "bpe:2048"
    c.model.vocab_size = 0
    return c
