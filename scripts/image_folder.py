"""Write a small image-folder data set to try `auxhead train --data FOLDER` on: N Fashion-MNIST
test images of each class as PNG files, one subfolder per class (the layout of a user's own
photos).

    .venv/bin/python scripts/image_folder.py /tmp/fm600 --per-class 60
    .venv/bin/auxhead train --data /tmp/fm600
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from auxhead.data import load_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to create")
    parser.add_argument("--per-class", type=int, default=60, help="images per class (60)")
    parser.add_argument("--seed", type=int, default=0, help="which images (0)")
    args = parser.parse_args()
    data = load_data()  # Fashion-MNIST; its test split, so nothing here is in its training set
    rng = np.random.default_rng(args.seed)
    for k, name in enumerate(data.classes):
        folder = args.out / name.replace("/", "-")
        folder.mkdir(parents=True, exist_ok=True)
        members = (data.valid_y == k).nonzero().flatten().numpy()
        for i in rng.choice(members, args.per_class, replace=False):
            pixels = (data.valid_x[i, 0].numpy() * 255).round().astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    print(f"wrote {args.per_class} images of each of {data.c} classes to {args.out}")


if __name__ == "__main__":
    main()
