"""scikit-learn's bundled handwritten digits (8×8), split like the paper's CIFAR-10 experiment,
and a small digit classifier whose features give a Fréchet distance.

Model A trains on digits 0–4, model B on 5–9, model "all" on every training digit; a fixed
stratified 20% test split is held out from all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["DigitSplit", "load_digits_split", "split_indices", "subset", "DigitClassifier", "frechet_distance"]

SPLIT_SEED = 0
TEST_FRACTION = 0.2


@dataclass(frozen=True)
class DigitSplit:
    """Images in [-1, 1], shape (N, 1, 8, 8), and integer labels."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor


def _load_raw() -> tuple[Tensor, Tensor]:
    """All 1797 images in [-1, 1], shape (N, 1, 8, 8), and their labels (scikit-learn, offline)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - the zoo extra installs it
        raise ImportError("the digits data needs scikit-learn: pip install 'superdiff[zoo]'") from exc
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    return images, torch.tensor(data.target, dtype=torch.long)


def split_indices(labels: Tensor) -> tuple[Tensor, Tensor]:
    """(train, test) indices: per digit, a seeded random 20% goes to test (stratified)."""
    g = torch.Generator().manual_seed(SPLIT_SEED)
    test_mask = torch.zeros(len(labels), dtype=torch.bool)
    for digit in range(10):
        idx = torch.nonzero(labels == digit).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        test_mask[idx[: round(TEST_FRACTION * len(idx))]] = True
    return torch.nonzero(~test_mask).flatten(), torch.nonzero(test_mask).flatten()


def load_digits_split() -> DigitSplit:
    """The fixed train/test split (stratified, 20% test, seed 0). Needs scikit-learn (offline data)."""
    images, labels = _load_raw()
    train, test = split_indices(labels)
    return DigitSplit(images[train], labels[train], images[test], labels[test])


def subset(split: DigitSplit, name: str) -> Tensor:
    """Training images of model ``name``: "a" (0–4), "b" (5–9) or "all"."""
    if name == "a":
        return split.train_images[split.train_labels < 5]
    if name == "b":
        return split.train_images[split.train_labels >= 5]
    if name == "all":
        return split.train_images
    raise ValueError(f"digit model must be 'a', 'b' or 'all', got {name!r}")


class DigitClassifier(nn.Module):
    """A small CNN for 8×8 digits; ``features`` are the penultimate activations (64-d)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.SiLU(),
            nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.SiLU(),
            nn.Conv2d(64, 64, 3, padding=1, stride=2), nn.SiLU(),
            nn.Flatten(), nn.Linear(64 * 2 * 2, 64), nn.SiLU(),
        )
        self.head = nn.Linear(64, 10)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations (N, 64) of images (N, 1, 8, 8) in [-1, 1]."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (N, 10)."""
        return self.head(self.features(x))


def frechet_distance(features_a: Tensor, features_b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D):
    ``‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2 (Σ_a^{1/2} Σ_b Σ_a^{1/2})^{1/2})``, in float64."""
    if min(features_a.shape[0], features_b.shape[0]) < 2:
        raise ValueError(
            f"the Fréchet distance needs at least 2 samples per set, got {features_a.shape[0]} and "
            f"{features_b.shape[0]}"
        )
    a, b = features_a.to(torch.float64), features_b.to(torch.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)

    def sqrtm_psd(m: Tensor) -> Tensor:
        vals, vecs = torch.linalg.eigh((m + m.T) / 2)
        return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T

    root_a = sqrtm_psd(cov_a)
    cross = sqrtm_psd(root_a @ cov_b @ root_a)
    return float(((mu_a - mu_b) ** 2).sum() + torch.trace(cov_a + cov_b - 2 * cross))
