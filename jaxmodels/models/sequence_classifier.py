"""Sequence classifier on a stack of state-space layers (the S4 / S4D / LRU / Mamba classification
setup: sequential images such as 8x8 digits read pixel by pixel, Long Range Arena tasks)."""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmodels.models.base import Model, check_fields
from jaxmodels.nn.layers import NORMS, Embed, dense, make_norm
from jaxmodels.nn.param import fan_in_init, param, zeros_init
from jaxmodels.nn.ssm import LRULayer, MambaBlock, ResidualBlock, S4DLayer, S4Layer


def _make_mixer(kind, d_model, d_state, kwargs, bidirectional, **kw):
    if kind == "s4d":
        return S4DLayer(d_model, d_state, bidirectional=bidirectional, **kwargs, **kw)
    if kind == "s4":
        return S4Layer(d_model, d_state, **kwargs, **kw)
    if kind == "lru":
        return LRULayer(d_model, d_state, **kwargs, **kw)
    return MambaBlock(d_model, d_state=d_state, **kwargs, **kw)


class SequenceClassifier(Model):
    """x (batch, length, in_features) float or (batch, length) int token ids -> logits (batch, num_classes) float32.

    Encoder (a linear map with bias for features, an embedding for tokens) -> num_layers pre-norm residual
    blocks x + mixer(norm(x)) (+ x + MLP(norm(x)) with `mlp_dim`) -> final norm -> pooling -> linear head.
    `mixer` is one of MIXERS: "s4d" (`S4DLayer`), "s4" (`S4Layer`), "lru" (`LRULayer`, linear: use an
    MLP), "mamba" (`MambaBlock`); `mixer_kwargs` go to its constructor (e.g. {"init": "inv"} for S4D,
    {"r_min": 0.9} for LRU, {"expand": 2} for Mamba). `bidirectional` (S4D only) makes the layers
    non-causal. Pooling "mean" averages over positions (S4's default); "last" reads the final position
    (for causal stacks, where it has seen the whole sequence).
    """

    MIXERS = ("s4d", "s4", "lru", "mamba")
    POOLINGS = ("mean", "last")

    @classmethod
    def check_config(cls, config) -> None:
        """config.model: mixer, norm and pooling kinds (a `SequenceTagger` has no pooling), positive sizes."""
        choices = {"mixer": cls.MIXERS, "norm_kind": tuple(NORMS)}
        if "pooling" in config:
            choices["pooling"] = cls.POOLINGS
        check_fields(config, "config.model", choices, ("num_classes", "d_model", "num_layers", "d_state"))

    def __init__(self, *, num_classes: int, d_model: int, num_layers: int, mixer: str = "s4d",
                 in_features: int | None = None, vocab_size: int | None = None, d_state: int = 64,
                 mlp_dim: int | None = None, norm_kind: str = "layer", pooling: str = "mean",
                 bidirectional: bool = False, mixer_kwargs: Mapping | None = None,
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        if mixer not in self.MIXERS:
            raise ValueError(f"unknown mixer {mixer!r}; valid: {list(self.MIXERS)}")
        if pooling not in self.POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; valid: {list(self.POOLINGS)}")
        if (in_features is None) == (vocab_size is None):
            raise ValueError(f"give exactly one of in_features (float inputs) or vocab_size (token ids), got "
                             f"in_features={in_features}, vocab_size={vocab_size}")
        if bidirectional and mixer != "s4d":
            raise ValueError(f"bidirectional is supported by the 's4d' mixer only, got mixer={mixer!r}")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.in_features, self.pooling, self.dtype = in_features, pooling, dtype
        if vocab_size is None:
            self.w_in = param(rngs, fan_in_init(), (in_features, d_model), (None, "embed"), param_dtype)
            self.b_in = param(rngs, zeros_init, (d_model,), ("embed",), param_dtype)
        else:
            self.embed = Embed(vocab_size, d_model, **kw)
        self.blocks = nnx.List([
            ResidualBlock(_make_mixer(mixer, d_model, d_state, dict(mixer_kwargs or {}), bidirectional, **kw),
                          d_model, norm_kind=norm_kind, mlp_dim=mlp_dim, **kw)
            for _ in range(num_layers)])
        self.final_norm = make_norm(norm_kind, d_model, **kw)
        self.w_head = param(rngs, fan_in_init(), (d_model, num_classes), ("embed", None), param_dtype)
        self.b_head = param(rngs, zeros_init, (num_classes,), (None,), param_dtype)

    def _encode(self, x):
        if self.in_features is None:
            if x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.integer):
                raise ValueError(f"SequenceClassifier: expected (batch, length) int token ids, got shape {x.shape} "
                                 f"dtype {x.dtype}")
            return self.embed(x)
        if x.ndim != 3 or x.shape[-1] != self.in_features or not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"SequenceClassifier: expected (batch, length, {self.in_features}) floats, got shape "
                             f"{x.shape} dtype {x.dtype}")
        return dense(x, self.w_in.value, self.dtype) + self.b_in.value.astype(self.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self._encode(x)
        for block in self.blocks:
            h = block(h)
        h = self.final_norm(h)
        pooled = jnp.mean(h.astype(jnp.float32), axis=1) if self.pooling == "mean" else h[:, -1]
        logits = dense(pooled, self.w_head.value, self.dtype) + self.b_head.value.astype(self.dtype)
        return logits.astype(jnp.float32)
