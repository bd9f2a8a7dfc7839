"""Vision operators and models against PyTorch on the same device: RoIAlign and deformable convolution v2 forward +
backward against torchvision's CUDA ops, Swin-T and ViT-B/16 train steps against timm's models under torch.compile.

    python -m benchmarks.vision [--cases roi_align,deform_conv2d,swin_t,vit_b16] [--batch 128] [--steps 20]
                                [--out benchmarks/results/vision.json]
    python -m benchmarks.vision --small [--out PATH]   # CPU smoke run: tiny shapes, a few iterations

Cases (each framework in its own process, so that each peak memory is its own and JAX and torch do not share the
GPU; inputs are drawn by NumPy from fixed seeds, identical in both):
  roi_align      `jaxmodels.ops.roi.roi_align` vs `torchvision.ops.roi_align`: features 8 x 256 x 64 x 64 (a
                 stride-16 map of 1024² images), 512 boxes, 7 x 7 bins, sampling_ratio 2, aligned=True, spatial
                 scale 1/16; the value and the gradient w.r.t. the features of sum(out · g), g fixed.
  deform_conv2d  `jaxmodels.ops.deformable.deform_conv2d` with modulation (v2) vs `torchvision.ops.deform_conv2d`:
                 x 8 x 64 x 128 x 128, 3 x 3 kernel 64 -> 64, padding 1, one offset group, offsets N(0, 2²) pixels,
                 mask in (0, 1); gradients w.r.t. x, offsets, mask and kernel. FLOPs: the convolution's
                 2·B·H·W·9·Cin·Cout per pass, x3 for forward + backward (the bilinear sampling not counted).
  swin_t, vit_b16  a train step (forward, backward, AdamW with clipping) at batch --batch, 224 x 224 x 3, 1000
                 classes, bf16 compute and float32 parameters: ours is the library's Trainer (task
                 "classification" on "synthetic_images", experiments/configs/image_classification.py with the
                 model's paper shape, `jaxmodels.models.swin.SWIN_T`, ViT-B/16), timm's
                 swin_tiny_patch4_window7_224 / vit_base_patch16_224 (drop path 0) under torch.compile with bf16
                 autocast and fused AdamW. MFU = the model's analytic train FLOPs (`train_flops_per_example`: 3x the
                 forward's matmuls, 2 FLOPs per multiply-add) x images/s / the device's bf16 peak (both frameworks
                 are credited with the same count; ours omits timm's qkv and MLP biases, <0.2% of the parameters).
Reported per case and framework: median time of --steps synchronised iterations after warm-up, the ratio
torch / ours (> 1: ours faster), peak device memory (JAX: the allocator's peak bytes in use; torch:
max_memory_allocated), and for the operators the largest difference between the two outputs. When torch,
torchvision or timm are missing, their cases are skipped and the JSON says so.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

# Case -> (torch modules it needs, tiny shapes for --small, full shapes).
OPS = {"roi_align": dict(small=dict(batch=2, channels=8, side=16, boxes=8, image=256),
                         full=dict(batch=8, channels=256, side=64, boxes=512, image=1024)),
       "deform_conv2d": dict(small=dict(batch=2, channels=8, side=16), full=dict(batch=8, channels=64, side=128))}
MODELS = {"swin_t": "swin_tiny_patch4_window7_224", "vit_b16": "vit_base_patch16_224"}
NEEDS = {"roi_align": ("torch", "torchvision"), "deform_conv2d": ("torch", "torchvision"),
         "swin_t": ("torch", "timm"), "vit_b16": ("torch", "timm")}
SMALL_MODELS = {"swin_t": dict(image_size=32, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2),
                               window_size=4, num_classes=10),
                "vit_b16": dict(image_size=32, patch_size=8, hidden_dim=32, depth=2, num_heads=2, mlp_dim=64,
                                num_classes=10)}


def missing_modules(names) -> list[str]:
    missing = []
    for name in names:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    return missing


# ------------------------------------------------------------------------------------------------ inputs

def roi_inputs(batch: int, channels: int, side: int, boxes: int, image: int) -> dict[str, np.ndarray]:
    """Channels-last features, boxes (x1, y1, x2, y2) of 16 to 512 pixels inside the image, their images, and the
    cotangent of the (K, 7, 7, C) output."""
    rng = np.random.default_rng(0)
    size = rng.uniform(16, image / 2, (boxes, 2))
    corner = rng.uniform(0, image - size)
    return {"features": rng.normal(size=(batch, side, side, channels)).astype(np.float32),
            "boxes": np.concatenate([corner, corner + size], 1).astype(np.float32),
            "batch_indices": rng.integers(0, batch, boxes).astype(np.int32),
            "cotangent": rng.normal(size=(boxes, 7, 7, channels)).astype(np.float32)}


def deform_inputs(batch: int, channels: int, side: int) -> dict[str, np.ndarray]:
    """x, offsets (2·9 channels, (Δy, Δx) per tap), mask logits passed through a sigmoid, an HWIO kernel and the
    output's cotangent, channels last."""
    rng = np.random.default_rng(1)
    return {"x": rng.normal(size=(batch, side, side, channels)).astype(np.float32),
            "offset": (2 * rng.normal(size=(batch, side, side, 18))).astype(np.float32),
            "mask": (1 / (1 + np.exp(-rng.normal(size=(batch, side, side, 9))))).astype(np.float32),
            "kernel": (rng.normal(size=(3, 3, channels, channels)) / np.sqrt(9 * channels)).astype(np.float32),
            "cotangent": rng.normal(size=(batch, side, side, channels)).astype(np.float32)}


def deform_flops(batch: int, channels: int, side: int) -> float:
    """Forward + backward FLOPs of the convolution inside deform_conv2d (3 x 2·B·H·W·9·C·C)."""
    return 3 * 2 * batch * side * side * 9 * channels * channels


# ----------------------------------------------------------------------------------------------- JAX side

def jax_op(case: str, shape: dict, steps: int, save: str) -> dict:
    import jax
    import jax.numpy as jnp

    from benchmarks.timing import median_time
    from jaxmodels.ops.deformable import deform_conv2d
    from jaxmodels.ops.roi import roi_align

    if case == "roi_align":
        inputs = {k: jnp.asarray(v) for k, v in roi_inputs(**shape).items()}
        scale = 1.0 / (shape["image"] / shape["side"])

        def forward(features):
            return roi_align(features, inputs["boxes"], inputs["batch_indices"], 7, spatial_scale=scale,
                             sampling_ratio=2, aligned=True)

        @jax.jit
        def step(features):
            out, vjp = jax.vjp(forward, features)
            return out, vjp(inputs["cotangent"])[0]

        args = (inputs["features"],)
    else:
        inputs = {k: jnp.asarray(v) for k, v in deform_inputs(**shape).items()}

        def forward(x, offset, mask, kernel):
            return deform_conv2d(x, offset, kernel, mask, padding=1)

        @jax.jit
        def step(x, offset, mask, kernel):
            out, vjp = jax.vjp(forward, x, offset, mask, kernel)
            return out, vjp(inputs["cotangent"])

        args = (inputs["x"], inputs["offset"], inputs["mask"], inputs["kernel"])
    seconds = median_time(step, *args, warmup=2, iters=steps)
    np.save(save, np.asarray(step(*args)[0]))
    return {"framework": f"jaxmodels (jax {jax.__version__})", "median_s": seconds, **jax_memory(jax)}


def jax_memory(jax) -> dict:
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return {"peak_gib": peak / 2**30 if peak else None, "device": jax.devices()[0].device_kind}


def model_config(case: str, batch: int, small: bool):
    """experiments/configs/image_classification.py with the case's model at its paper shape (or a tiny one), on
    synthetic 224 x 224 x 3 images with 1000 classes, bf16 compute (float32 with --small), AdamW."""
    from experiments.configs import image_classification
    from jaxmodels.models.swin import SWIN_T

    c = image_classification.get_config()
    name = "swin" if case == "swin_t" else "vit"
    shape = dict(SWIN_T) if name == "swin" else dict(image_size=224, patch_size=16, hidden_dim=768, depth=12,
                                                    num_heads=12, mlp_dim=3072, num_classes=1000, pooling="cls")
    if small:
        shape.update(SMALL_MODELS[case])
    shape.pop("in_channels", None)
    c.model.update(name=name, image_size=shape.pop("image_size"), in_channels=3, num_classes=shape.pop("num_classes"),
                   dtype="float32" if small else "bfloat16", param_dtype="float32")
    c.model[name].update(shape)
    c.data.update(name="synthetic_images", global_batch_size=batch)
    c.optimizer.update(warmup_steps=10, weight_decay=0.05)
    c.train.update(num_steps=10**6, checkpoint_every=10**6, trackers=("jsonl",))
    return c


def jax_model(case: str, batch: int, steps: int, warmup: int, small: bool) -> dict:
    import jax

    from benchmarks.timing import trainer_step_times
    from jaxmodels.train.loop import Trainer
    from jaxmodels.train.metrics import device_peak_flops

    config = model_config(case, batch, small)
    with tempfile.TemporaryDirectory() as workdir:
        trainer = Trainer(config, workdir, devices=jax.devices()[:1])  # one device, as torch's
        start = time.perf_counter()
        memory = trainer.compile_train_step()
        compile_s = time.perf_counter() - start
        times, state, metrics = trainer_step_times(trainer, steps, warmup)
        parameters = sum(x.size for x in jax.tree.leaves(state["params"]))
    step = float(np.median(times))
    peak = device_peak_flops(jax.devices()[0].device_kind)
    return {"framework": f"jaxmodels (jax {jax.__version__})", "median_step_s": step, "images_per_s": batch / step,
            "train_flops_per_example": trainer.flops_per_example, "parameters": int(parameters),
            "mfu": trainer.flops_per_example * batch / step / peak if peak else None, "compile_s": compile_s,
            "final_loss": float(metrics["loss"]), "xla_memory_gib": memory, **jax_memory(jax)}


# --------------------------------------------------------------------------------------------- torch side

def torch_median_time(torch, fn, warmup: int, iters: int) -> float:
    """Median seconds of fn() after `warmup` calls, each synchronised with the device."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def torch_memory(torch) -> dict:
    if not torch.cuda.is_available():
        return {"peak_gib": None, "device": "cpu"}
    return {"peak_gib": torch.cuda.max_memory_allocated() / 2**30, "device": torch.cuda.get_device_name()}


def torch_op(case: str, shape: dict, steps: int, save: str) -> dict:
    import torch
    import torchvision

    device = "cuda" if torch.cuda.is_available() else "cpu"
    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))).to(device)
    if case == "roi_align":
        inputs = roi_inputs(**shape)
        features = nchw(inputs["features"]).requires_grad_()
        rois = torch.from_numpy(np.concatenate([inputs["batch_indices"][:, None].astype(np.float32),
                                                inputs["boxes"]], 1)).to(device)
        cotangent = nchw(inputs["cotangent"])
        scale = 1.0 / (shape["image"] / shape["side"])

        def step():
            features.grad = None
            out = torchvision.ops.roi_align(features, rois, 7, spatial_scale=scale, sampling_ratio=2, aligned=True)
            out.backward(cotangent)
            return out
    else:
        inputs = deform_inputs(**shape)
        x, offset, mask = (nchw(inputs[k]).requires_grad_() for k in ("x", "offset", "mask"))
        weight = torch.from_numpy(np.ascontiguousarray(inputs["kernel"].transpose(3, 2, 0, 1))).to(device)
        weight.requires_grad_()
        cotangent = nchw(inputs["cotangent"])

        def step():
            for t in (x, offset, mask, weight):
                t.grad = None
            out = torchvision.ops.deform_conv2d(x, offset, weight, padding=1, mask=mask)
            out.backward(cotangent)
            return out

    seconds = torch_median_time(torch, step, 2, steps)
    np.save(save, step().detach().permute(0, 2, 3, 1).cpu().numpy())
    return {"framework": f"torchvision {torchvision.__version__} (torch {torch.__version__})", "median_s": seconds,
            **torch_memory(torch)}


def torch_model(case: str, batch: int, steps: int, warmup: int, small: bool) -> dict:
    import timm
    import torch

    from jaxmodels.train.metrics import device_peak_flops

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = model_config(case, batch, small)
    name = config.model.name
    kwargs = dict(num_classes=config.model.num_classes, drop_path_rate=0.0)
    if small:  # the tiny shape of SMALL_MODELS in timm's arguments
        m = config.model[name]
        kwargs.update(img_size=config.model.image_size, patch_size=m.patch_size)
        kwargs.update(dict(embed_dim=m.embed_dim, depths=m.depths, num_heads=m.num_heads, window_size=m.window_size)
                      if name == "swin" else dict(embed_dim=m.hidden_dim, depth=m.depth, num_heads=m.num_heads,
                                                  mlp_ratio=m.mlp_dim / m.hidden_dim))
    model = timm.create_model(MODELS[case], **kwargs).to(device).train()
    parameters = sum(p.numel() for p in model.parameters())
    compiled = torch.compile(model) if device == "cuda" else model  # CPU smoke runs skip the (slow) compile
    o = config.optimizer
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.learning_rate, betas=(o.b1, o.b2), eps=o.eps,
                                  weight_decay=o.weight_decay, fused=device == "cuda")
    side = config.model.image_size
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.uniform(-1, 1, (batch, 3, side, side)).astype(np.float32)).to(device)
    labels = torch.from_numpy(rng.integers(0, config.model.num_classes, batch)).to(device)
    loss_fn = torch.nn.CrossEntropyLoss()
    last = {}

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=not small):
            loss = loss_fn(compiled(images), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        last["loss"] = loss

    start = time.perf_counter()
    step()  # compilation
    compile_s = time.perf_counter() - start
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = torch_median_time(torch, step, warmup, steps)
    flops = model_flops(config)
    peak = device_peak_flops(torch.cuda.get_device_name()) if device == "cuda" else None
    return {"framework": f"timm {timm.__version__} (torch {torch.__version__}, "
                         f"{'torch.compile' if device == 'cuda' else 'eager'})",
            "median_step_s": seconds, "images_per_s": batch / seconds, "train_flops_per_example": flops,
            "parameters": int(parameters), "mfu": flops * batch / seconds / peak if peak else None,
            "compile_s": compile_s, "final_loss": float(last["loss"]), **torch_memory(torch)}


def model_flops(config) -> float:
    """The train FLOPs of config.model's model (its `train_flops_per_example`), from an abstract build."""
    from flax import nnx

    from jaxmodels.models import make_model

    return nnx.eval_shape(lambda: make_model(config.model, nnx.Rngs(0))).train_flops_per_example()


# ------------------------------------------------------------------------------------------------ driver

def run_case(args, case: str, framework: str, save: str) -> dict:
    """One case of one framework in a fresh process; its result dict (or {"error": ...})."""
    flags = ["--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    flags += ["--small"] if args.small else []
    # torch's processes count FLOPs with an abstract JAX model: on the CPU, so that JAX takes no GPU memory there.
    env = {**os.environ, "JAX_PLATFORMS": "cpu"} if framework == "torch" else None
    out = subprocess.run([sys.executable, "-m", "benchmarks.vision", "--case", case, "--framework", framework,
                          "--save", save, *flags], capture_output=True, text=True, check=False, env=env)
    if out.returncode:
        print(out.stdout[-2000:], out.stderr[-4000:], file=sys.stderr)
        lines = out.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"exit status {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(results: dict, case: str) -> dict:
    """Ratio torch / ours of the time (> 1: ours faster) and of images/s."""
    ours, theirs = results.get("jax", {}), results.get("torch", {})
    key = "median_step_s" if case in MODELS else "median_s"
    if key in ours and key in theirs:
        return {"speedup_vs_torch": theirs[key] / ours[key]}
    return {}


def table(results: dict) -> str:
    lines = [f"{'case':14} {'framework':48} {'ms':>9} {'img/s':>8} {'MFU':>6} {'TFLOP/s':>8} {'peak GiB':>8} "
             f"{'torch/ours':>10} {'max |diff|':>10}"]
    for case, r in results["cases"].items():
        for fw in ("jax", "torch"):
            x = r.get(fw)
            if x is None:
                continue
            if "error" in x or "skipped" in x:
                lines.append(f"{case:14} {fw:48} {x.get('error') or x['skipped']}")
                continue
            ms = 1e3 * x.get("median_step_s", x.get("median_s"))
            img = f"{x['images_per_s']:8.1f}" if "images_per_s" in x else f"{'':8}"
            mfu = f"{x['mfu']:6.3f}" if x.get("mfu") is not None else f"{'':6}"
            tflops = f"{x['tflops']:8.2f}" if x.get("tflops") else f"{'':8}"
            peak = f"{x['peak_gib']:8.2f}" if x.get("peak_gib") is not None else f"{'-':>8}"
            ratio = f"{r['speedup_vs_torch']:10.2f}" if fw == "jax" and "speedup_vs_torch" in r else f"{'':10}"
            diff = f"{r['max_abs_diff']:10.2e}" if fw == "jax" and "max_abs_diff" in r else f"{'':10}"
            lines.append(f"{case:14} {x['framework'][:48]:48} {ms:9.2f} {img} {mfu} {tflops} {peak} {ratio} {diff}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join([*OPS, *MODELS]))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--small", action="store_true", help="CPU smoke run: tiny shapes, batch 2, 2 steps")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/vision.json; none with "
                                                    "--small unless given)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: one case of one framework in this process
    parser.add_argument("--framework", help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.small and args.case is None:
        args.batch, args.steps, args.warmup = 2, 2, 1
    if args.case:
        size = "small" if args.small else "full"
        if args.case in OPS:
            run = jax_op if args.framework == "jax" else torch_op
            result = run(args.case, OPS[args.case][size], args.steps, args.save)
        else:
            run = jax_model if args.framework == "jax" else torch_model
            result = run(args.case, args.batch, args.steps, args.warmup, args.small)
        print(json.dumps(result))
        return
    out = args.out or (None if args.small else os.path.join(os.path.dirname(__file__), "results", "vision.json"))
    results = {"benchmark": "vision operators (fwd+bwd) and train steps, jaxmodels vs torchvision / timm",
               "small": args.small, "batch": args.batch, "steps": args.steps, "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases.split(","):
            if case not in NEEDS:
                raise SystemExit(f"unknown case {case!r}; valid: {list(NEEDS)}")
            r = {"shape": OPS[case]["small" if args.small else "full"] if case in OPS else
                 (SMALL_MODELS[case] if args.small else MODELS[case])}
            saves = {fw: os.path.join(tmp, f"{case}_{fw}.npy") for fw in ("jax", "torch")}
            r["jax"] = run_case(args, case, "jax", saves["jax"])
            missing = missing_modules(NEEDS[case])
            r["torch"] = ({"skipped": f"not installed: {', '.join(missing)}"} if missing
                          else run_case(args, case, "torch", saves["torch"]))
            r.update(compare(r, case))
            if case in OPS and all(os.path.exists(p) for p in saves.values()):
                r["max_abs_diff"] = float(np.max(np.abs(np.load(saves["jax"]) - np.load(saves["torch"]))))
            if case == "deform_conv2d":
                flops = deform_flops(**OPS[case]["small" if args.small else "full"])
                for fw in ("jax", "torch"):
                    if "median_s" in r[fw]:
                        r[fw]["tflops"] = flops / r[fw]["median_s"] / 1e12
            results["cases"][case] = r
            print("\n".join(table({"cases": {case: r}}).splitlines()[1:]), flush=True)
    print(table(results))
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
