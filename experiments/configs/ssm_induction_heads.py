"""Induction heads (Gu & Dao 2023, "Mamba", §4.1.2, Table 2; Olsson et al. 2022) at CPU scale: Mamba by
default; experiments/ssm_tasks.py compares it with softmax attention + RoPE and S4D.

Setting: vocab 16 (15 ordinary tokens and the trigger), trained at length 256; the model must output
at the final trigger the token that followed the first one. 2 layers, d_model 64 (the paper's
setting). Length generalisation (the paper's Table 2 tests up to 2^20) is measured by
`SequenceTokens.evaluate_lengths` in experiments/ssm_tasks.py.

Run:
    python -m jaxmodels.main --config experiments/configs/ssm_induction_heads.py --workdir /tmp/ssm_induction
Every model and length, with the table and plot: python -m experiments.ssm_tasks --only induction

Results (2-core CPU, via experiments/ssm_tasks.py):
- trained at length 64, 1500 steps x 32, lr 3e-3 (experiments/results/ssm_short/results.md): Mamba and
  attention + RoPE exact at 64, S4D near chance (0.14). Accuracy at 128 / 256 / 512 / 1024 / 4096: Mamba
  1.00 / 1.00 / 1.00 / 0.97 / 0.44; attention 0.94 / 0.34 / 0.13 / 0.03 / 0.09. Mamba ~15 min, the others ~75 s.
    python -m experiments.ssm_tasks --only induction --seq_len 64 --steps 1500 --batch_size 32 \\
        --learning_rate 3e-3 --lengths 64,128,256,512,1024,2048,4096 --out /tmp/ssm_short
- at this config's length 256, 150 steps x 8 sequences (experiments/results/ssm/results.md): not learned,
  every model at chance.
"""

import ml_collections

from experiments.configs import ssm_selective_copying


def get_config() -> ml_collections.ConfigDict:
    c = ssm_selective_copying.get_config()
    c.data = dict(name="induction_heads", seq_len=256, vocab_size=16, global_batch_size=32, seed=0, eval_seed=1,
                  eval_batches=4)
    return c
