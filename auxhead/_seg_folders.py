"""Which files of a segmentation folder are which split, and which mask goes with which image.

Layouts accepted (folder names in any case; an image folder is one of `images/`, `image/`,
`imgs/`, `img/`, `JPEGImages/`, `img_dir/`, a mask folder one of `labels/`, `label/`,
`masks/`, `mask/`, `annotations/`, `ann/`, `anns/`, `ann_dir/`, `SegmentationClass/`, `gt/`):
- an image folder beside a mask folder, `FOLDER/images/` + `FOLDER/labels/` (fastai's CamVid,
  milesial's Pytorch-UNet `imgs/` + `masks/`, Pascal VOC's `JPEGImages/` +
  `SegmentationClass/`). Validation is the files a `valid.txt` beside them names (fastai's
  CamVid), or VOC's `ImageSets/Segmentation/val.txt` (with `train.txt`), or else a share the
  caller holds out;
- split folders each holding that pair, `FOLDER/{train,val,test}/{images,labels}/` (SegNet's
  CamVid, as in ../shared/data/camvid);
- an image folder and a mask folder each holding split folders, `FOLDER/images/{train,val}/` +
  `FOLDER/labels/{train,val}/` (mmsegmentation's `img_dir/` + `ann_dir/`, ADE20K).
Split folders are `train/` (`training/`), `val/` (`valid/`, `validation/`) and `test/`
(`testing/`); with `test/` and no val folder, `test/` is validation.

A mask goes with the image of the same stem, or of its stem less one of the suffixes `_P`
(fastai's CamVid), `_mask` (Carvana, Pytorch-UNet), `_label`, `_labels`, `_gt`, `_seg`. An
image without a mask, a mask without an image, or two files for one stem is refused in one line
naming the file, except in VOC's `JPEGImages/`, which also holds the detection-only images: there
images without a mask are left out, and said.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from auxhead._errors import DataError
from auxhead._folders import IMAGE_SUFFIXES, SPLITS

IMAGE_DIRS = ("images", "image", "imgs", "img", "jpegimages", "img_dir")
MASK_DIRS = (
    "labels", "label", "masks", "mask", "segmentationclass", "annotations", "ann", "anns",
    "ann_dir", "gt",
)  # fmt: skip
MASK_SUFFIXES = ("_P", "_mask", "_label", "_labels", "_gt", "_seg")
CODES_FILES = ("codes.txt", "classes.txt")
LAYOUTS = (
    "an image folder beside a mask folder (images/ + labels/, imgs/ + masks/, image/ + label/, "
    "img/ + ann/, JPEGImages/ + SegmentationClass/, img_dir/ + ann_dir/), at the top or in each "
    "of train/, val/ and test/, or each holding train/ and val/ folders"
)
_HIDDEN = {"thumbs.db", "desktop.ini"}


@dataclass
class Pairs:
    """One split's images and their masks, in the same order."""

    images: list[Path] = field(default_factory=list)
    masks: list[Path] = field(default_factory=list)


@dataclass
class SegLayout:
    """The image-mask pairs of a segmentation folder, by split."""

    train: Pairs
    valid: Pairs | None  # None: the caller holds out a share of `train`
    test: Pairs | None
    codes_file: Path | None  # codes.txt / classes.txt, if the folder has one
    notes: list[str]  # decisions to tell the user


def find_seg_layout(root: Path) -> SegLayout:
    """Sort the files of the segmentation folder `root` into splits of image-mask pairs.

    Raises:
        DataError: the layout is none of those accepted, or a file has no partner.
    """
    if not root.is_dir():
        what = "a file" if root.exists() else "not found"
        raise DataError(f"{root} is {what}; segmentation data is a folder holding {LAYOUTS}")
    folders = _folders(root)
    codes_file = next((root / n for n in CODES_FILES if (root / n).is_file()), None)
    notes: list[str] = []
    pair = _image_and_mask_dirs(root, folders)
    if pair is not None:
        image_dir, mask_dir = pair
        image_splits = _split_folders(image_dir)
        if image_splits:  # images/train + labels/train (mmsegmentation, ADE20K)
            splits = {}
            for split, folder in image_splits.items():
                masks = mask_dir / folder.name
                if not masks.is_dir() and split == "test":
                    notes.append(f"{folder} has no masks in {masks}/: left out")
                    continue
                if not masks.is_dir():
                    raise DataError(
                        f"{folder} has no partner {masks}/ holding its masks; a data folder "
                        f"holds {LAYOUTS}"
                    )
                splits[split] = _pair(folder, masks, notes)
            return _by_split(root, splits, codes_file, notes)
        pairs = _pair(image_dir, mask_dir, notes)
        return _listed_split(root, pairs, codes_file, notes)
    split_dirs = {p: SPLITS[p.name.lower()] for p in folders if p.name.lower() in SPLITS}
    images = [p for p in folders if p.name.lower() in IMAGE_DIRS]
    masks = [p for p in folders if p.name.lower() in MASK_DIRS]
    if not split_dirs and (images or masks):
        found, missing = (images, "mask") if images else (masks, "image")
        raise DataError(
            f"{root} has {_names(found)} but no {missing} folder beside it; a data folder holds "
            f"{LAYOUTS}"
        )
    if not split_dirs:
        raise DataError(
            f"{root} is not a segmentation folder: it holds {_names(folders) or 'no folders'}; "
            f"expected {LAYOUTS}"
        )
    others = [p for p in folders if p not in split_dirs]
    if others:
        raise DataError(
            f"{root} mixes split folders ({_names(list(split_dirs))}) with other folders "
            f"({_names(others)}); a data folder holds {LAYOUTS}"
        )
    splits = {}
    for folder, split in split_dirs.items():
        if split in splits:
            raise DataError(
                f"{root} has two folders for the {split} split ({_names(list(split_dirs))}); "
                "keep one"
            )
        pair = _image_and_mask_dirs(folder, _folders(folder))
        if pair is None and split == "test":  # a competition's test images come without masks
            notes.append(f"{folder} holds no image folder beside a mask folder: left out")
            continue
        if pair is None:
            raise DataError(
                f"{folder} holds {_names(_folders(folder)) or 'no folders'}, not an image folder "
                f"beside a mask folder; a data folder holds {LAYOUTS}"
            )
        splits[split] = _pair(*pair, notes)
    return _by_split(root, splits, codes_file, notes)


def _by_split(
    root: Path, splits: dict[str, Pairs], codes_file: Path | None, notes: list[str]
) -> SegLayout:
    if "train" not in splits:
        raise DataError(
            f"{root} has split folders but no train/ to train on; a data folder holds {LAYOUTS}"
        )
    valid, test = splits.get("valid"), splits.get("test")
    if valid is None and test is not None:
        notes.append(f"{root}: validation uses test/ (there is no val/ folder)")
        valid, test = test, None
    return SegLayout(splits["train"], valid, test, codes_file, notes)


def _listed_split(root: Path, pairs: Pairs, codes_file: Path | None, notes: list[str]):
    """A flat pair of folders: split by `valid.txt` (fastai's CamVid) or VOC's lists, if any."""
    voc = root / "ImageSets" / "Segmentation"
    if (root / "valid.txt").is_file():
        valid_names = _read_list(root / "valid.txt")
        train_names = None
        listed = root / "valid.txt"
    elif (voc / "val.txt").is_file():
        valid_names = _read_list(voc / "val.txt")
        train_names = _read_list(voc / "train.txt") if (voc / "train.txt").is_file() else None
        listed = voc / "val.txt"
    else:
        return SegLayout(pairs, None, None, codes_file, notes)
    by_stem = {image.stem: i for i, image in enumerate(pairs.images)}
    by_name = {image.name: i for i, image in enumerate(pairs.images)}
    valid_idx = []
    for name in valid_names:
        i = by_name.get(name, by_stem.get(Path(name).stem, by_stem.get(name)))
        if i is None:
            raise DataError(
                f"{listed} names {name!r}, which has no image with a mask; fix the list or add "
                "the image and its mask"
            )
        valid_idx.append(i)
    chosen = set(valid_idx)
    train_idx = [i for i in range(len(pairs.images)) if i not in chosen]
    if train_names is not None:
        keep = {Path(n).stem for n in train_names} | set(train_names)
        left = [i for i in train_idx if pairs.images[i].stem not in keep]
        if left:
            notes.append(
                f"{root}: {len(left)} image(s) with masks are in neither train.txt nor val.txt: "
                "left out"
            )
        train_idx = [i for i in train_idx if pairs.images[i].stem in keep]
    notes.append(f"{root}: validation is the {len(valid_idx)} image(s) {listed.name} names")

    def pick(idx: list[int]) -> Pairs:
        idx = sorted(idx)
        return Pairs([pairs.images[i] for i in idx], [pairs.masks[i] for i in idx])

    return SegLayout(pick(train_idx), pick(valid_idx), None, codes_file, notes)


def _read_list(path: Path) -> list[str]:
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read {path}: {error}; fix or remove it") from None
    return [line.strip() for line in lines if line.strip()]


def _image_and_mask_dirs(root: Path, folders: list[Path]) -> tuple[Path, Path] | None:
    """The one image folder and the one mask folder directly in `root`, or None if either is
    missing. A mask-named folder without images (VOC's `Annotations/` of XML files) does not
    count."""
    images = [p for p in folders if p.name.lower() in IMAGE_DIRS]
    masks = [p for p in folders if p.name.lower() in MASK_DIRS]
    if not images or not masks:
        return None
    if len(masks) > 1:
        masks = [p for p in masks if _holds_images(p)] or masks[:1]
    for found, what in ((images, "image"), (masks, "mask")):
        if len(found) > 1:
            raise DataError(
                f"{root} has {len(found)} {what} folders ({_names(found)}); keep one "
                f"(a data folder holds {LAYOUTS})"
            )
    return images[0], masks[0]


def _holds_images(folder: Path) -> bool:
    return any(
        p.suffix.lower() in IMAGE_SUFFIXES or (p.is_dir() and p.name.lower() in SPLITS)
        for p in folder.iterdir()
    )


def _split_folders(folder: Path) -> dict[str, Path]:
    """Split folders directly in an image folder (mmsegmentation's img_dir/train)."""
    found = {}
    for path in _folders(folder):
        split = SPLITS.get(path.name.lower())
        if split is not None:
            if split in found:
                raise DataError(
                    f"{folder} has {found[split].name}/ and {path.name}/, both read as the "
                    f"{split} split; keep one"
                )
            found[split] = path
    return found


def _pair(image_dir: Path, mask_dir: Path, notes: list[str]) -> Pairs:
    """Each image of `image_dir` with its mask in `mask_dir`, sorted by image name."""
    images = _image_files(image_dir, notes)
    masks = _image_files(mask_dir, notes)
    if not images:
        raise DataError(f"{image_dir} holds no images; put the images there, or point at the data")
    by_stem: dict[str, Path] = {}
    for image in images:
        if image.stem in by_stem:
            raise DataError(
                f"{image} and {by_stem[image.stem].name} share the stem {image.stem!r}, so a "
                "mask cannot tell which it labels; remove or rename one"
            )
        by_stem[image.stem] = image
    mask_of: dict[str, Path] = {}
    for mask in masks:
        stem = _image_stem(mask.stem, by_stem)
        if stem is None:
            raise DataError(
                f"{mask} has no image in {image_dir}/ (expected {image_dir.name}/{mask.stem}.* "
                f"or the name less a suffix {', '.join(MASK_SUFFIXES)}); add the image or "
                "remove the mask"
            )
        if stem in mask_of:
            raise DataError(
                f"{mask} and {mask_of[stem].name} are both masks of {by_stem[stem]}; keep one"
            )
        mask_of[stem] = mask
    unlabelled = [image for image in images if image.stem not in mask_of]
    if unlabelled and image_dir.name.lower() == "jpegimages":  # VOC: detection-only images
        notes.append(
            f"{image_dir}: {len(unlabelled)} image(s) without a mask in {mask_dir.name}/ are "
            "left out (VOC keeps its detection-only images there)"
        )
    elif unlabelled:
        image = unlabelled[0]
        more = f" (and {len(unlabelled) - 1} more)" if len(unlabelled) > 1 else ""
        raise DataError(
            f"{image} has no mask in {mask_dir}/{more} (expected {mask_dir.name}/{image.stem}.png "
            f"or {image.stem}_P.png, {image.stem}_mask.png...); add its mask or remove the image"
        )
    labelled = [image for image in images if image.stem in mask_of]
    return Pairs(labelled, [mask_of[image.stem] for image in labelled])


def _image_stem(mask_stem: str, images: dict[str, Path]) -> str | None:
    if mask_stem in images:
        return mask_stem
    for suffix in MASK_SUFFIXES:
        if mask_stem.endswith(suffix) and mask_stem[: -len(suffix)] in images:
            return mask_stem[: -len(suffix)]
    return None


def _image_files(folder: Path, notes: list[str]) -> list[Path]:
    """The image files directly in `folder`, sorted; other visible files are said in `notes`."""
    images, others = [], []
    for path in sorted(folder.iterdir()):
        if _hidden(path.name) or path.is_dir():
            continue
        (images if path.suffix.lower() in IMAGE_SUFFIXES else others).append(path)
    if others:
        some = ", ".join(p.name for p in others[:3]) + (" ..." if len(others) > 3 else "")
        notes.append(f"{folder}: skipped {len(others)} file(s) that are not images ({some})")
    return images


def _folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not _hidden(p.name))


def _hidden(name: str) -> bool:
    return name.startswith(".") or name.lower() in _HIDDEN or name == "__MACOSX"


def _names(paths: list[Path], most: int = 8) -> str:
    names = [f"{p.name}/" for p in paths[:most]]
    more = f" and {len(paths) - most} more" if len(paths) > most else ""
    return ", ".join(names) + more
