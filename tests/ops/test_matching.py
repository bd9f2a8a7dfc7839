import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.ops.matching import detr_matching_cost, linear_sum_assignment


def _brute_force(cost):
    """Smallest total over every injective assignment of the shorter side into the longer one."""
    n, m = cost.shape
    if n >= m:
        return min(sum(cost[rows[j], j] for j in range(m)) for rows in itertools.permutations(range(n), m))
    return min(sum(cost[i, cols[i]] for i in range(n)) for cols in itertools.permutations(range(m), n))


def _check_matching(cost, col_for_row, row_for_col, row_mask=None, col_mask=None):
    """The result is a consistent matching of the valid rows and columns with the brute-force optimal total."""
    n, m = cost.shape
    rows = np.flatnonzero(np.ones(n, bool) if row_mask is None else row_mask)
    cols = np.flatnonzero(np.ones(m, bool) if col_mask is None else col_mask)
    matched = [(i, int(j)) for i, j in enumerate(col_for_row) if j >= 0]
    assert len(matched) == min(len(rows), len(cols))
    assert all(row_for_col[j] == i and i in rows and j in cols for i, j in matched)
    assert (np.asarray(row_for_col) >= 0).sum() == len(matched)
    total = sum(cost[i, j] for i, j in matched)
    best = _brute_force(cost[np.ix_(rows, cols)]) if len(rows) and len(cols) else 0.0
    np.testing.assert_allclose(total, best, rtol=1e-6)


@pytest.mark.parametrize("n,m", [(4, 4), (5, 3), (2, 5), (1, 1)])
def test_matches_brute_force_over_permutations(n, m):
    cost = np.random.default_rng(n * 7 + m).normal(size=(n, m)).astype(np.float32)
    col_for_row, row_for_col = linear_sum_assignment(jnp.asarray(cost))
    assert col_for_row.shape == (n,) and row_for_col.shape == (m,) and col_for_row.dtype == jnp.int32
    _check_matching(cost, col_for_row, row_for_col)
    best_max = -_brute_force(-cost)
    c, _ = linear_sum_assignment(jnp.asarray(cost), maximize=True)
    np.testing.assert_allclose(sum(cost[i, j] for i, j in enumerate(c) if j >= 0), best_max, rtol=1e-6)


def test_batched_under_jit_and_vmap_with_padding_masks():
    """A batch of images with 3, 0, 1 and 2 real targets padded to 3, matched in one jitted, vmapped call."""
    rng = np.random.default_rng(0)
    cost = rng.normal(size=(4, 5, 3)).astype(np.float32)
    col_mask = np.arange(3)[None, :] < np.asarray([3, 0, 1, 2])[:, None]
    row_mask = np.ones((4, 5), bool)
    row_mask[3, :2] = False
    batched = jax.jit(jax.vmap(linear_sum_assignment))(jnp.asarray(cost), jnp.asarray(row_mask), jnp.asarray(col_mask))
    direct = linear_sum_assignment(jnp.asarray(cost), jnp.asarray(row_mask), jnp.asarray(col_mask))
    for b in range(4):
        np.testing.assert_array_equal(batched[0][b], direct[0][b])
        _check_matching(cost[b], batched[0][b], batched[1][b], row_mask[b], col_mask[b])
    assert (np.asarray(batched[0][1]) == -1).all() and (np.asarray(batched[1][1]) == -1).all()


def test_gradient_flows_through_chosen_costs_only():
    cost = jnp.asarray([[0.0, 1.0], [1.0, 0.5]])
    loss = lambda c: jnp.take_along_axis(c, linear_sum_assignment(c)[0][:, None], 1).sum()
    np.testing.assert_array_equal(jax.grad(loss)(cost), [[1.0, 0.0], [0.0, 1.0]])


def test_infinite_costs_are_avoided_and_bad_input_raises():
    cost = jnp.asarray([[jnp.inf, 1.0], [2.0, jnp.inf]])
    np.testing.assert_array_equal(linear_sum_assignment(cost)[0], [1, 0])
    empty = linear_sum_assignment(jnp.zeros((3, 0)))
    assert empty[0].tolist() == [-1, -1, -1] and empty[1].shape == (0,)
    with pytest.raises(ValueError, match="NaN"):
        linear_sum_assignment(jnp.asarray([[jnp.nan]]))
    with pytest.raises(ValueError, match="col_mask must be bool with shape"):
        linear_sum_assignment(jnp.zeros((2, 3)), col_mask=jnp.ones((2,), bool))
    with pytest.raises(ValueError, match="cost must be at least 2-D"):
        linear_sum_assignment(jnp.zeros((3,)))


def _detr_cost_float64(logits, pred, labels, target, w):
    """The DETR matcher's cost written out per (prediction, target) pair in float64."""
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.zeros((len(pred), len(target)))
    for i in range(len(pred)):
        for j in range(len(target)):
            a = np.r_[pred[i, :2] - pred[i, 2:] / 2, pred[i, :2] + pred[i, 2:] / 2]
            b = np.r_[target[j, :2] - target[j, 2:] / 2, target[j, :2] + target[j, 2:] / 2]
            inter = np.prod(np.clip(np.minimum(a[2:], b[2:]) - np.maximum(a[:2], b[:2]), 0, None))
            union = np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2]) - inter
            hull = np.prod(np.maximum(a[2:], b[2:]) - np.minimum(a[:2], b[:2]))
            giou = inter / union - (hull - union) / hull
            out[i, j] = -w[0] * p[i, labels[j]] + w[1] * np.abs(pred[i] - target[j]).sum() - w[2] * giou
    return out


def test_detr_cost_matches_float64_formula_and_drives_the_matching():
    rng = np.random.default_rng(3)
    n, m, classes = 5, 3, 4
    logits = rng.normal(size=(2, n, classes)).astype(np.float32)
    pred = np.concatenate([rng.uniform(0.2, 0.8, (2, n, 2)), rng.uniform(0.05, 0.4, (2, n, 2))], -1)
    target = np.concatenate([rng.uniform(0.2, 0.8, (2, m, 2)), rng.uniform(0.05, 0.4, (2, m, 2))], -1)
    labels = rng.integers(0, classes, (2, m))
    weights = (1.0, 5.0, 2.0)
    cost_fn = jax.jit(detr_matching_cost)  # one compilation instead of many small eager ones
    cost = cost_fn(jnp.asarray(logits), jnp.asarray(pred, jnp.float32), jnp.asarray(labels),
                   jnp.asarray(target, jnp.float32))
    assert cost.shape == (2, n, m) and cost.dtype == jnp.float32
    for b in range(2):
        reference = _detr_cost_float64(logits[b].astype(np.float64), pred[b], labels[b], target[b], weights)
        np.testing.assert_allclose(cost[b], reference, rtol=1e-5, atol=1e-5)
        _check_matching(reference, *linear_sum_assignment(cost[b]))
    # Targets equal to predictions 4, 0, 2 with confident logits are matched to exactly those predictions.
    logits = np.full((n, classes), -5.0, np.float32)
    logits[[4, 0, 2], [1, 3, 0]] = 5.0
    cost = cost_fn(jnp.asarray(logits), jnp.asarray(pred[0], jnp.float32), jnp.asarray([1, 3, 0]),
                   jnp.asarray(pred[0][[4, 0, 2]], jnp.float32))
    np.testing.assert_array_equal(linear_sum_assignment(cost)[1], [4, 0, 2])
    with pytest.raises(ValueError, match="target_labels must be"):
        detr_matching_cost(jnp.asarray(logits), jnp.asarray(pred[0]), jnp.asarray([[1]]), jnp.zeros((1, 1, 4)))
