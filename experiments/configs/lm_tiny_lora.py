"""LoRA fine-tuning of lm_tiny: only rank-8 updates of the query and value projections train, on a pre-trained base.

Reproduces: the LoRA recipe of Hu et al. 2021 ("LoRA: Low-Rank Adaptation of Large Language Models", §4: W_q and
W_v adapted, B = 0 at init, update scaled by alpha / r, no weight decay) at smoke scale, on the embedded byte corpus
of lm_tiny. The base model comes from `train.init_from`, which a fine-tune requires: a run's workdir (its latest
checkpoint) or the folder `python -m jaxmodels.interop.hf import` wrote. Two commands:

    python -m jaxmodels.main --config experiments/configs/lm_tiny.py --workdir /tmp/lm_tiny
    python -m jaxmodels.main --config experiments/configs/lm_tiny_lora.py --workdir /tmp/lm_tiny_lora \\
        --config.train.init_from=/tmp/lm_tiny

Other methods with the same config: --config.peft.method=prefix | prompt | adapter (or none: full fine-tuning),
their sizes in the `peft` section (jaxmodels/nn/peft.py, `PeftSpec`). LoRA trains unfolded (x W + s (dropout(x) A) B
inside the projections: no weight gradient of the frozen kernels); --config.peft.dropout=0.05 adds LoRA dropout,
--config.peft.unfolded=False folds the update into the kernels instead. Only the adapters get optimizer state and go
into the checkpoints; a resumed run reads the base from init_from again. A LoRA run exports as a Hugging Face peft
adapter: python -m jaxmodels.interop.hf export --workdir /tmp/lm_tiny_lora --out /tmp/lora_hf [--merge].

Expect (2-core CPU): ~14k trained parameters (of ~0.9M), and an eval loss that falls from the base's on the
fine-tuning data within a few hundred steps; experiments/peft.py compares the methods on held-out text
(experiments/results/peft/).
"""

import dataclasses

import ml_collections
from ml_collections import config_dict

from experiments.configs import lm_tiny
from jaxmodels.nn.peft import PeftSpec, peft_spec_from_config


def peft_config(**overrides) -> dict:
    """The `peft` section: every field of jaxmodels.nn.peft.PeftSpec, so that each can be overridden from the
    command line (e.g. --config.peft.rank=16)."""
    peft_spec_from_config(overrides)  # unknown fields and invalid values fail here, naming the field
    fields = {f.name: f.default for f in dataclasses.fields(PeftSpec)}
    fields["base_dtype"] = config_dict.placeholder(str)  # None: model.param_dtype; "bfloat16": a half-size base
    return {**fields, **overrides}


def get_config() -> ml_collections.ConfigDict:
    c = lm_tiny.get_config()
    c.peft = peft_config(method="lora", targets="attn/w_(q|v)", rank=8, alpha=16.0)
    c.train.init_from = "/tmp/lm_tiny"  # the pre-trained run (the first command above)
    c.train.num_steps = 300
    c.train.eval_every = 100
    c.train.checkpoint_every = 100
    # LoRA's learning rates are higher than full training's (the update starts at 0); no weight decay.
    c.optimizer.learning_rate = 3e-3
    c.optimizer.weight_decay = 0.0
    c.optimizer.warmup_steps = 20
    return c
