"""Datasets that need no download: scikit-learn's bundled breast-cancer and digits, and a synthetic
generator for runs of any size.

Every dataset comes as float32 tensors split once into train and test (stratified by label, the
same split for the same seed), targets shaped ``(N, outputs)`` for ``BCEWithLogitsLoss``:

- ``breast_cancer``: 569 x 30, 1 output (1 = benign).
- ``digits``: 1797 x 64 (8x8 images), 10 outputs: one-hot targets, trained as ten sigmoid outputs
  with binary cross-entropy; predicted label = argmax of the logits.
- ``digits_binary``: the same images, 1 output: is the digit odd.
- ``synthetic``: ``n_samples x n_features`` Gaussian features with very different scales and
  offsets per feature (so input normalisation matters), labelled by a random two-layer teacher
  network (balanced classes, a nonlinear boundary), 1 output. Needs no scikit-learn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

DATASETS = ("breast_cancer", "digits", "digits_binary", "synthetic")

__all__ = ["DATASETS", "Dataset", "accuracy", "load_dataset", "stratified_split"]


@dataclass
class Dataset:
    """A train/test split: ``x_*`` float32 ``(N, features)``, ``y_*`` float32 ``(N, outputs)``
    (0/1 labels, one-hot when ``outputs > 1``)."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    @property
    def in_features(self) -> int:
        return self.x_train.shape[1]

    @property
    def outputs(self) -> int:
        return self.y_train.shape[1]

    def describe(self) -> str:
        return (
            f"{self.name}: {self.x_train.shape[0]} train / {self.x_test.shape[0]} test samples, "
            f"{self.in_features} features, {self.outputs} output(s)"
        )


def accuracy(logits: Tensor, targets: Tensor) -> Tensor:
    """Number of correct predictions (a 0-d int64 tensor): ``logit > 0`` against the 0/1 label for
    one output, ``argmax`` against the one-hot label for several."""
    if logits.shape[1] == 1:
        return ((logits > 0) == (targets > 0.5)).sum()
    return (logits.argmax(dim=1) == targets.argmax(dim=1)).sum()


def stratified_split(labels: Tensor, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Train and test indices (sorted), taking ``round(test_fraction * n_c)`` of each class ``c``
    at random (a ``torch.Generator`` seeded with ``seed``) for the test split."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in torch.unique(labels).tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        k = int(round(test_fraction * idx.numel()))
        test.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def _synthetic(n_samples: int, n_features: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n_samples, n_features, generator=g)
    hidden = max(8, n_features)
    w1 = torch.randn(n_features, hidden, generator=g) / n_features**0.5
    w2 = torch.randn(hidden, generator=g)
    score = torch.tanh(z @ w1) @ w2
    labels = (score > score.median()).long()
    # Features on very different scales and offsets, as raw measurements are.
    scale = torch.exp(torch.empty(n_features).uniform_(-3.0, 5.0, generator=g))
    offset = torch.empty(n_features).uniform_(-100.0, 100.0, generator=g)
    return z * scale + offset, labels


def _sklearn(name: str) -> tuple[Tensor, Tensor]:
    try:
        from sklearn import datasets
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"dataset {name!r} needs scikit-learn (pip install 'hpml_ops[train]'); the 'synthetic' "
            "dataset does not"
        ) from e
    bunch = datasets.load_breast_cancer() if name == "breast_cancer" else datasets.load_digits()
    x = torch.as_tensor(bunch.data, dtype=torch.float64)
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    return x, y


def load_dataset(
    name: str,
    seed: int = 0,
    test_fraction: float = 0.2,
    n_samples: int = 10_000,
    n_features: int = 32,
) -> Dataset:
    """Load ``name`` (one of ``DATASETS``) and split it; ``n_samples`` and ``n_features`` are for
    ``synthetic`` only. Same arguments, same tensors."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    if name == "synthetic":
        if n_samples < 4 or n_features < 1:
            raise ValueError(
                f"synthetic data needs n_samples >= 4 and n_features >= 1, got {n_samples} and "
                f"{n_features}"
            )
        x, labels = _synthetic(n_samples, n_features, seed)
    else:
        x, labels = _sklearn("digits" if name.startswith("digits") else name)
    if name == "digits":
        y = torch.nn.functional.one_hot(labels, 10)
    elif name == "digits_binary":
        labels = labels % 2
        y = labels[:, None]
    else:
        y = labels[:, None]
    train, test = stratified_split(labels, test_fraction, seed)
    x, y = x.float(), y.float()
    return Dataset(name, x[train], y[train], x[test], y[test])
