"""Generated shapes: each shape kind against a per-pixel loop, occlusion, boxes of masks, determinism, the builder."""

import socket

import numpy as np
import pytest

from jaxmodels.data import shapes

SMALL = dict(image_size=16, min_shapes=1, max_shapes=3, min_size=0.3, max_size=0.7, min_visible=2, num_train=24,
             num_test=10, seed=3)


def inside_loop(kind, g, x, y):
    """Independent membership test of the point (x, y), written the slow way."""
    if kind == "rectangle":
        return g[0] <= x <= g[2] and g[1] <= y <= g[3]
    if kind == "ellipse":
        return (x - g[0]) ** 2 * g[3] ** 2 + (y - g[1]) ** 2 * g[2] ** 2 <= (g[2] * g[3]) ** 2
    (xa, ya), (xb, yb), (xc, yc) = g[0:2], g[2:4], g[4:6]  # barycentric coordinates by Cramer's rule
    det = (xb - xa) * (yc - ya) - (xc - xa) * (yb - ya)
    u = ((x - xa) * (yc - ya) - (xc - xa) * (y - ya)) / det
    v = ((xb - xa) * (y - ya) - (x - xa) * (yb - ya)) / det
    return u >= 0 and v >= 0 and u + v <= 1


def mask_loop(kind, g, size):
    return np.array([[inside_loop(kind, g, j + 0.5, i + 0.5) for j in range(size)] for i in range(size)])


@pytest.mark.parametrize("kind", shapes.CLASSES)
def test_shape_mask_against_a_pixel_loop(kind):
    rng = np.random.default_rng(0)
    size = 13
    for _ in range(4):
        if kind == "rectangle":
            x0, y0 = rng.uniform(-2, 8, 2)
            g = [x0, y0, x0 + rng.uniform(1, 8), y0 + rng.uniform(1, 8)]
        elif kind == "ellipse":
            g = [*rng.uniform(0, 13, 2), *rng.uniform(1, 6, 2)]
        else:
            g = rng.uniform(-1, 14, 6)
        expected = mask_loop(kind, g, size)
        assert 0 < expected.sum() < size * size  # a real test: partly inside
        np.testing.assert_array_equal(shapes.shape_mask(kind, g, size), expected)
    with pytest.raises(ValueError, match="kind='circle'"):
        shapes.shape_mask("circle", [0, 0, 1, 1], size)


def test_drawn_shapes_have_the_drawn_box_and_each_kind_occurs():
    config = shapes.make_config(**SMALL)
    rng, kinds = np.random.default_rng(1), set()
    for _ in range(30):
        kind, g = shapes.draw_shape(rng, config)
        kinds.add(kind)
        mask = shapes.shape_mask(shapes.CLASSES[kind], g, 16)
        box = shapes.boxes_of_masks(mask[None])[0]
        assert 0 <= box[0] < box[2] <= 16 and 0 <= box[1] < box[3] <= 16
        side = box[2:] - box[:2]  # within a pixel of the drawn size range
        assert (side >= 0.3 * 16 - 1).all() and (side <= 0.7 * 16 + 1).all()
    assert kinds == {0, 1, 2}


def box_loop(mask):
    rows = [i for i in range(mask.shape[0]) if mask[i].any()]
    cols = [j for j in range(mask.shape[1]) if mask[:, j].any()]
    return [min(cols), min(rows), max(cols) + 1, max(rows) + 1]


def test_examples_are_consistent_occluded_and_deterministic():
    config = shapes.make_config(**SMALL)
    counts = []
    for index in range(12):
        ex = shapes.generate(config, "train", index)
        again = shapes.generate(config, "train", index)
        for key in ("image", "segmentation", "boxes", "classes", "masks", "valid"):
            np.testing.assert_array_equal(ex[key], again[key])
        n = ex["num_objects"]
        counts.append(n)
        assert 1 <= n <= 3 and ex["valid"].sum() == n and ex["valid"][:n].all()
        masks, geometry = ex["masks"], ex["geometry"]
        assert len(geometry) == n and not masks[n:].any() and not ex["boxes"][n:].any()
        assert (masks.sum(axis=0) <= 1).all()  # visible parts are disjoint
        drawn = [shapes.shape_mask(shapes.CLASSES[kind], g, 16) for kind, g in geometry]
        for k in range(n):
            assert masks[k].sum() >= config.min_visible
            covered_later = np.any(drawn[k + 1:], axis=0) if k + 1 < n else np.zeros((16, 16), bool)
            np.testing.assert_array_equal(masks[k], drawn[k] & ~covered_later)  # later shapes occlude
            np.testing.assert_array_equal(ex["boxes"][k], box_loop(masks[k]))
            assert ex["classes"][k] == geometry[k][0]
            assert len(np.unique(ex["image"][masks[k]], axis=0)) == 1  # one colour per object
            np.testing.assert_array_equal(ex["segmentation"] == k + 1, masks[k])
        background = ~masks.any(axis=0)
        assert len(np.unique(ex["image"][background], axis=0)) <= 1
    assert len(set(counts)) > 1
    other = [shapes.generate(config, "test", 0), shapes.generate(config, "train", 1),
             shapes.generate(shapes.make_config(**SMALL | dict(seed=4)), "train", 0)]
    first = shapes.generate(config, "train", 0)
    assert all(not np.array_equal(first["image"], o["image"]) for o in other)


def test_boxes_of_masks_rejects_empty_masks():
    with pytest.raises(ValueError, match="non-empty"):
        shapes.boxes_of_masks(np.zeros((1, 4, 4), bool))


@pytest.mark.parametrize("kwargs,match", [
    (dict(image_size=4), "image_size"),
    (dict(min_shapes=3, max_shapes=2), "min_shapes <= max_shapes"),
    (dict(min_size=0.6, max_size=0.5), "max_size"),
    (dict(min_size=0.0), "min_size"),
    (dict(min_visible=400), "min_visible"),
    (dict(num_test=0), "num_test"),
    (dict(seed=-1), "seed"),
])
def test_bad_configs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        shapes.make_config(**kwargs)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """SMALL prepared once into a fresh directory, with any network access failing the test at once."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")
    path = str(tmp_path_factory.mktemp("shapes"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket, "getaddrinfo", refuse)
        patch.setattr(socket.socket, "connect", refuse)
        shapes.prepare(path, config=shapes.make_config(**SMALL))
    return path


def test_prepared_splits_are_the_generated_examples(data_dir):
    config = shapes.make_config(**SMALL)
    for split, size in (("train", 24), ("test", 10)):
        arrays = shapes.load_split(split, data_dir, config)
        assert arrays["images"].shape == (size, 16, 16, 3) and arrays["masks"].shape == (size, 3, 16, 16)
        for i in (0, size - 1):
            ex = shapes.generate(config, split, i)
            for key, name in (("images", "image"), ("boxes", "boxes"), ("classes", "classes"), ("masks", "masks"),
                              ("valid", "valid")):
                np.testing.assert_array_equal(arrays[key][i], ex[name])
    with pytest.raises(ValueError, match="validation"):
        shapes.load_split("validation", data_dir, config)


def test_batches_are_pure_and_padded(data_dir):
    config = shapes.make_config(**SMALL)
    it = shapes.batches("train", 0, 8, data_dir=data_dir, config=config)
    full = [next(it) for _ in range(5)]  # crosses an epoch (24 / 8)
    b = full[0]
    assert b["inputs"].shape == (8, 16, 16, 3) and b["inputs"].dtype == np.float32
    assert -1 <= b["inputs"].min() and b["inputs"].max() <= 1
    assert b["boxes"].shape == (8, 3, 4) and b["classes"].dtype == np.int32 and b["valid"].dtype == bool
    np.testing.assert_array_equal(b["masks"].any(axis=(2, 3)), b["valid"])
    np.testing.assert_array_equal(shapes.batch("train", 0, 4, 8, data_dir=data_dir, config=config)["inputs"],
                                  full[4]["inputs"])
    halves = [shapes.batch("train", 0, 1, 8, p, 2, data_dir=data_dir, config=config) for p in range(2)]
    np.testing.assert_array_equal(np.concatenate([h["boxes"] for h in halves]), full[1]["boxes"])
    with pytest.raises(ValueError, match="process_index"):
        shapes.batch("train", 0, 0, 8, 2, 2, data_dir=data_dir, config=config)
