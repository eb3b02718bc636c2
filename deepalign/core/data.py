"""Image classification data as in-memory tensors with a fixed, seeded train/val/test split."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from torch import Tensor

from deepalign.config import Fraction, Seed, invalid, one_of
from deepalign.errors import DeepAlignError

TORCHVISION = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "cifar10": "CIFAR10"}
DATASETS = ("digits", *TORCHVISION)


@dataclass(frozen=True)
class DataCfg:
    name: Annotated[str, one_of(*DATASETS)]
    root: str  # folder of torchvision data sets (unused for digits)
    download: bool  # let torchvision download into `root`
    split_seed: Seed
    val_fraction: Fraction  # of the training pool
    test_fraction: Fraction  # digits only; torchvision sets have their own test split

    def __post_init__(self) -> None:
        if self.val_fraction + self.test_fraction >= 1:
            allowed = f"below 1 - test_fraction = {1 - self.test_fraction:g}"
            raise invalid("val_fraction", self.val_fraction, allowed)


@dataclass(frozen=True)
class Split:
    """Examples and targets. A classifier zoo shares one split; in an INR zoo each network
    fits its own signal, so y holds every network's targets and `of_networks` picks them."""

    x: Tensor  # (N, C, H, W) images in [0, 1], or (N, d) coordinates
    y: Tensor  # classify: (N,) int64 labels; regress: (N, out), or (Z, N, out) per network
    task: str = "classify"  # classify: cross-entropy and accuracy; regress: MSE and R^2

    @property
    def size(self) -> int:
        """Examples in the split."""
        return self.x.shape[0]

    @property
    def per_network(self) -> bool:
        """Whether y holds one target set per network, (Z, N, out)."""
        return self.task == "regress" and self.y.ndim == 3

    def of_networks(self, index: int | slice | list[int] | Tensor) -> Split:
        """The targets of networks `index` (an int: one network's, shared along its lines);
        the split itself where every network shares it."""
        if not self.per_network:
            return self
        return Split(self.x, self.y[index], self.task)

    def examples(self, idx: Tensor | slice) -> tuple[Tensor, Tensor]:
        """Inputs and targets of examples idx: (n, ...), and (n, ...) or (Z, n, out)."""
        return self.x[idx], self.y[:, idx] if self.per_network else self.y[idx]

    def to(self, device: torch.device) -> Split:
        return Split(self.x.to(device), self.y.to(device), self.task)


def reset_images_of(split: Split | None, count: int) -> Tensor | None:
    """The first `count` inputs of `split`, on which BatchNorm statistics are recomputed
    (None for none: 0 images, or no split)."""
    return split.x[:count] if split is not None and count else None


@dataclass(frozen=True)
class Dataset:
    name: str
    train: Split
    val: Split
    test: Split
    n_classes: int

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])  # type: ignore[return-value]


def _split(x: np.ndarray, y: np.ndarray, fraction: float, rng: np.random.Generator):
    order = rng.permutation(len(x))
    n_out = int(round(fraction * len(x)))
    rest, out = order[n_out:], order[:n_out]
    return (x[rest], y[rest]), (x[out], y[out])


def _to_split(x: np.ndarray, y: np.ndarray) -> Split:
    return Split(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64))


def _digits_file() -> Path | None:
    """The digits file scikit-learn ships, where it is."""
    spec = importlib.util.find_spec("sklearn")
    if not (spec and spec.submodule_search_locations):
        return None
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    return path if path.is_file() else None


def data_paths(cfg: DataCfg) -> list[Path]:
    """The files or folders loading `cfg` reads (for the input/output guard)."""
    if cfg.name == "digits":
        path = _digits_file()
        return [path] if path else []
    return [Path(cfg.root)]


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits: images (1797, 8, 8) in 0..16 and labels (1797,).

    Read from the file scikit-learn ships (`load_digits` reads the same one): importing
    scikit-learn took ~1 s of every stage process's start; `load_digits` where the file is
    not where scikit-learn keeps it.
    """
    path = _digits_file()
    if path is None:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return bunch.images, bunch.target
    table = np.loadtxt(path, delimiter=",")  # 64 pixel columns, then the label
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(int)


def _digits(cfg: DataCfg) -> tuple[np.ndarray, ...]:
    images, labels = digits_arrays()
    x = (images / 16.0).astype(np.float32)[:, None]  # (1797, 1, 8, 8)
    rng = np.random.default_rng(cfg.split_seed)
    (x_pool, y_pool), (x_test, y_test) = _split(x, labels, cfg.test_fraction, rng)
    return x_pool, y_pool, x_test, y_test


def _torchvision(cfg: DataCfg) -> tuple[np.ndarray, ...]:
    root = Path(cfg.root)
    if not root.is_dir() and not cfg.download:
        raise DeepAlignError(
            f"data folder '{root}' for {cfg.name} is missing: put torchvision's "
            f"{TORCHVISION[cfg.name]} files there, or set data.download: true in params.yaml"
        )
    try:
        import torchvision.datasets as tvd
    except ImportError as e:
        raise DeepAlignError(f"{cfg.name} needs torchvision: pip install -e '.[vision]'") from e
    cls = getattr(tvd, TORCHVISION[cfg.name])
    try:
        parts = [cls(str(root), train=t, download=cfg.download) for t in (True, False)]
    except RuntimeError as e:
        raise DeepAlignError(f"{cfg.name} under '{root}': {e} (or set data.download: true)") from e
    arrays = []
    for ds in parts:
        x = np.asarray(ds.data, dtype=np.float32) / 255.0
        x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)  # (N, C, H, W)
        arrays += [x, np.asarray(ds.targets)]
    return tuple(arrays)


def load_dataset(cfg: DataCfg) -> Dataset:
    """Load `cfg.name` with a split that depends only on `cfg.split_seed`."""
    if cfg.name not in DATASETS:
        raise DeepAlignError(f"unknown data set '{cfg.name}' (known: {', '.join(DATASETS)})")
    loader = _digits if cfg.name == "digits" else _torchvision
    x_pool, y_pool, x_test, y_test = loader(cfg)
    rng = np.random.default_rng(cfg.split_seed + 1)
    (x_tr, y_tr), (x_val, y_val) = _split(x_pool, y_pool, cfg.val_fraction, rng)
    n_classes = int(max(y_pool.max(), y_test.max())) + 1
    return Dataset(
        cfg.name,
        _to_split(x_tr, y_tr),
        _to_split(x_val, y_val),
        _to_split(x_test, y_test),
        n_classes,
    )
