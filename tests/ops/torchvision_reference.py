"""Writes tests/ops/data/torchvision_ops.npz: torchvision's outputs and gradients of roi_align, roi_pool,
deform_conv2d and the box ops on small random inputs, which tests/ops/test_roi.py, test_deformable.py and
test_boxes.py compare with ours.

torchvision is not a test dependency: PyPI's torchvision needs its own torch build (beside the CPU torch 2.13.0
the project installs it fails with "operator torchvision::nms does not exist"). So the numbers were made once in
a separate virtual environment and committed (about 200 kB):

    python -m venv /tmp/tvenv && /tmp/tvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 numpy
    /tmp/tvenv/bin/python tests/ops/torchvision_reference.py

Everything is stored channels-last (features (B, H, W, C), offsets (B, H', W', 2·G·kh·kw), kernels HWIO) and in
float64 for the comparison, computed by torchvision in float64 on the CPU. Each case's arrays are keys
"<case>/<name>"; the static options are in "<case>/options" as a JSON string.
"""

import json
import pathlib

import numpy as np
import torch
import torchvision
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import box_iou, deform_conv2d, generalized_box_iou, roi_align, roi_pool

OUT = pathlib.Path(__file__).with_name("data") / "torchvision_ops.npz"


def _nhwc(t):
    return t.detach().permute(0, 2, 3, 1).numpy()


def _boxes(rng, k, size):
    low = rng.uniform(-0.2 * size, 0.9 * size, (k, 2))
    return np.concatenate([low, low + rng.uniform(0.0, 0.8 * size, (k, 2))], 1)


def main():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    arrays = {}
    roi_cases = [  # (name, output_size, spatial_scale, sampling_ratio, aligned)
        ("align_adaptive", (3, 2), 0.5, -1, False),
        ("align_adaptive_aligned", (2, 3), 0.5, 0, True),
        ("align_ratio2", (2, 2), 1.0, 2, False),
        ("align_ratio3_aligned", (3, 3), 0.25, 3, True),
    ]
    for name, size, scale, ratio, aligned in roi_cases:
        features = torch.tensor(rng.normal(size=(2, 3, 9, 11)), requires_grad=True)
        boxes = torch.tensor(_boxes(rng, 6, 11 / scale))
        index = torch.tensor(rng.integers(0, 2, 6))
        out = roi_align(features, torch.cat([index[:, None].double(), boxes], 1), size, scale, ratio, aligned)
        cotangent = torch.tensor(rng.normal(size=out.shape))
        (grad,) = torch.autograd.grad(out, features, cotangent)
        arrays.update({f"{name}/features": _nhwc(features), f"{name}/boxes": boxes.numpy(),
                       f"{name}/batch_indices": index.numpy(), f"{name}/out": _nhwc(out),
                       f"{name}/cotangent": _nhwc(cotangent), f"{name}/grad_features": _nhwc(grad),
                       f"{name}/options": json.dumps(dict(output_size=size, spatial_scale=scale,
                                                          sampling_ratio=ratio, aligned=aligned))})
    for name, size, scale in [("pool_scale1", (3, 2), 1.0), ("pool_scale_half", (2, 4), 0.5)]:
        features = torch.tensor(rng.normal(size=(2, 3, 8, 10)), requires_grad=True)
        boxes = torch.tensor(_boxes(rng, 6, 10 / scale))
        index = torch.tensor(rng.integers(0, 2, 6))
        out = roi_pool(features, torch.cat([index[:, None].double(), boxes], 1), size, scale)
        cotangent = torch.tensor(rng.normal(size=out.shape))
        (grad,) = torch.autograd.grad(out, features, cotangent)
        arrays.update({f"{name}/features": _nhwc(features), f"{name}/boxes": boxes.numpy(),
                       f"{name}/batch_indices": index.numpy(), f"{name}/out": _nhwc(out),
                       f"{name}/cotangent": _nhwc(cotangent), f"{name}/grad_features": _nhwc(grad),
                       f"{name}/options": json.dumps(dict(output_size=size, spatial_scale=scale))})
    deform_cases = [  # (name, cin, cout, k, stride, padding, dilation, groups, offset_groups, modulated)
        ("deform_v1", 4, 3, 3, 1, 1, 1, 1, 1, False),
        ("deform_v2_groups", 4, 6, 3, 2, 1, 1, 2, 2, True),
        ("deform_v2_dilated", 6, 4, 2, 1, 2, 2, 1, 3, True),
    ]
    for name, cin, cout, k, stride, padding, dilation, groups, offset_groups, modulated in deform_cases:
        x = torch.tensor(rng.normal(size=(2, cin, 6, 7)), requires_grad=True)
        h_out = (6 + 2 * padding - dilation * (k - 1) - 1) // stride + 1
        w_out = (7 + 2 * padding - dilation * (k - 1) - 1) // stride + 1
        offset = torch.tensor(rng.normal(scale=1.5, size=(2, 2 * offset_groups * k * k, h_out, w_out)),
                              requires_grad=True)
        weight = torch.tensor(rng.normal(size=(cout, cin // groups, k, k)), requires_grad=True)
        mask = (torch.tensor(rng.uniform(size=(2, offset_groups * k * k, h_out, w_out)), requires_grad=True)
                if modulated else None)
        out = deform_conv2d(x, offset, weight, None, (stride, stride), (padding, padding), (dilation, dilation), mask)
        cotangent = torch.tensor(rng.normal(size=out.shape))
        inputs = [x, offset, weight] + ([mask] if modulated else [])
        grads = torch.autograd.grad(out, inputs, cotangent)
        arrays.update({f"{name}/x": _nhwc(x), f"{name}/offset": _nhwc(offset),
                       f"{name}/kernel": weight.detach().permute(2, 3, 1, 0).numpy(), f"{name}/out": _nhwc(out),
                       f"{name}/cotangent": _nhwc(cotangent), f"{name}/grad_x": _nhwc(grads[0]),
                       f"{name}/grad_offset": _nhwc(grads[1]),
                       f"{name}/grad_kernel": grads[2].permute(2, 3, 1, 0).numpy(),
                       f"{name}/options": json.dumps(dict(stride=stride, padding=padding, dilation=dilation,
                                                          feature_group_count=groups))})
        if modulated:
            arrays.update({f"{name}/mask": _nhwc(mask), f"{name}/grad_mask": _nhwc(grads[3])})
    a, b = torch.tensor(_boxes(rng, 5, 10.0)), torch.tensor(_boxes(rng, 4, 10.0))
    a[:, 2:] += 0.1
    b[:, 2:] += 0.1
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    deltas = coder.encode_single(a[:4], b)
    wild = torch.tensor(rng.normal(scale=3.0, size=(4, 4)))
    wild[0, 2] = 20.0  # beyond the log(1000/16) clip
    arrays.update({"boxes/a": a.numpy(), "boxes/b": b.numpy(), "boxes/iou": box_iou(a, b).numpy(),
                   "boxes/giou": generalized_box_iou(a, b).numpy(), "boxes/encoded": deltas.numpy(),
                   "boxes/wild_deltas": wild.numpy(), "boxes/decoded": coder.decode_single(wild, b).numpy(),
                   "versions": json.dumps(dict(torch=torch.__version__, torchvision=torchvision.__version__))})
    OUT.parent.mkdir(exist_ok=True)
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(arrays)} arrays)")


if __name__ == "__main__":
    main()
