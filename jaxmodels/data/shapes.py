"""Generated "shapes" images for detection and segmentation, as a tensorflow-datasets builder, and batches.

Each image is a background of one random colour with 1..N coloured shapes painted on it in order, each
shape one of CLASSES: an axis-aligned "rectangle", an axis-aligned "ellipse" or a "triangle" (apex on
one side of its bounding box, base the opposite side). Nothing is downloaded: the data are a pure
function of the config (image size, shape counts and sizes, split sizes, seed), generated and written
to ArrayRecord on first use, then read back as a random-access data source (no TensorFlow).

Geometry. Pixel (row i, column j) covers [j, j+1) x [i, i+1); it belongs to a shape when its centre
(j + 1/2, i + 1/2) is inside the shape (closed sets; `shape_mask`). Each shape's bounding box has sides
drawn uniformly in [min_size, max_size] * image_size and lies inside the image.

Occlusion. Later shapes occlude earlier ones: an object's instance mask is its visible part, and its
box is the box of that mask, in pixel edges xyxy: (min column, min row, max column + 1, max row + 1).
A shape with fewer than `min_visible` visible pixels (fully occluded ones included) is dropped and the
image repainted without it (which can only uncover pixels of the others) until every shape left has
at least `min_visible` pixels; so every image pixel is the background or the colour of exactly one
object's mask. Objects stay in painting order (back to front).

Features: "image" uint8 (S, S, 3); "segmentation" uint8 (S, S), 0 for background and k + 1 on object
k's mask; "boxes" float32 (N, 4) xyxy pixels and "classes" int64 (N,) (index into CLASSES), both padded
with zeros beyond "num_objects" int64; "index" int64. N = max_shapes.

Splits "train" and "test", of `num_train` and `num_test` images. Image `index` of split s is drawn
from `np.random.default_rng((seed, s, index))` (s = 0 train, 1 test): the two never share a stream,
and an image does not depend on the others.

Readers: `load_split` gives whole splits as padded arrays (masks included), `batch`/`batches`
deterministic shuffled batches: {"inputs" float32 (B, S, S, 3) in [-1, 1], "boxes" float32 (B, N, 4),
"classes" int32 (B, N), "masks" bool (B, N, S, S), "valid" bool (B, N)}.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import os
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

from jaxmodels.data import corpus, integrity
from jaxmodels.data.digits import check_batch_arguments, index_batches
from jaxmodels.data.text_files import unknown_split
from jaxmodels.ops.checks import non_negative_int, one_of, positive_int, real_in_range

NAME = "shapes"
SPLITS = ("train", "test")
CLASSES = ("rectangle", "ellipse", "triangle")
NUM_CLASSES = len(CLASSES)
MIN_CONTRAST = 96  # a shape's colour differs from the background by at least this much in some channel

# Every config is made on the fly (named by its parameters), so tfds's "custom data configuration" warning says nothing.
logging.getLogger("absl").addFilter(
    lambda record: not record.getMessage().startswith("Using custom data configuration: ShapesConfig("))


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
    """Builder config: the generation parameters (see `make_config`); its name spells them all."""

    image_size: int = 64
    min_shapes: int = 1
    max_shapes: int = 4
    min_size: float = 0.2
    max_size: float = 0.5
    min_visible: int = 4
    num_train: int = 5000
    num_test: int = 500
    seed: int = 0


PARAMETERS = tuple(f.name for f in dataclasses.fields(ShapesConfig) if f.name not in
                   {g.name for g in dataclasses.fields(tfds.core.BuilderConfig)})


def make_config(image_size: int = 64, min_shapes: int = 1, max_shapes: int = 4, min_size: float = 0.2,
                max_size: float = 0.5, min_visible: int = 4, num_train: int = 5000, num_test: int = 500,
                seed: int = 0) -> ShapesConfig:
    """A checked `ShapesConfig`; raises ValueError/TypeError naming a bad argument.

    image_size      S, the images' height and width (>= 8)
    min_shapes, max_shapes   the number of shapes painted is uniform in [min_shapes, max_shapes] (before
                    dropping the occluded ones); max_shapes is N, the padded object count
    min_size, max_size       a shape's bounding-box sides, as fractions of S, 0 < min_size <= max_size <= 1
    min_visible     shapes with fewer visible pixels are dropped (>= 1; 1 drops only fully occluded ones);
                    it must be at most the pixels of the smallest shape that can be drawn
    num_train, num_test      split sizes
    seed            the data set's seed
    """
    positive_int("image_size", image_size)
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    positive_int("min_shapes", min_shapes)
    positive_int("max_shapes", max_shapes)
    if min_shapes > max_shapes:
        raise ValueError(f"need min_shapes <= max_shapes, got {min_shapes} and {max_shapes}")
    real_in_range("min_size", min_size, 0, 1, include_low=False)
    real_in_range("max_size", max_size, min_size, 1)
    positive_int("min_visible", min_visible)
    side = min_size * image_size
    if min_visible > max(side - 1, 0) ** 2 / 2:  # a triangle of side s covers >= about (s - 1)^2 / 2 pixel centres
        raise ValueError(f"min_visible={min_visible} is more pixels than the smallest shape may cover "
                         f"(min_size * image_size = {side:.1f} pixels a side); lower min_visible or raise min_size")
    positive_int("num_train", num_train)
    positive_int("num_test", num_test)
    non_negative_int("seed", seed)
    params = dict(image_size=image_size, min_shapes=min_shapes, max_shapes=max_shapes, min_size=float(min_size),
                  max_size=float(max_size), min_visible=min_visible, num_train=num_train, num_test=num_test, seed=seed)
    name = (f"s{image_size}_n{min_shapes}-{max_shapes}_z{min_size:g}-{max_size:g}_v{min_visible}"
            f"_tr{num_train}_te{num_test}_seed{seed}")
    return ShapesConfig(name=name, description="generated shapes", **params)



def config_from_section(section) -> ShapesConfig:
    """`make_config(**section)` for a config's data.shapes section (a mapping; None or empty: the defaults); an
    invalid or unknown field raises its ValueError / TypeError prefixed with "config.data.shapes: "."""
    try:
        return make_config(**dict(section or {}))
    except (ValueError, TypeError) as e:
        raise type(e)(f"config.data.shapes: {e}") from None

def _params(config: ShapesConfig) -> tuple:
    return tuple(getattr(config, p) for p in PARAMETERS)


def shape_mask(kind: str, geometry, image_size: int) -> np.ndarray:
    """bool (S, S): the pixels whose centres (j + 1/2, i + 1/2) are inside the shape (closed set).

    geometry (float, pixel units, x = column, y = row):
      "rectangle"  (x0, y0, x1, y1): x0 <= x <= x1 and y0 <= y <= y1
      "ellipse"    (cx, cy, a, b): ((x - cx) / a)^2 + ((y - cy) / b)^2 <= 1
      "triangle"   (xa, ya, xb, yb, xc, yc): the three edge functions have one sign (or are 0)
    """
    one_of("kind", kind, CLASSES)
    g = np.asarray(geometry, np.float64)
    centres = np.arange(image_size) + 0.5
    x, y = centres[None, :], centres[:, None]
    if kind == "rectangle":
        return (g[0] <= x) & (x <= g[2]) & (g[1] <= y) & (y <= g[3])
    if kind == "ellipse":
        return ((x - g[0]) / g[2]) ** 2 + ((y - g[1]) / g[3]) ** 2 <= 1
    v = g.reshape(3, 2)
    edges = [(v[(k + 1) % 3, 0] - v[k, 0]) * (y - v[k, 1]) - (v[(k + 1) % 3, 1] - v[k, 1]) * (x - v[k, 0])
             for k in range(3)]
    return np.all([e >= 0 for e in edges], axis=0) | np.all([e <= 0 for e in edges], axis=0)


def draw_shape(rng: np.random.Generator, config: ShapesConfig) -> tuple[int, np.ndarray]:
    """(class, geometry) of one random shape whose bounding box lies inside the image."""
    size = config.image_size
    kind = int(rng.integers(NUM_CLASSES))
    w, h = rng.uniform(config.min_size, config.max_size, 2) * size
    x0, y0 = rng.uniform(0, size - w), rng.uniform(0, size - h)
    x1, y1 = x0 + w, y0 + h
    if CLASSES[kind] == "rectangle":
        return kind, np.array([x0, y0, x1, y1])
    if CLASSES[kind] == "ellipse":
        return kind, np.array([(x0 + x1) / 2, (y0 + y1) / 2, w / 2, h / 2])
    side, t = int(rng.integers(4)), rng.uniform()  # the apex's side (top, bottom, left, right) and place on it
    apex, base = {0: ((x0 + t * w, y0), ((x0, y1), (x1, y1))), 1: ((x0 + t * w, y1), ((x0, y0), (x1, y0))),
                  2: ((x0, y0 + t * h), ((x1, y0), (x1, y1))), 3: ((x1, y0 + t * h), ((x0, y0), (x0, y1)))}[side]
    return kind, np.array([*apex, *base[0], *base[1]])


def _colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    while True:
        colour = rng.integers(0, 256, 3)
        if np.abs(colour - background).max() >= MIN_CONTRAST:
            return colour


def visible_owner(masks: list[np.ndarray], image_size: int) -> np.ndarray:
    """int (S, S): the index of the last of `masks` (bool (S, S) each, in painting order) covering each pixel,
    -1 where none does."""
    owner = np.full((image_size, image_size), -1, np.int64)
    for k, mask in enumerate(masks):
        owner[mask] = k
    return owner


def boxes_of_masks(masks: np.ndarray) -> np.ndarray:
    """float32 (K, 4) xyxy pixel-edge boxes (min col, min row, max col + 1, max row + 1) of non-empty bool
    masks (K, H, W)."""
    masks = np.asarray(masks, bool)
    if masks.ndim != 3 or not masks.reshape(len(masks), -1).any(axis=1).all():
        raise ValueError(f"masks must be (K, H, W) with every mask non-empty, got shape {masks.shape}")
    rows, cols = masks.any(axis=2), masks.any(axis=1)
    first = lambda a: a.argmax(axis=1)
    last = lambda a: a.shape[1] - a[:, ::-1].argmax(axis=1)
    return np.stack([first(cols), first(rows), last(cols), last(rows)], axis=1).astype(np.float32)


def generate(config: ShapesConfig, split: str, index: int) -> dict[str, np.ndarray]:
    """Example `index` of `split`: the builder's features (see the module docstring), a pure function of
    (config, split, index). Also returns "masks" bool (N, S, S), "valid" bool (N,) and the kept shapes'
    "geometry" (a list of (class, geometry) in painting order, for `shape_mask`)."""
    one_of("split", split, SPLITS)
    size, n = config.image_size, config.max_shapes
    rng = np.random.default_rng((config.seed, SPLITS.index(split), index))
    background = rng.integers(0, 256, 3)
    count = int(rng.integers(config.min_shapes, config.max_shapes + 1))
    shapes = [draw_shape(rng, config) for _ in range(count)]
    colours = [_colour(rng, background) for _ in range(count)]
    masks = [shape_mask(CLASSES[kind], geometry, size) for kind, geometry in shapes]
    while True:  # drop shapes showing too few pixels until none is left (dropping uncovers the others)
        owner = visible_owner(masks, size)
        areas = np.bincount(owner.ravel() + 1, minlength=len(masks) + 1)[1:]
        keep = areas >= config.min_visible
        if keep.all():
            break
        shapes, colours, masks = ([x for x, k in zip(seq, keep) if k] for seq in (shapes, colours, masks))
    image = np.broadcast_to(background, (size, size, 3)).astype(np.uint8)
    for k, colour in enumerate(colours):
        image[owner == k] = colour
    visible = owner[None] == np.arange(len(shapes))[:, None, None]
    boxes, classes, all_masks = np.zeros((n, 4), np.float32), np.zeros(n, np.int64), np.zeros((n, size, size), bool)
    boxes[:len(shapes)] = boxes_of_masks(visible)
    classes[:len(shapes)] = [kind for kind, _ in shapes]
    all_masks[:len(shapes)] = visible
    return {"image": image, "segmentation": (owner + 1).astype(np.uint8), "boxes": boxes, "classes": classes,
            "num_objects": len(shapes), "index": index, "masks": all_masks, "valid": np.arange(n) < len(shapes),
            "geometry": shapes}


class Shapes(tfds.core.GeneratorBasedBuilder):
    """Generated shapes; features: image uint8 (S, S, 3), segmentation uint8 (S, S), boxes float32 (N, 4),
    classes int64 (N,), num_objects int64, index int64."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def _info(self) -> tfds.core.DatasetInfo:
        size, n = self.builder_config.image_size, self.builder_config.max_shapes
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8),
                "segmentation": tfds.features.Tensor(shape=(size, size), dtype=np.uint8),
                "boxes": tfds.features.Tensor(shape=(n, 4), dtype=np.float32),
                "classes": tfds.features.Tensor(shape=(n,), dtype=np.int64),
                "num_objects": tfds.features.Scalar(dtype=np.int64),
                "index": tfds.features.Scalar(dtype=np.int64),
            }),
            disable_shuffling=True,  # examples stay in index order
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        config = self.builder_config
        return {"train": self._generate_examples("train", config.num_train),
                "test": self._generate_examples("test", config.num_test)}

    def _generate_examples(self, split: str, num_examples: int):
        keys = ("image", "segmentation", "boxes", "classes", "num_objects", "index")
        for i in range(num_examples):
            example = generate(self.builder_config, split, i)
            yield i, {k: example[k] for k in keys}


def prepare(data_dir: str | None = None, *, config: ShapesConfig | None = None) -> Shapes:
    """Returns the `Shapes` builder of `config` (default `make_config()`), preparing it into `data_dir` on first use.

    Never downloads. Safe when several processes call it at once (`integrity.prepare_embedded`'s lock on
    `data_dir/shapes.lock`); damaged files are prepared again after a warning. `data_dir` defaults to
    `corpus.default_data_dir()`. Preparing the default 5500 images of 64x64 took 10 s on one (shared) CPU core.
    Read it with `builder.as_data_source(split)` (items: the features of the module docstring).
    """
    data_dir = data_dir or corpus.default_data_dir()
    config = config or make_config()
    if not isinstance(config, ShapesConfig):
        raise TypeError(f"config must be a ShapesConfig (see make_config), got {type(config).__name__}")
    return integrity.prepare_embedded(data_dir, NAME, lambda: Shapes(data_dir=data_dir, config=config,
                                                                     file_format="array_record"))


@functools.lru_cache(maxsize=8)
def _split_arrays(split: str, data_dir: str, params: tuple) -> dict[str, np.ndarray]:
    builder = prepare(data_dir, config=make_config(**dict(zip(PARAMETERS, params))))
    source = integrity.CheckedSource(builder.as_data_source(split), integrity.embedded_fix(builder.data_path))
    items = [source[i] for i in range(len(source))]
    n = params[PARAMETERS.index("max_shapes")]
    segmentation = np.stack([x["segmentation"] for x in items])
    arrays = {"images": np.stack([x["image"] for x in items]),
              "boxes": np.stack([x["boxes"] for x in items]),
              "classes": np.stack([x["classes"] for x in items]).astype(np.int32),
              "masks": segmentation[:, None] == np.arange(1, n + 1)[None, :, None, None],
              "valid": np.array([x["num_objects"] for x in items])[:, None] > np.arange(n)[None]}
    for a in arrays.values():
        a.flags.writeable = False  # shared by every caller of the cache
    return arrays


def load_split(split: str, data_dir: str | None = None, config: ShapesConfig | None = None) -> dict[str, np.ndarray]:
    """The whole split in index order: {"images" uint8 (M, S, S, 3), "boxes" float32 (M, N, 4) xyxy pixels,
    "classes" int32 (M, N), "masks" bool (M, N, S, S), "valid" bool (M, N)}; padding rows are zero / False.
    Read-only arrays, cached in memory per (split, data_dir, config parameters)."""
    if split not in SPLITS:
        raise unknown_split(split, SPLITS)
    config = config or make_config()
    return _split_arrays(split, os.path.abspath(data_dir or corpus.default_data_dir()), _params(config))


def to_unit_range(images: np.ndarray) -> np.ndarray:
    """uint8 pixels (any shape) -> float32 in [-1, 1]: x / 127.5 - 1."""
    return np.asarray(images, np.float32) / 127.5 - 1


def batch(split: str, seed: int, step: int, global_batch_size: int, process_index: int = 0, process_count: int = 1,
          *, data_dir: str | None = None, config: ShapesConfig | None = None) -> dict[str, np.ndarray]:
    """This process's batch of `split` at `step`, the one `batches` yields there.

    Returns {"inputs": float32 (B_l, S, S, 3) in [-1, 1], "boxes": float32 (B_l, N, 4) xyxy pixels,
    "classes": int32 (B_l, N), "masks": bool (B_l, N, S, S), "valid": bool (B_l, N)} with padding rows
    zero / False, B_l = global_batch_size // process_count. Process p gets rows [p*B_l, (p+1)*B_l) of the
    global batch; each epoch is a fresh permutation of the split.
    """
    return next(batches(split, seed, global_batch_size, process_index, process_count, start_step=step,
                        data_dir=data_dir, config=config))


def batches(split: str, seed: int, global_batch_size: int, process_index: int = 0, process_count: int = 1, *,
            start_step: int = 0, data_dir: str | None = None,
            config: ShapesConfig | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Endless iterator of this process's batches (see `batch`) for steps start_step, start_step + 1, ...

    A batch is a pure function of (split, seed, step, process, config). Raises ValueError on bad arguments,
    before the first batch is asked for.
    """
    check_batch_arguments("image", global_batch_size, seed, start_step, process_index, process_count)
    arrays = load_split(split, data_dir, config)
    ds = index_batches(len(arrays["images"]), global_batch_size, seed, process_index, process_count)
    rows = map(ds.__getitem__, itertools.count(start_step))
    return ({"inputs": to_unit_range(arrays["images"][r]), "boxes": arrays["boxes"][r],
             "classes": arrays["classes"][r], "masks": arrays["masks"][r], "valid": arrays["valid"][r]}
            for r in rows)
