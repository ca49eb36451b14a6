"""Which files of an image folder are which split and class, and what was skipped.

Layouts accepted (split folder names in any case):
- class folders at the top, `FOLDER/<class>/<image>`: the caller holds out a share for
  validation;
- split folders each holding class folders (ImageNet, Imagenette, fastai's `from_folder`):
  `FOLDER/train/<class>/<image>` (or `training/`) with a validation split beside it named
  `val/`, `valid/` or `validation/`. With a `test/` (or `testing/`) folder too, validation is
  the val folder and the test folder is left out (kept for a final evaluation, as fastai and
  torchvision users keep it); with `test/` and no val folder, the test folder is validation;
  with `train/` alone, the caller holds out a share of it.
Anything else (split folders mixed with other folders, two folders for one split, a split
folder without class folders, a class only in the validation split) is refused in one line.

Images in nested folders count for the class folder above them. Skipped, and counted: hidden
files and folders (`.DS_Store`, macOS `._*` files, `.ipynb_checkpoints/`), `Thumbs.db` and
`desktop.ini`, `__MACOSX/` folders, files that are not images (by suffix), images outside the
class folders, and class folders without images.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from auxhead._errors import DataError

IMAGE_SUFFIXES = {
    ".bmp", ".gif", ".jpe", ".jpeg", ".jpg", ".pbm", ".pgm", ".png", ".pnm", ".ppm", ".tif",
    ".tiff", ".webp",
}  # fmt: skip
# Folder name (lower case) -> the split it holds.
SPLITS = {
    "train": "train",
    "training": "train",
    "val": "valid",
    "valid": "valid",
    "validation": "valid",
    "test": "test",
    "testing": "test",
}
_SYSTEM_FILES = {"thumbs.db", "desktop.ini"}
_MACOSX = "__MACOSX"
LAYOUTS = (
    "class folders at the top (FOLDER/<class>/<image>), or a train/ folder of class folders "
    "(FOLDER/train/<class>/<image>) alone or beside one of val/, valid/, validation/ or test/ "
    "laid out the same way"
)


@dataclass
class Skipped:
    """What a folder walk left out, by kind."""

    hidden: list[Path] = field(default_factory=list)  # dotfiles and -folders, Thumbs.db
    macosx: list[Path] = field(default_factory=list)  # __MACOSX/ folders
    not_images: list[Path] = field(default_factory=list)  # files with other suffixes
    outside: list[Path] = field(default_factory=list)  # images outside the class folders
    empty_classes: list[Path] = field(default_factory=list)  # class folders with no image

    def describe(self, root: Path) -> list[str]:
        """One line per kind found, with counts and a few of the names."""

        def some(paths: list[Path]) -> str:
            names = [_relative(p, root) for p in sorted(paths)[:3]]
            return ", ".join(names) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")

        files = [
            (self.hidden, "hidden file(s) or folder(s)"),
            (self.macosx, "__MACOSX/ folder(s)"),
            (self.not_images, "file(s) that are not images"),
            (self.outside, "image(s) outside the class folders"),
        ]
        parts = [f"{len(paths)} {what} ({some(paths)})" for paths, what in files if paths]
        lines = [f"{root}: skipped {'; '.join(parts)}"] if parts else []
        if self.empty_classes:
            lines.append(
                f"{root}: skipped {len(self.empty_classes)} class folder(s) without images "
                f"({some(self.empty_classes)})"
            )
        return lines


@dataclass
class Layout:
    """The files of an image folder, by split and class."""

    train: dict[str, list[Path]]  # class name -> image files
    valid: dict[str, list[Path]] | None  # None: hold out a share of `train`
    train_dir: Path
    valid_dir: Path | None
    notes: list[str]  # decisions to tell the user (which folder is validation, what was left)
    skipped: Skipped


def find_layout(root: Path) -> Layout:
    """Sort the files of the image folder `root` into splits and classes.

    Raises:
        DataError: the layout is none of those accepted, or it has fewer than two classes.
    """
    skipped = Skipped()
    folders, files = _entries(root, skipped)
    splits = [p for p in folders if p.name.lower() in SPLITS]
    if splits and len(splits) < len(folders):
        others = [p for p in folders if p not in splits]
        raise DataError(
            f"{root} mixes split folders ({_names(splits)}) with other folders "
            f"({_names(others)}); a data folder holds {LAYOUTS}"
        )
    skipped.outside += [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    skipped.not_images += [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    if not splits:
        train = _classes(root, folders, skipped)
        _check_classes(root, train, folders)
        return Layout(train, None, root, None, [], skipped)
    return _split_layout(root, splits, skipped)


def _split_layout(root: Path, splits: list[Path], skipped: Skipped) -> Layout:
    by_split: dict[str, list[Path]] = {"train": [], "valid": [], "test": []}
    for folder in splits:
        by_split[SPLITS[folder.name.lower()]].append(folder)
    for split, found in by_split.items():
        if len(found) > 1:
            raise DataError(
                f"{root} has {_names(found)}, each read as the {split} split; keep one "
                f"(a data folder holds {LAYOUTS})"
            )
    if not by_split["train"]:
        raise DataError(
            f"{root} has {_names(splits)} but no train/ folder to train on; a data folder "
            f"holds {LAYOUTS}"
        )
    train_dir = by_split["train"][0]
    notes = []
    valid_dir = (by_split["valid"] or by_split["test"] or [None])[0]
    if by_split["valid"] and by_split["test"]:
        notes.append(
            f"{root}: validation uses {valid_dir.name}/; {by_split['test'][0].name}/ is left out "
            "(kept for a final evaluation)"
        )
    elif valid_dir is not None and not by_split["valid"]:
        notes.append(f"{root}: validation uses {valid_dir.name}/ (there is no val/ folder)")
    train = _split_classes(train_dir, skipped)
    _check_classes(train_dir, train, _folders(train_dir))
    valid = None if valid_dir is None else _split_classes(valid_dir, skipped)
    if valid is not None and not valid:
        notes.append(f"{valid_dir} holds no images: it is not used")
        valid, valid_dir = None, None
    if valid is not None:
        only_valid = sorted(set(valid) - set(train))
        if only_valid:
            raise DataError(
                f"{valid_dir} has class(es) {', '.join(map(repr, only_valid))} that {train_dir} "
                "does not: a classifier cannot learn a class it never trains on; add its "
                f"training images under {train_dir}/, or remove it from {valid_dir}/"
            )
    return Layout(train, valid, train_dir, valid_dir, notes, skipped)


def _split_classes(split_dir: Path, skipped: Skipped) -> dict[str, list[Path]]:
    """The class folders of one split folder, refusing images that lie in it directly."""
    folders, files = _entries(split_dir, skipped)
    loose = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if loose and not folders:
        raise DataError(
            f"{split_dir} holds {len(loose)} image(s) but no class folders: put each class's "
            f"images in a folder named after the class ({split_dir}/<class>/<image>)"
        )
    skipped.outside += loose
    skipped.not_images += [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    return _classes(split_dir, folders, skipped)


def _check_classes(where: Path, by_class: dict[str, list[Path]], folders: list[Path]) -> None:
    if len(by_class) >= 2:
        return
    if not by_class:
        if any(p.suffix.lower() in IMAGE_SUFFIXES for p in _entries(where, Skipped())[1]):
            raise DataError(
                f"{where} holds images but no class subfolders: put each class's images in a "
                f"subfolder named after the class ({where}/<class>/<image>)"
            )
        raise DataError(
            f"{where} holds no images: expected one subfolder of images per class, a train/ "
            "folder of them, or the four idx files (train-images-idx3-ubyte, ...)"
        )
    (name,) = by_class
    hint = ""
    inner = _folders(where / name)
    if inner:  # the data set may be one level down, as unzipping often leaves it
        hint = f" (is {where / name} the data folder? it holds {_names(inner)})"
    raise DataError(
        f"{where} has a single class {name!r}; a classifier needs at least two class "
        f"subfolders{hint}"
    )


def _classes(where: Path, folders: list[Path], skipped: Skipped) -> dict[str, list[Path]]:
    """Image files by class (sorted), one class per folder, searched recursively."""
    by_class = {}
    for folder in folders:
        images = _images_under(folder, skipped)
        if images:
            by_class[folder.name] = images
        else:
            skipped.empty_classes.append(folder)
    return by_class


def _images_under(folder: Path, skipped: Skipped) -> list[Path]:
    images, seen = [], set()
    for parent, dirs, names in os.walk(folder, followlinks=True):  # symlinked folders too
        real = os.path.realpath(parent)
        if real in seen:  # a link back up the tree, or a second link to one folder
            dirs.clear()
            continue
        seen.add(real)
        parent_path = Path(parent)
        for name in list(dirs):
            if _is_hidden(name) or name == _MACOSX:
                dirs.remove(name)  # not walked into
                kind = skipped.macosx if name == _MACOSX else skipped.hidden
                kind.append(parent_path / name)
        for name in names:
            path = parent_path / name
            if _is_hidden(name):
                skipped.hidden.append(path)
            elif path.suffix.lower() in IMAGE_SUFFIXES:
                images.append(path)
            else:
                skipped.not_images.append(path)
    return sorted(images)


def _entries(folder: Path, skipped: Skipped) -> tuple[list[Path], list[Path]]:
    """The visible folders and files directly in `folder`, sorted; the rest go to `skipped`."""
    folders, files = [], []
    for path in sorted(folder.iterdir()):
        if path.name == _MACOSX:
            skipped.macosx.append(path)
        elif _is_hidden(path.name):
            skipped.hidden.append(path)
        elif path.is_dir():
            folders.append(path)
        else:
            files.append(path)
    return folders, files


def _folders(folder: Path) -> list[Path]:
    return _entries(folder, Skipped())[0]


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name.lower() in _SYSTEM_FILES


def _names(paths: list[Path], most: int = 8) -> str:
    names = [f"{p.name}/" for p in paths[:most]]
    more = f" and {len(paths) - most} more" if len(paths) > most else ""
    return ", ".join(names) + more


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)
