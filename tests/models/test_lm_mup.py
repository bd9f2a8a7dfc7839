"""DecoderLM's muP option (Yang et al. 2021, Tensor Programs V, Tables 3 and 8 for Adam): standard parametrisation
unchanged, muP at the base width equal to it but for the attention logits, the learning-rate multipliers of the
table, the coordinate check, and config errors."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from experiments.configs import lm_tiny
from jaxmodels.models import check_model_config
from jaxmodels.models.lm import DecoderLM
from jaxmodels.nn.peft import PeftSpec
from jaxmodels.train.optimizer import make_optimizer
from tests.tiny import apply_overrides

KW = dict(vocab_size=64, num_layers=1, embed_dim=32, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64)
# Sums over the parameters (of squares, of absolute values), over the logits of TOKENS (the same two) and the loss
# after 3 steps of lm_tiny's AdamW, of DecoderLM(**KW, tie_embeddings=tie, rngs=nnx.Rngs(0)) as the code drew and
# computed them before muP existed (commit 5b43278, CPU float32): (untied, tied).
BEFORE_MUP = ((2437.3247727941343, 3168.44461825646, 2040.0824117034313, 1621.4329200070351, 4.60163688659668),
              (2375.8244730232377, 2877.145142759447, 94164.31955112753, 10302.532454430126, 27.32024383544922))
# Coordinate check: |ratio - 1| bounds of the change of the logits between the widest and the narrowest model.
CONSTANT_RATIO = (0.5, 1.5)  # muP: measured 0.60-0.71 over seeds (a 1/sqrt(width) remainder at these widths)
GROWING_RATIO = 1.6          # standard: measured 1.8-2.7 (theory for Adam: linear in width, 4 here)


def _constant_adamw(learning_rate=1e-2, weight_decay=0.0, grad_clip_norm=0.0):
    return ml_collections.ConfigDict(dict(learning_rate=learning_rate, warmup_steps=0, schedule="constant",
                                          min_lr_ratio=1.0, b1=0.9, b2=0.95, eps=1e-8, weight_decay=weight_decay,
                                          grad_clip_norm=grad_clip_norm))


def _tokens(shape=(2, 17), seed=1):
    return jax.random.randint(jax.random.key(seed), shape, 0, KW["vocab_size"])


def _trained(model, optimizer_config, tokens, steps=3):
    """(logits of tokens[:, :-1] before, pure-dict params after `steps` steps of make_optimizer with the model's
    lr_multipliers on the next-token loss, loss after)."""
    graphdef, params = nnx.split(model, nnx.Param)
    tx = make_optimizer(optimizer_config, 10, lr_multipliers=model.lr_multipliers())

    def loss(p):
        logits = nnx.merge(graphdef, p)(tokens[:, :-1])
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]))

    def step(_, carry):
        params, state = carry
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    @jax.jit
    def train(params):
        params, _ = jax.lax.fori_loop(0, steps, step, (params, tx.init(params)))
        return params, loss(params)

    params, final = train(params.to_pure_dict())
    return model(tokens[:, :-1]), params, float(final)


def _sums(tree):
    leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]
    return sum(float(np.sum(x**2)) for x in leaves), sum(float(np.sum(np.abs(x))) for x in leaves)


@pytest.mark.parametrize("tie", [False, True])
def test_standard_parametrization_is_the_model_before_mup(tie):
    with jax.default_matmul_precision("float32"):
        model = DecoderLM(**KW, tie_embeddings=tie, parametrization="standard", mup_base_width=8, rngs=nnx.Rngs(0))
        assert model.lr_multipliers() is None and model.attention.logit_divisor == "sqrt_head_dim"
        params = nnx.state(model, nnx.Param).to_pure_dict()
        logits, _, loss = _trained(model, lm_tiny.get_config().optimizer, _tokens())
    assert _sums(params) + _sums(logits) + (loss,) == pytest.approx(BEFORE_MUP[tie], rel=1e-5)
    default = nnx.state(DecoderLM(**KW, tie_embeddings=tie, rngs=nnx.Rngs(0)), nnx.Param).to_pure_dict()
    jax.tree.map(np.testing.assert_array_equal, params, default)


@pytest.mark.parametrize("tie", [False, True])
def test_mup_at_the_base_width_is_standard_but_for_the_attention_divisor(tie):
    """width_mult = 1: the same parameters (init statistics included), learning-rate multipliers all 1 (AdamW with
    multipliers of 1 is AdamW: tests/train/test_lr_multipliers.py), and the forward of standard parametrisation
    with logits q·k / head_dim, where TP-V differs from the standard q·k / sqrt(head_dim) at every width."""
    tokens = _tokens()
    mup = DecoderLM(**KW, tie_embeddings=tie, parametrization="mup", mup_base_width=KW["embed_dim"], rngs=nnx.Rngs(0))
    standard = DecoderLM(**KW, tie_embeddings=tie, rngs=nnx.Rngs(0))
    standard_head_dim = DecoderLM(**KW, tie_embeddings=tie, attention={"logit_divisor": "head_dim"},
                                  rngs=nnx.Rngs(0))
    params = nnx.state(mup, nnx.Param).to_pure_dict()
    jax.tree.map(np.testing.assert_array_equal, params, nnx.state(standard, nnx.Param).to_pure_dict())
    assert set(jax.tree.leaves(mup.lr_multipliers())) == {1.0}
    np.testing.assert_array_equal(mup(tokens), standard_head_dim(tokens))
    assert not np.allclose(mup(tokens), standard(tokens), atol=1e-3)  # 1/d vs 1/sqrt(d)


def _assert_variance(x, variance, tolerance_se=4.0):
    """Sample second moment of x (zero mean) within 4 standard errors of `variance`."""
    x = np.asarray(x, np.float64).ravel()
    m2, m4 = np.mean(x**2), np.mean(x**4)
    assert abs(m2 - variance) <= tolerance_se * math.sqrt((m4 - m2**2) / x.size), (m2, variance)


def test_multipliers_init_and_readout_follow_the_table():
    """width_mult 4 (embed_dim 64, base 16): Adam lr / 4 for the blocks' matrices (hidden), 1 for the embedding,
    learned positions, norm and q/k-norm gains (input) and the readout (output, Table 8); the readout's variance
    1 / base_width and logits times 1/4; the hidden kernels LeCun 1 / fan_in as in standard parametrisation."""
    kw = dict(KW, embed_dim=64, head_dim=32)
    attention = {"position": "learned", "qk_norm": True, "max_positions": 32}
    mup = DecoderLM(**kw, attention=attention, parametrization="mup", mup_base_width=16, rngs=nnx.Rngs(0))
    multipliers = mup.lr_multipliers()
    expected = {"hidden": 0.25, "input": 1.0, "output": 1.0}
    flat = {jax.tree_util.keystr(path): m for path, m in jax.tree_util.tree_leaves_with_path(multipliers)}
    params = {jax.tree_util.keystr(path): p for path, p in
              jax.tree_util.tree_leaves_with_path(nnx.state(mup, nnx.Param).to_pure_dict())}
    assert flat.keys() == params.keys()
    for name, m in flat.items():
        role = ("hidden" if name.startswith("['blocks']") and params[name].ndim >= 2
                else "output" if name == "['w_out']" else "input")
        assert m == expected[role], name
    assert sum(m == 0.25 for m in flat.values()) == 7 * KW["num_layers"]  # q, k, v, o, gate, up, down per block
    for name in ("['position_table']", "['embed']['embedding']", "['final_norm']['scale']"):
        assert flat[name] == 1.0
    assert any("q_norm" in name or "k_norm" in name for name in flat)
    _assert_variance(mup.w_out.value, 1 / 16)
    _assert_variance(mup.blocks[0].attn.w_q.value, 1 / 64)
    _assert_variance(mup.blocks[0].mlp.w_down.value, 1 / (2 * KW["num_layers"] * KW["mlp_dim"]))  # GPT-2 depth scale
    reference = DecoderLM(**kw, attention={**attention, "logit_divisor": "head_dim"}, rngs=nnx.Rngs(1))
    nnx.update(reference, nnx.state(mup, nnx.Param))
    tokens = _tokens((2, 16))
    np.testing.assert_allclose(mup(tokens), reference(tokens) / 4, rtol=1e-5, atol=1e-6)


def _logit_change(parametrization, width, steps=3):
    """std over a batch of the change of the logits after `steps` AdamW steps (lr 1e-2, constant) of a 1-layer
    DecoderLM of embed_dim `width` (2 heads of width / 2, MLP 2 width), muP base width 32."""
    model = DecoderLM(vocab_size=64, num_layers=1, embed_dim=width, num_heads=2, num_kv_heads=2, head_dim=width // 2,
                      mlp_dim=2 * width, parametrization=parametrization, mup_base_width=32, rngs=nnx.Rngs(0))
    tokens = _tokens((2, 9), seed=100)
    graphdef, params = nnx.split(model, nnx.Param)
    tx = make_optimizer(_constant_adamw(), steps, lr_multipliers=model.lr_multipliers())

    @jax.jit
    def change(params):
        logits = lambda p: nnx.merge(graphdef, p)(tokens[:, :-1])
        loss = lambda p: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits(p), tokens[:, 1:]))

        def step(_, carry):
            params, state = carry
            updates, state = tx.update(jax.grad(loss)(params), state, params)
            return optax.apply_updates(params, updates), state

        trained, _ = jax.lax.fori_loop(0, steps, step, (params, tx.init(params)))
        return jnp.std(logits(trained) - logits(params))

    return float(change(params.to_pure_dict()))


def test_coordinate_check_logit_change_is_width_independent_under_mup_only():
    """TP-V's coordinate check: after a few Adam steps at one learning rate, the change of the logits grows with
    width in standard parametrisation (each doubling of 32 -> 64 -> 128) and stays within CONSTANT_RATIO of the
    narrowest model's under muP."""
    widths = (32, 64, 128)
    standard = [_logit_change("standard", w) for w in widths]
    mup = [_logit_change("mup", w) for w in widths]
    assert mup[0] == pytest.approx(standard[0], rel=0.1)  # the base width: the same up to the attention divisor
    assert standard[1] > 1.15 * standard[0] and standard[2] > 1.15 * standard[1], standard
    assert standard[2] / standard[0] > GROWING_RATIO, standard
    assert all(CONSTANT_RATIO[0] < m / mup[0] < CONSTANT_RATIO[1] for m in mup), mup


def _section(**fields):
    """lm_tiny's model section with dotted overrides ("attention.kind": "linear")."""
    return apply_overrides(lm_tiny.get_config().model, fields)


@pytest.mark.parametrize("fields, match", [
    ({"parametrization": "mu_p"}, "config.model.parametrization='mu_p' is not valid"),
    ({"parametrization": "mup", "mup_base_width": 0}, "config.model.mup_base_width must be"),
    ({"parametrization": "mup", "mup_base_width": 32, "attention.logit_divisor": "none"}, "logit_divisor='none'"),
    ({"parametrization": "mup", "mup_base_width": 32, "attention.kind": "linear"}, "attention.kind in"),
    ({"parametrization": "mup", "mup_base_width": 32, "moe.num_experts": 4}, "mixture-of-experts"),
])
def test_bad_mup_config_raises_naming_the_field(fields, match):
    check_model_config(_section(parametrization="standard", mup_base_width=0))  # the defaults pass
    check_model_config(_section(parametrization="mup", mup_base_width=32))
    with pytest.raises(ValueError, match=match):
        check_model_config(_section(**fields))


def test_mup_refuses_peft_and_bad_constructor_arguments():
    section = _section(parametrization="mup", mup_base_width=64)
    check_model_config(section)
    DecoderLM.check_peft(section, PeftSpec())  # no PEFT: fine
    with pytest.raises(ValueError, match="config.peft.method='lora' does not fit config.model.parametrization"):
        DecoderLM.check_peft(section, PeftSpec(method="lora"))
    with pytest.raises(ValueError, match="mup_base_width"):
        DecoderLM(**KW, parametrization="mup", rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="mup_base_width"):
        DecoderLM(**KW, parametrization="mup", mup_base_width=32.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="parametrization"):
        DecoderLM(**KW, parametrization="ntk", rngs=nnx.Rngs(0))
