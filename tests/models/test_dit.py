import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxmodels.models.dit import DiT, dit_flops_per_example, dit_parameter_count
from jaxmodels.nn.diffusion import drop_labels, patchify, sincos_2d_embedding, unpatchify

SMALL = dict(input_size=8, patch_size=2, in_channels=1, hidden_dim=32, depth=2, num_heads=4, num_classes=10)


@pytest.fixture(scope="module")
def model():
    return nnx.jit(lambda: DiT(**SMALL, rngs=nnx.Rngs(0)))()  # one compile instead of one per parameter shape


def _count(module):
    return sum(p.size for p in jax.tree.leaves(nnx.state(module, nnx.Param)))


@jax.jit
def _add_wiggle(state, seed):
    """Every leaf plus 0.3·cos(a·i + seed), a fixed pseudo-random pattern (cheaper to compile than
    jax.random for every leaf)."""
    leaves, treedef = jax.tree.flatten(state)
    return jax.tree.unflatten(treedef, [
        x + 0.3 * jnp.cos(jnp.arange(x.size) * (0.7 + 0.1 * n) + seed).reshape(x.shape).astype(x.dtype)
        for n, x in enumerate(leaves)])


def _perturbed(model, seed):
    """A copy of `model` with every parameter moved (so zero-initialised layers act)."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, _add_wiggle(state, jnp.float32(seed)))


def _with_dtype(model, dtype, **kw):
    """The same parameters in a model built with compute dtype `dtype` (abstract init, no compile)."""
    abstract = nnx.eval_shape(lambda: DiT(**{**SMALL, **kw}, dtype=dtype, rngs=nnx.Rngs(0)))
    nnx.update(abstract, nnx.state(model))
    return abstract


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, *args):
    return nnx.merge(graphdef, state)(*args)


def _jaxprs(value):
    """The jaxprs inside an equation parameter (pjit, remat, custom_vjp, cond branches ...)."""
    if hasattr(value, "eqns"):
        yield value
    elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
        yield value.jaxpr
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _jaxprs(v)


def _equations(model, *args):
    """Every equation of the jaxpr of model(*args), sub-jaxprs included (traced, not compiled)."""
    graphdef, state = nnx.split(model)
    todo = [jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(*args))(state).jaxpr]
    while todo:
        for eqn in todo.pop().eqns:
            yield eqn
            for value in eqn.params.values():
                todo.extend(_jaxprs(value))


def matmul_dtypes(model, *args) -> set:
    """The operand dtypes of every dot_general and convolution that model(*args) traces: a check of
    the compute dtype without compiling anything."""
    return {str(v.aval.dtype) for eqn in _equations(model, *args)
            if eqn.primitive.name in ("dot_general", "conv_general_dilated") for v in eqn.invars}


def matmul_flops(model, *args) -> int:
    """2 · multiply-adds of every dot_general and convolution that model(*args) traces."""
    total = 0
    for eqn in _equations(model, *args):
        if eqn.primitive.name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in contracting)
        elif eqn.primitive.name == "conv_general_dilated":  # each output takes kernel size / out channels products
            rhs, out_dim = eqn.invars[1].aval.shape, eqn.params["dimension_numbers"].rhs_spec[0]
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs) // rhs[out_dim]
    return total


def _eval_shape(model, *args):
    """The shape and dtype of model(*args), traced only (works on abstract models too)."""
    graphdef, state = nnx.split(model)
    return jax.eval_shape(lambda s: nnx.merge(graphdef, s)(*args), state)


def _apply(model, *args):
    """model(*args) under jit (compiled once per graph and shapes)."""
    return _forward(*nnx.split(model), *args)


@pytest.mark.parametrize("kw", [{}, dict(position="learned", learn_sigma=True, num_classes=0, hidden_dim=48,
                                         patch_size=4, mlp_ratio=2.0)])
def test_parameter_count_matches_hand_count(kw):
    config = {**SMALL, **kw}
    abstract = nnx.eval_shape(lambda: DiT(**config, rngs=nnx.Rngs(0)))
    assert _count(abstract) == dit_parameter_count(**{k: v for k, v in config.items() if k != "num_heads"})
    # The hand count of the SMALL config, term by term.
    d, f, c = 32, 128, 10
    by_hand = (4 * d + d) + (256 * d + d + d * d + d) + (c + 1) * d + 2 * (4 * d * d + 2 * d * f + 6 * d * d + 6 * d) \
        + (2 * d * d + 2 * d) + (d * 4 + 4)
    assert dit_parameter_count(**{k: v for k, v in SMALL.items() if k != "num_heads"}) == by_hand


def test_shapes_and_dtypes(model):
    x, t, y = jax.random.normal(jax.random.key(0), (3, 8, 8, 1)), jnp.array([0.0, 10.0, 999.0]), jnp.array([0, 9, 10])
    out = _apply(model, x, t, y)
    assert out.shape == (3, 8, 8, 1) and out.dtype == jnp.float32
    assert matmul_dtypes(model, x, t, y) == {"float32"}
    bf16 = _with_dtype(model, jnp.bfloat16)
    assert matmul_dtypes(bf16, x, t, y) == {"bfloat16"}
    assert _eval_shape(bf16, x, t, y).dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    moved = _perturbed(model, 1)  # non-zero output; then bf16 arithmetic stays close to float32
    out32, out16 = _apply(moved, x, t, y), _apply(_with_dtype(moved, jnp.bfloat16), x, t, y)
    assert out16.dtype == jnp.float32 and not np.array_equal(out16, out32)
    np.testing.assert_allclose(out16, out32, atol=0.1 * float(jnp.abs(out32).max()))
    sigma = nnx.eval_shape(lambda: DiT(**SMALL, learn_sigma=True, position="learned", rngs=nnx.Rngs(0)))
    assert _eval_shape(sigma, x, t, y).shape == (3, 8, 8, 2)
    with pytest.raises(ValueError, match="x must be"):
        model(jnp.zeros((1, 6, 6, 1)), jnp.zeros(1))
    with pytest.raises(ValueError, match="unknown position"):
        DiT(**SMALL, position="rope", rngs=nnx.Rngs(0))


def test_adaln_zero_blocks_are_identity_at_init(model):
    h = jax.random.normal(jax.random.key(2), (3, 16, 32))
    c = jax.random.normal(jax.random.key(3), (3, 32))
    for block in model.blocks:
        np.testing.assert_array_equal(_apply(block, h, c), h)
    x, t, y = jnp.ones((3, 8, 8, 1)), jnp.ones(3), jnp.array([1, 2, 10])
    assert not np.any(np.asarray(_apply(model, x, t, y)))  # the final linear is zero too
    moved = _perturbed(model, 4)
    assert not np.allclose(_apply(moved.blocks[0], h, c), h)


def test_patchify_matches_reference_and_unpatchify_inverts():
    x = np.random.default_rng(0).normal(size=(2, 6, 4, 3)).astype(np.float32)
    tokens = patchify(jnp.asarray(x), 2)
    ref = x.reshape(2, 3, 2, 2, 2, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 6, 12)  # (i, j, c) within a patch
    np.testing.assert_array_equal(tokens, ref)
    np.testing.assert_array_equal(tokens[0, 1], np.concatenate([x[0, 0, 2], x[0, 0, 3], x[0, 1, 2], x[0, 1, 3]]))
    np.testing.assert_array_equal(unpatchify(tokens, 2, 6, 4), x)
    with pytest.raises(ValueError, match="tokens must be"):
        unpatchify(tokens, 2, 4, 4)


def test_sincos_2d_embedding_matches_numpy():
    emb = np.asarray(sincos_2d_embedding(3, 4, 16))
    rows, cols = np.meshgrid(np.arange(3), np.arange(4), indexing="ij")
    omega = 1.0 / 10000 ** (np.arange(4) / 4.0)  # MAE: 1 / 10000^(i / (D/4))

    def one_d(pos):
        angles = pos.reshape(-1)[:, None] * omega
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    np.testing.assert_allclose(emb, np.concatenate([one_d(rows), one_d(cols)], axis=1), atol=1e-6)


def test_drop_labels():
    labels = jnp.arange(1000) % 7
    np.testing.assert_array_equal(drop_labels(labels, jax.random.key(0), 0.0, 7), labels)
    assert np.all(np.asarray(drop_labels(labels, jax.random.key(0), 1.0, 7)) == 7)
    dropped = np.asarray(drop_labels(labels, jax.random.key(1), 0.1, 7)) == 7
    assert 0.07 < dropped.mean() < 0.13


def test_flops_match_the_paper_and_a_hand_count():
    # DiT-XL/2 on 256² images (32² latents, 4 channels, learned sigma): 118.6 "Gflops" in Table 4,
    # which are multiply-adds.
    xl = dit_flops_per_example(input_size=32, patch_size=2, in_channels=4, hidden_dim=1152, depth=28, learn_sigma=True)
    assert math.isclose(xl / 2, 118.6e9, rel_tol=1e-3)
    t, d = 16, 32
    small = dit_flops_per_example(**{k: v for k, v in SMALL.items() if k not in ("num_heads", "num_classes")})
    by_hand = t * (2 * 4 * d + 2 * 2 * (4 * d * d + 2 * d * 4 * d) + 2 * 2 * 2 * t * d + 2 * d * 4) \
        + 2 * (256 * d + d * d) + 2 * 2 * d * 6 * d + 2 * d * 2 * d
    assert small == by_hand
    # Every matmul the model actually traces (q, k, v, out, MLP, attention, embeddings, adaLN).
    config = dict(input_size=16, patch_size=2, in_channels=4, hidden_dim=64, depth=3, mlp_ratio=3.0, learn_sigma=True)
    model = nnx.eval_shape(lambda: DiT(**config, num_heads=4, num_classes=5, rngs=nnx.Rngs(0)))
    traced = matmul_flops(model, jnp.zeros((3, 16, 16, 4)), jnp.zeros(3), jnp.zeros(3, jnp.int32))
    assert traced == 3 * dit_flops_per_example(**config)


def _denoising_loss(model, call, x0, key):
    """Tiny ε-prediction objective: x_t = cos(πt/2) x0 + sin(πt/2) ε, t ~ U(0, 1);
    call(model, x_t, noise_level) is the network's prediction of ε."""
    k1, k2 = jax.random.split(key)
    t = jax.random.uniform(k1, x0.shape[:1])
    eps = jax.random.normal(k2, x0.shape)
    a = jnp.cos(0.5 * jnp.pi * t)[:, None, None, None]
    x_t = a * x0 + jnp.sqrt(1 - a * a) * eps
    return jnp.mean(jnp.square(call(model, x_t, 1000 * t) - eps))


def assert_training_reduces_loss(model, call, x0, *, steps=12, lr=3e-3, factor=0.7):
    """`steps` Adam steps on the denoising loss of x0 bring the loss on a held-out noise draw below
    `factor` times its initial value."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adam(lr)

    def loss_fn(p, key):
        return _denoising_loss(nnx.merge(graphdef, p, rest), call, x0, key)

    @jax.jit
    def step(p, opt, key):
        loss, grads = jax.value_and_grad(loss_fn)(p, key)
        updates, opt = tx.update(grads, opt, p)
        return optax.apply_updates(p, updates), opt, loss

    opt = tx.init(params)
    before = step(params, opt, jax.random.key(-1))[2]  # the loss on a held-out noise draw
    for i in range(steps):
        params, opt, _ = step(params, opt, jax.random.key(i))
    after = step(params, opt, jax.random.key(-1))[2]
    print(f"denoising loss {float(before):.3f} -> {float(after):.3f}")
    assert after < factor * before, (float(before), float(after))


RAMP = jnp.tile(jnp.linspace(-1, 1, 8)[None, :, None, None], (8, 1, 8, 1))  # smooth 8x8 training images


def test_a_few_adam_steps_reduce_the_denoising_loss(model):
    assert_training_reduces_loss(model, lambda m, x, t: m(x, t), RAMP)
