"""Data sets: scikit-learn digits (offline default), CIFAR-10/100 and ImageFolder.

Every data set is brought to the model's input size and channel count, normalized
with its own statistics (recorded in the run so export and evaluation can redo the
exact preprocessing), and augmented for training with the usual random crop with
padding and horizontal flip (no flip for digits, where it changes the class).
"""

from __future__ import annotations

import math
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import RSDError, option

DATASETS = ("digits", "cifar10", "cifar100", "imagefolder")

# Per-channel statistics of the training splits.
_CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
_CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))


@dataclass
class DataInfo:
    """What a run records about its data: enough to rebuild the evaluation pipeline."""

    name: str
    dir: str | None
    classes: list[str]
    input_size: list[int]  #: [H, W] fed to the model
    in_channels: int
    mean: list[float]
    std: list[float]
    val_split: str = "val"
    flip: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Any) -> "DataInfo":
        """Rebuild from :meth:`to_json`; a missing, unknown or wrong-typed entry is an RSDError."""
        if not isinstance(d, dict):
            raise RSDError(f"must be an object (got {d!r})")
        names = {f.name for f in fields(cls)}
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing, unknown = [k for k in required if k not in d], sorted(set(d) - names)
        if missing or unknown:
            raise RSDError(f"lacks {', '.join(missing)}" if missing else f"has unknown key(s) {', '.join(unknown)}")
        for key, (test, words) in _DATA_TYPES.items():
            if key in d and not test(d[key]):
                raise RSDError(f"{key} must be {words} (got {d[key]!r})")
        info = cls(**d)
        if len(info.mean) != info.in_channels or len(info.std) != info.in_channels:
            raise RSDError(f"mean and std must hold {info.in_channels} values, one per channel")
        return info


def is_count(v: Any) -> bool:
    """A positive integer (not a bool): sizes, channels, classes."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def is_numbers(v: Any, positive: bool = False) -> bool:
    """A non-empty list of finite numbers (all > 0 when ``positive``)."""
    return isinstance(v, list) and len(v) > 0 and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
        and (x > 0 or not positive) for x in v)


def is_size(v: Any) -> bool:
    """``[H, W]``, two positive integers."""
    return isinstance(v, list) and len(v) == 2 and all(map(is_count, v))


def is_names(v: Any) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(isinstance(x, str) for x in v)


#: Type test and words of every entry of a run's ``"data"`` record.
_DATA_TYPES: dict[str, tuple[Any, str]] = {
    "name": (lambda v: v in DATASETS, f"one of {', '.join(DATASETS)}"),
    "dir": (lambda v: v is None or isinstance(v, str), "a folder or null"),
    "classes": (is_names, "a list of class names"),
    "input_size": (is_size, "[H, W], two positive integers"),
    "in_channels": (is_count, "a positive integer"),
    "mean": (is_numbers, "a list of finite numbers"),
    "std": (lambda v: is_numbers(v, positive=True), "a list of positive finite numbers"),
    "val_split": (lambda v: isinstance(v, str) and v in ("val", "test"), "'val' or 'test'"),
    "flip": (lambda v: isinstance(v, bool), "true or false"),
    "extra": (lambda v: isinstance(v, dict), "an object"),
}


def _transforms(info: DataInfo, train: bool):
    from torchvision import transforms as T

    h, w = info.input_size
    steps: list[Any] = [T.Resize((h, w))]
    if info.in_channels == 1:
        steps.append(T.Grayscale(1))
    if train:
        steps.append(T.RandomCrop((h, w), padding=max(1, h // 8)))
        if info.flip:
            steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(info.mean, info.std)]
    return T.Compose(steps)


class _ArrayImages(Dataset):
    """In-memory uint8 images ``(N, H, W, C)`` with labels, served through PIL transforms."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform) -> None:
        self.images, self.labels, self.transform = images, labels.astype(np.int64), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        img = self.images[i]
        img = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
        return self.transform(img.convert("RGB") if img.mode != "RGB" else img), int(self.labels[i])


def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]  # (N, 8, 8, 1)
    is_val = np.arange(len(images)) % 5 == 0  # fixed, seed-independent 80/20 split
    return images[~is_val], d.target[~is_val], images[is_val], d.target[is_val]


def _channel_stats(images: np.ndarray, in_channels: int) -> tuple[list[float], list[float]]:
    x = images.astype(np.float64) / 255.0
    if x.shape[-1] != in_channels:
        x = np.repeat(x.mean(-1, keepdims=True), in_channels, -1)
    flat = x.reshape(-1, in_channels)
    return flat.mean(0).round(4).tolist(), flat.std(0).round(4).tolist()


class UnreadableImage(RSDError):
    """An image file that PIL cannot read, named in the message.

    A DataLoader worker hands its exception to the main process as
    ``type(e)("Caught ... Original Traceback ...")``; this keeps only the original
    message (the traceback's last line), so the error still prints as one line.
    """

    def __init__(self, message: str) -> None:
        if "\nOriginal Traceback" in message:
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(message)


def load_image(path: str, mode: str = "RGB"):
    """The image at ``path`` in ``mode``; a corrupt or non-image file is an :class:`UnreadableImage`."""
    from PIL import Image

    try:
        with open(path, "rb") as f, Image.open(f) as im:
            return im.convert(mode)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UnreadableImage(f"cannot read image {path}: {e}") from None


def _image_folder(folder: Path, transform=None) -> Dataset:
    """An ImageFolder whose missing classes or images, and unreadable files, are RSDErrors."""
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(str(folder), transform=transform, loader=load_image)
    except FileNotFoundError as e:  # no class folder, or a class folder without images
        raise RSDError(f"{folder}: {e}") from None


def _imagefolder_split(root: Path) -> str:
    for split in ("val", "test"):
        if (root / split).is_dir():
            return split
    raise RSDError(f"{root} needs train/ and val/ (or test/) ImageFolder subfolders")


def _imagefolder_stats(root: Path, in_channels: int, limit: int = 5000) -> tuple[list[float], list[float]]:
    ds = _image_folder(root / "train")
    step = max(1, len(ds) // limit)
    s = np.zeros(in_channels)
    s2 = np.zeros(in_channels)
    n = 0
    for path, _ in ds.samples[::step]:
        x = np.asarray(load_image(path, "L" if in_channels == 1 else "RGB"), dtype=np.float64) / 255.0
        x = x.reshape(-1, in_channels)
        s += x.sum(0)
        s2 += (x**2).sum(0)
        n += len(x)
    mean = s / n
    std = np.sqrt(np.maximum(s2 / n - mean**2, 1e-12))
    return mean.round(4).tolist(), std.round(4).tolist()


def native_size(name: str, data_dir: str | os.PathLike | None) -> int:
    """The side of the data set's own images: what a model without its own input size is fed.

    digits: 16 (its 8x8 images, doubled); CIFAR: 32; an image folder: the shorter side
    of its first training image.
    """
    if name == "digits":
        return 16
    if name in ("cifar10", "cifar100"):
        return 32
    if data_dir is None:
        raise RSDError(f"{option('data')} {name} needs {option('data_dir')}")
    train = Path(data_dir).expanduser() / "train"
    first = next((p for p in sorted(train.glob("*/*")) if p.is_file()), None) if train.is_dir() else None
    if first is None:
        raise RSDError(f"{train} holds no images (expected train/CLASS/IMAGE files)")
    return min(load_image(first, "RGB").size)


def load_datasets(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    input_size: int,
    in_channels: int = 3,
    download: bool = False,
) -> tuple[Dataset, Dataset, DataInfo]:
    """Training and validation sets of ``name``, preprocessed for a model, and their info."""
    if name not in DATASETS:
        raise RSDError(f"unknown data set {name!r}; choose from: {', '.join(DATASETS)}")
    size = [input_size, input_size]
    if name == "digits":
        xtr, ytr, xva, yva = _digits()
        mean, std = _channel_stats(xtr, in_channels)
        info = DataInfo("digits", None, [str(i) for i in range(10)], size, in_channels, mean, std,
                        flip=False)
        return (_ArrayImages(xtr, ytr, _transforms(info, True)),
                _ArrayImages(xva, yva, _transforms(info, False)), info)

    if data_dir is None:
        raise RSDError(f"{option('data')} {name} needs {option('data_dir')}")
    root = Path(data_dir).expanduser().resolve()
    if name in ("cifar10", "cifar100"):
        from torchvision import datasets

        cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        mean, std = _CIFAR10_STATS if name == "cifar10" else _CIFAR100_STATS
        try:
            train = cls(str(root), train=True, download=download)
            val = cls(str(root), train=False, download=False)
        except RuntimeError:
            raise RSDError(
                f"{name} not found under {root}; set {option('download')} to fetch it there, "
                f"or {option('data_dir')} to a folder that holds it"
            ) from None
        if in_channels != 3:
            mean, std = _channel_stats(train.data[:5000], in_channels)
        info = DataInfo(name, str(root), list(train.classes), size, in_channels, list(mean), list(std),
                        val_split="test")
        return (_ArrayImages(train.data, np.asarray(train.targets), _transforms(info, True)),
                _ArrayImages(val.data, np.asarray(val.targets), _transforms(info, False)), info)

    if not (root / "train").is_dir():
        raise RSDError(f"{root} has no train/ folder (expected train/ and val/ ImageFolder subfolders)")
    split = _imagefolder_split(root)
    mean, std = _imagefolder_stats(root, in_channels)
    train_classes = _image_folder(root / "train").classes
    info = DataInfo("imagefolder", str(root), train_classes, size, in_channels, mean, std,
                    val_split=split)
    train = _image_folder(root / "train", _transforms(info, True))
    val = _image_folder(root / split, _transforms(info, False))
    if val.classes != train.classes:
        raise RSDError(f"{root / split} and {root / 'train'} hold different classes")
    return train, val, info


def eval_dataset(info: DataInfo) -> Dataset:
    """The validation split a run was evaluated on, with its evaluation preprocessing."""
    return _split_dataset(info, train=False)


def calibration_dataset(info: DataInfo) -> Dataset:
    """The training split of a run's data set with its *evaluation* preprocessing (no
    augmentation): the images a quantized model is calibrated on, never the validation
    split it is judged on."""
    return _split_dataset(info, train=True)


def _split_dataset(info: DataInfo, train: bool) -> Dataset:
    """The training or validation split of ``info``'s data set, with its evaluation preprocessing."""
    if info.name == "digits":
        xtr, ytr, xva, yva = _digits()
        images, labels = (xtr, ytr) if train else (xva, yva)
        return _ArrayImages(images, labels, _transforms(info, False))
    if info.dir is None or not Path(info.dir).is_dir():
        raise RSDError(f"the run's data set ({info.name} at {info.dir}) is not available here")
    if info.name in ("cifar10", "cifar100"):
        from torchvision import datasets

        cls = datasets.CIFAR10 if info.name == "cifar10" else datasets.CIFAR100
        try:
            split = cls(info.dir, train=train, download=False)
        except RuntimeError:
            raise RSDError(f"{info.name} not found under {info.dir}") from None
        return _ArrayImages(split.data, np.asarray(split.targets), _transforms(info, False))
    name = "train" if train else info.val_split
    folder = Path(info.dir) / name
    if not folder.is_dir():
        what = "training" if train else "validation"
        raise RSDError(f"{info.dir} has no {name}/ folder (the run's {what} split)")
    return _image_folder(folder, _transforms(info, False))


def first_batch(ds: Dataset, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` samples of ``ds``, spread over its classes when it is sorted by class."""
    step = max(1, len(ds) // n)
    idx = list(range(0, len(ds), step))[:n]
    xs, ys = zip(*(ds[i] for i in idx), strict=True)
    return torch.stack(xs), torch.tensor(ys)
