"""Segmentation folders -> tensors: the layouts users have, masks of every kind, void, and a
one-line refusal naming the file for each kind of bad data. Tiny generated PNGs, compared with
the arrays written; the CamVid frames shipped in data/camvid-tiny."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from auxhead.data import (
    CAMVID_CODES,
    CAMVID_TINY,
    CAMVID_VOID,
    DataError,
    MixedSizes,
    SegmentationData,
    load_segmentation,
)

H, W = 6, 8  # tiny frames: height, width


def _image(seed: int, height: int = H, width: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _mask(seed: int, k: int = 3, height: int = H, width: int = W) -> np.ndarray:
    mask = np.random.default_rng(1000 + seed).integers(0, k, (height, width), dtype=np.uint8)
    mask.flat[: min(k, mask.size)] = np.arange(min(k, mask.size))  # every class in every mask
    return mask


def _save(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def _pairs(image_dir: Path, mask_dir: Path, n: int, *, suffix: str = "", start: int = 0):
    """Write n PNG image-mask pairs; returns {stem: (image, mask)} arrays."""
    written = {}
    for i in range(start, start + n):
        stem = f"frame{i:03d}"
        image, mask = _image(i), _mask(i)
        _save(image_dir / f"{stem}.png", image)
        _save(mask_dir / f"{stem}{suffix}.png", mask)
        written[stem] = (image, mask)
    return written


def _assert_matches(x: torch.Tensor, y: torch.Tensor, files: list[Path], written: dict) -> None:
    assert len(files) == len(x) == len(y)
    for image_file, image, mask in zip(files, x, y, strict=True):
        want_image, want_mask = written[image_file.stem]
        expected = torch.from_numpy(want_image).permute(2, 0, 1).float() / 255
        torch.testing.assert_close(image, expected, rtol=0, atol=0)
        assert torch.equal(mask, torch.from_numpy(want_mask.astype(np.int64)))


# --- the shipped frames ---------------------------------------------------------------------


def test_shipped_camvid_frames_load_with_their_classes():
    data = load_segmentation(CAMVID_TINY)
    assert isinstance(data, SegmentationData)
    assert data.codes == CAMVID_CODES and data.c == 11 and data.void == CAMVID_VOID
    assert data.train_x.shape == (12, 3, 180, 240) and data.train_x.dtype == torch.float32
    assert data.train_y.shape == (12, 180, 240) and data.train_y.dtype == torch.int64
    assert data.valid_x.shape == (4, 3, 180, 240) and data.valid_y.shape == (4, 180, 240)
    assert data.test_x.shape == (4, 3, 180, 240) and data.test_y.shape == (4, 180, 240)
    assert data.size == (180, 240)
    assert float(data.train_x.min()) >= 0 and float(data.train_x.max()) <= 1
    values = torch.cat([data.train_y.flatten(), data.valid_y.flatten(), data.test_y.flatten()])
    assert set(values.unique().tolist()) == set(range(12))  # all 11 classes and void
    for split, folder in (("train", "train"), ("valid", "val"), ("test", "test")):
        assert [p.parent for p in data.files[split]] == [CAMVID_TINY / folder / "images"] * len(
            data.files[split]
        )
    # The first training mask is the PNG's own values.
    label = CAMVID_TINY / "train" / "labels" / f"{data.files['train'][0].stem}.png"
    assert torch.equal(data.train_y[0], torch.from_numpy(np.array(Image.open(label))).long())


def test_shipped_frames_are_tracked_and_small():
    files = [p for p in CAMVID_TINY.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 1_000_000
    assert (CAMVID_TINY / "README.md").is_file() and (CAMVID_TINY / "codes.txt").is_file()


# --- layouts --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image_dir", "mask_dir", "suffix"),
    [
        ("images", "labels", ""),
        ("images", "masks", ""),
        ("imgs", "masks", "_mask"),  # milesial/Pytorch-UNet (Carvana)
        ("image", "label", ""),
        ("img", "ann", ""),
        ("Images", "Labels", "_P"),  # fastai's CamVid names, any case
        ("img_dir", "ann_dir", ""),
    ],
)
def test_flat_pair_of_folders_is_split_by_seed(tmp_path, image_dir, mask_dir, suffix):
    written = _pairs(tmp_path / image_dir, tmp_path / mask_dir, 10, suffix=suffix)
    data = load_segmentation(tmp_path, valid_pct=0.2, seed=3)
    assert (len(data.train_y), len(data.valid_y), data.test_y) == (8, 2, None)
    assert data.codes == ["0", "1", "2"] and data.void is None
    _assert_matches(data.train_x, data.train_y, data.files["train"], written)
    _assert_matches(data.valid_x, data.valid_y, data.files["valid"], written)
    assert any("held out" in note for note in data.notes)
    again = load_segmentation(tmp_path, valid_pct=0.2, seed=3)
    assert again.files == data.files  # the seed fixes the split
    other = load_segmentation(tmp_path, valid_pct=0.2, seed=4)
    assert set(other.files["train"]) | set(other.files["valid"]) == set(data.files["train"]) | set(
        data.files["valid"]
    )


def test_split_folders_each_with_images_and_labels(tmp_path):
    written = {}
    for split, n, start in (("train", 4, 0), ("val", 2, 10), ("test", 3, 20)):
        written |= _pairs(tmp_path / split / "images", tmp_path / split / "labels", n, start=start)
    data = load_segmentation(tmp_path)
    assert (len(data.train_y), len(data.valid_y), len(data.test_y)) == (4, 2, 3)
    _assert_matches(data.train_x, data.train_y, data.files["train"], written)
    _assert_matches(data.valid_x, data.valid_y, data.files["valid"], written)
    _assert_matches(data.test_x, data.test_y, data.files["test"], written)
    assert data.notes == []


@pytest.mark.parametrize("valid_name", ["valid", "validation", "VAL"])
def test_other_validation_folder_names(tmp_path, valid_name):
    _pairs(tmp_path / "train" / "imgs", tmp_path / "train" / "masks", 3)
    _pairs(tmp_path / valid_name / "imgs", tmp_path / valid_name / "masks", 2, start=5)
    data = load_segmentation(tmp_path)
    assert (len(data.train_y), len(data.valid_y), data.test_y) == (3, 2, None)


def test_test_folder_without_val_is_validation(tmp_path):
    _pairs(tmp_path / "train" / "images", tmp_path / "train" / "labels", 3)
    _pairs(tmp_path / "test" / "images", tmp_path / "test" / "labels", 2, start=5)
    data = load_segmentation(tmp_path)
    assert (len(data.train_y), len(data.valid_y), data.test_y) == (3, 2, None)
    assert any("validation uses test/" in note for note in data.notes)


def test_test_folder_without_masks_is_left_out(tmp_path):  # a competition's test images
    _pairs(tmp_path / "train" / "images", tmp_path / "train" / "masks", 3)
    _pairs(tmp_path / "val" / "images", tmp_path / "val" / "masks", 2, start=5)
    _save(tmp_path / "test" / "images" / "unknown.png", _image(9))
    data = load_segmentation(tmp_path)
    assert (len(data.train_y), len(data.valid_y), data.test_y) == (3, 2, None)
    assert any("test holds no image folder beside a mask folder" in n for n in data.notes)


def test_files_that_are_not_images_are_skipped_and_said(tmp_path):
    _pairs(tmp_path / "images", tmp_path / "labels", 5)
    (tmp_path / "images" / "notes.txt").write_text("x")
    (tmp_path / "labels" / ".DS_Store").write_text("x")
    data = load_segmentation(tmp_path)
    assert len(data.train_y) + len(data.valid_y) == 5
    assert [n for n in data.notes if "not images" in n] == [
        f"{tmp_path / 'images'}: skipped 1 file(s) that are not images (notes.txt)"
    ]


def test_a_folder_named_camvid_without_codes_is_camvid(tmp_path):
    root = tmp_path / "CamVid"
    written = _pairs(root / "images", root / "labels", 5)
    mask = written["frame000"][1].copy()
    mask[0, 0] = CAMVID_VOID
    _save(root / "labels" / "frame000.png", mask)
    data = load_segmentation(root)
    assert data.codes == CAMVID_CODES and data.void == CAMVID_VOID
    assert any("named CamVid" in note for note in data.notes)
    assert load_segmentation(root, codes=["a", "b", "c"], void=11).codes == ["a", "b", "c"]


def test_image_and_mask_folders_holding_splits(tmp_path):  # mmsegmentation, ADE20K
    written = _pairs(tmp_path / "images" / "train", tmp_path / "annotations" / "train", 4)
    written |= _pairs(tmp_path / "images" / "val", tmp_path / "annotations" / "val", 2, start=9)
    data = load_segmentation(tmp_path)
    assert (len(data.train_y), len(data.valid_y)) == (4, 2)
    _assert_matches(data.valid_x, data.valid_y, data.files["valid"], written)


def test_fastai_camvid_layout_with_codes_and_valid_txt(tmp_path):
    written = _pairs(tmp_path / "images", tmp_path / "labels", 6, suffix="_P")
    (tmp_path / "codes.txt").write_text("Sky\nRoad\nCar\nVoid\n")
    (tmp_path / "valid.txt").write_text("frame001.png\nframe004.png\n")
    # Void (3) on a few pixels of one mask.
    mask = written["frame002"][1].copy()
    mask[0, :3] = 3
    _save(tmp_path / "labels" / "frame002_P.png", mask)
    written["frame002"] = (written["frame002"][0], mask)
    data = load_segmentation(tmp_path)
    assert data.codes == ["Sky", "Road", "Car"] and data.void == 3  # last line: dropped
    assert [p.name for p in data.files["valid"]] == ["frame001.png", "frame004.png"]
    assert len(data.train_y) == 4
    _assert_matches(data.train_x, data.train_y, data.files["train"], written)


def test_a_class_in_no_training_mask_is_said(tmp_path):
    _pairs(tmp_path / "images", tmp_path / "labels", 5)
    (tmp_path / "codes.txt").write_text("a\nb\nc\nnever\n")
    data = load_segmentation(tmp_path)
    assert [n for n in data.notes if "no training mask" in n] == [
        "class(es) 'never' appear in no training mask: the model never learns them (their IoU "
        "will be 0 or undefined)"
    ]


def test_a_segmentation_folder_is_not_loaded_as_classes(tmp_path):
    from auxhead.data import load_data

    _pairs(tmp_path / "train" / "images", tmp_path / "train" / "labels", 3)
    with pytest.raises(DataError, match=r"holds images/ and labels/, a segmentation layout"):
        load_data(tmp_path)


def test_void_named_in_the_middle_of_codes_stays_a_code(tmp_path):
    _pairs(tmp_path / "images", tmp_path / "labels", 5)
    (tmp_path / "codes.txt").write_text("background\nUnlabelled\nthing\n")
    data = load_segmentation(tmp_path)
    assert data.codes == ["background", "Unlabelled", "thing"] and data.void == 1


def _palette_png(path: Path, indices: np.ndarray) -> None:
    image = Image.fromarray(indices.astype(np.uint8), "P")
    palette = np.random.default_rng(0).integers(0, 256, 768, dtype=np.uint8)  # colours != indices
    image.putpalette(palette.tolist())
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def test_voc_layout_palette_masks_255_void_and_lists(tmp_path):
    images, masks = tmp_path / "JPEGImages", tmp_path / "SegmentationClass"
    written = {}
    for i in range(5):
        stem = f"2007_{i:06d}"
        image, mask = _image(i), _mask(i, k=4)
        mask[-1, -2:] = 255  # VOC's object borders
        _save(images / f"{stem}.png", image)
        _palette_png(masks / f"{stem}.png", mask)
        written[stem] = (image, mask)
    _save(images / "2008_000999.png", _image(99))  # a detection-only image: no mask
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "Annotations" / "2007_000000.xml").write_text("<annotation/>")
    lists = tmp_path / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("2007_000000\n2007_000001\n2007_000002\n")
    (lists / "val.txt").write_text("2007_000003\n2007_000004\n")
    data = load_segmentation(tmp_path)
    assert data.void == 255 and data.codes == ["0", "1", "2", "3"]
    assert [p.stem for p in data.files["valid"]] == ["2007_000003", "2007_000004"]
    _assert_matches(data.train_x, data.train_y, data.files["train"], written)
    assert any("without a mask" in note and "left out" in note for note in data.notes)


def test_palette_masks_are_read_as_indices(tmp_path):
    written = {}
    for i in range(4):
        image, mask = _image(i), _mask(i, k=5)
        _save(tmp_path / "images" / f"a{i}.png", image)
        _palette_png(tmp_path / "masks" / f"a{i}.png", mask)
        written[f"a{i}"] = (image, mask)
    data = load_segmentation(tmp_path, valid_pct=0.25)
    assert data.codes == ["0", "1", "2", "3", "4"]
    _assert_matches(data.train_x, data.train_y, data.files["train"], written)


def test_binary_masks_saved_as_0_and_255_become_0_and_1(tmp_path):
    for i in range(4):
        _save(tmp_path / "imgs" / f"car{i}.png", _image(i))
        _save(tmp_path / "masks" / f"car{i}_mask.png", (_mask(i, k=2) * 255).astype(np.uint8))
    data = load_segmentation(tmp_path, valid_pct=0.25)
    assert data.codes == ["0", "1"] and data.void is None
    for y, image_file in zip(data.train_y, data.files["train"], strict=True):
        index = int(image_file.stem[-1])
        assert torch.equal(y, torch.from_numpy(_mask(index, k=2).astype(np.int64)))
    assert any("binary" in note for note in data.notes)
    # Said otherwise: 255 is void.
    explicit = load_segmentation(tmp_path, valid_pct=0.25, void=255, codes=["bg", "fg"])
    assert explicit.void == 255 and set(explicit.train_y.unique().tolist()) == {0, 255}


def test_grey_rgb_masks_and_16_bit_masks_are_indices(tmp_path):
    for i in range(4):
        _save(tmp_path / "images" / f"f{i}.png", _image(i))
        mask = _mask(i)
        if i % 2:
            _save(tmp_path / "labels" / f"f{i}.png", np.repeat(mask[..., None], 3, axis=2))
        else:
            _save(tmp_path / "labels" / f"f{i}.png", mask.astype(np.uint16))
    data = load_segmentation(tmp_path, valid_pct=0.25)
    assert data.codes == ["0", "1", "2"]
    for y, image_file in zip(data.train_y, data.files["train"], strict=True):
        assert torch.equal(y, torch.from_numpy(_mask(int(image_file.stem[1:])).astype(np.int64)))


def test_jpeg_images_and_grey_images_become_rgb(tmp_path):
    for i in range(3):
        Image.fromarray(_image(i)[..., 0]).save(_dir(tmp_path / "images") / f"g{i}.jpg")
        _save(tmp_path / "labels" / f"g{i}.png", _mask(i))
    data = load_segmentation(tmp_path, valid_pct=0.34)
    assert data.train_x.shape[1] == 3
    assert torch.equal(data.train_x[:, 0], data.train_x[:, 2])


def _dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_codes_argument_and_void_none(tmp_path):
    _pairs(tmp_path / "images", tmp_path / "labels", 5)
    data = load_segmentation(tmp_path, codes=["a", "b", "c", "d"], void=None)
    assert data.codes == ["a", "b", "c", "d"] and data.void is None


def test_size_resizes_images_bilinear_and_masks_nearest(tmp_path):
    written = _pairs(tmp_path / "images", tmp_path / "labels", 5)
    data = load_segmentation(tmp_path, size=(4, 5))
    assert data.train_x.shape[2:] == (4, 5) and data.train_y.shape[1:] == (4, 5)
    for x, y, path in zip(data.train_x, data.train_y, data.files["train"], strict=True):
        image, mask = written[path.stem]
        want_mask = Image.fromarray(mask).resize((5, 4), Image.Resampling.NEAREST)
        want_image = Image.fromarray(image).resize((5, 4), Image.Resampling.BILINEAR)
        assert torch.equal(y, torch.from_numpy(np.array(want_mask, np.int64)))
        expected = torch.from_numpy(np.array(want_image)).permute(2, 0, 1).float() / 255
        torch.testing.assert_close(x, expected, rtol=0, atol=0)
    square = load_segmentation(tmp_path, size=7)
    assert square.size == (7, 7)


def test_mixed_sizes_need_a_size(tmp_path):
    _pairs(tmp_path / "images", tmp_path / "labels", 3)
    _save(tmp_path / "images" / "big.png", _image(7, 10, 12))
    _save(tmp_path / "labels" / "big.png", _mask(7, height=10, width=12))
    with pytest.raises(
        MixedSizes, match=r"frame000\.png is 8x6 but .*big\.png is 12x10; pass a size"
    ):
        load_segmentation(tmp_path)
    data = load_segmentation(tmp_path, size=8)
    assert data.size == (8, 8)


def test_subset_keeps_files_in_step(tmp_path):
    _pairs(tmp_path / "images", tmp_path / "labels", 10)
    data = load_segmentation(tmp_path)
    small = data.subset(3, 1, seed=1)
    assert (len(small.train_y), len(small.valid_y)) == (3, 1)
    for x, path in zip(small.train_x, small.files["train"], strict=True):
        assert torch.equal(x, data.train_x[data.files["train"].index(path)])


# --- refusals: one line, naming the file or folder ------------------------------------------


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_unrecognised_layout_names_the_layouts(tmp_path):
    _pairs(tmp_path / "pictures", tmp_path / "targets", 3)
    with pytest.raises(DataError, match=r"not a segmentation folder") as error:
        load_segmentation(tmp_path)
    message = _one_line(error)
    assert str(tmp_path) in message and "images/ + labels/" in message and "pictures/" in message


@pytest.mark.parametrize("present", ["images", "masks"])
def test_an_image_folder_without_a_mask_folder(tmp_path, present):
    _pairs(tmp_path / present, tmp_path / "other", 3)
    missing = "mask" if present == "images" else "image"
    with pytest.raises(DataError, match=rf"has {present}/ but no {missing} folder beside it"):
        load_segmentation(tmp_path)


def test_split_folder_without_a_pair_is_refused(tmp_path):
    _pairs(tmp_path / "train" / "images", tmp_path / "train" / "labels", 3)
    _pairs(tmp_path / "val" / "photos", tmp_path / "val" / "labels", 2)
    with pytest.raises(DataError, match=r"val holds labels/, photos/, not an image folder"):
        load_segmentation(tmp_path)


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match=r"nowhere is not found"):
        load_segmentation(tmp_path / "nowhere")


def test_mask_of_another_size_names_the_mask(tmp_path):
    _pairs(tmp_path / "images", tmp_path / "labels", 3)
    bad = _save(tmp_path / "labels" / "frame001.png", _mask(1, height=H + 1))
    with pytest.raises(DataError, match=r"is 8x7 but its image .*frame001\.png is 8x6") as error:
        load_segmentation(tmp_path)
    assert str(bad) in _one_line(error)


def test_image_without_a_mask_names_the_image(tmp_path):
    _pairs(tmp_path / "images", tmp_path / "labels", 3)
    lonely = _save(tmp_path / "images" / "lonely.png", _image(5))
    with pytest.raises(DataError, match=r"has no mask in .*add its mask or remove") as error:
        load_segmentation(tmp_path)
    assert _one_line(error).startswith(str(lonely))


def test_mask_without_an_image_names_the_mask(tmp_path):
    _pairs(tmp_path / "images", tmp_path / "labels", 3)
    orphan = _save(tmp_path / "labels" / "orphan.png", _mask(5))
    with pytest.raises(DataError, match=r"has no image in .*add the image or remove") as error:
        load_segmentation(tmp_path)
    assert _one_line(error).startswith(str(orphan))


def test_class_index_beyond_codes_names_the_mask(tmp_path):
    _pairs(tmp_path / "images", tmp_path / "labels", 4)
    (tmp_path / "codes.txt").write_text("a\nb\nc\n")
    mask = _mask(2)
    mask[2, 2] = 7
    bad = _save(tmp_path / "labels" / "frame002.png", mask)
    with pytest.raises(DataError, match=r"holds class index 7, but .*codes\.txt names 3") as error:
        load_segmentation(tmp_path)
    assert _one_line(error).startswith(str(bad))


def test_colour_mask_is_refused_as_one(tmp_path):
    _pairs(tmp_path / "images", tmp_path / "labels", 3)
    bad = _save(tmp_path / "labels" / "frame000.png", _image(50))
    with pytest.raises(DataError, match=r"is a colour mask .*class index") as error:
        load_segmentation(tmp_path)
    assert _one_line(error).startswith(str(bad))


@pytest.mark.parametrize("which", ["images", "labels"])
def test_unreadable_file_is_named(tmp_path, which):
    _pairs(tmp_path / "images", tmp_path / "labels", 3)
    bad = tmp_path / which / "frame001.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"cannot read image .*frame001\.png") as error:
        load_segmentation(tmp_path)
    assert str(bad) in _one_line(error)


def test_two_mask_folders_are_ambiguous(tmp_path):
    _pairs(tmp_path / "images", tmp_path / "labels", 3)
    _pairs(tmp_path / "images", tmp_path / "masks", 3)
    with pytest.raises(DataError, match=r"2 mask folders \(labels/, masks/\)"):
        load_segmentation(tmp_path)


def test_one_class_only_is_refused(tmp_path):
    for i in range(3):
        _save(tmp_path / "images" / f"z{i}.png", _image(i))
        _save(tmp_path / "labels" / f"z{i}.png", np.zeros((H, W), np.uint8))
    with pytest.raises(DataError, match=r"holds only class 0; segmentation needs at least two"):
        load_segmentation(tmp_path)


def test_valid_txt_naming_a_missing_image(tmp_path):
    _pairs(tmp_path / "images", tmp_path / "labels", 3)
    (tmp_path / "valid.txt").write_text("frame001.png\nghost.png\n")
    with pytest.raises(DataError, match=r"valid\.txt names 'ghost\.png'"):
        load_segmentation(tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"size": 0}, "size must be"),
        ({"size": (4, 0)}, "size must be"),
        ({"void": -1}, "void must be"),
        ({"codes": ["only"]}, "at least two classes"),
        ({"valid_pct": 1.0}, "valid_pct"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    _pairs(tmp_path / "images", tmp_path / "labels", 3)
    with pytest.raises(DataError, match=match):
        load_segmentation(tmp_path, **kwargs)


# --- the full CamVid copy -------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
# ../shared beside the clone (CI), or beside the main checkout for a worktree one level down.
SHARED_CAMVID = (
    next(
        (p for p in (ROOT.parent / "shared", ROOT.parents[1] / "shared") if p.is_dir()),
        ROOT.parent / "shared",
    )
    / "data"
    / "camvid"
)


@pytest.mark.slow
def test_shared_camvid_loads_in_the_segnet_split():
    if not SHARED_CAMVID.is_dir():
        pytest.skip(f"no CamVid copy at {SHARED_CAMVID} (../shared/data/camvid)")
    data = load_segmentation(SHARED_CAMVID)  # no codes.txt: named camvid, read as CamVid
    assert data.codes == CAMVID_CODES
    assert (len(data.train_y), len(data.valid_y), len(data.test_y)) == (367, 101, 233)
    assert data.size == (180, 240) and data.c == 11 and data.void == 11
    assert int(data.train_y.max()) == 11
