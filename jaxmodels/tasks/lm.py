"""Language modelling on byte tokens: next-token loss, bits/byte, data and text samples."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from jaxmodels.data import lm as lm_data
from jaxmodels.models.lm import check_top_k, generate
from jaxmodels.ops.checks import positive_int, real_in_range
from jaxmodels.ops.losses import softmax_cross_entropy
from jaxmodels.tasks.base import Task


def next_token_loss(model: nnx.Module, batch: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean next-token cross entropy. batch: (batch, length + 1) int32 token ids;
    inputs batch[:, :-1] predict targets batch[:, 1:]. Returns (loss nats/token f32, metrics).

    The model is called as model(tokens, return_aux=True) -> (logits, aux). When its aux is not empty (a
    DecoderLM with MoE blocks: `jaxmodels.models.lm.combine_moe_aux`'s moe_loss, Switch load balancing and
    ST-MoE z-loss) the loss is cross entropy + aux["moe_loss"], and metrics also hold cross_entropy, moe_loss,
    load_balancing_loss, router_z_loss, dropped_fraction, routing_entropy and max_expert_load.
    bits_per_byte is always cross entropy's."""
    logits, aux = model(batch[:, :-1], return_aux=True)
    cross_entropy = jnp.mean(softmax_cross_entropy(logits, batch[:, 1:]))
    metrics = {"bits_per_byte": cross_entropy / math.log(2.0)}
    loss = cross_entropy
    if aux:
        loss = cross_entropy + aux["moe_loss"]
        metrics |= {"cross_entropy": cross_entropy} | {k: v for k, v in aux.items() if k != "expert_load"}
    return loss, {"loss": loss, **metrics}


def check_sample_config(sample: ml_collections.ConfigDict, vocab_size: int) -> None:
    """config.sample, checked before training so that the final sample cannot fail: prompt a non-empty string,
    max_new_tokens an int >= 1, temperature a real >= 0 (0: greedy), top_k an int in [0, vocab_size] (0: off).
    Raises ValueError / TypeError naming config.sample.X."""
    if not isinstance(sample.prompt, str) or not sample.prompt:
        raise ValueError(f"config.sample.prompt must be a non-empty string (generation continues it), "
                         f"got {sample.prompt!r}")
    positive_int("config.sample.max_new_tokens", sample.max_new_tokens)
    real_in_range("config.sample.temperature", sample.temperature, 0)
    check_top_k(sample.top_k, vocab_size, "config.sample.top_k")


def decode_bytes(tokens) -> str:
    """Byte token ids -> text (invalid UTF-8 replaced)."""
    return bytes(np.asarray(tokens, np.uint8).tolist()).decode("utf-8", errors="replace")


class LanguageModeling(Task):
    """Byte-level language modelling (`Task`): next-token loss, bits/byte, FLOPs and a text sample, for any
    model with the causal-LM interface (`DecoderLM`, `MambaLM`: tokens -> logits, `return_aux`,
    `train_flops_per_token`, cached generation).

    Config sections used: model (see `jaxmodels.models.make_model`), data (name, data_dir, seq_len,
    global_batch_size, seed, eval_batches), sample (prompt, max_new_tokens, temperature, top_k).
    """

    def __init__(self, config: ml_collections.ConfigDict):
        if config.model.vocab_size != 256:
            raise ValueError(f"byte-level data needs model.vocab_size=256, got {config.model.vocab_size}")
        check_sample_config(config.sample, config.model.vocab_size)
        super().__init__(config)

    loss = staticmethod(next_token_loss)

    def abstract_batch(self) -> jax.ShapeDtypeStruct:
        """The global batch: (global_batch_size, seq_len + 1) int32 token ids."""
        d = self.config.data
        return jax.ShapeDtypeStruct((d.global_batch_size, d.seq_len + 1), jnp.int32)

    @property
    def tokens_per_example(self) -> int:
        return self.config.data.seq_len

    def flops_per_example(self, model: nnx.Module) -> float:
        """seq_len x the model's `train_flops_per_token(seq_len)`."""
        seq_len = self.config.data.seq_len
        return seq_len * model.train_flops_per_token(seq_len)

    def train_batches(self, start_step: int, process_index: int, process_count: int):
        d = self.config.data
        return lm_data.lm_batches(d.name, "train", d.data_dir, d.seq_len, d.global_batch_size, d.seed,
                                  process_index=process_index, process_count=process_count, start_step=start_step)

    def eval_batches(self) -> list[np.ndarray]:
        d = self.config.data
        return lm_data.eval_batches(d.name, "validation", d.data_dir, d.seq_len, d.global_batch_size,
                                    d.eval_batches)

    def baseline(self) -> dict[str, float]:
        """Reference numbers printed beside eval: the corpus's unigram entropy in bits/byte."""
        d = self.config.data
        return {"unigram_entropy_bits_per_byte": lm_data.unigram_entropy_bits(d.name, "train", d.data_dir)}

    def sample(self, model: nnx.Module, seed: int) -> str:
        """Generate text from the configured prompt with the KV cache."""
        s = self.config.sample
        prompt = jnp.asarray([list(s.prompt.encode("utf-8"))], jnp.int32)
        tokens = generate(model, prompt, jax.random.key(seed), max_new_tokens=s.max_new_tokens,
                          temperature=s.temperature, top_k=s.top_k)
        return decode_bytes(tokens[0])

