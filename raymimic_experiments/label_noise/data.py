"""Data for the label-noise simulation: a real image dataset plus symmetric label noise.

The default dataset, scikit-learn's handwritten digits (1,797 8x8 images, 10 classes), ships
inside the installed package, so the simulation runs with no download. With a data folder,
torchvision datasets already on disk (CIFAR-10/100, MNIST, ...) are read with
``download=False``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from raymimic_experiments.label_noise.config import DATASETS, TORCHVISION_DATASETS


@dataclass
class SimData:
    """Standardised flat features and clean labels of a train and a test split."""

    name: str
    x_train: torch.Tensor  # (n_train, features) float32
    y_train: torch.Tensor  # (n_train,) int64, clean labels
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def num_features(self) -> int:
        return self.x_train.shape[1]

    def uids(self) -> list[str]:
        """One synthetic 32-hex uid per training sample: the score table's key."""
        return [f"{i:032x}" for i in range(len(self.y_train))]


def load_dataset(
    name: str = "digits",
    data_dir: str | None = None,
    seed: int = 0,
    test_fraction: float = 0.25,
    max_train: int | None = None,
    max_test: int | None = None,
) -> SimData:
    """Load ``name`` and standardise its features with the training split's mean and std.

    ``digits`` is split into train/test with ``test_fraction`` (stratified, ``seed``); the
    torchvision datasets keep their own train/test splits. ``max_train``/``max_test`` keep a
    random subset (large datasets on a small machine).
    """
    if name == "digits":
        x_train, y_train, x_test, y_test = _digits(seed, test_fraction)
    elif name in TORCHVISION_DATASETS:
        if not data_dir:
            raise ValueError(f"dataset {name!r} is read from disk: pass --data-dir, the folder torchvision stored it in")
        x_train, y_train = _torchvision(name, data_dir, train=True)
        x_test, y_test = _torchvision(name, data_dir, train=False)
    else:
        raise ValueError(f"unknown dataset {name!r}; choose one of {list(DATASETS)}")
    rng = np.random.default_rng(seed)
    x_train, y_train = _subsample(x_train, y_train, max_train, rng)
    x_test, y_test = _subsample(x_test, y_test, max_test, rng)
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    std[std < 1e-6] = 1.0  # constant pixels (digits' borders) stay 0 instead of dividing by 0
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    return SimData(
        name=name,
        x_train=torch.as_tensor((x_train - mean) / std, dtype=torch.float32),
        y_train=torch.as_tensor(y_train, dtype=torch.int64),
        x_test=torch.as_tensor((x_test - mean) / std, dtype=torch.float32),
        y_test=torch.as_tensor(y_test, dtype=torch.int64),
        num_classes=num_classes,
    )


def _digits(seed: int, test_fraction: float):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    digits = load_digits()
    x, y = digits.data.astype(np.float32), digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    return x_train, y_train, x_test, y_test


def _torchvision(name: str, data_dir: str, train: bool):
    import torchvision

    class_name, split_kind = TORCHVISION_DATASETS[name]
    cls = getattr(torchvision.datasets, class_name)
    split = {"train": train} if split_kind == "train" else {"split": "train" if train else "test"}
    try:
        dataset = cls(root=data_dir, download=False, **split)
    except RuntimeError as err:  # torchvision says "Dataset not found or corrupted"
        raise FileNotFoundError(
            f"{class_name} ({'train' if train else 'test'} split) was not found under {data_dir!r}: {err}. "
            f"Place it there with torchvision (download=True on a machine with network) first."
        ) from err
    images = np.asarray(dataset.data)
    if images.ndim == 4 and images.shape[1] in (1, 3) and name == "svhn":
        images = images.transpose(0, 2, 3, 1)  # SVHN stores channels first
    labels = np.asarray(dataset.targets if hasattr(dataset, "targets") else dataset.labels)  # SVHN: .labels
    return images.reshape(len(images), -1).astype(np.float32) / 255.0, labels.astype(np.int64)


def _subsample(x: np.ndarray, y: np.ndarray, limit: int | None, rng: np.random.Generator):
    if limit is None or limit >= len(y):
        return x, y
    if limit <= 0:
        raise ValueError(f"sample limit must be positive, got {limit}")
    keep = np.sort(rng.choice(len(y), size=limit, replace=False))
    return x[keep], y[keep]


def symmetric_noise(labels: torch.Tensor, rate: float, num_classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip exactly ``round(rate * n)`` labels, each to a uniformly chosen *wrong* class.

    Returns ``(noisy_labels, is_noisy)``; ``is_noisy`` marks the flipped samples, which is
    what the mislabeled-sample detection is scored against.
    """
    if not 0 <= rate < 1:
        raise ValueError(f"noise rate must lie in [0, 1), got {rate}")
    if num_classes < 2:
        raise ValueError(f"symmetric noise needs at least 2 classes, got {num_classes}")
    generator = torch.Generator().manual_seed(seed)
    n = len(labels)
    flipped = torch.randperm(n, generator=generator)[: int(round(rate * n))]
    # adding 1..C-1 modulo C gives every wrong class with equal probability and never the true one
    shift = torch.randint(1, num_classes, (len(flipped),), generator=generator)
    noisy = labels.clone()
    noisy[flipped] = (labels[flipped] + shift) % num_classes
    is_noisy = torch.zeros(n, dtype=torch.bool)
    is_noisy[flipped] = True
    return noisy, is_noisy
