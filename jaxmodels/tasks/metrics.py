"""Sample-quality metrics of generative models, computed on the host in float64 NumPy.

`frechet_distance`: the Fréchet distance between Gaussians fitted to two feature sets (FID when the features
are Inception-v3's; here the digits classifier's or raw pixels). The 2-D toys' distances (sliced W2, MMD^2)
live with their data in `jaxmodels.data.toy2d`.
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
