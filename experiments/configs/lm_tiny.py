"""Tiny byte-level decoder-only Transformer LM on the Python standard library's source (embedded).

Reproduces: nothing published; it is the project's smoke-scale default experiment — a 4-layer,
d=128 pre-norm Transformer (RoPE, SwiGLU, RMSNorm; ~0.9M parameters) trained on the bytes of
the running interpreter's stdlib `.py` files (tfds builder `py_stdlib`, prepared locally, no
download), 128-byte context.

Run:
    python -m jaxmodels.main --config experiments/configs/lm_tiny.py --workdir /tmp/lm_tiny

Expect (2-core CPU, see README "Results"): eval bits/byte falls from ~8.0 (uniform over 256)
to well below the corpus's unigram entropy in a few minutes.
"""

import dataclasses

import ml_collections
from ml_collections import config_dict

from jaxmodels.nn.attention import AttentionSpec, spec_from_config
from jaxmodels.nn.transformer import MoESpec, moe_spec_from_config
from jaxmodels.parallel.sharding import DEFAULT_RULES
from jaxmodels.train.loss_scaling import LossScaling


def attention_config(**overrides) -> dict:
    """The `model.attention` section: every field of jaxmodels.nn.attention.AttentionSpec, so that
    each can be overridden from the command line (e.g. --config.model.attention.kind=linear)."""
    spec_from_config(overrides)  # unknown fields and invalid values fail here, naming the field
    fields = {f.name: f.default for f in dataclasses.fields(AttentionSpec)}
    fields["implementation"] = config_dict.placeholder(str)  # None: fastest correct kernel for the device
    return {**fields, **overrides}


def moe_config(**overrides) -> dict:
    """The `model.moe` section: every field of jaxmodels.nn.transformer.MoESpec (num_experts=0: dense),
    each overridable from the command line (e.g. --config.model.moe.num_experts=8)."""
    moe_spec_from_config(overrides)  # unknown fields and invalid values fail here, naming the field
    fields = {f.name: f.default for f in dataclasses.fields(MoESpec)}
    fields["implementation"] = config_dict.placeholder(str)  # None: the fastest for the backend (ops.moe)
    return {**fields, **overrides}


def run_sections(*, num_steps: int, log_every: int, eval_every: int, checkpoint_every: int, **train) -> dict:
    """The sections every experiment config shares, documented once here: `train` (the schedule given, other
    fields at these defaults unless named in `train`), `mesh`, `sharding_rules` and `parallel`.
    Use: `c.update(lm_tiny.run_sections(num_steps=..., log_every=..., eval_every=..., checkpoint_every=...))`."""
    overrides = train
    train = dict(
        num_steps=num_steps,
        seed=0,
        grad_accum_steps=1,
        log_every=log_every,
        eval_every=eval_every,
        checkpoint_every=checkpoint_every,
        keep_checkpoints=1,
        nan_policy="skip",      # "skip": keep the old state and go on; "halt": raise
        max_consecutive_skips=10,  # "skip" halts after this many non-finite steps in a row
        peak_flops=0.0,         # device peak FLOP/s for MFU; 0 = look up the device table
        # PRNG of parameter initialisation. "threefry2x32": the same values on every backend and mesh.
        # "rbg": the GPU compiles the initialiser 5x faster (125M: 18 s vs 95 s on an H100,
        # benchmarks/results/lm_step_notes.md), but its values depend on the backend.
        prng_impl="threefry2x32",
        # (start, count): a jax.profiler trace of the `count` steps after step `start`, in WORKDIR/profile/
        # (process 0); (0, 0): none. E.g. --config.train.profile_steps="(10, 5)".
        profile_steps=(0, 0),
        # Where metrics go (jaxmodels/train/trackers.py): "jsonl" (WORKDIR/metrics.jsonl), "tensorboard"
        # (WORKDIR/tensorboard/), "wandb" (Weights & Biases: pip install 'jaxmodels[wandb]').
        trackers=("jsonl", "tensorboard"),
        wandb_project="jaxmodels",
        # A params checkpoint to start from instead of a random init: the folder `python -m jaxmodels.interop.hf
        # import` wrote, or another run's workdir (its latest checkpoint). Step 0, fresh optimizer state; the
        # shapes must fit config.model. Ignored when this workdir has checkpoints (resuming wins). "": random.
        init_from="",
    )
    train.update(overrides)

    # Axes data / fsdp / expert / tensor; -1 takes the remaining devices. The batch is split over
    # data x fsdp x expert; MoE experts are sharded over expert.
    mesh = dict(data=-1, fsdp=1, expert=1, tensor=1)
    # Logical axis name -> mesh axes (see jaxmodels/parallel/sharding.py).
    sharding_rules = DEFAULT_RULES
    # Data-parallel strategy: "replicated", "zero" or "fsdp" (README "Data-parallel strategies",
    # jaxmodels/parallel/strategy.py); "fsdp" needs mesh.fsdp != 1. collectives (zero only): "ring"
    # (ppermute rings of jaxmodels/ops/collectives.py) or "xla" (lax.psum_scatter / all_gather, NCCL on GPU).
    parallel = dict(strategy="replicated", collectives="ring")
    return dict(train=train, mesh=mesh, sharding_rules=sharding_rules, parallel=parallel)


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "lm"

    c.model = dict(
        name="decoder_lm",
        vocab_size=256,         # 0: the tokenizer's vocabulary padded to a multiple of 128
        num_layers=4,
        embed_dim=128,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        mlp_dim=384,
        mlp_kind="swiglu",
        norm_kind="rms",
        norm_eps=1e-6,          # epsilon of every norm (Llama checkpoints: 1e-5 or 1e-6)
        tie_embeddings=False,   # True: the output head is the embedding table transposed (no w_out)
        attention=attention_config(),
        moe=moe_config(),       # mixture-of-experts MLPs; num_experts=0 (default) is the dense model
        remat="none",
        # "mup": maximal update parametrisation (Tensor Programs V) relative to a base model of embed_dim
        # mup_base_width, whose learning rate then transfers to wider models (DecoderLM; experiments/mup.py).
        parametrization="standard",
        mup_base_width=0,       # muP's base embed_dim (ignored by "standard")
        dtype="float32",        # compute dtype ("bfloat16" on accelerators)
        param_dtype="float32",
    )

    c.data = dict(
        name="py_stdlib",       # any tfds data set with a text feature works with data_dir set
        data_dir=config_dict.placeholder(str),  # None: $JAXMODELS_DATA_DIR or ~/.cache/jaxmodels
        # "byte" (ids = bytes, vocabulary 256, no end-of-document token), a SentencePiece .model or Hugging Face
        # tokenizer.json (or a directory holding one), or "bpe:VOCAB" (byte-level BPE trained on train_split on
        # first use). With an end-of-document token, documents in a window do not attend to each other.
        tokenizer="byte",
        train_split="train",
        eval_split="validation",
        text_key="text",        # the feature holding the documents' text
        seq_len=128,
        global_batch_size=32,
        seed=0,
        eval_batches=8,         # batches of eval_split per evaluation; 0 = every window of the split once
    )

    c.optimizer = dict(
        learning_rate=3e-3,
        warmup_steps=50,
        schedule="cosine",
        min_lr_ratio=0.1,
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=0.1,
        grad_clip_norm=1.0,
    )

    c.update(run_sections(num_steps=600, log_every=50, eval_every=200, checkpoint_every=200, keep_checkpoints=3))
    # Loss scaling for float16 (model.dtype="float16"; jaxmodels/train/loss_scaling.py): loss_scale "none",
    # "static" or "dynamic" (S from init_scale, times backoff_factor on overflow, times growth_factor after
    # growth_interval finite steps). bfloat16 and float32 need none.
    c.precision = dataclasses.asdict(LossScaling())

    # top_k=0 and top_p=1.0 are off (the whole vocabulary).
    c.sample = dict(prompt="def ", max_new_tokens=200, temperature=0.8, top_k=0, top_p=1.0)
    return c
