"""Image folders as users bring them: every split layout, every PIL mode and bit depth, and the
clutter (hidden files, __MACOSX/, empty classes, notes files), each with its expected result."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from auxhead.data import DataError, load_data

GREY_PALETTE = [v for i in range(256) for v in (i, i, i)]


def save(path: Path, image: Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def grey(path: Path, value: int = 100) -> Path:
    return save(path, Image.new("L", (4, 4), value))


def classes(root: Path, counts: dict[str, int], value: int = 100) -> Path:
    """`root/<class>/<i>.png`, `counts[class]` grey images of `value` each."""
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            grey(root / name / f"{i}.png", value)
    return root


def everything(data) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([data.train_x, data.valid_x]), torch.cat([data.train_y, data.valid_y])


# Layouts --------------------------------------------------------------------------------------


@pytest.mark.parametrize("valid_name", ["val", "valid", "validation", "VAL", "Valid", "test"])
def test_train_and_a_validation_folder(tmp_path, valid_name):
    classes(tmp_path / "train", {"cat": 3, "dog": 3}, value=10)
    classes(tmp_path / valid_name, {"cat": 1, "dog": 2}, value=200)
    data = load_data(tmp_path)
    assert data.classes == ["cat", "dog"]
    assert data.train_y.tolist() == [0, 0, 0, 1, 1, 1] and data.valid_y.tolist() == [0, 1, 1]
    torch.testing.assert_close(data.train_x, torch.full_like(data.train_x, 10 / 255))
    torch.testing.assert_close(data.valid_x, torch.full_like(data.valid_x, 200 / 255))
    if valid_name == "test":  # the test folder is validation when there is no val folder
        assert data.notes == [f"{tmp_path}: validation uses test/ (there is no val/ folder)"]
    else:
        assert data.notes == []


def test_train_val_and_test_validates_on_val_and_leaves_test_out(tmp_path):
    classes(tmp_path / "Train", {"a": 2, "b": 2}, value=10)
    classes(tmp_path / "val", {"a": 1, "b": 1}, value=200)
    classes(tmp_path / "test", {"a": 4, "b": 4}, value=99)
    data = load_data(tmp_path)
    assert len(data.train_y) == 4 and len(data.valid_y) == 2
    torch.testing.assert_close(data.valid_x, torch.full_like(data.valid_x, 200 / 255))
    assert data.notes == [
        f"{tmp_path}: validation uses val/; test/ is left out (kept for a final evaluation)"
    ]


def test_train_alone_holds_out_a_share_and_says_so(tmp_path, caplog):
    classes(tmp_path / "train", {"a": 5, "b": 5})
    with caplog.at_level(logging.WARNING, logger="auxhead.data"):
        data = load_data(tmp_path, valid_pct=0.4)
    assert data.classes == ["a", "b"] and len(data.train_y) == 6 and len(data.valid_y) == 4
    note = (
        f"{tmp_path}: train/ has no validation folder beside it (val/, valid/, validation/ or "
        "test/): 40% of each class is held out instead"
    )
    assert data.notes == [note] and caplog.messages == [note]


def test_class_folders_at_the_top(tmp_path, caplog):
    classes(tmp_path, {"a": 5, "b": 5})
    with caplog.at_level(logging.WARNING, logger="auxhead.data"):
        data = load_data(tmp_path, valid_pct=0.4)
    assert data.classes == ["a", "b"] and len(data.train_y) == 6 and len(data.valid_y) == 4
    assert data.notes == [] and caplog.messages == []


def test_a_mix_of_split_and_other_folders_is_refused(tmp_path):
    classes(tmp_path / "train", {"a": 2, "b": 2})
    classes(tmp_path / "val", {"a": 1, "b": 1})
    classes(tmp_path, {"cat": 2})
    mixed = r"mixes split folders \(train/, val/\) with other folders \(cat/\); a data folder "
    with pytest.raises(DataError, match=mixed + "holds class folders at the top"):
        load_data(tmp_path)


def test_two_folders_for_one_split_are_refused(tmp_path):
    for name in ("train", "val", "valid"):
        classes(tmp_path / name, {"a": 1, "b": 1})
    with pytest.raises(DataError, match=r"has val/, valid/, each read as the valid split; keep"):
        load_data(tmp_path)


def test_split_folders_without_train_are_refused(tmp_path):
    classes(tmp_path / "val", {"a": 1, "b": 1})
    classes(tmp_path / "test", {"a": 1, "b": 1})
    with pytest.raises(DataError, match=r"has test/, val/ but no train/ folder to train on"):
        load_data(tmp_path)


def test_a_validation_folder_of_loose_images_is_refused(tmp_path):
    classes(tmp_path / "train", {"a": 2, "b": 2})
    grey(tmp_path / "val" / "0.png")  # ImageNet's own val/: flat, labels in a separate file
    grey(tmp_path / "val" / "1.png")
    with pytest.raises(DataError, match=r"val holds 2 image\(s\) but no class folders"):
        load_data(tmp_path)


def test_a_class_only_in_the_validation_folder_is_refused(tmp_path):
    classes(tmp_path / "train", {"a": 2, "b": 2})
    classes(tmp_path / "valid", {"a": 1, "c": 1})
    with pytest.raises(DataError, match=r"valid has class\(es\) 'c' that .*train does not"):
        load_data(tmp_path)


def test_one_folder_too_high_points_one_level_down(tmp_path):
    classes(tmp_path / "imagenette" / "train", {"a": 2, "b": 2})
    classes(tmp_path / "imagenette" / "val", {"a": 1, "b": 1})
    hint = (
        r"single class 'imagenette'.* \(is .*imagenette the data folder\? it holds train/, val/\)"
    )
    with pytest.raises(DataError, match=hint):
        load_data(tmp_path)


def test_a_class_missing_from_the_validation_folder_is_noted(tmp_path):
    classes(tmp_path / "train", {"a": 2, "b": 2})
    classes(tmp_path / "val", {"a": 1})
    data = load_data(tmp_path)
    assert data.classes == ["a", "b"] and data.valid_y.tolist() == [0]
    assert data.notes == [
        f"no image in {tmp_path / 'val'} for class(es) 'b': the validation accuracy leaves them "
        f"out; add some of their images to {tmp_path / 'val'}/"
    ]


def test_empty_and_one_image_classes(tmp_path):
    classes(tmp_path, {"a": 5, "b": 5, "d": 1})
    (tmp_path / "c").mkdir()
    data = load_data(tmp_path)
    assert data.classes == ["a", "b", "d"]
    assert data.notes == [
        f"{tmp_path}: skipped 1 class folder(s) without images (c)",
        "no held-out image for class(es) 'd' (1 image): the validation accuracy leaves them out; "
        "a class needs 3 images to have one held out at valid_pct=0.2",
    ]


def test_a_class_held_out_whole_is_noted(tmp_path):
    classes(tmp_path, {"a": 5, "b": 5, "d": 1})
    data = load_data(tmp_path, valid_pct=0.6)  # round(0.6 x 1) = 1: d's one image is held out
    assert data.notes == [
        "no training image left for class(es) 'd': every image of them is held out at "
        "valid_pct=0.6; add images or lower valid_pct"
    ]


def test_hidden_files_macos_leftovers_and_non_images_are_skipped_and_counted(tmp_path, caplog):
    classes(tmp_path, {"a": 2, "b": 2})
    (tmp_path / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tmp_path / "a" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tmp_path / "a" / "._0.png").write_bytes(b"\0\5\26\7 AppleDouble, not a png")
    (tmp_path / "a" / ".ipynb_checkpoints").mkdir()
    grey(tmp_path / "a" / ".ipynb_checkpoints" / "0-checkpoint.png")
    (tmp_path / "__MACOSX" / "a").mkdir(parents=True)
    (tmp_path / "__MACOSX" / "a" / "._0.png").write_bytes(b"\0\5\26\7")
    (tmp_path / "b" / "notes.txt").write_text("not an image")
    (tmp_path / "labels.csv").write_text("file,label\n")
    grey(tmp_path / "stray.png")
    with caplog.at_level(logging.WARNING, logger="auxhead.data"):
        data = load_data(tmp_path, valid_pct=0.5)
    assert data.classes == ["a", "b"] and len(data.train_y) + len(data.valid_y) == 4
    line = (
        f"{tmp_path}: skipped 4 hidden file(s) or folder(s) (.DS_Store, a/.DS_Store, a/._0.png "
        "and 1 more); 1 __MACOSX/ folder(s) (__MACOSX); 2 file(s) that are not images "
        "(b/notes.txt, labels.csv); 1 image(s) outside the class folders (stray.png)"
    )
    assert data.notes == [line] and caplog.messages == [line]


def test_nested_folders_count_for_their_class(tmp_path):
    classes(tmp_path, {"a": 2, "b": 2})
    grey(tmp_path / "a" / "more" / "deeper" / "x.png")
    data = load_data(tmp_path, valid_pct=0.4)
    assert (torch.cat([data.train_y, data.valid_y]) == 0).sum() == 3


# Image modes and bit depths ---------------------------------------------------------------------


def palette(value: int, colours: list[int] = GREY_PALETTE) -> Image.Image:
    image = Image.new("P", (4, 4), value)
    image.putpalette(colours)
    return image


RED_AT_7 = [*GREY_PALETTE[:21], 255, 0, 0, *GREY_PALETTE[24:]]


# (what, the image, how it is saved, the expected pixel, one value per channel)
MODES = [
    ("1", Image.new("1", (4, 4), 1), "png", [1.0]),
    ("L", Image.new("L", (4, 4), 64), "png", [64 / 255]),
    ("LA", Image.new("LA", (4, 4), (50, 128)), "png", [50 / 255]),
    ("P grey palette png", palette(7), "png", [7 / 255]),
    ("P grey palette gif", palette(7), "gif", [7 / 255]),
    ("P colour palette", palette(7, RED_AT_7), "png", [1.0, 0.0, 0.0]),
    ("RGB", Image.new("RGB", (4, 4), (10, 20, 30)), "png", [10 / 255, 20 / 255, 30 / 255]),
    ("RGB of a grey picture", Image.new("RGB", (4, 4), (9, 9, 9)), "png", [9 / 255]),
    ("RGBA", Image.new("RGBA", (4, 4), (10, 20, 30, 40)), "png", [10 / 255, 20 / 255, 30 / 255]),
    ("CMYK", Image.new("CMYK", (4, 4), (255, 0, 0, 0)), "tif", [0.0, 1.0, 1.0]),
    ("I;16 png", Image.fromarray(np.full((4, 4), 32768, np.uint16)), "png", [32768 / 65535]),
    ("I;16 tiff", Image.fromarray(np.full((4, 4), 65535, np.uint16)), "tif", [1.0]),
    ("I;16B", Image.new("I;16B", (4, 4), 300), "tif", [300 / 65535]),
    ("I", Image.fromarray(np.full((4, 4), 40000, np.int32)), "tif", [40000 / 65535]),
    ("F", Image.fromarray(np.full((4, 4), 0.25, np.float32)), "tif", [0.25]),
]


@pytest.mark.parametrize("what, image, suffix, expected", MODES, ids=[m[0] for m in MODES])
def test_each_mode_loads_by_its_true_range(tmp_path, what, image, suffix, expected):
    for i in range(2):
        save(tmp_path / "a" / f"{i}.{suffix}", image)
        grey(tmp_path / "b" / f"{i}.png", 0)
    data = load_data(tmp_path, valid_pct=0.5)
    assert data.channels == len(expected)
    x, y = everything(data)
    want = torch.tensor(expected).view(1, -1, 1, 1).expand(2, -1, 4, 4)
    torch.testing.assert_close(x[y == 0], want, atol=1e-6, rtol=0)


def test_a_16_bit_image_keeps_its_value_when_resized(tmp_path):
    for i in range(2):
        save(tmp_path / "a" / f"{i}.png", Image.fromarray(np.full((6, 6), 32768, np.uint16)))
        grey(tmp_path / "b" / f"{i}.png", 0)
    x, y = everything(load_data(tmp_path, valid_pct=0.5, size=3))
    torch.testing.assert_close(x[y == 0], torch.full((2, 1, 3, 3), 32768 / 65535))


def test_a_palette_file_among_grey_ones_keeps_the_data_grey(tmp_path):
    classes(tmp_path, {"a": 3, "b": 3})
    save(tmp_path / "b" / "anim.gif", palette(40))
    assert load_data(tmp_path, valid_pct=0.5).channels == 1


def test_a_grey_image_among_colour_ones_is_grey_in_every_channel(tmp_path):
    for i in range(2):
        save(tmp_path / "a" / f"{i}.png", Image.fromarray(np.full((4, 4), 65535, np.uint16)))
        save(tmp_path / "b" / f"{i}.png", Image.new("RGB", (4, 4), (255, 0, 0)))
    x, y = everything(load_data(tmp_path, valid_pct=0.5))
    torch.testing.assert_close(x[y == 0], torch.ones(2, 3, 4, 4))


def test_a_palette_with_transparency(tmp_path):
    for i in range(2):
        save(tmp_path / "a" / f"{i}.png", palette(7), transparency=0)
        grey(tmp_path / "b" / f"{i}.png", 0)
    x, y = everything(load_data(tmp_path, valid_pct=0.5))
    torch.testing.assert_close(x[y == 0], torch.full((2, 1, 4, 4), 7 / 255))


def test_animations_use_their_first_frame_and_say_so_once(tmp_path):
    frames = [palette(10), palette(200)]
    for i in range(2):
        save(tmp_path / "a" / f"{i}.gif", frames[0], save_all=True, append_images=frames[1:])
        grey(tmp_path / "b" / f"{i}.png", 0)
    data = load_data(tmp_path, valid_pct=0.5)
    x, y = everything(data)
    torch.testing.assert_close(x[y == 0], torch.full((2, 1, 4, 4), 10 / 255))
    assert data.notes == [
        f"2 file(s) hold several frames or pages ({tmp_path / 'a' / '0.gif'} and others): the "
        "first of each is used"
    ]


@pytest.mark.parametrize(
    "array, match",
    [
        (np.full((4, 4), 3.5, np.float32), r"mode F\) with values from 3.5 to 3.5; .*rescale"),
        (np.full((4, 4), np.nan, np.float32), r"mode F\) holding NaN or infinite values"),
        (np.full((4, 4), 70000, np.int32), r"mode I\) with values from 70000 to 70000; .*16-bit"),
        (np.full((4, 4), -5, np.int32), r"mode I\) with values from -5 to -5"),
    ],
    ids=["float above 1", "float nan", "int above 16 bits", "negative int"],
)
def test_values_outside_the_modes_range_are_refused_naming_the_file(tmp_path, array, match):
    grey(tmp_path / "a" / "0.png")
    save(tmp_path / "b" / "odd.tif", Image.fromarray(array))
    with pytest.raises(DataError, match=r"odd\.tif: an? .*" + match):
        load_data(tmp_path)


def test_a_48_bit_rgb_png_keeps_its_range(tmp_path):
    # PIL cannot write one: a 4x4 PNG of 16-bit RGB (65535, 32768, 0), written chunk by chunk.
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    row = b"\0" + np.tile(np.array([65535, 32768, 0], ">u2"), 4).tobytes()
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 4, 16, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(row * 4)) + chunk(b"IEND", b"")
    for i in range(2):
        (tmp_path / "a").mkdir(exist_ok=True)
        (tmp_path / "a" / f"{i}.png").write_bytes(png)
        grey(tmp_path / "b" / f"{i}.png", 0)
    x, y = everything(load_data(tmp_path, valid_pct=0.5))
    want = torch.tensor([1.0, 128 / 255, 0.0]).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    torch.testing.assert_close(x[y == 0], want)  # PIL keeps 8 bits of each: 32768 -> 128
