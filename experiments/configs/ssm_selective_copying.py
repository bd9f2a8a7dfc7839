"""Selective copying (Gu & Dao 2023, "Mamba", §4.1.1, Table 1) at CPU scale: Mamba (S6) by default;
`token_model("s4d")` gives the LTI baseline (S4D, which cannot select by content).

Setting: 16 data tokens (ids 1..14) scattered over the first 240 of 256 positions, then 16 markers at
which the model must output them in order; vocab 16; 2 layers, d_model 64 (the paper: length 4096,
2 layers, d_model 64, 400k steps). Loss and accuracy count only the 16 answer positions.

Run:
    python -m jaxmodels.main --config experiments/configs/ssm_selective_copying.py --workdir /tmp/ssm_copy
S4D vs Mamba, with the results table and plot: python -m experiments.ssm_tasks --only copying

Results (2-core CPU, via experiments/ssm_tasks.py):
- at length 64 with 8 tokens, 1500 steps x 32, lr 3e-3 (experiments/results/ssm_short/results.md):
  Mamba 0.902 accuracy (~0.5 s/step, ~13 min), S4D 0.572 (64 s); chance 0.071.
    python -m experiments.ssm_tasks --only copying --seq_len 64 --num_tokens 8 --steps 1500 --batch_size 32 \\
        --learning_rate 3e-3 --out /tmp/ssm_short
- at this config's length 256, 150 steps x 8 (experiments/results/ssm/results.md): not learned, Mamba 0.088,
  S4D 0.072. The paper's setting (length 4096, Mamba ~99%, S4 ~18%) needs a GPU.
"""

import ml_collections
from ml_collections import config_dict

from experiments.configs import lm_tiny


def token_model(kind: str, *, vocab_size: int = 16, num_layers: int = 2, d_model: int = 64) -> dict:
    """The `model` section of a causal token model: "mamba" (MambaLM, S6), "s4d" (SequenceTagger with
    S4D mixers and an MLP, the LTI baseline) or "attention" (DecoderLM, softmax attention + RoPE)."""
    if kind == "mamba":
        return dict(name="mamba_lm", vocab_size=vocab_size, num_layers=num_layers, embed_dim=d_model, d_state=16,
                    d_conv=4, expand=2, dt_rank="auto", chunk_size=config_dict.placeholder(int),
                    scan_implementation=config_dict.placeholder(str), dtype="float32", param_dtype="float32")
    if kind == "s4d":
        return dict(name="sequence_tagger", num_classes=vocab_size, vocab_size=vocab_size, d_model=d_model,
                    num_layers=num_layers, mixer="s4d", d_state=64, mlp_dim=2 * d_model, norm_kind="layer",
                    in_features=config_dict.placeholder(int), mixer_kwargs={}, dtype="float32",
                    param_dtype="float32")
    if kind == "attention":
        return dict(name="decoder_lm", vocab_size=vocab_size, num_layers=num_layers, embed_dim=d_model,
                    num_heads=4, num_kv_heads=4, head_dim=d_model // 4, mlp_dim=2 * d_model, mlp_kind="swiglu",
                    norm_kind="rms", attention=lm_tiny.attention_config(), remat="none", dtype="float32",
                    param_dtype="float32")
    raise ValueError(f"unknown token model {kind!r}; valid: ['mamba', 's4d', 'attention']")


def get_config() -> ml_collections.ConfigDict:
    c = lm_tiny.get_config()
    del c.sample  # the token tasks print targets vs predictions instead
    c.task = "sequence_tokens"
    c.model = token_model("mamba")
    c.data = dict(name="selective_copying", seq_len=256, num_tokens=16, vocab_size=16, global_batch_size=32,
                  seed=0, eval_seed=1, eval_batches=4)
    c.optimizer.update(learning_rate=2e-3, warmup_steps=50, weight_decay=0.0)
    c.train.update(num_steps=1000, log_every=50, eval_every=250, checkpoint_every=250)
    return c
