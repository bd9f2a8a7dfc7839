"""Induction heads (Gu & Dao 2023, "Mamba", §4.1.2, Table 2; Olsson et al. 2022) at CPU scale: Mamba by
default; experiments/ssm_tasks.py compares it with softmax attention + RoPE and S4D.

Setting: vocab 16 (15 ordinary tokens and the trigger), trained at length 256; the model must output
at the final trigger the token that followed the first one. 2 layers, d_model 64 (the paper's
setting). Length generalisation (the paper's Table 2 tests up to 2^20) is measured by
`SequenceTokens.evaluate_lengths` in experiments/ssm_tasks.py.

Run:
    python -m experiments.main --config experiments/configs/ssm_induction_heads.py --workdir /tmp/ssm_induction
Every model and length, with the table and plot: python -m experiments.ssm_tasks --only induction

Result (experiments/results/ssm/results.md; 2-core CPU shared with other jobs, 150 steps x 8
sequences): not learned at that budget — Mamba, attention + RoPE and S4D all at chance (0.0625 at
length 256; chance 0.067) at every test length up to 8192 (attention to 4096); train + eval wall
time Mamba 348 s, attention 87 s, S4D 86 s.
"""

import ml_collections

from experiments.configs import ssm_selective_copying


def get_config() -> ml_collections.ConfigDict:
    c = ssm_selective_copying.get_config()
    c.data = dict(name="induction_heads", seq_len=256, vocab_size=16, global_batch_size=32, seed=0, eval_seed=1,
                  eval_batches=4)
    return c
