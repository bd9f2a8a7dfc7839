"""Metrics computed on the host in float64 NumPy: sample quality of generative models, and verification.

`frechet_distance`: the Fréchet distance between Gaussians fitted to two feature sets (FID when the features
are Inception-v3's; here the digits classifier's or raw pixels). The 2-D toys' distances (sliced W2, MMD^2)
live with their data in `jaxmodels.data.toy2d`.
Verification (face-recognition protocols, e.g. LFW's): `verification_pairs` draws balanced same / different pairs,
`best_threshold` picks the similarity threshold on validation pairs, `verification_accuracy` applies it to test
pairs; `roc_auc` is the threshold-free area under the ROC curve.
"""

import numpy as np


def frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets x (n, d) and y (m, d) (Heusel et al. 2017,
    "GANs Trained by a Two Time-Scale Update Rule", eq. 6; FID with this repo's classifier features):

        |mu_x - mu_y|^2 + tr(C_x + C_y - 2 (C_x C_y)^(1/2)),

    in float64, with tr (C_x C_y)^(1/2) = sum sqrt(eig(C_x^(1/2) C_y C_x^(1/2))) (a symmetric PSD matrix,
    so no complex square root). Covariances are unbiased (n - 1). Returns a float >= 0.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or min(len(x), len(y)) < 2:
        raise ValueError(f"need feature sets (n, d) and (m, d) with n, m >= 2; got {x.shape} and {y.shape}")
    mu_x, mu_y = x.mean(0), y.mean(0)
    c_x, c_y = np.cov(x, rowvar=False).reshape(x.shape[1], -1), np.cov(y, rowvar=False).reshape(y.shape[1], -1)
    w, v = np.linalg.eigh(c_x)
    root_x = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(root_x @ c_y @ root_x), 0, None)))
    return float(max(np.sum((mu_x - mu_y) ** 2) + np.trace(c_x) + np.trace(c_y) - 2 * cross, 0.0))


def verification_pairs(labels: np.ndarray, num_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Balanced verification pairs of a labelled set (the protocol of face verification benchmarks such as LFW:
    as many same-identity as different-identity pairs): num_pairs pairs (i, j), i != j, with labels[i] = labels[j]
    and num_pairs with labels[i] != labels[j], drawn uniformly with replacement by NumPy's generator of `seed`.
    Returns (pairs int64 (2·num_pairs, 2), same bool (2·num_pairs,)), positives first."""
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    if labels.ndim != 1 or len(classes) < 2 or counts.max() < 2 or num_pairs < 1:
        raise ValueError(f"need 1-D labels of at least 2 classes, one with 2+ examples, and num_pairs >= 1; got "
                         f"labels {labels.shape} of {len(classes)} classes and num_pairs={num_pairs}")
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(labels == c) for c in classes]
    weights = np.where(counts >= 2, counts * (counts - 1), 0).astype(np.float64)  # ordered same-class pairs
    positive = []
    for c in rng.choice(len(classes), size=num_pairs, p=weights / weights.sum()):
        positive.append(rng.choice(members[c], size=2, replace=False))
    negative = []
    while len(negative) < num_pairs:
        i, j = rng.integers(0, len(labels), size=2)
        if labels[i] != labels[j]:
            negative.append((i, j))
    pairs = np.concatenate([np.array(positive, np.int64), np.array(negative, np.int64)])
    return pairs, np.arange(2 * num_pairs) < num_pairs


def best_threshold(scores: np.ndarray, same: np.ndarray) -> float:
    """The threshold t maximising the accuracy of "same iff score > t" on (scores (n,), same bool (n,)), the
    validation step of verification protocols: t is chosen among the midpoints between consecutive distinct
    scores and the ends (below the least, above the largest); ties go to the smallest t."""
    scores, same = np.asarray(scores, np.float64), np.asarray(same, bool)
    values = np.unique(scores)
    candidates = np.concatenate([[values[0] - 1.0], (values[1:] + values[:-1]) / 2, [values[-1] + 1.0]])
    # accuracy(t) = #(same and score > t) + #(not same and score <= t), counted with sorted scores.
    order = np.sort(scores[same]), np.sort(scores[~same])
    correct = (len(order[0]) - np.searchsorted(order[0], candidates, side="right")
               + np.searchsorted(order[1], candidates, side="right"))
    return float(candidates[np.argmax(correct)])


def verification_accuracy(scores: np.ndarray, same: np.ndarray, threshold: float) -> float:
    """The fraction of pairs classified right by "same iff score > threshold"."""
    return float(np.mean((np.asarray(scores) > threshold) == np.asarray(same, bool)))


def roc_auc(scores: np.ndarray, same: np.ndarray) -> float:
    """Area under the ROC curve of `scores` for the positives `same`: the probability that a random positive scores
    above a random negative, ties counting 1/2 (the Mann-Whitney U statistic / (n_pos·n_neg)), by ranks."""
    scores, same = np.asarray(scores, np.float64), np.asarray(same, bool)
    n_pos, n_neg = int(same.sum()), int((~same).sum())
    if not n_pos or not n_neg:
        raise ValueError(f"need positive and negative pairs, got {n_pos} and {n_neg}")
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2  # average rank (1-based) of a tie group
    return float((ranks[same].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
