"""Hugging Face causal-LM checkpoints in and out: `load_hf` and `save_hf`, LoRA adapters out in Hugging Face peft's
layout (`save_hf_lora`), and a command line.

    python -m jaxmodels.interop.hf import --hf_dir DIR --out OUT [--dtype bfloat16 --param_dtype float32]
    python -m jaxmodels.interop.hf export --workdir WORKDIR --out DIR [--merge]

(`export` of a LoRA fine-tune writes its peft adapter, or with --merge the model with the update merged.)

Architectures (config.json "architectures", or "model_type" when that is absent):
  LlamaForCausalLM, MistralForCausalLM -> `DecoderLM` ("decoder_lm"): RMSNorm, SwiGLU, grouped-query softmax
    attention with rotate-half RoPE (both are the LLaMA layout, Touvron et al. 2023), tied or untied
    embeddings; Mistral's `sliding_window` is `attention.window` (a query sees its last `window` keys, itself
    included, as in transformers' masks).
  MambaForCausalLM -> `MambaLM` ("mamba_lm") (Gu & Dao 2023), with in_proj's first half the conv/SSM branch x and
    its second half the gate z, as in the reference and in transformers.
RoPE scalings reproduced exactly (ROPE_TYPES): "default", "linear" (position interpolation) and "dynamic" (dynamic
NTK, with max_position_embeddings as the training length). YaRN is refused (transformers ramps by pair index and
truncates, `ops.position.yarn_frequencies` follows the paper), and so are llama3, longrope and the others.

Weight layouts: torch's Linear stores (out, in), ours (in, out) with heads split out: q_proj (N·H, D) ↔ w_q (D, N, H),
o_proj (D, N·H) ↔ w_o (N, H, D); Mamba's conv1d (d_inner, 1, d_conv) ↔ conv_weight (d_conv, d_inner), dt_proj's
weight (d_inner, R) and bias ↔ dt_proj (R, d_inner) and dt_bias. Each conversion is a transpose and reshape, so
import ∘ export is the identity on every array.
"""

import argparse
import dataclasses
import json
import math
import pathlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from jaxmodels.data.lm import resolve_tokenizer
from jaxmodels.interop.weights import SafetensorsFolder, write_safetensors
from jaxmodels.models import check_model_config, make_model
from jaxmodels.models.lm import DecoderLM
from jaxmodels.models.mamba import MambaLM
from jaxmodels.nn.attention import AttentionSpec
from jaxmodels.nn.peft import PeftSpec, path_name
from jaxmodels.nn.ssm import mamba_dt_rank
from jaxmodels.nn.transformer import MoESpec
from jaxmodels.ops.checks import one_of
from jaxmodels.ops.precision import DTYPES
from jaxmodels.train.checkpoint import params_item, restore_params, save_params
from jaxmodels.train.finetune import fine_tune, model_builder
from jaxmodels.train.paths import workdir_path

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "MambaForCausalLM")
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "mamba": "MambaForCausalLM"}
# transformers' rope_type -> AttentionSpec.rope_scaling, for the scalings our RoPE reproduces exactly.
ROPE_TYPES = {"default": "none", "linear": "linear", "dynamic": "dynamic_ntk"}
SILU = ("silu", "swish")  # transformers' names of x·sigmoid(x)
# transformers' defaults of the fields we read (config.json may leave out a field at its default).
HF_DEFAULTS = {
    "LlamaForCausalLM": dict(hidden_act="silu", max_position_embeddings=2048, rms_norm_eps=1e-6,
                             tie_word_embeddings=False, rope_theta=10000.0, attention_bias=False, mlp_bias=False),
    "MistralForCausalLM": dict(hidden_act="silu", max_position_embeddings=4096 * 32, rms_norm_eps=1e-6,
                               tie_word_embeddings=False, rope_theta=10000.0, sliding_window=4096),
    "MambaForCausalLM": dict(state_size=16, conv_kernel=4, expand=2, layer_norm_epsilon=1e-5, use_bias=False,
                             use_conv_bias=True, hidden_act="silu", tie_word_embeddings=True, time_step_rank="auto"),
}
DEFAULT_MAX_POSITIONS = 2048  # max_position_embeddings of an export whose attention.train_length is unset


class Tensor(NamedTuple):
    """One checkpoint tensor: its Hugging Face name, its path in our params (keys of the pure dict of
    `nnx.state(model, nnx.Param)`), and its layout (LAYOUTS)."""
    hf_name: str
    path: tuple
    layout: str


# layout -> (HF shape from ours, HF array -> ours (given our shape), ours -> HF array).
# "linear": torch's (out, in) Linear of our (in, *out) kernel; "heads_out": of our (*in, out) kernel;
# "conv": the depthwise Conv1d (d_inner, 1, d_conv) of our (d_conv, d_inner).
LAYOUTS = {
    "copy": (lambda s: s, lambda x, s: x, lambda x: x),
    "linear": (lambda s: (math.prod(s[1:]), s[0]), lambda x, s: x.T.reshape(s), lambda x: x.reshape(x.shape[0], -1).T),
    "heads_out": (lambda s: (s[-1], math.prod(s[:-1])), lambda x, s: x.T.reshape(s),
                  lambda x: x.reshape(-1, x.shape[-1]).T),
    "conv": (lambda s: (s[1], 1, s[0]), lambda x, s: x[:, 0, :].T, lambda x: x.T[:, None, :]),
}


def tensor_map(model_name: str, num_layers: int, tie_embeddings: bool) -> list[Tensor]:
    """Every tensor of a "decoder_lm" (Llama/Mistral names) or "mamba_lm" (Mamba names) checkpoint; no lm_head when
    the embeddings are tied."""
    if model_name == "decoder_lm":
        prefix, embed, final = "model", "model.embed_tokens.weight", "model.norm.weight"
        per_layer = [("input_layernorm.weight", ("attn_norm", "scale"), "copy"),
                     *((f"self_attn.{w}_proj.weight", ("attn", f"w_{w}"), "linear") for w in "qkv"),
                     ("self_attn.o_proj.weight", ("attn", "w_o"), "heads_out"),
                     ("post_attention_layernorm.weight", ("mlp_norm", "scale"), "copy"),
                     *((f"mlp.{w}_proj.weight", ("mlp", f"w_{w}"), "linear") for w in ("gate", "up", "down"))]
    else:
        prefix, embed, final = "backbone", "backbone.embeddings.weight", "backbone.norm_f.weight"
        per_layer = [("norm.weight", ("norm", "scale"), "copy"),
                     ("mixer.in_proj.weight", ("mixer", "in_proj"), "linear"),
                     ("mixer.conv1d.weight", ("mixer", "conv_weight"), "conv"),
                     ("mixer.conv1d.bias", ("mixer", "conv_bias"), "copy"),
                     ("mixer.x_proj.weight", ("mixer", "x_proj"), "linear"),
                     ("mixer.dt_proj.weight", ("mixer", "dt_proj"), "linear"),
                     ("mixer.dt_proj.bias", ("mixer", "dt_bias"), "copy"),
                     ("mixer.A_log", ("mixer", "A_log"), "copy"),
                     ("mixer.D", ("mixer", "D"), "copy"),
                     ("mixer.out_proj.weight", ("mixer", "out_proj"), "linear")]
    tensors = [Tensor(embed, ("embed", "embedding"), "copy")]
    tensors += [Tensor(f"{prefix}.layers.{i}.{name}", ("blocks", i, *path), layout)
                for i in range(num_layers) for name, path, layout in per_layer]
    tensors.append(Tensor(final, ("final_norm", "scale"), "copy"))
    if not tie_embeddings:
        tensors.append(Tensor("lm_head.weight", ("w_out",), "linear"))
    return tensors


def architecture(hf_config: dict) -> str:
    """The architecture a config.json describes (one of ARCHITECTURES); ValueError naming the supported ones."""
    names = hf_config.get("architectures") or [MODEL_TYPES.get(hf_config.get("model_type"), "")]
    supported = [n for n in names if n in ARCHITECTURES]
    if not supported:
        found = hf_config.get("architectures") or f"model_type {hf_config.get('model_type')!r}"
        raise ValueError(f"unsupported architecture {found!r}; supported: {list(ARCHITECTURES)}")
    return supported[0]


def _rope(hf: dict) -> tuple[float, dict, list[str]]:
    """(rope_theta, the rope_type's parameters, problems) from transformers 5's `rope_parameters` or 4's
    `rope_theta` + `rope_scaling`."""
    params = hf.get("rope_parameters") or {**(hf.get("rope_scaling") or {}), "rope_theta": hf["rope_theta"]}
    rope_type = params.get("rope_type", params.get("type", "default"))
    problems = []
    if rope_type not in ROPE_TYPES:
        problems.append(f"rope_type={rope_type!r} (supported, as our RoPE reproduces them exactly: "
                        f"{list(ROPE_TYPES)})")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        problems.append(f"partial_rotary_factor={params['partial_rotary_factor']} (supported: 1.0)")
    return float(params.get("rope_theta", hf["rope_theta"])), {**params, "rope_type": rope_type}, problems


def hf_to_model_config(hf_config: dict, *, dtype: str = "float32",
                       param_dtype: str = "float32") -> ml_collections.ConfigDict:
    """Our `config.model` section (every field, so each can be overridden) for a Hugging Face config.json (a dict).

    dtype, param_dtype: names of `ops.precision.DTYPES` (compute and parameter dtypes).
    Raises ValueError naming the supported architectures for another one, and listing every field our model
    cannot reproduce (biases, another activation, a RoPE scaling of another type, ...).
    """
    arch = architecture(hf_config)
    for name, value in (("dtype", dtype), ("param_dtype", param_dtype)):
        one_of(name, value, DTYPES)
    hf = {**HF_DEFAULTS[arch], **hf_config}
    problems = [] if hf["hidden_act"] in SILU else [f"hidden_act={hf['hidden_act']!r} (supported: 'silu')"]
    if arch == "MambaForCausalLM":
        hidden, inner = hf["hidden_size"], hf.get("intermediate_size") or int(hf["expand"] * hf["hidden_size"])
        if hf["use_bias"]:
            problems.append("use_bias=True (in_proj/out_proj biases; supported: False)")
        if inner % hidden:
            problems.append(f"intermediate_size={inner} (supported: a multiple of hidden_size={hidden})")
        section = dict(name="mamba_lm", vocab_size=hf["vocab_size"], num_layers=hf["num_hidden_layers"],
                       embed_dim=hidden, d_state=hf["state_size"], d_conv=hf["conv_kernel"], expand=inner // hidden,
                       dt_rank=mamba_dt_rank(hidden, hf["time_step_rank"]), chunk_size=None, scan_implementation=None,
                       norm_eps=float(hf["layer_norm_epsilon"]), tie_embeddings=bool(hf["tie_word_embeddings"]))
    else:
        for bias in ("attention_bias", "mlp_bias"):
            if hf.get(bias):
                problems.append(f"{bias}=True (supported: False)")
        theta, rope, rope_problems = _rope(hf)
        problems += rope_problems
        heads = hf["num_attention_heads"]
        attention = AttentionSpec(
            position="rope", rope_base=theta, rope_scaling=ROPE_TYPES.get(rope["rope_type"], "none"),
            rope_factor=float(rope.get("factor", 1.0)) if rope["rope_type"] != "default" else 1.0,
            train_length=hf["max_position_embeddings"],
            window=(hf["sliding_window"] or 0) if arch == "MistralForCausalLM" else 0)
        section = dict(name="decoder_lm", vocab_size=hf["vocab_size"], num_layers=hf["num_hidden_layers"],
                       embed_dim=hf["hidden_size"], num_heads=heads,
                       num_kv_heads=hf.get("num_key_value_heads") or heads,
                       head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, mlp_dim=hf["intermediate_size"],
                       mlp_kind="swiglu", norm_kind="rms", norm_eps=float(hf["rms_norm_eps"]),
                       tie_embeddings=bool(hf["tie_word_embeddings"]), attention=dataclasses.asdict(attention),
                       moe=dataclasses.asdict(MoESpec()), remat="none")
    if problems:
        raise ValueError(f"cannot import this {arch}: " + "; ".join(problems))
    return ml_collections.ConfigDict({**section, "dtype": dtype, "param_dtype": param_dtype})


def load_hf(directory, *, dtype: str = "float32",
            param_dtype: str = "float32") -> tuple[ml_collections.ConfigDict, nnx.Module]:
    """(our config.model section, the model with the checkpoint's weights) for a Hugging Face checkpoint folder:
    config.json and model.safetensors or shards listed by model.safetensors.index.json (read without torch).

    dtype, param_dtype: names of `ops.precision.DTYPES`; weights are cast to param_dtype. The section is a
    ConfigDict with every field of the model (`hf_to_model_config`), ready to be `config.model`.
    Raises ValueError for an unsupported architecture or field (`hf_to_model_config`), for tensors the config
    needs and the checkpoint lacks or the other way round (naming them; lm_head.weight of tied embeddings and
    rotary_emb.inv_freq buffers are ignored), and for a tensor whose shape does not fit the config (naming the
    tensor and both shapes). A Mamba checkpoint with use_conv_bias=False gets zero conv biases.
    """
    directory = pathlib.Path(directory)
    hf_config = json.loads((directory / "config.json").read_text())
    section = hf_to_model_config(hf_config, dtype=dtype, param_dtype=param_dtype)
    check_model_config(section)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: make_model(section, nnx.Rngs(0))))
    wanted = state.to_pure_dict()
    tensors = tensor_map(section.name, section.num_layers, section.tie_embeddings)
    names = {t.hf_name for t in tensors}
    no_conv_bias = section.name == "mamba_lm" and not {**HF_DEFAULTS["MambaForCausalLM"], **hf_config}["use_conv_bias"]
    may_lack = {n for n in names if n.endswith("conv1d.bias")} if no_conv_bias else set()
    params = {}
    with SafetensorsFolder(directory) as folder:
        ignored = {n for n in folder.names if n.endswith("rotary_emb.inv_freq")}
        ignored |= {"lm_head.weight"} if section.tie_embeddings else set()
        missing, unexpected = sorted(names - folder.names - may_lack), sorted(folder.names - names - ignored)
        if missing or unexpected:
            raise ValueError(f"the tensors in {directory} do not match its config.json ({architecture(hf_config)}, "
                             f"{section.num_layers} layers, tie_word_embeddings={section.tie_embeddings}): "
                             f"missing {missing}, unexpected {unexpected}")
        for t in tensors:
            want = _get(wanted, t.path)
            hf_shape, to_ours, _ = LAYOUTS[t.layout]
            if t.hf_name in folder.names:
                expected, found = hf_shape(want.shape), folder.shape(t.hf_name)
                if found != expected:
                    raise ValueError(f"tensor {t.hf_name} has shape {found} in {directory}, but config.json's sizes "
                                     f"need {expected}")
                value = to_ours(folder.load(t.hf_name), want.shape)
            else:
                value = jnp.zeros(want.shape)
            _set(params, t.path, value.astype(want.dtype))
    state.replace_by_pure_dict(params)
    return section, nnx.merge(graphdef, state)


def hf_config(model: nnx.Module) -> dict:
    """The config.json of `model` (a DecoderLM or MambaLM) for transformers: LlamaForCausalLM, MistralForCausalLM
    (a DecoderLM with attention.window > 0: its sliding_window) or MambaForCausalLM.

    RoPE is written both as transformers 5's `rope_parameters` and 4's `rope_theta` / `rope_scaling`;
    max_position_embeddings is attention.train_length (DEFAULT_MAX_POSITIONS when unset; only dynamic scaling
    uses it). No special tokens (bos/eos/pad None): generation stops only at max_new_tokens.
    Raises ValueError listing every field Hugging Face's Llama/Mistral cannot express (another attention kind,
    positions, RoPE scaling, qk_norm, log_n, a logit divisor other than sqrt(head_dim), MoE, a GELU MLP, LayerNorm,
    muP's logit multiplier),
    TypeError for another model class.
    """
    if not isinstance(model, DecoderLM | MambaLM):
        raise TypeError(f"save_hf exports a DecoderLM or a MambaLM, got {type(model).__name__}")
    dtype = str(jax.tree.leaves(nnx.state(model, nnx.Param))[0].dtype)
    common = dict(vocab_size=model.vocab_size, hidden_size=model.embed_dim, num_hidden_layers=model.num_layers,
                  hidden_act="silu", tie_word_embeddings=model.tie_embeddings, bos_token_id=None, eos_token_id=None,
                  pad_token_id=None, dtype=dtype, torch_dtype=dtype)  # transformers 5 reads dtype, 4 torch_dtype
    if isinstance(model, MambaLM):
        return dict(architectures=["MambaForCausalLM"], model_type="mamba", **common, state_size=model.d_state,
                    conv_kernel=model.d_conv, expand=model.expand, intermediate_size=model.expand * model.embed_dim,
                    time_step_rank=mamba_dt_rank(model.embed_dim, model.dt_rank), layer_norm_epsilon=model.norm_eps,
                    use_bias=False, use_conv_bias=True, residual_in_fp32=True)
    spec, rope_types = model.attention, {ours: theirs for theirs, ours in ROPE_TYPES.items()}
    fields = {"mlp_kind": (model.mlp_kind, "swiglu"), "norm_kind": (model.norm_kind, "rms"),
              "attention.kind": (spec.kind, "softmax"), "attention.position": (spec.position, "rope"),
              "attention.qk_norm": (spec.qk_norm, False), "attention.log_n": (spec.log_n, False),
              "attention.logit_divisor": (spec.logit_divisor, "sqrt_head_dim"),
              "moe.num_experts": (model.moe.num_experts, 0), "parametrization": (model.parametrization, "standard")}
    problems = [f"model.{name}={value!r} (Hugging Face needs {need!r})"
                for name, (value, need) in fields.items() if value != need]
    if spec.rope_scaling not in rope_types:
        problems.append(f"model.attention.rope_scaling={spec.rope_scaling!r} (Hugging Face: one of {list(rope_types)})")
    if problems:
        raise ValueError("cannot export this DecoderLM as a Hugging Face Llama/Mistral: " + "; ".join(problems))
    rope = {"rope_type": rope_types[spec.rope_scaling], "rope_theta": spec.rope_base}
    if spec.rope_scaling != "none":
        rope["factor"] = spec.rope_factor
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", **common, intermediate_size=model.mlp_dim,
                  num_attention_heads=model.num_heads, num_key_value_heads=model.num_kv_heads,
                  head_dim=model.head_dim, max_position_embeddings=spec.train_length or DEFAULT_MAX_POSITIONS,
                  rms_norm_eps=model.norm_eps, rope_parameters=rope, rope_theta=spec.rope_base,
                  rope_scaling={k: v for k, v in rope.items() if k != "rope_theta"} if "factor" in rope else None)
    if spec.window:
        return {**config, "architectures": ["MistralForCausalLM"], "model_type": "mistral",
                "sliding_window": spec.window}
    return {**config, "attention_bias": False, "mlp_bias": False}


def save_hf(model: nnx.Module, directory, *, tokenizer=None) -> pathlib.Path:
    """Write `model` (DecoderLM or MambaLM) as a Hugging Face checkpoint folder that
    `transformers.AutoModelForCausalLM.from_pretrained(directory)` loads: config.json (`hf_config`) and one
    model.safetensors in the parameters' dtype (no lm_head.weight when the embeddings are tied).

    tokenizer: optional, an object of `jaxmodels.data.tokenizers` (anything with `.save(directory)`), called to
    write its files next to the weights. Returns the folder. Raises as `hf_config` for a model HF cannot express.
    """
    config = hf_config(model)
    params = nnx.state(model, nnx.Param).to_pure_dict()
    name = "mamba_lm" if isinstance(model, MambaLM) else "decoder_lm"
    tensors = {t.hf_name: LAYOUTS[t.layout][2](_get(params, t.path))
               for t in tensor_map(name, model.num_layers, model.tie_embeddings)}
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_safetensors(tensors, directory)
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory


LORA_LAYOUTS = ("linear", "heads_out")  # the tensors that are a torch Linear's weight, which peft's LoRA adapts
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def lora_target_modules(model: DecoderLM, lora: dict) -> tuple[dict[str, str], list[str]]:
    """({our path: the transformers module it adapts, e.g. "model.layers.0.self_attn.q_proj"}, peft's
    `target_modules`) of the LoRA factors `lora` (`nn.peft.lora_init`'s tree) of a Llama-shaped `model`.
    target_modules are the modules' last names ("q_proj") when the factors adapt every module of those names, else
    their full names. ValueError naming a path that is not a Linear projection of the Hugging Face model (the
    embedding, say: peft keeps embedding LoRA under other names)."""
    linear = {t.path: t.hf_name.removesuffix(".weight") for t in tensor_map("decoder_lm", model.num_layers,
                                                                             model.tie_embeddings)
              if t.layout in LORA_LAYOUTS}
    paths = [tuple(k.key for k in path[:-1]) for path, _ in jax.tree_util.tree_flatten_with_path(lora)[0]
             if path[-1].key == "lora_a"]
    missing = [path_name(p) for p in paths if p not in linear]
    if missing:
        raise ValueError(f"LoRA factors of {missing} have no Hugging Face peft layout: only the Linear projections "
                         f"({sorted({m.rsplit('.', 1)[-1] for m in linear.values()})}) export")
    modules = {p: linear[p] for p in paths}
    short = {m.rsplit(".", 1)[-1] for m in modules.values()}
    every = all(m in modules.values() for m in linear.values() if m.rsplit(".", 1)[-1] in short)
    return modules, sorted(short) if every else sorted(modules.values())


def save_hf_lora(model: DecoderLM, lora: dict, spec: PeftSpec, directory) -> pathlib.Path:
    """Write the LoRA factors `lora` (`nn.peft.lora_init`'s tree: A (in, r), B (r, out) per adapted kernel) of a
    DecoderLM that `save_hf` exports as a Llama/Mistral, with rank and alpha of `spec`, as a Hugging Face peft
    adapter folder: adapter_model.safetensors (base_model.model.<module>.lora_A.weight (r, in) = Aᵀ and
    .lora_B.weight (out, r) = Bᵀ, in the factors' dtype) and adapter_config.json (LORA, r, lora_alpha, lora_dropout,
    target_modules: `lora_target_modules`). `peft.PeftModel.from_pretrained(the save_hf model, directory)` then
    computes W + (lora_alpha / r) B A, which is our W + (alpha / r) A B transposed. `model` gives only the names
    and sizes: it may be abstract (`nnx.eval_shape`). Returns the folder. Raises as `hf_config` for a model Hugging
    Face cannot express and as `lora_target_modules` for another kernel."""
    hf_config(model)
    modules, target_modules = lora_target_modules(model, lora)
    tensors = {}
    for path, module in modules.items():
        factors = _get(lora, path)
        tensors[f"base_model.model.{module}.lora_A.weight"] = factors["lora_a"].T
        tensors[f"base_model.model.{module}.lora_B.weight"] = factors["lora_b"].T
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", r=spec.rank, lora_alpha=spec.alpha,
                  lora_dropout=spec.dropout, target_modules=target_modules, bias="none", fan_in_fan_out=False,
                  use_rslora=False, init_lora_weights=True, inference_mode=True, modules_to_save=None,
                  base_model_name_or_path=None)
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    write_safetensors(tensors, directory, ADAPTER_WEIGHTS)
    return directory


def _get(tree: dict, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _num_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
FINETUNE_CONFIG = '''"""Fine-tune the Hugging Face checkpoint imported from {hf_dir}
(written by `python -m jaxmodels.interop.hf import`; edit it freely).

Run from the jaxmodels checkout:
    python -m jaxmodels.main --config {out}/config.py --workdir /tmp/finetune

The model section is model_config.json beside this file and training starts from the imported parameters
(train.init_from); data, optimizer and steps are experiments/configs/lm_tiny.py's with a fine-tuning learning
rate: override any of them on the command line (--config.data.name=..., --config.train.num_steps=...).
"""

import json
import pathlib

from experiments.configs import lm_tiny

HERE = pathlib.Path(__file__).parent


def get_config():
    c = lm_tiny.get_config()
    c.model = json.loads((HERE / "model_config.json").read_text())
    c.train.init_from = str(HERE)
    c.data.tokenizer = {tokenizer}
    c.optimizer.learning_rate = 3e-4
    return c
'''


def import_checkpoint(hf_dir, out, *, dtype: str = "float32",
                      param_dtype: str = "float32") -> ml_collections.ConfigDict:
    """`load_hf(hf_dir)`, then write into OUT: params/ (an orbax checkpoint of the params,
    `train.checkpoint.save_params`: what config.train.init_from=OUT starts a run from), model_config.json (the
    config.model section to train it with), the checkpoint's tokenizer files (TOKENIZER_FILES that exist), and
    config.py, a config that fine-tunes it (`python -m jaxmodels.main --config OUT/config.py`; the tokenizer is
    OUT's, or "byte" when the checkpoint has none). Prints what it did; returns the section."""
    section, model = load_hf(hf_dir, dtype=dtype, param_dtype=param_dtype)
    hf_dir, out = pathlib.Path(hf_dir), pathlib.Path(out).absolute()  # orbax wants an absolute path
    path = save_params(out, nnx.state(model, nnx.Param).to_pure_dict())
    (out / "model_config.json").write_text(section.to_json(indent=2) + "\n")
    copied = [name for name in TOKENIZER_FILES if (hf_dir / name).exists()]
    for name in copied:
        (out / name).write_bytes((hf_dir / name).read_bytes())
    tokenizer = repr(str(out)) if copied else '"byte"  # the checkpoint came with no tokenizer files'
    (out / "config.py").write_text(FINETUNE_CONFIG.format(hf_dir=hf_dir, out=out, tokenizer=tokenizer))
    arch = hf_config(model)["architectures"][0]
    print(f"imported {arch} from {hf_dir} as {section.name!r}: {_num_params(model):,} parameters ({param_dtype})\n"
          f"  params:       {path}\n  model config: {out / 'model_config.json'}\n"
          f"  tokenizer:    {', '.join(copied) if copied else 'none in the checkpoint (config.py uses bytes)'}\n"
          f"Fine-tune it: python -m jaxmodels.main --config {out / 'config.py'} --workdir WORKDIR\n"
          f"  (or, in any LM config: config.model = model_config.json's section, --config.train.init_from={out})")
    return section


def export_workdir(workdir, out, *, merge: bool = False) -> pathlib.Path:
    """Export the latest checkpoint of a training run's workdir (its config.json gives config.model and
    config.data.tokenizer) as a Hugging Face checkpoint folder `out` (`save_hf`), with the run's tokenizer files
    beside the weights. Prints what it did; returns `out`.

    A LoRA fine-tune (config.peft.method "lora") exports its adapter as a Hugging Face peft folder (`save_hf_lora`)
    to load on the base model (the one its train.init_from holds, exported by `save_hf`), or with `merge` the model
    with the update folded into its kernels. Other PEFT methods have no such export (ValueError)."""
    workdir = workdir_path(workdir)
    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    section = config.model
    check_model_config(section)
    fine = fine_tune(config, model_builder(config), lambda: nnx.Rngs(0))
    if fine and fine.spec.method != "lora":
        raise ValueError(f"{workdir} fine-tunes with peft.method={fine.spec.method!r}, which has no Hugging Face "
                         "export; LoRA runs export as a peft adapter or, with --merge, as the merged model")
    abstract = nnx.eval_shape(lambda: make_model(section, nnx.Rngs(0)))
    if fine:
        lora = restore_params(workdir, fine.abstract_trainable)
        if not merge:
            save_hf_lora(abstract, lora, fine.spec, out)
            print(f"exported the LoRA adapter (r={fine.spec.rank}, alpha={fine.spec.alpha}) of "
                  f"{params_item(workdir)} as a Hugging Face peft adapter to {out}: {ADAPTER_CONFIG}, "
                  f"{ADAPTER_WEIGHTS}; its base model is {config.train.init_from} (export that run, or use the "
                  "Hugging Face checkpoint it was imported from)")
            return pathlib.Path(out)
        params = fine.combine(lora, restore_params(config.train.init_from, fine.abstract_frozen))
    else:
        params = restore_params(workdir, nnx.state(abstract, nnx.Param).to_pure_dict())
    graphdef, state = nnx.split(abstract)
    state.replace_by_pure_dict(params)
    model = nnx.merge(graphdef, state)
    tokenizer = resolve_tokenizer(config.data)
    save_hf(model, out, tokenizer=tokenizer)
    arch = hf_config(model)["architectures"][0]
    print(f"exported {section.name!r} ({_num_params(model):,} parameters) from {params_item(workdir)} as {arch} "
          f"to {out}: config.json, model.safetensors, the {tokenizer.name!r} tokenizer's files")
    return pathlib.Path(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jaxmodels.interop.hf",
                                     description="Hugging Face checkpoints in and out of jaxmodels.")
    commands = parser.add_subparsers(dest="command", required=True)
    imp = commands.add_parser("import", help="a Hugging Face checkpoint folder -> params checkpoint + config.model")
    imp.add_argument("--hf_dir", required=True, help="folder with config.json and *.safetensors")
    imp.add_argument("--out", required=True, help="folder to write params/ and model_config.json to")
    imp.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="compute dtype of config.model")
    imp.add_argument("--param_dtype", default="float32", choices=sorted(DTYPES), help="dtype to store weights in")
    exp = commands.add_parser("export", help="a training run's latest checkpoint -> a Hugging Face checkpoint folder")
    exp.add_argument("--workdir", required=True, help="the run's workdir (config.json and checkpoints/)")
    exp.add_argument("--out", required=True, help="folder to write config.json and model.safetensors to")
    exp.add_argument("--merge", action="store_true",
                     help="for a LoRA fine-tune: the model with the update merged (default: the peft adapter)")
    args = parser.parse_args(argv)
    try:
        if args.command == "import":
            import_checkpoint(args.hf_dir, args.out, dtype=args.dtype, param_dtype=args.param_dtype)
        else:
            export_workdir(args.workdir, args.out, merge=args.merge)
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
