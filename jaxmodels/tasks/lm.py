"""Language modelling with any tokenizer: next-token loss over packed documents, bits per byte comparable across
tokenizers, data and text samples."""

import math
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from jaxmodels.data import lm as lm_data
from jaxmodels.data.tokenizers import Tokenizer, padded_vocab_size
from jaxmodels.models.lm import check_top_k, compile_generate
from jaxmodels.ops.checks import non_negative_int, positive_int, real_in_range
from jaxmodels.ops.losses import softmax_cross_entropy
from jaxmodels.tasks.base import Task

# How `next_token_loss`'s metrics combine over batches (`Task.metric_weights`): per-target-token means weigh by
# num_tokens, bits_per_byte by num_bytes.
METRIC_WEIGHTS = {"loss": "num_tokens", "cross_entropy": "num_tokens", "bits_per_byte": "num_bytes"}


def next_token_loss(model: nnx.Module, tokens: jax.Array, segment_ids: jax.Array | None = None, *,
                    token_byte_lengths: jax.Array | np.ndarray | None = None,
                    attend_within_documents: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Next-token cross entropy over the targets that are not padding. Returns (loss, metrics), float32 scalars.

    tokens: (B, T + 1) int32 ids; inputs tokens[:, :-1] predict targets tokens[:, 1:].
    segment_ids: None (every target counts) or (B, T + 1) int32, the document of each token (1, 2, ... within a
      row; 0 = padding): targets in segment 0 are not counted.
    token_byte_lengths: None (one byte per token: the byte tokenizer) or (V,) int, the UTF-8 bytes each id
      stands for (`Tokenizer.token_byte_lengths`, padded with zeros to the model's vocabulary).
    attend_within_documents: the model gets the inputs' segment ids (`DecoderLM(segment_ids=...)`): a token
      attends only to its own document and positions restart at each document.

    The model is called as model(inputs, return_aux=True[, segment_ids=...]) -> (logits, aux). Metrics, with
    n the counted targets and b the bytes they stand for:
      cross_entropy: Σ nats / n, the mean cross entropy per target token (in "loss"; its own key with MoE);
      loss: cross_entropy, + aux["moe_loss"] when the model's aux is not empty (a DecoderLM with MoE blocks:
        `jaxmodels.models.lm.combine_moe_aux`, Switch load balancing and ST-MoE z-loss), whose router statistics
        (load_balancing_loss, router_z_loss, dropped_fraction, routing_entropy, max_expert_load) come too;
      perplexity: exp(cross_entropy);
      bits_per_byte: Σ nats / ln 2 / b, comparable across tokenizers (Σ nats / ln 2 / n for bytes);
      num_tokens: n, num_bytes: b (the counts `METRIC_WEIGHTS` weighs by, so that eval batches combine
        exactly: `Task.combine_metrics`).
    A batch with no counted target gives cross entropy 0 (the counts are floored at 1 in the divisions).
    """
    if attend_within_documents and segment_ids is None:
        raise ValueError("attend_within_documents=True needs the segment_ids of the documents, got None")
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    kwargs = {"segment_ids": segment_ids[:, :-1]} if attend_within_documents else {}
    logits, aux = model(inputs, return_aux=True, **kwargs)
    if segment_ids is None:
        counted = jnp.ones(targets.shape, jnp.float32)
    else:
        counted = (segment_ids[:, 1:] != 0).astype(jnp.float32)
    target_bytes = counted if token_byte_lengths is None else counted * jnp.asarray(token_byte_lengths)[targets]
    nats = jnp.sum(softmax_cross_entropy(logits, targets) * counted)
    num_tokens, num_bytes = jnp.sum(counted), jnp.sum(target_bytes)
    cross_entropy = nats / jnp.maximum(num_tokens, 1.0)
    metrics = {"bits_per_byte": nats / math.log(2.0) / jnp.maximum(num_bytes, 1.0),
               "perplexity": jnp.exp(cross_entropy), "num_tokens": num_tokens, "num_bytes": num_bytes}
    loss = cross_entropy
    if aux:
        loss = cross_entropy + aux["moe_loss"]
        metrics |= {"cross_entropy": cross_entropy} | {k: v for k, v in aux.items() if k != "expert_load"}
    return loss, {"loss": loss, **metrics}


def token_batch(tokens: np.ndarray) -> dict[str, np.ndarray]:
    """The LM task's batch for windows of one document each: {"tokens": tokens, "segment_ids": ones}, both int32
    (B, T + 1); for benchmarks and experiments that make their own token arrays."""
    tokens = np.asarray(tokens, np.int32)
    return {"tokens": tokens, "segment_ids": np.ones_like(tokens)}


def check_sample_config(sample: ml_collections.ConfigDict, vocab_size: int) -> None:
    """config.sample, checked before training so that the final sample cannot fail: prompt a non-empty string,
    max_new_tokens an int >= 1, temperature a real >= 0 (0: greedy), top_k an int in [0, vocab_size] (0: off),
    top_p a real in (0, 1] (1: off). Raises ValueError / TypeError naming config.sample.X."""
    if not isinstance(sample.prompt, str) or not sample.prompt:
        raise ValueError(f"config.sample.prompt must be a non-empty string (generation continues it), "
                         f"got {sample.prompt!r}")
    positive_int("config.sample.max_new_tokens", sample.max_new_tokens)
    real_in_range("config.sample.temperature", sample.temperature, 0)
    check_top_k(sample.top_k, vocab_size, "config.sample.top_k")
    real_in_range("config.sample.top_p", sample.top_p, 0, 1, include_low=False)


class LanguageModeling(Task):
    """Language modelling (`Task`) with the tokenizer of config.data.tokenizer: next-token loss over packed
    documents, bits/byte, FLOPs and a text sample, for any model with the causal-LM interface (`DecoderLM`,
    `MambaLM`: tokens -> logits, `return_aux`, `segment_ids`, `train_flops_per_token`, cached generation).

    Config sections used: model (see `jaxmodels.models.make_model`; vocab_size 0 = the tokenizer's vocabulary
    padded to a multiple of 128, written back into the config here so that the saved config and the model carry
    the number), data (name, data_dir, tokenizer ("byte", a tokenizer file or directory, or "bpe:VOCAB"),
    train_split, eval_split, text_key, seq_len, global_batch_size, seed, eval_batches: 0 = the whole eval split),
    sample (prompt, max_new_tokens, temperature, top_k, top_p).

    Batches are {"tokens", "segment_ids"} int32 (B, seq_len + 1) (`jaxmodels.data.lm`). The model attends within
    documents (gets the segment ids) only when the tokenizer has an end-of-document token: byte windows are one
    segment of concatenated text, so the byte experiments keep the plain causal kernel (cuDNN's on a GPU).
    Metrics: `next_token_loss`, combined over eval batches by `METRIC_WEIGHTS`, perplexity recomputed from the
    combined cross entropy.
    """

    metric_weights = METRIC_WEIGHTS
    min_eval_batches = 0

    def __init__(self, config: ml_collections.ConfigDict):
        d, m = config.data, config.model
        for split in (d.train_split, d.eval_split):  # a missing split: ValueError naming the data set's splits
            lm_data.text_source(d.name, split, d.data_dir, d.get("files"), text_key=d.text_key)
        self.tokenizer = lm_data.resolve_tokenizer(d)
        vocab = self.tokenizer.vocab_size
        if non_negative_int("config.model.vocab_size", m.vocab_size) == 0:
            m.vocab_size = padded_vocab_size(vocab)
        elif m.vocab_size < vocab:
            raise ValueError(f"config.model.vocab_size={m.vocab_size} is smaller than the vocabulary of "
                             f"config.data.tokenizer={d.tokenizer!r}, {vocab} ids; set it to at least {vocab}, or "
                             f"to 0 for {padded_vocab_size(vocab)} (padded to a multiple of 128)")
        check_sample_config(config.sample, m.vocab_size)
        if not self.tokenizer.encode(config.sample.prompt):
            raise ValueError(f"config.sample.prompt={config.sample.prompt!r} encodes to no token")
        self.token_byte_lengths = np.zeros(m.vocab_size, np.int32)  # padding ids stand for no byte
        self.token_byte_lengths[:vocab] = self.tokenizer.token_byte_lengths()
        super().__init__(config)

    def loss(self, model: nnx.Module, batch: dict) -> tuple[jax.Array, dict[str, jax.Array]]:
        """`next_token_loss` of batch {"tokens", "segment_ids"}, documents kept apart when the tokenizer has an
        end-of-document token."""
        return next_token_loss(model, batch["tokens"], batch["segment_ids"],
                               token_byte_lengths=self.token_byte_lengths,
                               attend_within_documents=self.tokenizer.eos_id is not None)

    def combine_metrics(self, batches):
        """`Task.combine_metrics`, then perplexity = exp(the combined cross entropy)."""
        out = super().combine_metrics(batches)
        out["perplexity"] = math.exp(out.get("cross_entropy", out["loss"]))
        return out

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        """The global batch: {"tokens", "segment_ids"}, each (global_batch_size, seq_len + 1) int32."""
        d = self.config.data
        shape = jax.ShapeDtypeStruct((d.global_batch_size, d.seq_len + 1), jnp.int32)
        return {"tokens": shape, "segment_ids": shape}

    @property
    def tokens_per_example(self) -> int:
        return self.config.data.seq_len

    def flops_per_example(self, model: nnx.Module) -> float:
        """seq_len x the model's `train_flops_per_token(seq_len)`."""
        seq_len = self.config.data.seq_len
        return seq_len * model.train_flops_per_token(seq_len)

    def train_batches(self, start_step: int, process_index: int, process_count: int):
        d = self.config.data
        return lm_data.lm_batches(d, self.tokenizer, split=d.train_split, global_batch_size=d.global_batch_size,
                                  seed=d.seed, process_index=process_index, process_count=process_count,
                                  start_step=start_step)

    def eval_batches(self) -> list[dict]:
        """data.eval_batches batches of data.eval_split, or every window of it once when that is 0."""
        d = self.config.data
        return lm_data.eval_batches(d, self.tokenizer, split=d.eval_split, batch_size=d.global_batch_size,
                                    num_batches=d.eval_batches)

    def baseline(self) -> dict[str, float]:
        """Reference numbers printed beside eval: the unigram entropy of the train split's tokens, in bits/byte."""
        d = self.config.data
        return {"unigram_entropy_bits_per_byte": lm_data.unigram_entropy_bits_per_byte(d, self.tokenizer,
                                                                                       d.train_split)}

    def sample(self, model: nnx.Module, seed: int) -> str:
        """Text generated from the configured prompt (`generate_text`: the tokenizer's EOS ends it, padded ids are
        never sampled); `python -m jaxmodels.generate --workdir W` reproduces it."""
        s = self.config.sample
        texts, _ = generate_text(model, self.tokenizer, [s.prompt], seed=seed, max_new_tokens=s.max_new_tokens,
                                 temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
        return texts[0]


def generate_text(model: nnx.Module, tokenizer: Tokenizer, prompts: list[str], *, seed: int = 0,
                  max_new_tokens: int, temperature: float, top_k: int = 0,
                  top_p: float = 1.0) -> tuple[list[str], dict[str, float]]:
    """Continue each prompt with `jaxmodels.models.lm.generate`; returns (texts, stats).

    texts[i]: prompts[i]'s tokens followed by its new tokens up to (not including) the tokenizer's EOS, decoded
    together by `tokenizer` (as the training run's sample is: `LanguageModeling.sample`).
    Batching: prompts of equal token length form a group, decoded as one batch (no padding, so exact for every
    model kind); groups are numbered g = 0, 1, ... in the order their length first occurs in `prompts`, and
    group g draws with key `jax.random.key(seed + g)`. So one prompt with `seed` reproduces the run's sample
    (`jax.random.key(config.train.seed)`), and a prompt whose group is g gives the same text alone with seed
    seed + g when its group holds only it. Rows stop at the tokenizer's EOS (`eos_id`; bytes have none), and
    ids >= tokenizer.vocab_size (the model's padded vocabulary) are never sampled.
    temperature, top_k (0: off), top_p (1.0: off): as in `jaxmodels.models.lm.sample_logits`.
    stats: new_tokens (generated, each row's EOS counted, nothing after it), seconds (decoding, compilation
    excluded: each group is compiled ahead of time), tokens_per_second (new_tokens / seconds),
    compile_seconds, groups.
    Raises ValueError for no prompts, a prompt that encodes to no tokens, or a tokenizer whose vocabulary is
    larger than the model's (and as `generate` does for the settings).
    """
    if not prompts:
        raise ValueError("prompts must hold at least one prompt, got none")
    if tokenizer.vocab_size > model.vocab_size:
        raise ValueError(f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} ids but the model only "
                         f"{model.vocab_size}; load the model with the tokenizer its run was trained with")
    ids = [tokenizer.encode(p) for p in prompts]
    for i, x in enumerate(ids):
        if not x:
            raise ValueError(f"prompts[{i}]={prompts[i]!r} encodes to no tokens; give each prompt some text")
    groups: dict[int, list[int]] = {}  # token length -> indices of its prompts, in order of first occurrence
    for i, x in enumerate(ids):
        groups.setdefault(len(x), []).append(i)
    eos_id = tokenizer.eos_id
    settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                    eos_id=eos_id, vocab_limit=tokenizer.vocab_size)
    texts, new_tokens, seconds, compile_seconds = [""] * len(prompts), 0, 0.0, 0.0
    for g, (length, members) in enumerate(groups.items()):
        prompt, key = np.asarray([ids[i] for i in members], np.int32), jax.random.key(seed + g)
        start = time.perf_counter()
        run = compile_generate(model, prompt, key, **settings)
        compile_seconds += time.perf_counter() - start
        start = time.perf_counter()
        tokens = np.asarray(jax.device_get(run(prompt, key)))
        seconds += time.perf_counter() - start
        for i, row in zip(members, tokens):
            new = row[length:].tolist()
            stop = new.index(eos_id) if eos_id in new else len(new)
            new_tokens += min(stop + 1, len(new))
            texts[i] = tokenizer.decode(ids[i] + new[:stop])
    stats = dict(new_tokens=new_tokens, seconds=seconds, tokens_per_second=new_tokens / seconds,
                 compile_seconds=compile_seconds, groups=len(groups))
    return texts, stats
