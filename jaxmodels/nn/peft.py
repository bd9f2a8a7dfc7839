"""Parameter-efficient fine-tuning (PEFT): what is trained on top of a frozen pre-trained model.

Methods (`PeftSpec.method`, the `peft` section of a config):
  lora     LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): a kernel W of a chosen
           projection becomes W + (alpha / r) A B with A (in, r), B (r, out), B = 0 at init, so that training
           starts from the pre-trained function. Two forms of one update:
           unfolded (training): y = x W + (alpha / r) (dropout(x) A) B inside the projection (`LoraKernel`, which
             `nn.layers.dense` computes), as Hugging Face peft does: the frozen W gets no weight gradient (only dx
             flows through it) and dropout (peft's lora_dropout, on the input of A) acts per example. A layer
             lists the kernels it uses only through `dense` in LORA_PROJECTIONS (`lora_projections`);
           folded (`lora_apply`): W + (alpha / r) A B written into the parameter tree, which any model takes
             unchanged: merged inference and export, `lora_unmerge` takes it out again, and the training form of
             the kernels a model uses otherwise (an embedding table), where dropout is not offered.
  prefix   prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation"):
           learned keys and values prepended to every layer's attention (`Prefix`), produced during training by
           a reparametrisation MLP from a small table (the paper's §4.3, which stabilises training) and
           materialised for inference (`Prefix.materialized`: the MLP is dropped).
  prompt   prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning"):
           prompt_length learned embeddings prepended to the input embeddings.
  adapter  bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP"):
           h + up(gelu(down(h))) on the output of each attention and MLP sublayer (`Adapter`), the up-projection
           zero-initialised so that the model starts equal to the pre-trained one.
  none     no PEFT: every parameter is trained (full fine-tuning when the run starts from a checkpoint).
prefix, prompt and adapter add modules to the model (HOOK_METHODS; a model lists those it has in
`Model.peft_methods`); lora adds none (the factors live beside the parameter tree and enter the model through its
kernels' values).

Parameter trees here are pure dicts (`nnx.state(model, nnx.Param).to_pure_dict()`); a parameter's path is its keys
joined by "/" ("blocks/0/attn/w_q").
"""

import dataclasses
import math
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmodels.nn.param import fan_in_init, param, zeros_init
from jaxmodels.nn.spec import spec_from_section
from jaxmodels.ops.checks import non_negative_int, one_of, positive_int, real_in_range
from jaxmodels.ops.precision import DTYPES

METHODS = ("none", "lora", "prefix", "prompt", "adapter")
HOOK_METHODS = ("prefix", "prompt", "adapter")  # methods that add modules to the model


@dataclasses.dataclass(frozen=True)
class PeftSpec:
    """What is fine-tuned; the `peft` section of a config. method: one of METHODS (see the module docstring).

    lora: `targets`, a regular expression searched (re.search) in the path of every parameter of two or more
      dims ("attn/w_(q|v)": the query and value projections of every block); `rank` r; `alpha` (the update is
      scaled by alpha / r, so that changing r needs no new learning rate); `dropout` p in [0, 1), dropout on the
      input of A in training (Hu et al.'s code and Hugging Face peft's lora_dropout; inverted: kept entries are
      scaled by 1 / (1 - p)), which needs the unfolded form; `unfolded`: train with the update computed inside
      the projections (`LoraKernel`) where the model's layers allow it (True), or folded into every kernel
      (False: the kernels' full weight gradients are computed, kept to compare the two forms).
    prefix: `prefix_length` key/value positions per layer; `prefix_hidden`, the width of the reparametrisation
      MLP (0: the prefixes are parameters themselves, the materialised form).
    prompt: `prompt_length` soft-prompt embeddings.
    adapter: `adapter_dim`, the bottleneck width m (Houlsby et al.: 2 to 256 for D = 1024).
    base_dtype: the dtype the frozen pre-trained parameters are stored in ("bfloat16" keeps them in half the
      memory, as QLoRA keeps them quantised, Dettmers et al. 2023); None: model.param_dtype. The trained
      parameters and the arithmetic keep the model's dtypes.
    """

    method: str = "none"
    targets: str = "attn/w_(q|v)"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    unfolded: bool = True
    prefix_length: int = 16
    prefix_hidden: int = 64
    prompt_length: int = 16
    adapter_dim: int = 16
    base_dtype: str | None = None

    def __post_init__(self):
        one_of("peft.method", self.method, METHODS)
        one_of("peft.base_dtype", self.base_dtype, (None, *DTYPES))
        positive_int("peft.rank", self.rank)
        positive_int("peft.adapter_dim", self.adapter_dim)
        for name in ("prefix_length", "prefix_hidden", "prompt_length"):
            non_negative_int(f"peft.{name}", getattr(self, name))
        real_in_range("peft.alpha", self.alpha, 0, include_low=False)
        real_in_range("peft.dropout", self.dropout, 0, 1, include_high=False)
        if not isinstance(self.unfolded, bool):
            raise TypeError(f"peft.unfolded must be a bool, got {self.unfolded!r}")
        if self.dropout and not self.unfolded:
            raise ValueError(f"peft.dropout={self.dropout} needs peft.unfolded=True: a kernel with the update folded "
                             "in has no per-example input to drop")
        if not isinstance(self.targets, str):
            raise TypeError(f"peft.targets must be a regular expression (a str), got {self.targets!r}")
        try:
            re.compile(self.targets)
        except re.error as e:
            raise ValueError(f"peft.targets={self.targets!r} is not a regular expression: {e}") from None

    @property
    def scale(self) -> float:
        """LoRA's alpha / r."""
        return self.alpha / self.rank


def peft_spec_from_config(section: Mapping | None) -> PeftSpec:
    """PeftSpec from a config section (a dict / ConfigDict of its fields); None gives method "none"."""
    return spec_from_section(PeftSpec, section, "peft")


# --------------------------------------------------------------------------------------------------- LoRA


@dataclasses.dataclass(frozen=True)
class LoraTarget:
    """A kernel LoRA adapts: its path in the params, its shape, and `fan_in`, how many leading dims are its
    inputs (the kernel is used as the matrix (prod(shape[:fan_in]), prod(shape[fan_in:])))."""

    path: tuple
    shape: tuple[int, ...]
    fan_in: int

    @property
    def name(self) -> str:
        return path_name(self.path)

    @property
    def in_features(self) -> int:
        return math.prod(self.shape[:self.fan_in])

    @property
    def out_features(self) -> int:
        return math.prod(self.shape[self.fan_in:])


def path_name(path: tuple) -> str:
    """("blocks", 0, "attn", "w_q") -> "blocks/0/attn/w_q"."""
    return "/".join(str(k) for k in path)


def matrix_fan_in(shape: tuple[int, ...], logical_axes: tuple | None) -> int | None:
    """How many leading dims of a kernel are its inputs, from its logical axes: 1 for a matrix and for a kernel
    that starts with "embed" (a projection out of the residual stream, e.g. w_q (embed, heads, head_dim)); all but
    the last for one that ends with "embed" (into it, e.g. w_o (heads, head_dim, embed)); None when neither (no
    matrix view, e.g. a stack of experts (expert, embed, mlp))."""
    if len(shape) == 2:
        return 1
    axes = logical_axes or ()
    if axes and axes[0] == "embed":
        return 1
    if axes and axes[-1] == "embed":
        return len(shape) - 1
    return None


def _short(names: list[str]) -> list[str]:
    """Paths with layer indices replaced by "*", each once: "blocks/*/attn/w_q"."""
    return sorted({re.sub(r"(^|/)\d+(?=/|$)", r"\1*", n) for n in names})


def lora_targets(model: nnx.Module, spec: PeftSpec) -> list[LoraTarget]:
    """The kernels of `model` (possibly abstract, from `nnx.eval_shape`) whose path `spec.targets` matches, among
    the parameters of two or more dims. Raises ValueError when it matches none (naming the paths there are, layer
    indices shortened to "*"), matches a kernel with no matrix view (`matrix_fan_in`), or spec.rank exceeds a
    matched kernel's min(in, out) (a rank-r update of it would not be low-rank)."""
    candidates, targets = [], []
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        shape = tuple(var.get_value().shape)
        if len(shape) < 2:
            continue
        candidates.append(path_name(path))
        if not re.search(spec.targets, path_name(path)):
            continue
        fan_in = matrix_fan_in(shape, var.get_metadata().get("logical_axes"))
        if fan_in is None:
            raise ValueError(f"peft.targets={spec.targets!r} matches {path_name(path)} of shape {shape}, which LoRA "
                             "cannot view as a matrix (inputs, outputs); narrow peft.targets")
        targets.append(LoraTarget(tuple(path), shape, fan_in))
    if not targets:
        raise ValueError(f"peft.targets={spec.targets!r} matches no parameter; the kernels are: "
                         + ", ".join(_short(candidates)))
    too_small = [f"{t.name} {t.shape} (min(in, out) = {min(t.in_features, t.out_features)})"
                 for t in targets if spec.rank > min(t.in_features, t.out_features)]
    if too_small:
        raise ValueError(f"peft.rank={spec.rank} is larger than the layers it adapts allow: " + ", ".join(too_small))
    return targets


def lora_init(key: jax.Array, targets: list[LoraTarget], rank: int) -> dict:
    """The LoRA parameters of `targets`: a tree mirroring the params' paths with {"lora_a": (in, r), "lora_b":
    (r, out)} at each target, float32 whatever the kernels' dtype. A ~ U(-1/sqrt(in), 1/sqrt(in)) (PyTorch's
    Kaiming-uniform with a = sqrt(5), as in Hu et al.'s code and Hugging Face peft), B = 0: the adapted model
    starts equal to the base."""
    tree: dict = {}
    for target, k in zip(targets, jax.random.split(key, len(targets))):
        bound = 1.0 / math.sqrt(target.in_features)
        node = tree
        for key_ in target.path[:-1]:
            node = node.setdefault(key_, {})
        node[target.path[-1]] = {
            "lora_a": jax.random.uniform(k, (target.in_features, rank), jnp.float32, -bound, bound),
            "lora_b": jnp.zeros((rank, target.out_features), jnp.float32)}
    return tree


def _is_lora(node) -> bool:
    return isinstance(node, Mapping) and "lora_a" in node


def lora_apply(params: Mapping, lora: Mapping, scale: float, sign: float = 1.0) -> dict:
    """params with W + sign * scale * (A @ B) reshaped to W's shape at each kernel `lora` adapts (`lora_init`'s
    tree); the other leaves as they are. The update is computed in float32 and the result has W's dtype.
    sign=1 merges the update into the kernels, sign=-1 (`lora_unmerge`) takes it out again."""
    def walk(p, l):
        if _is_lora(l):
            return _fold(p, l, sign * scale)
        return {k: walk(v, l[k]) if k in l else v for k, v in p.items()}

    return walk(params, lora)


def _fold(w: jax.Array, factors: Mapping, scale: float) -> jax.Array:
    """W + scale (A @ B) reshaped to W's shape, computed in float32, in W's dtype."""
    delta = jnp.matmul(factors["lora_a"].astype(jnp.float32), factors["lora_b"].astype(jnp.float32))
    return (w.astype(jnp.float32) + scale * delta.reshape(w.shape)).astype(w.dtype)


def lora_unmerge(merged: Mapping, lora: Mapping, scale: float) -> dict:
    """The inverse of `lora_apply` (up to rounding): W = W' - scale * (A @ B) at each adapted kernel."""
    return lora_apply(merged, lora, scale, sign=-1.0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraKernel:
    """A kernel W adapted by LoRA and left unfolded, standing where the model reads W (`lora_unfold`):
    `nn.layers.dense(x, kernel, dtype, spec)` computes x W + `update(x, dtype, spec)` = x W + scale (dropout(x) A) B
    (Hu et al. 2021, eq. 3, with the dropout of their code and of Hugging Face peft) instead of x (W + scale A B).
    The frozen W then only carries dx in the backward pass; A and B get their gradients from the (.., r)
    activations, and no (in, out) weight gradient is formed.

    w: the kernel (in..., out...), its first `fan_in` dims the inputs (`LoraTarget.fan_in`); lora_a (in, r),
    lora_b (r, out) (`lora_init`'s factors); scale: alpha / r; dropout: the rate p in [0, 1) on the input of A,
    drawn from `key` (None when p = 0) per element of x, kept entries scaled by 1 / (1 - p) (inverted dropout, so
    the update's expectation is the undropped one).
    """

    w: jax.Array
    lora_a: jax.Array
    lora_b: jax.Array
    key: jax.Array | None
    scale: float = dataclasses.field(metadata=dict(static=True))
    fan_in: int = dataclasses.field(metadata=dict(static=True))
    dropout: float = dataclasses.field(default=0.0, metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.w.shape

    @property
    def dtype(self):
        return self.w.dtype

    def update(self, x: jax.Array, dtype, spec: str) -> jax.Array:
        """scale (dropout(x) A) B laid out as einsum(spec, x, W): x (..., in...) -> (..., out...) in `dtype`, the
        factors cast to it. `spec` ("bld,dnh->blnh") must contract x over all of W's input dims and keep its output
        dims (a projection); ValueError otherwise."""
        inputs, out = spec.replace(" ", "").split("->")
        x_sub, w_sub = inputs.split(",")
        w_in, w_out = w_sub[:self.fan_in], w_sub[self.fan_in:]
        if len(w_sub) != self.w.ndim or not set(w_in) <= set(x_sub) - set(out) or not set(w_out) <= set(out):
            raise ValueError(f"LoRA's unfolded update needs a projection of x over the kernel's {self.fan_in} input "
                             f"dims (of shape {self.w.shape}); einsum spec {spec!r} is not one")
        r = next(c for c in "rRzZyY" if c not in spec)
        h_sub = "".join(c for c in x_sub if c not in w_in) + r
        a = self.lora_a.reshape(*self.w.shape[:self.fan_in], -1).astype(dtype)
        b = self.lora_b.reshape(-1, *self.w.shape[self.fan_in:]).astype(dtype)
        if self.dropout:
            keep = jax.random.bernoulli(self.key, 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0)
        h = jnp.einsum(f"{x_sub},{w_in}{r}->{h_sub}", x.astype(dtype), a) * jnp.asarray(self.scale, dtype)
        return jnp.einsum(f"{h_sub},{r}{w_out}->{out}", h, b)


def lora_projections(model: nnx.Module, targets: list[LoraTarget]) -> list[LoraTarget]:
    """The `targets` that `model` (possibly abstract) uses only as projections through `nn.layers.dense`, which
    LoRA can therefore compute unfolded (`LoraKernel`): those whose attribute name is in the LORA_PROJECTIONS of
    the module that holds them (Attention's w_q, w_k, w_v, w_o; MLP's; GAU's; the LM's w_out). The others (an
    embedding table, gains) train folded (`lora_apply`)."""
    owners = {tuple(path): node for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Module)}
    return [t for t in targets if t.path[-1] in getattr(type(owners.get(tuple(t.path[:-1]))), "LORA_PROJECTIONS", ())]


def lora_unfold(params: Mapping, lora: Mapping, scale: float, unfolded: list[LoraTarget], *, dropout: float = 0.0,
                key: jax.Array | None = None) -> dict:
    """params for a training forward with the adapters `lora` (`lora_init`'s tree): a `LoraKernel` at each kernel
    of `unfolded` (`lora_projections`), the i-th with dropout rate `dropout` drawn from fold_in(key, i); W + scale
    A B folded (as `lora_apply`) at the other kernels `lora` adapts. Dropout needs a key and every adapted kernel
    unfolded: ValueError naming peft.dropout otherwise."""
    index = {t.path: i for i, t in enumerate(unfolded)}
    if dropout and key is None:
        raise ValueError(f"peft.dropout={dropout} needs a key")

    def walk(p, l, path):
        if not _is_lora(l):
            return {k: walk(v, l[k], (*path, k)) if k in l else v for k, v in p.items()}
        if path not in index:
            if dropout:
                raise ValueError(f"peft.dropout={dropout} needs LoRA unfolded, but {path_name(path)} is folded (not "
                                 "one of the projections its layer lists in LORA_PROJECTIONS); set peft.dropout=0")
            return _fold(p, l, scale)
        i = index[path]
        return LoraKernel(p, l["lora_a"], l["lora_b"], jax.random.fold_in(key, i) if dropout else None, scale,
                          unfolded[i].fan_in, dropout)

    return walk(params, lora, ())


# ------------------------------------------------------------------------------------- parameter trees


def split_params(params: Mapping, base: Mapping) -> tuple[dict, dict]:
    """(added, kept): the leaves of `params` whose path is absent from `base` (a tree of the same kind, e.g. of
    the model without its PEFT modules), and those present. Empty subtrees are dropped."""
    added, kept = {}, {}
    for k, v in params.items():
        if k not in base:
            added[k] = v
        elif isinstance(v, Mapping):
            a, b = split_params(v, base[k])
            if a:
                added[k] = a
            if b:
                kept[k] = b
        else:
            kept[k] = v
    return added, kept


def merge_params(a: Mapping, b: Mapping) -> dict:
    """The union of two trees with disjoint leaves (`split_params`'s inverse)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge_params(out[k], v) if k in out and isinstance(v, Mapping) else v
    return out


# ----------------------------------------------------------------------------------------------- modules


class Adapter(nnx.Module):
    """Houlsby et al. (2019)'s bottleneck adapter: h -> h + up(gelu(down(h) + b_down)) + b_up.
    h: (..., dim) -> same. down (dim, m) fan-in init; up (m, dim) and both biases zero: the identity at init."""

    def __init__(self, dim: int, bottleneck: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.dtype = dtype
        self.down = param(rngs, fan_in_init(), (dim, bottleneck), ("embed", None), param_dtype)
        self.b_down = param(rngs, zeros_init, (bottleneck,), (None,), param_dtype)
        self.up = param(rngs, zeros_init, (bottleneck, dim), (None, "embed"), param_dtype)
        self.b_up = param(rngs, zeros_init, (dim,), ("norm",), param_dtype)

    def __call__(self, h: jax.Array) -> jax.Array:
        z = jax.nn.gelu(jnp.einsum("...d,dm->...m", h.astype(self.dtype), self.down.value.astype(self.dtype))
                        + self.b_down.value.astype(self.dtype))
        return h + (jnp.einsum("...m,md->...d", z, self.up.value.astype(self.dtype))
                    + self.b_up.value.astype(self.dtype)).astype(h.dtype)


class Prefix(nnx.Module):
    """Li & Liang (2021)'s prefixes of every layer: () -> (num_layers, 2, length, num_kv_heads, head_dim), the
    keys ([:, 0]) and values ([:, 1]) that each layer's attention sees before the sequence.

    hidden > 0: reparametrised, P = MLP(P') with P' (length, embed_dim) and a tanh MLP of width `hidden` (as
    Hugging Face peft's PrefixEncoder); hidden = 0: the prefixes are the parameter `kv` itself, N(0, 1) (keys and
    values of unit-RMS inputs through fan-in kernels have about that scale). `materialized()` turns the first
    form into the second for inference.
    """

    def __init__(self, *, num_layers: int, length: int, num_kv_heads: int, head_dim: int, embed_dim: int,
                 hidden: int, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.shape = (num_layers, 2, length, num_kv_heads, head_dim)
        self.hidden = hidden
        if hidden:
            out = math.prod(self.shape[:2]) * num_kv_heads * head_dim
            self.embedding = param(rngs, jax.nn.initializers.normal(1.0), (length, embed_dim), (None, "embed"),
                                   param_dtype)
            self.w_in = param(rngs, fan_in_init(), (embed_dim, hidden), ("embed", None), param_dtype)
            self.b_in = param(rngs, zeros_init, (hidden,), (None,), param_dtype)
            self.w_out = param(rngs, fan_in_init(), (hidden, out), (None, None), param_dtype)
            self.b_out = param(rngs, zeros_init, (out,), (None,), param_dtype)
        else:
            self.kv = param(rngs, jax.nn.initializers.normal(1.0), self.shape,
                            (None, None, None, "kv_heads", "head_dim"), param_dtype)

    def __call__(self) -> jax.Array:
        if not self.hidden:
            return self.kv.value
        h = jnp.tanh(self.embedding.value @ self.w_in.value + self.b_in.value)
        out = (h @ self.w_out.value + self.b_out.value).reshape(self.shape[2], *self.shape[:2], *self.shape[3:])
        return jnp.moveaxis(out, 0, 2)

    def materialized(self) -> "Prefix":
        """A Prefix with hidden = 0 whose `kv` is this one's output: the same prefixes without the MLP."""
        kv = self()
        out = Prefix(num_layers=self.shape[0], length=self.shape[2], num_kv_heads=self.shape[3],
                     head_dim=self.shape[4], embed_dim=1, hidden=0, param_dtype=kv.dtype, rngs=nnx.Rngs(0))
        out.kv.value = kv
        return out
