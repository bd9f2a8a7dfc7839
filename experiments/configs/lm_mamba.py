"""Byte-level Mamba LM on the Python standard library's source (embedded): lm_tiny with the
Transformer replaced by a Mamba stack (Gu & Dao 2023: residual RMSNorm blocks of the Mamba mixer,
no attention, no MLP, no positions).

Reproduces: the Mamba-vs-Transformer comparison of the Mamba paper (§4.2) at toy scale, on the
embedded corpus. 4 layers, d_model 128, d_inner 256, N 16 (~0.45M parameters vs lm_tiny's ~0.9M;
experiments/ssm_tasks.py compares at equal parameters).

Run:
    python -m jaxmodels.main --config experiments/configs/lm_mamba.py --workdir /tmp/lm_mamba

Generation (the final sample) runs the recurrent form, one token per step from the cached
conv and SSM states, and equals the parallel forward (tests/models/test_mamba.py).
"""

import ml_collections

from experiments.configs import lm_tiny


def get_config() -> ml_collections.ConfigDict:
    c = lm_tiny.get_config()
    c.model = dict(
        name="mamba_lm",
        vocab_size=256,
        num_layers=4,
        embed_dim=128,
        d_state=16,
        d_conv=4,
        expand=2,
        dt_rank="auto",
        chunk_size=ml_collections.config_dict.placeholder(int),   # None: no chunking
        scan_implementation=ml_collections.config_dict.placeholder(str),  # None: fused on GPU, else associative
        scalar_A=False,         # True: A one scalar per channel (Mamba-2), which scan_implementation "ssd" needs
        norm_eps=1e-6,          # the RMSNorms' epsilon (Hugging Face's Mamba checkpoints: 1e-5)
        tie_embeddings=False,   # True: the output head is the embedding table transposed, as in the reference
        dtype="float32",
        param_dtype="float32",
    )
    return c
