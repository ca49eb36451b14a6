"""Image-mask pairs -> tensors, and the class names and void index of their masks.

A mask is a single-channel image whose pixel value is the class index: 8- or 16-bit grey, or
a palette ("P" mode) PNG read as its indices (Pascal VOC's). An RGB mask whose three channels
are equal is read as grey; one in colour is refused (its colours would need a colour table).
Masks are resized nearest-neighbour, images bilinear; a mask must have its image's size.

Classes: the names `codes` gives, else a `codes.txt` (or `classes.txt`) beside the data, one
name a line, else "0".."K-1" for the K = largest index + 1 found. Void (pixels the loss and
the metrics ignore): `void=` when given (an index, or None for none); else a codes.txt line
named Void, Unlabelled, Unlabeled or Ignore (dropped from the class names when it is the last
line: CamVid's 11 classes with void 11); else 255 if masks hold it (Pascal VOC's border).
Masks that hold only 0 and 255 are binary (milesial's Carvana, most medical sets): 255 becomes
class 1, unless `void=255` says otherwise. JPEG masks holding more than two values are refused
unless `codes` is given: compression has blurred their indices.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from auxhead._errors import DataError, MixedSizes
from auxhead._pixels import pil_size, read_pixels, unreadable

if TYPE_CHECKING:
    from PIL import Image

VOID_NAMES = {"void", "unlabelled", "unlabeled", "ignore"}
BINARY_VALUE = 255  # the foreground of masks saved as 0/255
DEFAULT_VOID = 255  # Pascal VOC's, torchvision's and mmsegmentation's ignore index
_LARGEST_INDEX = 65535
_JPEG = {".jpg", ".jpeg", ".jpe"}


def read_pairs(
    images: list[Path], masks: list[Path], size: int | tuple[int, int] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode image-mask pairs into float32 (N, 3, H, W) images in [0, 1] and int64 (N, H, W)
    mask values, as stored (void and binary values not yet mapped).

    Raises:
        DataError: a file is unreadable, a mask is in colour or has another size than its
            image; `MixedSizes` when `size` is None and the images differ in size.
    """
    from PIL import Image

    x: torch.Tensor | None = None
    y: torch.Tensor | None = None
    first: Path | None = None
    for i, (image_path, mask_path) in enumerate(zip(images, masks, strict=True)):
        try:
            with Image.open(image_path) as image:
                native = image.size  # (width, height), from the header
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
            raise DataError(unreadable(image_path, e)) from None
        mask = read_mask(mask_path, native, image_path, size)
        pixels = read_pixels(image_path, size).values
        if x is None:
            height, width = mask.shape
            x = torch.empty(len(images), 3, height, width)
            y = torch.empty(len(images), height, width, dtype=torch.int64)
            first = image_path
        elif mask.shape != tuple(y.shape[1:]):
            raise MixedSizes(
                f"{image_path} is {native[0]}x{native[1]} but {first} is "
                f"{y.shape[2]}x{y.shape[1]}; pass a size (load_segmentation(size=N) or "
                "size=(height, width)) to resize all"
            )
        image = torch.from_numpy(pixels.astype(np.float32))
        if pixels.dtype == np.uint8:
            image /= 255
        x[i] = image.permute(2, 0, 1) if image.dim() == 3 else image  # grey: same in R, G, B
        y[i] = torch.from_numpy(mask.astype(np.int64))
    assert x is not None and y is not None  # the layout refuses a split without images
    return x, y


def read_mask(
    path: Path, native: tuple[int, int], image_path: Path, size: int | tuple[int, int] | None
) -> np.ndarray:
    """The class indices of one mask, (H, W), resized nearest-neighbour to `size`.

    Args:
        path: the mask file.
        native: its image's (width, height); the mask must match it.
        image_path: its image, named when the sizes differ.
        size: the size to resize to, or None.
    """
    from PIL import Image

    try:
        with Image.open(path) as mask:
            if mask.size != native:
                raise DataError(
                    f"{path} is {mask.size[0]}x{mask.size[1]} but its image {image_path} is "
                    f"{native[0]}x{native[1]}; a mask must have its image's size (resize it "
                    "nearest-neighbour, or find the right mask)"
                )
            values = _indices(mask, path, size)
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as error:
        raise DataError(unreadable(path, error)) from None
    return values


def _indices(mask: Image.Image, path: Path, size: int | tuple[int, int] | None) -> np.ndarray:
    from PIL import Image

    mode = mask.mode
    if mode in ("P", "PA"):
        pass  # palette: the indices are the classes (PA's first channel), the colours for show
    elif mode in ("1", "LA", "La"):
        mask = mask.convert("L")
    elif mode in ("RGB", "RGBA", "RGBX"):
        rgb = np.asarray(mask.convert("RGB"))
        if not ((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()):
            raise DataError(
                f"{path} is a colour mask (RGB pixels, not class indices); save each mask as a "
                "single-channel or palette PNG whose pixel value is the class index (0, 1, ...), "
                "mapping each colour to its class"
            )
        mask = Image.fromarray(rgb[..., 0])
    elif mode == "F":
        raise DataError(
            f"{path} is a float image; a mask holds integer class indices: save it as an 8- or "
            "16-bit PNG"
        )
    elif mode != "L" and mode != "I" and not mode.startswith("I;16"):
        raise DataError(
            f"{path}: PIL mode {mode!r} is not a mask; save masks as single-channel 8- or 16-bit "
            "PNGs whose pixel value is the class index"
        )
    if size is not None:
        mask = mask.resize(pil_size(size), Image.Resampling.NEAREST)
    values = np.asarray(mask)
    if values.ndim != 2:  # a mode PIL hands back with channels; keep the first
        values = values[..., 0]
    if values.dtype.kind not in "ub":
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > _LARGEST_INDEX:
            raise DataError(
                f"{path} holds values from {low} to {high}; class indices must be 0 to "
                f"{_LARGEST_INDEX}: save the mask as an 8- or 16-bit PNG of class indices"
            )
    return values


class Classes(NamedTuple):
    """What the masks' values mean."""

    codes: list[str]  # class names; class i is codes[i]
    void: int | None  # the index to ignore, or None
    notes: list[str]


def read_codes(path: Path) -> list[str]:
    """The class names of a codes.txt, one a line (blank lines skipped)."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read {path}: {error}; fix or remove it") from None
    codes = [line.strip() for line in lines if line.strip()]
    if not codes:
        raise DataError(f"{path} names no class; write one class name a line, or remove it")
    return codes


def resolve_classes(
    y: torch.Tensor,
    masks: list[Path],
    *,
    codes: list[str] | None,
    codes_file: Path | None,
    void: int | str | None,
) -> Classes:
    """Name the classes of the mask values `y` (changed in place: binary 255 -> 1) and choose
    the void index; refuse a value out of the classes' range, naming its mask."""
    notes: list[str] = []
    source = "codes="
    if codes is None and codes_file is not None:
        codes, source = read_codes(codes_file), str(codes_file)
    present = torch.unique(y).tolist()
    if void == "auto":
        void = _auto_void(codes, present)
        last = codes is not None and void is not None and void == len(codes) - 1
        if last and codes[void].lower() in VOID_NAMES:
            codes = codes[:void]  # the void line names no class the model predicts
    binary = set(present) <= {0, BINARY_VALUE} and BINARY_VALUE in present
    if binary and void != BINARY_VALUE:
        y[y == BINARY_VALUE] = 1
        present = sorted(set(y.unique().tolist()))
        notes.append("the masks hold only 0 and 255: read as binary, 255 as class 1")
    kept = [v for v in present if v != void]
    jpeg = [path for path in masks if path.suffix.lower() in _JPEG]
    if codes is None and jpeg and len(kept) > 2:
        raise DataError(
            f"{jpeg[0]} is a JPEG mask, and the masks hold {len(kept)} different values: JPEG "
            "compression blurs class indices; save the masks as PNG (or pass codes= naming "
            "the classes, to take the values as they are)"
        )
    if codes is None:
        n = max(kept, default=0) + 1
        if n < 2:
            raise DataError(
                f"every mask ({masks[0]} and the rest) holds only class {kept[0] if kept else 0}"
                f"{' and void' if void in present else ''}; segmentation needs at least two "
                "classes"
            )
        codes = [str(i) for i in range(n)]
    else:
        bad = [v for v in kept if v >= len(codes)]
        if bad:
            value = bad[0]
            index = int((y == value).flatten(1).any(1).nonzero()[0])
            void_hint = "" if void is None else f" (void is {void})"
            raise DataError(
                f"{masks[index]} holds class index {value}, but {source} names {len(codes)} "
                f"classes (0 to {len(codes) - 1}){void_hint}; fix the mask, add the class to "
                f"{source}, or pass void={value} (--void {value}) if it marks pixels to ignore"
            )
    return Classes(list(codes), None if void is None else int(void), notes)


def _auto_void(codes: list[str] | None, present: list[int]) -> int | None:
    if codes is not None:
        named = [i for i, name in enumerate(codes) if name.lower() in VOID_NAMES]
        if named:
            return named[0]
    if DEFAULT_VOID in present and not set(present) <= {0, BINARY_VALUE}:
        return DEFAULT_VOID
    return None
