"""The Segment-Anything model: parameter count, prompt encodings against the NumPy formula, mask and IoU output
shapes of the single- and multimask modes, prompt equivalences, and errors for wrong prompts and configs."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from jaxmodels.models import check_model_config
from jaxmodels.models.sam import SAM, PromptEncoder, sam_parameter_count, select_masks

SMALL = dict(image_size=16, patch_size=4, in_channels=3, hidden_dim=16, depth=1, num_heads=2, mlp_dim=32,
             embed_dim=16, decoder_depth=1, decoder_num_heads=2, decoder_mlp_dim=32, iou_head_hidden_dim=16)


@pytest.fixture(autouse=True)
def _full_precision_matmuls():
    with jax.default_matmul_precision("float32"):
        yield


def _random(factory, seed=0, scale=0.3):
    """factory()'s module built abstractly, every parameter drawn as scale·N(0, 1) on the host (no compiled
    initialisers)."""
    graphdef, state = nnx.split(nnx.eval_shape(factory))
    rng = np.random.default_rng(seed)
    return nnx.merge(graphdef, jax.tree.map(lambda a: jnp.asarray(scale * rng.normal(size=a.shape), a.dtype), state))


def _count(module):
    return sum(p.size for p in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_parameter_count():
    for overrides in ({}, dict(num_multimask_outputs=2, iou_head_depth=2, attention_downsample_rate=1,
                               decoder_depth=2, embed_dim=32)):
        config = {**SMALL, **overrides}
        assert _count(nnx.eval_shape(lambda: SAM(**config, rngs=nnx.Rngs(0)))) == sam_parameter_count(**config)


def _pe_reference(coords, matrix):
    angles = 2 * np.pi * (2 * coords.astype(np.float64) - 1) @ np.asarray(matrix, np.float64)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)


def test_prompt_encoder_positional_encoding_matches_the_numpy_formula():
    """A point's token is γ((p + 1/2) / S) + the embedding of its label; a padding point's is "not a point"; a box
    is its two corners with labels 2 and 3; the dense encoding is γ of the grid cell centres."""
    encoder = _random(lambda: PromptEncoder(embed_dim=8, image_size=16, grid_size=4, pe_scale=1.5, pe_seed=3,
                                            rngs=nnx.Rngs(0)))
    matrix = 1.5 * np.random.default_rng(3).standard_normal((2, 4))
    table = np.asarray(encoder.point_embeddings.value, np.float64)
    not_a_point = np.asarray(encoder.not_a_point_embed.value, np.float64)
    points = np.array([[[3.0, 7.0], [15.2, 0.0]], [[0.0, 9.5], [8.0, 8.0]]])
    labels = np.array([[1, 0], [-1, 1]])
    boxes = np.array([[1.0, 2.0, 9.0, 12.0], [0.0, 0.0, 16.0, 16.0]])
    sparse, dense = encoder(jnp.asarray(points, jnp.float32), jnp.asarray(labels), jnp.asarray(boxes, jnp.float32))
    expected = _pe_reference((points + 0.5) / 16, matrix) + table[np.clip(labels, 0, 3)]
    expected[labels == -1] = not_a_point
    corners = _pe_reference((boxes.reshape(2, 2, 2) + 0.5) / 16, matrix) + table[[2, 3]]
    np.testing.assert_allclose(sparse, np.concatenate([expected, corners], axis=1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dense, np.broadcast_to(encoder.no_mask_embed.value, (2, 4, 4, 8)))
    cells = np.array([[[(j + 0.5) / 4, (i + 0.5) / 4] for j in range(4)] for i in range(4)])
    np.testing.assert_allclose(encoder.dense_positional_encoding(), _pe_reference(cells, matrix), atol=1e-5)
    # points alone get a padding point; boxes alone are exactly the corner points with labels 2 and 3
    alone, _ = encoder(jnp.asarray(points, jnp.float32), jnp.asarray(labels))
    np.testing.assert_allclose(alone[:, :2], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(alone[:, 2], np.broadcast_to(not_a_point, (2, 8)), rtol=1e-6)
    as_points = encoder.embed_points(jnp.asarray(boxes.reshape(2, 2, 2), jnp.float32), jnp.asarray([[2, 3]] * 2))
    np.testing.assert_allclose(encoder(boxes=jnp.asarray(boxes, jnp.float32))[0], as_points, rtol=1e-6)
    assert encoder(batch_size=3)[0].shape == (3, 0, 8)


@functools.lru_cache(maxsize=2)
def _compiled_outputs(graphdef):
    """Every prompt form in one compiled function: {name: (masks, iou)}."""

    @jax.jit
    def run(state, images, points, labels, boxes):
        m = nnx.merge(graphdef, state)
        embeddings = m.encode(images)
        return {"all": m.decode(embeddings, points, labels), "multi": m(images, points, labels),
                "single_box": m(images, boxes=boxes, multimask_output=False),
                "both": m(images, points, labels, boxes), "none": m.decode(embeddings),
                "moved_padding": m.decode(embeddings, points.at[:, 1].add(3.0), labels)}

    return run


def _outputs(model, *args):
    graphdef, state = nnx.split(model)
    return _compiled_outputs(graphdef)(state, *args)


def test_mask_outputs_single_and_multimask_shapes_and_padding_points_are_ignored():
    model = _random(lambda: SAM(**SMALL, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32)
    points = jnp.asarray(rng.uniform(0, 16, (2, 2, 2)), jnp.float32)
    labels = jnp.asarray([[1, -1], [0, -1]])
    boxes = jnp.asarray([[1.0, 2.0, 9.0, 12.0], [4.0, 4.0, 6.0, 15.0]])
    out = _outputs(model, images, points, labels, boxes)
    expected = {"all": 4, "multi": 3, "single_box": 1, "both": 3, "none": 4, "moved_padding": 4}
    for name, (masks, iou) in out.items():
        assert masks.shape == (2, expected[name], 16, 16) and iou.shape == (2, expected[name]), name
        assert masks.dtype == iou.dtype == jnp.float32 and np.isfinite(masks).all(), name
    all_masks, all_iou = out["all"]
    multi, multi_iou = select_masks(all_masks, all_iou, True)
    np.testing.assert_allclose(out["multi"][0], multi, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["multi"][1], all_iou[:, 1:], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(select_masks(all_masks, all_iou, False)[0], all_masks[:, :1])
    np.testing.assert_allclose(out["moved_padding"][0], all_masks, rtol=1e-5, atol=1e-5)
    assert not np.allclose(out["both"][0], multi, atol=1e-3)  # the box changes the masks
    # the prompt matters per example: example 0's masks do not depend on example 1's prompt
    other = _outputs(model, images, points.at[1].set(1.0), labels, boxes)
    np.testing.assert_allclose(other["all"][0][0], all_masks[0], rtol=1e-5, atol=1e-5)
    assert not np.allclose(other["all"][0][1], all_masks[1], atol=1e-3)


def test_low_resolution_masks_are_upsampled_to_the_image():
    config = {**SMALL, "patch_size": 8}  # 2 x 2 embeddings, 8 x 8 decoded masks, bilinear to 16 x 16
    model = _random(lambda: SAM(**config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    masks, iou = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, boxes=jnp.asarray([[1.0, 1.0, 5.0, 5.0]])))(
        state, jnp.ones((1, 16, 16, 3)))
    assert masks.shape == (1, 3, 16, 16) and iou.shape == (1, 3)


def test_wrong_prompts_raise_naming_the_argument():
    model = nnx.eval_shape(lambda: SAM(**SMALL, rngs=nnx.Rngs(0)))
    images = jnp.zeros((2, 16, 16, 3))
    cases = [(dict(points=jnp.zeros((2, 2)), point_labels=jnp.zeros((2,), jnp.int32)), r"points must be \(batch"),
             (dict(points=jnp.zeros((2, 1, 2))), "points and point_labels must be given together"),
             (dict(points=jnp.zeros((2, 1, 2)), point_labels=jnp.zeros((2, 2), jnp.int32)),
              r"point_labels must be \(batch, num_points\)"),
             (dict(points=jnp.zeros((2, 1, 2)), point_labels=jnp.zeros((2, 1))), "point_labels must be integers"),
             (dict(points=jnp.zeros((2, 1, 2)), point_labels=jnp.full((2, 1), 4)), "point_labels must hold values"),
             (dict(boxes=jnp.zeros((2, 2, 2))), r"boxes must be \(batch, 4\)"),
             (dict(boxes=jnp.zeros((3, 4))), "one batch size")]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            model(images, **kwargs)
    with pytest.raises(ValueError, match=r"images must be \(batch, 16, 16, 3\)"):
        model(jnp.zeros((2, 16, 16, 1)), boxes=jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="image_embeddings must be"):
        model.decode(jnp.zeros((2, 3, 3, 16)), boxes=jnp.zeros((2, 4)))


def test_check_config_names_the_field():
    base = dict(name="sam", dtype="float32", param_dtype="float32", **SMALL)
    check_model_config(ml_collections.ConfigDict(base))
    for change, message in [({"patch_size": 5}, "config.model.image_size=16 must be divisible"),
                            ({"embed_dim": 12}, "config.model.embed_dim=12 must be divisible by 8"),
                            ({"decoder_num_heads": 16}, "attention_downsample_rate \\* config.model.decoder_num_heads"),
                            ({"depth": 0}, "config.model.depth"), ({"pe_scale": -1.0}, "config.model.pe_scale")]:
        with pytest.raises(ValueError, match=message):
            check_model_config(ml_collections.ConfigDict({**base, **change}))
