"""Experiment: latent diffusion on 8x8 digits with the KL autoencoder, and a ControlNet that follows edges.

    python -m experiments.latent_diffusion [--quick] [--out experiments/results/latent_diffusion]

Stages (OUT/results.json is rewritten after each one, so an interrupted run keeps what it finished):

  autoencoder  `KLAutoencoder` (Rombach et al. 2022, §3.1) on the 1500 training digits in [-1, 1] to a
               4x4x2 latent (f = 2), loss = L2 reconstruction + 1e-4 KL. Reports the test reconstruction MSE
               and the latent scale factor 1 / std(latent) (SD's `scale_factor`: diffusion sees unit-std
               latents; the decoder gets z / scale).
  classifier   the yardstick: scikit-learn logistic regression on the training pixels (test accuracy
               reported; it is also scored on the autoencoder's reconstructions).
  diffusion    a UNet on the scaled latents, conditioned on the class through cross-attention: the label's
               learned embedding (`LabelEmbedding`, null label 10 for classifier-free guidance, dropped with
               p = 0.1) is a 1-token context. EDM loss and preconditioning (Karras et al. 2022), Heun
               sampler, classifier-free guidance (Ho & Salimans 2022). Decoded samples are scored by the
               classifier against the conditioning label, per guidance scale; OUT/ldm_samples.png.
  controlnet   the UNet is frozen; a ControlNet (Zhang et al. 2023) copied from its encoder reads the Sobel
               edge magnitude of a digit at pixel resolution (8x8) through a hint encoder with one stride-2
               conv (to the 4x4 latent), trained with the same EDM loss to denoise that digit's latent.
               Measured on test digits: mean squared distance between the edge map of the generated digit
               and the condition, with the ControlNet vs without it (same label, same noise), vs the edge
               map of another test digit of the same class (random-pair baseline) and vs the autoencoder's
               reconstruction of the very digit (the floor); OUT/controlnet.png (condition | source digit |
               without ControlNet | with ControlNet).

--quick: tiny models and a few steps into /tmp/latent_diffusion_quick (a smoke test of this script, not a
result). results.json records each stage's wall time (wall_s) and the backend it ran on.
"""

import argparse
import functools
import itertools
import json
import os
import time

import matplotlib

matplotlib.use("Agg")
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import ml_collections
import numpy as np
from flax import nnx
from sklearn.linear_model import LogisticRegression
from tqdm import tqdm

from jaxmodels.data.digits import NUM_CLASSES, load_split, to_unit_range
from jaxmodels.models.autoencoder import KLAutoencoder, autoencoder_loss
from jaxmodels.models.controlnet import ControlledUNet, ControlNet
from jaxmodels.models.label_context_unet import LabelContextUNet
from jaxmodels.ops import diffusion
from jaxmodels.tasks.fit import fit
from jaxmodels.train.optimizer import make_optimizer

NULL_LABEL = NUM_CLASSES  # LabelEmbedding's extra row: "no class" for classifier-free guidance
SIGMA_DATA = 1.0  # the latents are scaled to unit std
SOBEL_X = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float32)
EDGE_SCALE = 8.0  # |Sobel| of a step from -1 to 1 is 8: edge maps come out in about [0, 1.4]

FULL = dict(ae_channels=32, ae_steps=800, unet_channels=32, context_dim=32, ldm_steps=1800, control_steps=900,
            unet_levels=2, batch_size=64, sample_steps=18, guidance=(1.0, 2.0, 3.0), num_eval=297)
QUICK = dict(ae_channels=8, ae_steps=4, unet_channels=8, context_dim=8, ldm_steps=4, control_steps=4,
             unet_levels=1, batch_size=16, sample_steps=2, guidance=(2.0,), num_eval=20)


def edge_map(images: jax.Array) -> jax.Array:
    """Sobel gradient magnitude sqrt(G_x² + G_y²) / 8 (Sobel & Feldman 1968), edge-replicated borders.

    images: (B, H, W, 1) float in [-1, 1] -> (B, H, W, 1) float32 (a -1 -> 1 step gives 1).
    """
    if images.ndim != 4 or images.shape[-1] != 1:
        raise ValueError(f"images must be (batch, height, width, 1), got shape {images.shape}")
    x = jnp.pad(jnp.asarray(images, jnp.float32)[..., 0], ((0, 0), (1, 1), (1, 1)), mode="edge")
    h, w = images.shape[1:3]

    def correlate(kernel):
        return sum(kernel[i, j] * x[:, i:i + h, j:j + w] for i in range(3) for j in range(3))

    return (jnp.sqrt(jnp.square(correlate(SOBEL_X)) + jnp.square(correlate(SOBEL_X.T))) / EDGE_SCALE)[..., None]


def random_batches(arrays: dict, batch_size: int, seed: int):
    """Endless batches of `batch_size` rows of `arrays` (dict of (N, ...) arrays) drawn at random with
    `np.random.default_rng(seed)`, each with "step" (the int32 step, to seed the loss's randomness)."""
    rng = np.random.default_rng(seed)
    n = len(next(iter(arrays.values())))
    for i in itertools.count():
        rows = rng.integers(0, n, batch_size)
        yield {k: v[rows] for k, v in arrays.items()} | {"step": np.int32(i)}


def train(model: nnx.Module, loss_fn, arrays: dict, *, steps: int, batch_size: int, learning_rate: float,
          seed: int, desc: str) -> tuple[nnx.Module, list[float]]:
    """Trains all of `model`'s parameters with `fit` on `random_batches(arrays, batch_size, seed)` and the
    library's AdamW (`make_optimizer`: warmup + cosine decay to 0.1, clipping at 1).
    loss_fn(model, batch) -> (loss, metrics). Returns the trained model and the loss every 50 steps (and the last)."""
    config = ml_collections.ConfigDict(dict(learning_rate=learning_rate, warmup_steps=max(1, min(100, steps // 10)),
                                            schedule="cosine", min_lr_ratio=0.1, grad_clip_norm=1.0, b1=0.9,
                                            b2=0.99, eps=1e-8, weight_decay=0.0))
    losses = []
    with tqdm(total=steps, desc=desc, mininterval=2.0) as bar:
        def record(i, loss):
            bar.update()
            if i % 50 == 0 or i == steps - 1:
                losses.append(float(loss))
                bar.set_postfix(loss=f"{losses[-1]:.4f}")

        model = fit(model, loss_fn, random_batches(arrays, batch_size, seed), num_steps=steps,
                    optimizer=make_optimizer(config, steps), callback=record)
    return model, losses


def _key(seed: int, batch) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), batch["step"])


def ae_loss_fn(model: KLAutoencoder, batch, *, kl_weight: float = 1e-4):
    """`autoencoder_loss` on batch["images"] (B, 8, 8, 1) in [-1, 1]."""
    return autoencoder_loss(model, batch["images"], _key(0, batch), kl_weight=kl_weight)


def _ldm_denoiser(model: LabelContextUNet, labels, *, controlnet: ControlNet | None = None, hint=None):
    """EDM denoiser D(z, sigma) of the latent UNet for `labels`, through the ControlNet when given."""
    context = model.context(labels)
    if controlnet is None:
        net = lambda z, c_noise: model.unet(z, c_noise, context=context)
    else:
        net = lambda z, c_noise: ControlledUNet(model.unet, controlnet)(z, c_noise, hint, context=context)
    return diffusion.edm_denoiser(net, SIGMA_DATA)


def ldm_loss_fn(model: LabelContextUNet, batch, *, drop_p: float = 0.1):
    """EDM loss (Karras et al. 2022, eq. 8) on batch["latents"] with labels dropped to the null label w.p. drop_p."""
    k_drop, k_loss = jax.random.split(_key(1, batch))
    labels = diffusion.drop_labels(k_drop, batch["labels"], drop_p, NULL_LABEL)
    loss = jnp.mean(diffusion.edm_loss(_ldm_denoiser(model, labels), batch["latents"], k_loss, sigma_data=SIGMA_DATA))
    return loss, {}


def control_loss_fn(controlnet: ControlNet, batch, *, frozen: LabelContextUNet, drop_p: float = 0.1):
    """EDM loss of the frozen UNet + trainable ControlNet, hint = batch["hints"] (edge maps)."""
    k_drop, k_loss = jax.random.split(_key(2, batch))
    labels = diffusion.drop_labels(k_drop, batch["labels"], drop_p, NULL_LABEL)
    den = _ldm_denoiser(frozen, labels, controlnet=controlnet, hint=batch["hints"])
    return jnp.mean(diffusion.edm_loss(den, batch["latents"], k_loss, sigma_data=SIGMA_DATA)), {}


@functools.partial(nnx.jit, static_argnames=("steps", "guidance"))
def sample_images(ae: KLAutoencoder, model: LabelContextUNet, scale: jax.Array, labels: jax.Array, noise: jax.Array,
                  controlnet: ControlNet | None = None, hints: jax.Array | None = None, *, steps: int,
                  guidance: float) -> jax.Array:
    """Decoded samples (B, 8, 8, 1) in [-1, 1]: EDM Heun sampling (Algorithm 1, `steps` steps) of the latent
    UNet with classifier-free guidance `guidance` (both branches see the same hints), z / scale decoded.
    labels (B,) int; noise (B, 4, 4, latent_channels); hints (B, 8, 8, 1) edge maps with a ControlNet."""
    both = None if hints is None else jnp.concatenate([hints, hints])

    def denoiser(z, sigma, y):
        return _ldm_denoiser(model, y, controlnet=controlnet, hint=both)(z, sigma)

    guided = diffusion.cfg_denoiser(denoiser, labels, NULL_LABEL, guidance)
    z = diffusion.edm_sample(guided, noise, diffusion.edm_sigmas(steps, sigma_max=80.0), solver="heun")
    return jnp.clip(ae.decode(z / scale), -1.0, 1.0)


@nnx.jit
def encode_means(ae: KLAutoencoder, images: jax.Array) -> jax.Array:
    """The encoder's posterior means (B, 4, 4, latent_channels) of images (B, 8, 8, 1)."""
    return ae.encode(images)[0]


def accuracy(classifier: LogisticRegression, images, labels) -> float:
    return float(np.mean(classifier.predict(np.asarray(images).reshape(len(images), -1)) == np.asarray(labels)))


def save_grid(rows: list[np.ndarray], path: str, row_names: list[str] | None = None) -> str:
    """rows: list of (n, 8, 8, 1) arrays in [-1, 1], drawn as a grid (one row per array)."""
    fig, axes = plt.subplots(len(rows), len(rows[0]), figsize=(0.6 * len(rows[0]) + 1, 0.6 * len(rows)),
                             squeeze=False)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            ax = axes[r, c]
            ax.imshow(np.asarray(img)[..., 0], cmap="gray_r", vmin=-1, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
        if row_names:
            axes[r, 0].set_ylabel(row_names[r], rotation=0, ha="right", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _write(out: str, results: dict) -> None:
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    if "diffusion" in results:
        with open(os.path.join(out, "results.md"), "w") as f:
            f.write(markdown(results))


def run(out: str, hp: dict, seed: int = 0) -> dict:
    """All four stages; returns (and after each stage writes) OUT/results.json's dict."""
    os.makedirs(out, exist_ok=True)
    train_images, train_labels, _ = load_split("train")
    test_images, test_labels, _ = load_split("test")
    x_train, x_test = to_unit_range(train_images), to_unit_range(test_images)
    y_train, y_test = train_labels.astype(np.int32), test_labels.astype(np.int32)
    results = {"hyperparameters": hp, "seed": seed, "backend": jax.default_backend()}
    groups = 8 if hp["ae_channels"] % 8 == 0 else 4

    # 1. autoencoder
    start = time.time()
    ae = KLAutoencoder(in_channels=1, latent_channels=2, base_channels=hp["ae_channels"], channel_mult=(1, 2),
                       num_groups=groups, rngs=nnx.Rngs(seed))
    ae, ae_losses = train(ae, ae_loss_fn, {"images": x_train}, steps=hp["ae_steps"], batch_size=hp["batch_size"],
                          learning_rate=2e-3, seed=seed, desc="autoencoder")
    latents_train = np.asarray(encode_means(ae, jnp.asarray(x_train)))
    recon_test = np.asarray(ae.decode(encode_means(ae, jnp.asarray(x_test))))
    scale = float(1.0 / latents_train.std())
    results["autoencoder"] = {
        "latent_shape": list(latents_train.shape[1:]), "num_params": _count(ae),
        "test_reconstruction_mse": float(np.mean((recon_test - x_test) ** 2)),
        "test_mse_of_mean_image": float(np.mean((x_train.mean(0) - x_test) ** 2)),
        "latent_std": float(latents_train.std()), "latent_mean": float(latents_train.mean()), "scale_factor": scale,
        "loss_every_50_steps": ae_losses, "wall_s": time.time() - start}
    _write(out, results)

    # 2a. the yardstick classifier
    classifier = LogisticRegression(max_iter=3000).fit(x_train.reshape(len(x_train), -1), y_train)
    results["classifier"] = {"kind": "sklearn LogisticRegression on 64 pixels",
                             "test_accuracy": accuracy(classifier, x_test, y_test),
                             "test_reconstruction_accuracy": accuracy(classifier, recon_test, y_test)}
    _write(out, results)

    # 2b. class-conditional latent diffusion
    start = time.time()
    z_train = latents_train * scale
    model = LabelContextUNet(latent_channels=2, num_classes=NUM_CLASSES, base_channels=hp["unet_channels"],
                             context_dim=hp["context_dim"], num_levels=hp["unet_levels"], num_groups=groups,
                             rngs=nnx.Rngs(seed + 1))
    model, ldm_losses = train(model, ldm_loss_fn, {"latents": z_train, "labels": y_train}, steps=hp["ldm_steps"],
                              batch_size=hp["batch_size"], learning_rate=1e-3, seed=seed + 1, desc="latent diffusion")
    n_eval = hp["num_eval"]
    eval_labels = jnp.asarray(np.arange(n_eval) % NUM_CLASSES, jnp.int32)
    noise = jax.random.normal(jax.random.key(seed + 10), (n_eval,) + z_train.shape[1:])
    by_guidance, samples = {}, {}
    for w in hp["guidance"]:
        samples[w] = np.asarray(sample_images(ae, model, jnp.float32(scale), eval_labels, noise,
                                              steps=hp["sample_steps"], guidance=w))
        by_guidance[str(w)] = accuracy(classifier, samples[w], eval_labels)
    best = max(hp["guidance"], key=lambda w: by_guidance[str(w)])
    results["diffusion"] = {
        "num_params": _count(model), "loss_every_50_steps": ldm_losses, "num_samples": n_eval,
        "sampler": f"EDM Heun, {hp['sample_steps']} steps ({2 * hp['sample_steps'] - 1} evaluations), sigma_max 80",
        "classifier_accuracy_by_guidance": by_guidance, "wall_s": time.time() - start}
    order = np.argsort(np.asarray(eval_labels), kind="stable")
    per_class = min(10, n_eval // NUM_CLASSES) or 1
    grid = [samples[best][order][np.asarray(eval_labels)[order] == c][:per_class] for c in range(NUM_CLASSES)]
    grid = [g for g in grid if len(g) == per_class]
    results["diffusion"]["grid"] = os.path.basename(save_grid(grid, os.path.join(out, "ldm_samples.png"),
                                                              [str(c) for c in range(len(grid))]))
    _write(out, results)

    # 3. ControlNet on edge maps
    start = time.time()
    controlnet = ControlNet.from_unet(model.unet, hint_channels=1, hint_downsample=1, rngs=nnx.Rngs(seed + 2))
    hints_train = np.asarray(edge_map(x_train))
    controlnet, control_losses = train(
        controlnet, functools.partial(control_loss_fn, frozen=model),
        {"latents": z_train, "labels": y_train, "hints": hints_train}, steps=hp["control_steps"],
        batch_size=hp["batch_size"], learning_rate=1e-3, seed=seed + 2, desc="controlnet")
    x_eval, y_eval = x_test[:n_eval], jnp.asarray(y_test[:n_eval])
    cond = edge_map(x_eval)
    w = best
    noise = jax.random.normal(jax.random.key(seed + 20), (n_eval,) + z_train.shape[1:])
    without = np.asarray(sample_images(ae, model, jnp.float32(scale), y_eval, noise, steps=hp["sample_steps"],
                                       guidance=w))
    with_cn = np.asarray(sample_images(ae, model, jnp.float32(scale), y_eval, noise, controlnet, cond,
                                       steps=hp["sample_steps"], guidance=w))
    null = jnp.full_like(y_eval, NULL_LABEL)
    # both guidance branches get the null label, so any scale gives the unguided sample; w reuses the compiled sampler
    edges_only = np.asarray(sample_images(ae, model, jnp.float32(scale), null, noise, controlnet, cond,
                                          steps=hp["sample_steps"], guidance=w))
    rng = np.random.default_rng(seed)
    same_class = np.array([rng.choice(np.flatnonzero((y_test == y) & (np.arange(len(y_test)) != i)))
                           for i, y in enumerate(y_test[:n_eval])])

    def edge_distance(images):
        return float(jnp.mean(jnp.square(edge_map(jnp.asarray(images)) - cond)))

    results["controlnet"] = {
        "condition": "Sobel edge magnitude of a test digit, 8x8 (hint encoder: one stride-2 conv to the 4x4 latent)",
        "num_params": _count(controlnet), "loss_every_50_steps": control_losses, "guidance": w, "num_eval": n_eval,
        "edge_mse": {"with_controlnet": edge_distance(with_cn), "without_controlnet": edge_distance(without),
                     "controlnet_null_label": edge_distance(edges_only),
                     "random_same_class_test_digit": edge_distance(x_test[same_class]),
                     "random_test_digit": edge_distance(x_test[rng.permutation(len(x_test))[:n_eval]]),
                     "autoencoder_reconstruction": edge_distance(recon_test[:n_eval])},
        "pixel_mse_to_source_digit": {"with_controlnet": float(np.mean((with_cn - x_eval) ** 2)),
                                      "without_controlnet": float(np.mean((without - x_eval) ** 2))},
        "classifier_accuracy": {"with_controlnet": accuracy(classifier, with_cn, y_eval),
                                "without_controlnet": accuracy(classifier, without, y_eval),
                                "controlnet_null_label": accuracy(classifier, edges_only, y_eval)},
        "wall_s": time.time() - start}
    k = min(12, n_eval)
    rows = [np.asarray(cond[:k]) * 2 - 1, x_eval[:k], without[:k], with_cn[:k], edges_only[:k]]
    names = ["condition", "source", "no control", "ControlNet", "CN, no label"]
    results["controlnet"]["grid"] = os.path.basename(save_grid(rows, os.path.join(out, "controlnet.png"), names))
    _write(out, results)
    return results


def markdown(results: dict) -> str:
    """OUT/results.md: the tables of results.json."""
    a, c, d = results["autoencoder"], results["classifier"], results["diffusion"]
    hp = results["hyperparameters"]
    lines = [
        "# Latent diffusion on 8x8 digits (KL autoencoder + class-conditional latent UNet + ControlNet)", "",
        f"`python -m experiments.latent_diffusion` (seed {results['seed']}, {results['backend']}); numbers from "
        "results.json.", "",
        "## Autoencoder", "",
        f"- latent {tuple(a['latent_shape'])}, {a['num_params']:,} parameters, {hp['ae_steps']} steps",
        f"- test reconstruction MSE (pixels in [-1, 1]): **{a['test_reconstruction_mse']:.4f}** (predicting the "
        f"mean training image: {a['test_mse_of_mean_image']:.4f})",
        f"- latent std {a['latent_std']:.3f}, mean {a['latent_mean']:.3f} -> scale factor **{a['scale_factor']:.4f}**",
        f"- yardstick classifier ({c['kind']}): test accuracy {c['test_accuracy']:.3f}, on the autoencoder's "
        f"reconstructions {c['test_reconstruction_accuracy']:.3f}", "",
        "## Class-conditional latent diffusion", "",
        f"{d['num_params']:,} parameters, {hp['ldm_steps']} steps, {d['sampler']}, {d['num_samples']} samples "
        "(labels 0..9 in turn); classifier accuracy of the decoded samples w.r.t. the conditioning label:", "",
        "| guidance scale | accuracy |", "|---|---|"]
    lines += [f"| {w} | {acc:.3f} |" for w, acc in d["classifier_accuracy_by_guidance"].items()]
    lines += ["", f"![samples]({d['grid']})"]
    if "controlnet" in results:
        cn = results["controlnet"]
        e, px, acc = cn["edge_mse"], cn["pixel_mse_to_source_digit"], cn["classifier_accuracy"]
        lines += [
            "", "## ControlNet on edge maps", "",
            f"{cn['condition']}; {cn['num_params']:,} trainable parameters (UNet frozen), {hp['control_steps']} "
            f"steps; {cn['num_eval']} test digits, guidance {cn['guidance']}. Edge MSE = mean squared distance "
            "between the Sobel edge map of the generated digit and the condition (lower follows it better).", "",
            "| | edge MSE | pixel MSE to the source digit | classifier accuracy |", "|---|---|---|---|",
            f"| with ControlNet | **{e['with_controlnet']:.4f}** | {px['with_controlnet']:.4f} | "
            f"{acc['with_controlnet']:.3f} |",
            f"| without ControlNet (same label, same noise) | {e['without_controlnet']:.4f} | "
            f"{px['without_controlnet']:.4f} | {acc['without_controlnet']:.3f} |",
            f"| ControlNet, null label (edges only) | {e['controlnet_null_label']:.4f} | | "
            f"{acc['controlnet_null_label']:.3f} |",
            f"| baseline: another test digit of the same class | {e['random_same_class_test_digit']:.4f} | | |",
            f"| baseline: a random test digit | {e['random_test_digit']:.4f} | | |",
            f"| floor: the autoencoder's reconstruction of the source | {e['autoencoder_reconstruction']:.4f} | | |",
            "", f"![controlnet]({cn['grid']})"]
    walls = [results[k]["wall_s"] for k in ("autoencoder", "diffusion", "controlnet") if k in results]
    lines += ["", f"Wall time of the stages: {sum(walls) / 60:.1f} min on 2 shared CPU cores."]
    return "\n".join(lines) + "\n"


def _count(model: nnx.Module) -> int:
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny smoke run into /tmp/latent_diffusion_quick")
    p.add_argument("--out", default=None)
    p.add_argument("--seed", type=int, default=0)
    for name in ("ae_steps", "ldm_steps", "control_steps", "num_eval"):
        p.add_argument(f"--{name}", type=int, default=None)
    args = p.parse_args(argv)
    hp = dict(QUICK if args.quick else FULL)
    hp.update({k: getattr(args, k) for k in ("ae_steps", "ldm_steps", "control_steps", "num_eval")
               if getattr(args, k) is not None})
    out = args.out or ("/tmp/latent_diffusion_quick" if args.quick else "experiments/results/latent_diffusion")
    start = time.time()
    results = run(out, hp, args.seed)
    print(json.dumps({k: v for k, v in results.items() if k not in ("hyperparameters",)}, indent=1, default=str)[:4000])
    print(f"total {time.time() - start:.0f} s; wrote {out}")
    return results


if __name__ == "__main__":
    main()
