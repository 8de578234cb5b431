"""Sample quality beyond accuracy, on evaluator features.

The Fréchet distance fits a 512x512 covariance: on the 64 validation samples it has rank 63 at most, so
its value is biased and moves with the sample count. KID (Bińkowski et al., "Demystifying MMD GANs",
2018) is the unbiased estimate of the squared maximum mean discrepancy under a cubic polynomial kernel:
0 in expectation for two samples of one distribution at any sample sizes, so 64 samples give a noisy
but comparable figure.
"""
import math

import torch


def _usable(a, b):
    """Two feature sets a distance can be computed from: two samples or more each, every value finite."""
    return min(len(a), len(b)) >= 2 and bool(a.isfinite().all()) and bool(b.isfinite().all())


def kernel_distance(feats_a, feats_b):
    """KID between two feature sets (n, d) and (m, d): the unbiased MMD² with k(x, y) = (x·y / d + 1)³; NaN when
    either side has fewer than two samples or a non-finite feature."""
    a, b = feats_a.double(), feats_b.double()
    if not _usable(a, b):
        return math.nan
    d = a.shape[1]

    def kernel(x, y):
        return (x @ y.T / d + 1) ** 3

    def within(x):  # the mean over pairs of distinct samples: leaving out k(x, x) is what makes it unbiased
        k = kernel(x, x)
        return (k.sum() - k.diagonal().sum()) / (len(x) * (len(x) - 1))
    return float(within(a) + within(b) - 2 * kernel(a, b).mean())


def frechet_distance(feats_a, feats_b):
    """Fréchet distance between Gaussians fitted to two feature sets (FID's formula, our features); NaN when
    either side has fewer than two samples or a non-finite feature."""
    a, b = feats_a.double(), feats_b.double()
    if not _usable(a, b):
        return math.nan
    mu = (a.mean(0) - b.mean(0)).square().sum()
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    # tr(sqrt(A B)) = sum of sqrt(eigenvalues of sqrt(A) B sqrt(A)), all symmetric PSD
    vals, vecs = torch.linalg.eigh(cov_a)
    root_a = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return float(mu + cov_a.trace() + cov_b.trace() - 2 * cross)
