"""One image file -> pixels in [0, 1], by the true range of its PIL mode and bit depth.

8-bit modes (1, L, LA, P, PA, RGB, RGBA, CMYK, YCbCr...) go through PIL's own conversion to L or
RGB (alpha dropped, palettes looked up) and come back as uint8. 16-bit integers (I;16, I;16B,
...) are divided by 65535. 32-bit integers (I) are read as 16-bit data, which is what they
hold in practice (16-bit TIFFs and older Pillows' 16-bit PNGs), and refused outside 0..65535.
Floats (F) are kept as they are when they lie in [0, 1] and refused otherwise: a per-image
min-max would hide the brightness differences a classifier may need. The first frame of an
animation or multi-page file is used.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from auxhead._errors import DataError

if TYPE_CHECKING:
    from PIL import Image

# PIL modes that convert("L") keeps whole; every other 8-bit mode converts to RGB.
_GREY_8_BIT = {"1", "L", "LA", "La"}
# Float pixels this far outside [0, 1] (rounding in whoever wrote them) are clipped, not refused.
_FLOAT_SLACK = 1e-6
_LARGEST_16_BIT = 65535


class Pixels(NamedTuple):
    """A decoded image: `values` is (H, W) or (H, W, 3), uint8 (0-255) or float32 (0-1)."""

    values: np.ndarray
    frames: int  # frames or pages in the file; only the first is used


def unreadable(path: Path, error: BaseException) -> str:
    return (
        f"cannot read image {path}: {' '.join(str(error).split())}; remove the file or replace "
        "it with a readable image, then run again"
    )


def read_pixels(path: Path, size: int | tuple[int, int] | None) -> Pixels:
    """Decode the first frame of `path`, resized to `size` x `size` (or to a (height, width)
    pair) when a size is given.

    Raises:
        DataError: the file cannot be decoded, or its values cannot be put in [0, 1].
    """
    from PIL import Image

    try:
        with Image.open(path) as image:
            frames = int(getattr(image, "n_frames", 1))
            values = _values(image, path, size)
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as error:
        raise DataError(unreadable(path, error)) from None
    return Pixels(values, frames)


def is_grey(values: np.ndarray) -> bool:
    """Whether decoded pixels are grey: one channel, or three equal ones (a grey palette, an RGB
    file of a grey picture)."""
    if values.ndim == 2:
        return True
    red, green, blue = values[..., 0], values[..., 1], values[..., 2]
    return bool((red == green).all() and (green == blue).all())


def pil_size(size: int | tuple[int, int]) -> tuple[int, int]:
    """`size` (pixels a side, or (height, width)) as PIL's (width, height)."""
    if isinstance(size, int):
        return size, size
    height, width = size
    return width, height


def _values(image: Image.Image, path: Path, size: int | tuple[int, int] | None) -> np.ndarray:
    from PIL import Image

    mode = image.mode
    if mode == "F" or mode == "I" or mode.startswith("I;16"):
        return _wide_values(image, path, size)
    if mode in ("P", "PA"):  # PIL asks for RGBA first when the palette has transparency
        image = image.convert("RGBA")
    try:
        image = image.convert("L" if mode in _GREY_8_BIT else "RGB")
    except ValueError as error:  # a mode PIL cannot convert (LAB, HSV, ...)
        raise DataError(
            f"{path}: PIL mode {mode!r} cannot be converted to grey or RGB ({error}); save the "
            "image as an 8- or 16-bit PNG or a JPEG"
        ) from None
    if size is not None:
        image = image.resize(pil_size(size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def _wide_values(image: Image.Image, path: Path, size: int | tuple[int, int] | None) -> np.ndarray:
    """Pixels of a 16-bit, 32-bit integer or float image, as float32 in [0, 1]."""
    from PIL import Image

    mode = image.mode
    raw = np.asarray(image)  # the stored values: uint16, int32 or float32
    if mode == "F":
        if not np.isfinite(raw).all():
            raise DataError(
                f"{path}: a float image (PIL mode F) holding NaN or infinite values; replace "
                "them, or save the image as an 8- or 16-bit integer one"
            )
        low, high = float(raw.min()), float(raw.max())
        if low < -_FLOAT_SLACK or high > 1 + _FLOAT_SLACK:
            raise DataError(
                f"{path}: a float image (PIL mode F) with values from {low:g} to {high:g}; float "
                "images are read as values in [0, 1]: rescale the images to [0, 1], or save "
                "them as 8- or 16-bit integer images"
            )
        values = np.clip(raw, 0, 1).astype(np.float32)
    else:
        low, high = int(raw.min()), int(raw.max())
        if low < 0 or high > _LARGEST_16_BIT:
            raise DataError(
                f"{path}: an integer image (PIL mode {mode}) with values from {low} to {high}; "
                f"integer images are read as 16-bit (0 to {_LARGEST_16_BIT}): save them as 8- "
                "or 16-bit images, or as floats in [0, 1]"
            )
        values = raw.astype(np.float32) / _LARGEST_16_BIT
    if size is not None:
        resized = Image.fromarray(values).resize(pil_size(size), Image.Resampling.BILINEAR)
        values = np.clip(np.asarray(resized, dtype=np.float32), 0, 1)
    return values
