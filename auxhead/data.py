"""Image data for everything in auxhead: Fashion-MNIST / MNIST idx files, scikit-learn's digits
and folders of images, as in-memory tensors (`load_data`) or fastai DataLoaders (`dataloaders`);
segmentation folders (images and class-index masks) likewise (`load_segmentation`,
`segmentation_dataloaders`), with a few CamVid frames shipped in the repository (`CAMVID_TINY`).

Images are float32 (N, C, H, W) in [0, 1], labels int64 (N,), masks int64 (N, H, W). No
normalisation is applied anywhere: the built-in CNN starts with BatchNorm and needs none; if your
model wants it, add fastai's `Normalize.from_stats(mean, std)` to the loaders' `after_batch`.

Only torch and numpy are imported here; scikit-learn, PIL and fastai are imported by the
functions that need them.
"""

from __future__ import annotations

import functools
import gzip
import logging
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from auxhead._errors import DataError, MixedSizes
from auxhead._extras import raise_missing_extra
from auxhead._folders import Layout, find_layout
from auxhead._masks import read_pairs, resolve_classes
from auxhead._pixels import is_grey, read_pixels
from auxhead._seg_folders import IMAGE_DIRS as SEG_IMAGE_DIRS
from auxhead._seg_folders import MASK_DIRS, find_seg_layout

if TYPE_CHECKING:
    from fastai.data.core import DataLoaders

__all__ = [
    "CAMVID_CODES",
    "CAMVID_TINY",
    "CAMVID_VOID",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "DataError",
    "ImageData",
    "MixedSizes",
    "SegmentationData",
    "dataloaders",
    "load_data",
    "load_segmentation",
    "read_idx",
    "segmentation_dataloaders",
]

# Where the Debian/Ubuntu package `dataset-fashion-mnist` installs the four idx files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

# 20 CamVid frames (12 train, 4 val, 4 test) at 240x180, in the repository beside the package
# (data/camvid-tiny/, with a README saying where they come from); a pip-installed auxhead does
# not have them: load_segmentation says where to get them.
CAMVID_TINY = Path(__file__).resolve().parent.parent / "data" / "camvid-tiny"
# CamVid's 11 classes in the SegNet version (../shared/data/camvid, data/camvid-tiny); pixels
# labelled CAMVID_VOID (Unlabelled) are ignored in the loss and the metrics.
CAMVID_CODES = [
    "Sky",
    "Building",
    "Pole",
    "Road",
    "Pavement",
    "Tree",
    "SignSymbol",
    "Fence",
    "Car",
    "Pedestrian",
    "Bicyclist",
]
CAMVID_VOID = 11

# The four files of an idx data set (MNIST, Fashion-MNIST, KMNIST...), by role.
_IDX_STEMS = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "valid_x": "t10k-images-idx3-ubyte",
    "valid_y": "t10k-labels-idx1-ubyte",
}
# Also matches the dotted spelling some mirrors use (train-images.idx3-ubyte).
_IDX_NAME = re.compile(r"^(train|t10k)-(images|labels)[-.]idx[13]-ubyte(\.gz)?$")
# idx type byte -> big-endian numpy dtype (see http://yann.lecun.com/exdb/mnist/)
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

# Image folders' notes (what was skipped or decided) go here as warnings; the CLI shows them.
logger = logging.getLogger(__name__)


_GET_DATA = (
    "Install it with `sudo apt-get install dataset-fashion-mnist`, or use other data: "
    "`--data PATH` (a folder with the four idx files, or one subfolder of images per class) "
    "or `--data digits` (bundled with scikit-learn); in Python, load_data(PATH) or "
    "load_data('digits')."
)


@dataclass
class ImageData:
    """An image classification data set held in memory.

    Attributes:
        name: "fashion-mnist", "digits", or the folder's name.
        classes: class names; label i is `classes[i]`.
        train_x: float32 (N, C, H, W) images in [0, 1].
        train_y: int64 (N,) labels.
        valid_x: the test split for idx data sets, a held-out split otherwise.
        valid_y: its labels.
        notes: what loading an image folder skipped or decided, one line each (also logged as
            warnings): hidden, non-image and empty-class files and folders, which folder is
            validation, first frames of animations, classes without held-out images.
    """

    name: str
    classes: list[str]
    train_x: torch.Tensor
    train_y: torch.Tensor
    valid_x: torch.Tensor
    valid_y: torch.Tensor
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for split in ("train", "valid"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if x.dim() != 4 or y.dim() != 1 or len(x) != len(y):
                raise ValueError(
                    f"{split}_x must be (N, C, H, W) and {split}_y (N,), "
                    f"got {tuple(x.shape)} and {tuple(y.shape)}"
                )

    @property
    def c(self) -> int:
        """The number of classes."""
        return len(self.classes)

    @property
    def channels(self) -> int:
        """Channels per image: 1 (grayscale) or 3 (RGB)."""
        return int(self.train_x.shape[1])

    @property
    def size(self) -> int:
        """Image height in pixels (the images are square unless a folder's were not)."""
        return int(self.train_x.shape[2])

    def subset(self, n_train: int, n_valid: int | None = None, *, seed: int = 0) -> ImageData:
        """A random subset for quick runs: `n_train` training and `n_valid` validation images.

        Args:
            n_train: training images to keep (all of them if there are fewer).
            n_valid: validation images to keep; None keeps them all.
            seed: seeds the choice, so the same arguments give the same subset.
        """
        for what, n in (("n_train", n_train), ("n_valid", n_valid)):
            if n is not None and n < 1:
                raise ValueError(f"{what} must be at least 1, got {n}")
        generator = torch.Generator().manual_seed(seed)

        def pick(x: torch.Tensor, y: torch.Tensor, n: int | None):
            if n is None or n >= len(y):
                return x, y
            keep = torch.randperm(len(y), generator=generator)[:n].sort().values
            return x[keep], y[keep]

        train_x, train_y = pick(self.train_x, self.train_y, n_train)
        valid_x, valid_y = pick(self.valid_x, self.valid_y, n_valid)
        classes, notes = list(self.classes), list(self.notes)
        return ImageData(self.name, classes, train_x, train_y, valid_x, valid_y, notes=notes)

    def __repr__(self) -> str:
        shape = "x".join(map(str, self.train_x.shape[1:]))
        return (
            f"ImageData({self.name!r}, {self.c} classes, {len(self.train_y)} train + "
            f"{len(self.valid_y)} valid images of {shape})"
        )


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one idx file (the MNIST format), gzipped or not, into a numpy array.

    Args:
        path: the file; a name ending in ".gz" is decompressed.

    Returns:
        The array, with the dtype and shape the file's header gives.

    Raises:
        DataError: the file is not an idx file or is truncated.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as file:
            raw = file.read()
    except (OSError, EOFError) as error:
        raise DataError(f"cannot read idx file {path}: {error}") from None
    # Header: two zero bytes, a type byte, the number of dimensions, then each size as a
    # big-endian int32.
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an idx file (bad header {raw[:4].hex() or 'empty'})")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    offset = 4 + 4 * ndim
    if len(raw) < offset:
        raise DataError(f"{path} is truncated: its header names {ndim} dimensions")
    shape = tuple(int(n) for n in np.frombuffer(raw, ">i4", ndim, 4))
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(
            f"{path} holds {len(raw)} bytes, but its header {shape} needs {expected}: "
            "the file is truncated or corrupt"
        )
    return np.frombuffer(raw, dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


def _idx_files(folder: Path) -> dict[str, Path]:
    """The four idx files of `folder` by role, failing if any is missing."""
    found, missing = {}, []
    for role, stem in _IDX_STEMS.items():
        dotted = stem.replace("-idx", ".idx")
        names = (stem, f"{stem}.gz", dotted, f"{dotted}.gz")
        path = next((folder / name for name in names if (folder / name).is_file()), None)
        if path is None:
            missing.append(f"{stem}[.gz]")
        else:
            found[role] = path
    if missing:
        raise DataError(
            f"{folder} is missing idx file(s) {', '.join(missing)}; an idx folder needs all four "
            f"of {', '.join(_IDX_STEMS.values())} (gzipped or not)"
        )
    return found


def _idx_images(path: Path) -> torch.Tensor:
    images = read_idx(path)
    if images.ndim != 3:
        raise DataError(f"{path} holds an array of shape {images.shape}, not (N, H, W) images")
    x = torch.from_numpy(images.astype(np.float32))
    if images.dtype == np.uint8:
        x /= 255
    return x.unsqueeze(1)  # (N, 1, H, W)


def _idx_labels(path: Path, n_images: int) -> torch.Tensor:
    labels = read_idx(path)
    if labels.shape != (n_images,):
        raise DataError(f"{path} holds labels of shape {labels.shape}; expected ({n_images},)")
    return torch.from_numpy(labels.astype(np.int64))


def _load_idx_folder(folder: Path, name: str) -> ImageData:
    files = _idx_files(folder)
    train_x, valid_x = _idx_images(files["train_x"]), _idx_images(files["valid_x"])
    train_y = _idx_labels(files["train_y"], len(train_x))
    valid_y = _idx_labels(files["valid_y"], len(valid_x))
    labels = torch.unique(torch.cat([train_y, valid_y]))
    if len(labels) < 2:
        raise DataError(
            f"{folder}: every label in its idx files is {int(labels[0])}; a classifier needs "
            "at least two classes"
        )
    n_classes = int(labels.max()) + 1
    # The files do not name their classes; a folder called *fashion* is Fashion-MNIST.
    if "fashion" in str(folder).lower() and n_classes <= len(FASHION_MNIST_CLASSES):
        classes = list(FASHION_MNIST_CLASSES)
    else:
        classes = [str(i) for i in range(n_classes)]
    return ImageData(name, classes, train_x, train_y, valid_x, valid_y)


def _check_valid_pct(valid_pct: float) -> None:
    if not 0 < valid_pct < 1:
        raise DataError(f"valid_pct must be between 0 and 1 (exclusive), got {valid_pct!r}")


def _split(y: torch.Tensor, valid_pct: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified split: a seeded `valid_pct` of each class goes to validation."""
    generator = torch.Generator().manual_seed(seed)
    train, valid = [], []
    for label in torch.unique(y):
        members = (y == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_valid = round(valid_pct * len(members))
        valid.append(members[:n_valid])
        train.append(members[n_valid:])
    train_idx, valid_idx = torch.cat(train).sort().values, torch.cat(valid).sort().values
    if len(train_idx) == 0 or len(valid_idx) == 0:
        raise DataError(
            f"holding out {valid_pct:.0%} of the images for validation splits {len(y)} images "
            f"into {len(train_idx)} train and {len(valid_idx)} valid; use more images (in "
            "Python, or another valid_pct)"
        )
    return train_idx, valid_idx


def _split_data(
    name: str, classes: list[str], x: torch.Tensor, y: torch.Tensor, valid_pct: float, seed: int
) -> ImageData:
    train_idx, valid_idx = _split(y, valid_pct, seed)
    return ImageData(name, classes, x[train_idx], y[train_idx], x[valid_idx], y[valid_idx])


def _load_digits(valid_pct: float, seed: int) -> ImageData:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError(
            "the digits data set comes with scikit-learn: pip install scikit-learn"
        ) from None
    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16).unsqueeze(1)  # (1797, 1, 8, 8)
    y = torch.from_numpy(digits.target.astype(np.int64))
    classes = [str(i) for i in range(10)]
    return _split_data("digits", classes, x, y, valid_pct, seed)


def _read_images(files: list[Path], size: int | None) -> tuple[torch.Tensor, list[str]]:
    """Decode `files` into one float (N, C, H, W) tensor in [0, 1], grayscale if every image's
    content is grey, RGB otherwise; and the notes to tell (first frames of animations)."""
    pixels, animated, shape = [], [], None
    for path in files:
        decoded = read_pixels(path, size)
        height, width = decoded.values.shape[:2]
        if shape is None:
            shape, first = (width, height), path
        elif (width, height) != shape:
            raise MixedSizes(
                f"{path} is {width}x{height} but {first} is {shape[0]}x{shape[1]}; pass a size "
                "(--size N, load_data(size=N)) to resize all"
            )
        pixels.append(decoded.values)
        if decoded.frames > 1:
            animated.append(path)
    grey = all(is_grey(values) for values in pixels)
    images = torch.empty(len(files), 1 if grey else 3, shape[1], shape[0])
    for i in reversed(range(len(images))):
        values = pixels.pop()  # uint8 (0-255) or float32 (0-1), (H, W) or (H, W, 3); freed here
        image = torch.from_numpy(values.astype(np.float32))  # a copy: PIL's arrays are read-only
        if values.dtype == np.uint8:
            image /= 255
        if grey:
            images[i, 0] = image if image.dim() == 2 else image[..., 0]
        elif image.dim() == 2:
            images[i] = image  # a grey image among colour ones: the same in R, G and B
        else:
            images[i] = image.permute(2, 0, 1)
    notes = []
    if animated:
        notes.append(
            f"{len(animated)} file(s) hold several frames or pages ({animated[0]}"
            f"{' and others' if len(animated) > 1 else ''}): the first of each is used"
        )
    return images, notes


def _labelled(by_class: dict[str, list[Path]], classes: list[str]):
    files = [path for name in by_class for path in by_class[name]]
    labels = [classes.index(name) for name in by_class for _ in by_class[name]]
    return files, torch.tensor(labels, dtype=torch.int64)


def _held_out_notes(data: ImageData, layout: Layout, valid_pct: float) -> list[str]:
    """A line for the classes the validation split cannot measure, or never trains on."""
    n_train = torch.bincount(data.train_y, minlength=data.c).tolist()
    n_valid = torch.bincount(data.valid_y, minlength=data.c).tolist()
    notes = []
    unmeasured = [(c, t) for c, t, v in zip(data.classes, n_train, n_valid, strict=True) if not v]
    if unmeasured and layout.valid_dir is not None:
        notes.append(
            f"no image in {layout.valid_dir} for class(es) "
            f"{', '.join(repr(c) for c, _ in unmeasured)}: the validation accuracy leaves "
            f"them out; add some of their images to {layout.valid_dir}/"
        )
    elif unmeasured:
        need = max(1, int(0.5 / valid_pct))  # the smallest class the split holds one out of
        while round(valid_pct * need) < 1:
            need += 1
        counts = ", ".join(f"{c!r} ({t} image{'s' * (t != 1)})" for c, t in unmeasured)
        notes.append(
            f"no held-out image for class(es) {counts}: the validation accuracy leaves them "
            f"out; a class needs {need} images to have one held out at valid_pct={valid_pct:g}"
        )
    untrained = [c for c, t in zip(data.classes, n_train, strict=True) if not t]
    if untrained:
        notes.append(
            f"no training image left for class(es) {', '.join(map(repr, untrained))}: every "
            f"image of them is held out at valid_pct={valid_pct:g}; add images or lower valid_pct"
        )
    return notes


def _load_image_folder(folder: Path, valid_pct: float, seed: int, size: int | None) -> ImageData:
    layout = find_layout(folder)
    _refuse_segmentation(folder, list(layout.train))
    groups = {"train": layout.train}
    if layout.valid is not None:
        groups["valid"] = layout.valid
    classes = sorted(layout.train)
    notes = layout.notes + layout.skipped.describe(folder)
    if layout.valid is None and layout.train_dir != folder:
        notes.append(
            f"{folder}: {layout.train_dir.name}/ has no validation folder beside it (val/, "
            f"valid/, validation/ or test/): {valid_pct:.0%} of each class is held out instead"
        )
    # One decode for all files, so every split gets the same colour mode and size.
    labelled = {key: _labelled(by_class, classes) for key, by_class in groups.items()}
    all_files = [path for files, _ in labelled.values() for path in files]
    images, image_notes = _read_images(all_files, size)
    notes += image_notes
    if layout.valid is None:
        data = _split_data(folder.name, classes, images, labelled["train"][1], valid_pct, seed)
    else:
        n_train = len(labelled["train"][0])
        train_x, valid_x = images[:n_train], images[n_train:]
        train_y, valid_y = labelled["train"][1], labelled["valid"][1]
        data = ImageData(folder.name, classes, train_x, train_y, valid_x, valid_y)
    notes += _held_out_notes(data, layout, valid_pct)
    for note in notes:
        logger.warning("%s", note)
    data.notes = notes
    return data


def _refuse_segmentation(folder: Path, classes: list[str]) -> None:
    """Two "classes" named as an image folder and a mask folder are segmentation data: a
    classifier would learn to tell photos from masks."""
    lower = sorted(classes, key=lambda name: name.lower() not in SEG_IMAGE_DIRS)
    if len(lower) == 2 and lower[0].lower() in SEG_IMAGE_DIRS and lower[1].lower() in MASK_DIRS:
        raise DataError(
            f"{folder} holds {lower[0]}/ and {lower[1]}/, a segmentation layout, not one folder "
            "per class: load it with load_segmentation(PATH) (`auxhead train --task segment`)"
        )


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-2:] == (size, size):
        return x
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.clamp_(0, 1)


def _load_path(path: Path, valid_pct: float, seed: int, size: int | None) -> ImageData:
    if not path.exists():
        raise DataError(
            f"no data set {str(path)!r}: not a known name ('fashion-mnist', 'digits') and no "
            "such file or folder"
        )
    if not path.is_dir():
        raise DataError(
            f"{path} is a file; --data needs a folder (four idx files, or one subfolder of "
            "images per class) or a name ('fashion-mnist', 'digits')"
        )
    if any(_IDX_NAME.match(p.name) for p in path.iterdir()):
        return _load_idx_folder(path, path.name)
    return _load_image_folder(path, valid_pct, seed, size)


def load_data(
    spec: str | os.PathLike = "fashion-mnist",
    *,
    valid_pct: float = 0.2,
    seed: int = 0,
    size: int | None = None,
) -> ImageData:
    """Load an image classification data set into memory.

    Args:
        spec: what to load:
            - "fashion-mnist" (the default): Fashion-MNIST from `FASHION_MNIST_DIR` (60,000
              train and 10,000 test images, 28x28 grayscale; `apt-get install
              dataset-fashion-mnist`).
            - "digits": scikit-learn's bundled 8x8 digits (1,797 images).
            - a folder with the four idx files (`train-images-idx3-ubyte[.gz]`, ...), like
              MNIST's; the t10k files become the validation split. Classes are named "0", "1",
              ... unless the path contains "fashion".
            - a folder with one subfolder of images per class (as fastai's
              `ImageDataLoaders.from_folder`), or a `train/` folder laid out that way (the
              ImageNet layout), alone or beside `val/`, `valid/` or `validation/` (or else
              `test/`) as the validation split; with a val folder and `test/` both, `test/` is
              left out. Split names match in any case; any other mix is refused. Hidden files,
              `__MACOSX/`, non-image files and empty class folders are skipped, and said in
              `ImageData.notes` and logged warnings. Pixels are scaled by their type's range
              (8-bit by 255, 16-bit by 65535; floats must lie in [0, 1]); images become
              grayscale if every one is grey in content (a grey palette counts), RGB otherwise.
        valid_pct: the share of each class held out for validation when the data has no split
            of its own (digits, image folders).
        seed: seeds that split.
        size: resize every image to `size` x `size`. None keeps the data's own size (an image
            folder's images must then all have one size).

    Returns:
        An `ImageData` with float32 images in [0, 1] and int64 labels.

    Raises:
        DataError: the data is missing or unreadable; the message says what to do.

    Example:
        >>> data = load_data()  # Fashion-MNIST
        >>> data.train_x.shape, data.classes[0]
        (torch.Size([60000, 1, 28, 28]), 'T-shirt/top')
    """
    _check_valid_pct(valid_pct)
    if size is not None and (not isinstance(size, int) or size < 1):
        raise DataError(f"size must be a positive number of pixels, got {size!r}")
    key = str(spec).strip()
    name = key.lower().replace("_", "-")
    if name in ("fashion-mnist", "fashionmnist"):
        if not FASHION_MNIST_DIR.is_dir():
            raise DataError(f"Fashion-MNIST is not installed at {FASHION_MNIST_DIR}. {_GET_DATA}")
        data = _load_idx_folder(FASHION_MNIST_DIR, "fashion-mnist")
    elif name == "digits":
        data = _load_digits(valid_pct, seed)
    else:
        data = _load_path(Path(key).expanduser(), valid_pct, seed, size)
    if size is not None:
        data.train_x, data.valid_x = _resize(data.train_x, size), _resize(data.valid_x, size)
    return data


@functools.cache
def _tensor_dl_type() -> type:
    """fastai's `TfmdDL`, made to build each batch with one index into whole arrays (defined on
    first use, so that importing auxhead does not import fastai)."""
    from fastai.data.core import TfmdDL
    from fastai.torch_core import TensorCategory

    class TensorDL(TfmdDL):
        """A `TfmdDL` over in-memory arrays: each batch is one index into `arrays`.

        Its dataset is an ordinary fastai `Datasets` of (image, class name) items, used for
        everything but iteration (types, decoding, `test_dl`, `Interpretation`). A loader
        derived from it with another dataset (`test_dl`, `Learner.export`) is a plain `TfmdDL`,
        so no auxhead class is ever pickled.
        """

        def __init__(
            self,
            dataset: Any = None,
            arrays: Any = None,
            image_type: Any = None,
            target_type: Any = None,
            **kwargs: Any,
        ) -> None:
            self.arrays = arrays  # (images, labels) as numpy arrays, in dataset order
            self.image_type = image_type  # TensorImageBW or TensorImage
            self.target_type = target_type or TensorCategory  # TensorMask for segmentation
            super().__init__(dataset, **kwargs)

        def new(self, dataset: Any = None, cls: type | None = None, **kwargs: Any):
            if cls is None and (dataset is None or dataset is self.dataset):
                kwargs.update(
                    arrays=self.arrays, image_type=self.image_type, target_type=self.target_type
                )
                return super().new(dataset, cls, **kwargs)
            return super().new(dataset, cls or TfmdDL, **kwargs)

        def create_batches(self, samps):
            if self.after_item.fs or self.before_batch.fs:  # item transforms need items
                yield from super().create_batches(samps)
                return
            x, y = self.arrays
            idxs = np.fromiter(samps, dtype=np.int64) % len(y)  # `repeats` passes: n > len(y)
            for start in range(0, len(idxs), self.bs):
                chunk = idxs[start : start + self.bs]
                if self.drop_last and len(chunk) < self.bs:
                    break
                # numpy's gather: torch's x[chunk] is 10-100x slower on a busy 2-core CPU.
                images = self.image_type(torch.from_numpy(x[chunk]))
                yield images, self.target_type(torch.from_numpy(y[chunk]))

        def create_item(self, s):
            return super().create_item(s if s is None else s % len(self.dataset))

    TensorDL.__module__ = __name__
    return TensorDL


def dataloaders(
    data: ImageData,
    *,
    bs: int = 128,
    seed: int = 0,
    device: str | torch.device | None = None,
    shuffle_train: bool = True,
    repeats: int = 1,
) -> DataLoaders:
    """fastai DataLoaders over an `ImageData`, fast on many small images.

    Batches are typed as fastai expects, (TensorImage or TensorImageBW, TensorCategory), and
    decode to class names, so `dls.c`, `dls.vocab`, `show_batch`, `Learner.get_preds`,
    `show_results`, `predict` on one (C, H, W) image tensor and `ClassificationInterpretation`
    work as for any fastai image data (`Interpretation.plot_top_losses` also needs
    `fastai.vision.learner` imported, as `from fastai.vision.all import *` does). Each batch is
    built by indexing the whole image array once (no per-item transforms). Inputs stay in
    [0, 1]. An exported learner holds only fastai classes and loads with plain fastai.

    Args:
        data: from `load_data`.
        bs: batch size (validation uses the same).
        seed: seeds the training shuffle; the same seed gives the same batches.
        device: where batches go; None picks fastai's default (the GPU if there is one).
        shuffle_train: shuffle the training set each epoch (and drop its last partial batch).
        repeats: passes over the training set in one epoch, shuffled together (each image is
            drawn exactly `repeats` times an epoch): fewer, longer epochs for a long schedule
            on a small data set, such as a GAN's. Loaders derived with `dls.train.new(...)`
            make one pass.

    Returns:
        A fastai `DataLoaders` with `train` and `valid` loaders.

    Example:
        >>> dls = dataloaders(load_data("digits"), bs=64)
        >>> learn = Learner(dls, model, metrics=accuracy)  # loss: CrossEntropyLossFlat
    """
    try:
        import fastai.vision.data  # noqa: F401  (registers show_batch / show_results for images)
        from fastai.data.core import DataLoaders, Datasets
        from fastai.data.transforms import Categorize, ItemGetter, Transform
        from fastai.torch_core import TensorImage, TensorImageBW, default_device
    except ModuleNotFoundError as error:
        raise_missing_extra(error, "auxhead.data.dataloaders")
        raise

    for name, value in (("bs", bs), ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    image_type = TensorImageBW if data.channels == 1 else TensorImage
    dl_type = _tensor_dl_type()

    def loader(x: torch.Tensor, y: torch.Tensor, train: bool):
        # Items are (image, class name) pairs, as fastai builds them from files, so test_dl,
        # predict and Interpretation can rebuild either from an item.
        names = [data.classes[i] for i in y.tolist()]
        dataset = Datasets(
            list(zip(x.unbind(0), names, strict=True)),
            tfms=[
                [ItemGetter(0), Transform(image_type)],
                [ItemGetter(1), Categorize(vocab=data.classes, sort=False)],
            ],
            split_idx=0 if train else 1,
        )
        shuffle = train and shuffle_train
        n = len(y) * (repeats if train else 1)
        dl = dl_type(
            dataset,
            arrays=(x.detach().cpu().numpy(), y.detach().cpu().numpy()),
            image_type=image_type,
            bs=bs,
            n=n,
            shuffle=shuffle,
            drop_last=shuffle and n > bs,
            num_workers=0,
        )
        dl.rng = random.Random(seed)
        return dl

    device = default_device() if device is None else torch.device(device)
    train = loader(data.train_x, data.train_y, True)
    valid = loader(data.valid_x, data.valid_y, False)
    return DataLoaders(train, valid, device=device)


# --- Segmentation: images with class-index masks -------------------------------------------


@dataclass
class SegmentationData:
    """A semantic segmentation data set held in memory.

    Attributes:
        name: the folder's name.
        codes: class names; mask value i is `codes[i]` (as fastai's `codes`).
        void: the mask value to ignore in the loss and the metrics (CamVid's 11, VOC's 255),
            or None when every pixel is labelled. It may lie outside `range(len(codes))`.
        train_x: float32 (N, 3, H, W) images in [0, 1].
        train_y: int64 (N, H, W) masks of class indices (and `void`).
        valid_x: the validation split (a val/ folder, valid.txt, or a seeded held-out share).
        valid_y: its masks.
        test_x: the test split when the folder has one (test/ beside val/), else None.
        test_y: its masks, or None.
        files: each split's image files, in the order of its tensors ("train", "valid",
            "test").
        notes: what loading decided, one line each (also logged as warnings): which folder or
            list is validation, binary masks read as 0/1, images left out.
    """

    name: str
    codes: list[str]
    void: int | None
    train_x: torch.Tensor
    train_y: torch.Tensor
    valid_x: torch.Tensor
    valid_y: torch.Tensor
    test_x: torch.Tensor | None = None
    test_y: torch.Tensor | None = None
    files: dict[str, list[Path]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for split in ("train", "valid", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if split == "test" and x is None and y is None:
                continue
            if (
                x is None
                or y is None
                or x.dim() != 4
                or y.dim() != 3
                or len(x) != len(y)
                or x.shape[2:] != y.shape[1:]
            ):
                shapes = [None if t is None else tuple(t.shape) for t in (x, y)]
                raise ValueError(
                    f"{split}_x must be (N, C, H, W) and {split}_y (N, H, W) of the same N, H "
                    f"and W, got {shapes[0]} and {shapes[1]}"
                )

    @property
    def c(self) -> int:
        """The number of classes (the model's output channels)."""
        return len(self.codes)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of every image and mask."""
        return int(self.train_x.shape[2]), int(self.train_x.shape[3])

    def subset(
        self, n_train: int, n_valid: int | None = None, *, seed: int = 0
    ) -> SegmentationData:
        """A random subset for quick runs: `n_train` training and `n_valid` validation images
        (the test split is kept whole).

        Args:
            n_train: training images to keep (all of them if there are fewer).
            n_valid: validation images to keep; None keeps them all.
            seed: seeds the choice, so the same arguments give the same subset.
        """
        for what, n in (("n_train", n_train), ("n_valid", n_valid)):
            if n is not None and n < 1:
                raise ValueError(f"{what} must be at least 1, got {n}")
        generator = torch.Generator().manual_seed(seed)
        files = dict(self.files)

        def pick(split: str, n: int | None):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if n is None or n >= len(y):
                return x, y
            keep = torch.randperm(len(y), generator=generator)[:n].sort().values
            if split in files:
                files[split] = [files[split][i] for i in keep.tolist()]
            return x[keep], y[keep]

        train_x, train_y = pick("train", n_train)
        valid_x, valid_y = pick("valid", n_valid)
        return SegmentationData(
            self.name,
            list(self.codes),
            self.void,
            train_x,
            train_y,
            valid_x,
            valid_y,
            self.test_x,
            self.test_y,
            files,
            list(self.notes),
        )

    def __repr__(self) -> str:
        height, width = self.size
        test = "" if self.test_y is None else f" + {len(self.test_y)} test"
        return (
            f"SegmentationData({self.name!r}, {self.c} classes, void={self.void}, "
            f"{len(self.train_y)} train + {len(self.valid_y)} valid{test} images of "
            f"{width}x{height})"
        )


def load_segmentation(
    path: str | os.PathLike,
    *,
    valid_pct: float = 0.2,
    seed: int = 0,
    size: int | tuple[int, int] | None = None,
    codes: list[str] | None = None,
    void: int | str | None = "auto",
) -> SegmentationData:
    """Load a folder of images and class-index masks into memory.

    Layouts accepted (folder names in any case): an image folder beside a mask folder
    (`images/` + `labels/`, `imgs/` + `masks/`, `image/` + `label/`, `img/` + `ann/`,
    `JPEGImages/` + `SegmentationClass/`, `img_dir/` + `ann_dir/`, ...), at the top (split by
    a `valid.txt` naming the validation images as fastai's CamVid, by VOC's
    `ImageSets/Segmentation/val.txt`, or else a seeded `valid_pct`), inside each of `train/`,
    `val/` (`valid/`, `validation/`) and `test/`, or each holding `train/` and `val/` folders.
    A mask has its image's stem, or that stem with `_P`, `_mask`, `_label`, `_labels`, `_gt`
    or `_seg` after it. Anything else is refused in one line naming the file or folder.

    Masks are single-channel PNGs (8 or 16 bits) or palette PNGs, read as class indices;
    masks holding only 0 and 255 are binary (255 becomes 1). RGB colour masks are refused.

    Args:
        path: the folder.
        valid_pct: the share held out for validation when the folder has no split of its own.
        seed: seeds that split.
        size: resize images (bilinear) and masks (nearest) to `size` x `size`, or to a
            (height, width) pair. None keeps their size, which must then be the same for all
            (else `MixedSizes`).
        codes: class names, in index order; None reads `codes.txt` (or `classes.txt`) in the
            folder, one name a line, or else names the classes "0".."K-1".
        void: the mask value to ignore in the loss and metrics; None for none; "auto" (the
            default) takes a codes.txt line named Void / Unlabelled / Ignore (dropped from
            `codes` when it is the last line), else 255 when the masks hold it (as Pascal VOC's
            do). A folder named *camvid* without codes.txt whose masks fit CamVid's is read
            as `codes=CAMVID_CODES, void=CAMVID_VOID` (../shared/data/camvid), and says so.

    Returns:
        A `SegmentationData`: float32 (N, 3, H, W) images in [0, 1], int64 (N, H, W) masks.

    Raises:
        DataError: the folder's layout is not one of those accepted, or a file is bad (no
            partner, another size than its image, a colour mask, a class index beyond
            `codes`, unreadable); the message names it and what to do.

    Example:
        >>> data = load_segmentation(CAMVID_TINY)
        >>> data
        SegmentationData('camvid-tiny', 11 classes, void=11, 12 train + 4 valid + 4 test images of 240x180)
    """  # noqa: E501
    _check_valid_pct(valid_pct)
    if size is not None:
        sizes = (size,) if isinstance(size, int) else tuple(size)
        if len(sizes) not in (1, 2) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in sizes
        ):
            raise DataError(
                f"size must be a positive number of pixels or a (height, width) pair, got {size!r}"
            )
        size = size if isinstance(size, int) else (sizes[0], sizes[1])
    if not (void is None or void == "auto" or (isinstance(void, int) and void >= 0)):
        raise DataError(f"void must be a class index >= 0, None or 'auto', got {void!r}")
    if codes is not None:
        codes = [str(name) for name in codes]
        if len(codes) < 2:
            raise DataError(f"codes must name at least two classes, got {codes!r}")
    root = Path(path).expanduser()
    if not root.exists() and root == CAMVID_TINY:
        raise DataError(
            f"{root} is not here: the CamVid frames ship in auxhead's source repository "
            "(data/camvid-tiny/), not in the pip package; clone the repository, or copy that "
            "folder and pass its path"
        )
    layout = find_seg_layout(root)
    splits = {"train": layout.train, "valid": layout.valid, "test": layout.test}
    found = {split: pairs for split, pairs in splits.items() if pairs is not None}
    images = [path for pairs in found.values() for path in pairs.images]
    masks = [path for pairs in found.values() for path in pairs.masks]
    x, y = read_pairs(images, masks, size)  # one read, so every split gets the same size
    notes = list(layout.notes)
    # As for idx files named *fashion*: a folder named *camvid* without codes.txt, whose masks
    # fit CamVid's 11 classes and void, is CamVid (../shared/data/camvid).
    camvid = "camvid" in root.name.lower() and int(y.max()) <= CAMVID_VOID
    if codes is None and layout.codes_file is None and camvid:
        codes = list(CAMVID_CODES)
        void = CAMVID_VOID if void == "auto" else void
        notes.append(
            f"{root}: no codes.txt; the folder is named CamVid, so its masks are read as "
            f"CamVid's 11 classes with void {CAMVID_VOID} (pass codes= to say otherwise)"
        )
    classes = resolve_classes(y, masks, codes=codes, codes_file=layout.codes_file, void=void)
    notes += classes.notes
    tensors, files, start = {}, {}, 0
    for split, pairs in found.items():
        end = start + len(pairs.images)
        tensors[split] = (x[start:end], y[start:end])
        files[split] = list(pairs.images)
        start = end
    if layout.valid is None:
        tensors, files = _hold_out(root, tensors, files, valid_pct, seed)
        notes.append(
            f"{root}: no validation folder or list: {len(files['valid'])} of "
            f"{len(files['train']) + len(files['valid'])} images are held out "
            f"(valid_pct={valid_pct:g}, seed={seed})"
        )
    test_x, test_y = tensors.get("test", (None, None))
    data = SegmentationData(
        root.name,
        classes.codes,
        classes.void,
        *tensors["train"],
        *tensors["valid"],
        test_x,
        test_y,
        files=files,
        notes=notes,
    )
    notes += _absent_classes(data)
    for note in notes:
        logger.warning("%s", note)
    return data


def _absent_classes(data: SegmentationData) -> list[str]:
    """A line for the classes no training mask holds: the model never learns them."""
    counts = torch.bincount(data.train_y.flatten(), minlength=data.c)[: data.c].tolist()
    absent = [name for i, name in enumerate(data.codes) if counts[i] == 0 and i != data.void]
    if not absent:
        return []
    return [
        f"class(es) {', '.join(map(repr, absent))} appear in no training mask: the model never "
        "learns them (their IoU will be 0 or undefined)"
    ]


def _hold_out(
    root: Path,
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    files: dict[str, list[Path]],
    valid_pct: float,
    seed: int,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, list[Path]]]:
    """Split the train tensors into train and a seeded held-out `valid_pct`."""
    x, y = tensors["train"]
    n_valid = round(valid_pct * len(y))
    if n_valid < 1 or n_valid >= len(y):
        raise DataError(
            f"{root} holds {len(y)} image(s): holding out {valid_pct:.0%} for validation leaves "
            f"{len(y) - n_valid} to train on and {n_valid} to validate; add images, a val/ "
            "folder or a valid.txt, or another valid_pct"
        )
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    valid_idx, train_idx = order[:n_valid].sort().values, order[n_valid:].sort().values
    tensors = dict(tensors, train=(x[train_idx], y[train_idx]), valid=(x[valid_idx], y[valid_idx]))
    names = files["train"]
    files = dict(
        files,
        train=[names[i] for i in train_idx.tolist()],
        valid=[names[i] for i in valid_idx.tolist()],
    )
    return tensors, files


def segmentation_dataloaders(
    data: SegmentationData,
    *,
    bs: int = 8,
    seed: int = 0,
    device: str | torch.device | None = None,
    shuffle_train: bool = True,
) -> DataLoaders:
    """fastai DataLoaders over a `SegmentationData`, typed as fastai's
    `SegmentationDataLoaders` types its batches: (TensorImage float (B, 3, H, W) in [0, 1],
    TensorMask int64 (B, H, W)), with the codes on the masks.

    So `unet_learner(dls, arch, n_out=dls.c)`, `show_batch`, `get_preds` and `show_results`
    (masks drawn over the images) work as on fastai's own. `dls.c` is the number of classes,
    `dls.vocab` the codes. The default loss (`Learner(dls, model)` without `loss_func`) is
    `CrossEntropyLossFlat(axis=1, ignore_index=data.void)`: void pixels do not count. With a
    test split, `dls[2]` is its loader (`learn.get_preds(ds_idx=2)`). Inputs stay in [0, 1]
    (fastai's `unet_learner` adds ImageNet normalisation for pretrained encoders). An exported
    learner holds only fastai classes and loads with plain fastai.

    Args:
        data: from `load_segmentation`.
        bs: batch size (validation and test use the same).
        seed: seeds the training shuffle; the same seed gives the same batches.
        device: where batches go; None picks fastai's default (the GPU if there is one).
        shuffle_train: shuffle the training set each epoch (and drop its last partial batch).

    Returns:
        A fastai `DataLoaders` with `train`, `valid` and, when `data` has one, a test loader.

    Example:
        >>> dls = segmentation_dataloaders(load_segmentation(CAMVID_TINY), bs=4)
        >>> learn = unet_learner(dls, resnet18, pretrained=False)  # loss ignores void
    """
    try:
        import fastai.vision.data  # noqa: F401  (registers show_batch / show_results for images)
        from fastai.data.core import DataLoaders, Datasets
        from fastai.data.transforms import ItemGetter, Transform
        from fastai.losses import CrossEntropyLossFlat
        from fastai.torch_core import TensorImage, TensorMask, default_device
        from fastai.vision.core import AddMaskCodes
    except ModuleNotFoundError as error:
        raise_missing_extra(error, "auxhead.data.segmentation_dataloaders")
        raise

    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
        raise ValueError(f"bs must be an integer >= 1, got {bs!r}")
    dl_type = _tensor_dl_type()
    ignore = -100 if data.void is None else data.void  # -100: torch's "ignore nothing" default

    def loader(x: torch.Tensor, y: torch.Tensor, split_idx: int):
        # Items are (image, mask) tensor pairs; the mask pipeline ends as fastai's MaskBlock's
        # does (AddMaskCodes), and carries the loss fastai's Learner picks up by default.
        codes = AddMaskCodes(codes=list(data.codes))
        codes.loss_func = CrossEntropyLossFlat(axis=1, ignore_index=ignore)
        dataset = Datasets(
            list(zip(x.unbind(0), y.unbind(0), strict=True)),
            tfms=[
                [ItemGetter(0), Transform(TensorImage)],
                [ItemGetter(1), Transform(TensorMask), codes],
            ],
            split_idx=min(split_idx, 1),
        )
        shuffle = split_idx == 0 and shuffle_train
        dl = dl_type(
            dataset,
            arrays=(x.detach().cpu().numpy(), y.detach().cpu().numpy()),
            image_type=TensorImage,
            target_type=TensorMask,
            bs=bs,
            shuffle=shuffle,
            drop_last=shuffle and len(y) > bs,
            num_workers=0,
        )
        dl.rng = random.Random(seed)
        return dl

    device = default_device() if device is None else torch.device(device)
    loaders = [loader(data.train_x, data.train_y, 0), loader(data.valid_x, data.valid_y, 1)]
    if data.test_x is not None and data.test_y is not None:
        loaders.append(loader(data.test_x, data.test_y, 2))
    return DataLoaders(*loaders, device=device)
