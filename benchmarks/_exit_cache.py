"""Train the deep-supervision benchmark's ResNet-style CNN with two heads once and cache what
`benchmarks/exit_guarantee.py` needs: each held-out image's head and main logits, its label,
and the FLOPs profile of the exits. No forward runs after this.

    OMP_NUM_THREADS=1 python benchmarks/_exit_cache.py --out runs/exit-guarantee/cache.pt
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import deep_supervision as ds

import auxhead
from auxhead.data import load_data
from auxhead.exits import flop_profile
from auxhead.fastai import AuxHeads


@torch.no_grad()
def logits_of(aux_model: auxhead.AuxModel, x: torch.Tensor, bs: int = 1000):
    """(N, E, K) head logits and (N, K) main logits, in eval mode."""
    aux_model.eval()
    heads, main = [], []
    with aux_model.heads_enabled():
        for i in range(0, len(x), bs):
            main.append(aux_model(x[i : i + bs]))
            heads.append(torch.stack([aux_model.aux_outputs[t] for t in aux_model.taps], dim=1))
    aux_model.clear_aux()
    return torch.cat(heads), torch.cat(main)


def build_parser() -> argparse.ArgumentParser:
    """The script's options (the docs' commands are parsed with it in tests/test_commands.py)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--calib-size", type=int, default=5000)
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--distill", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/exit-guarantee/cache.pt"))
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore")
    ds_args = argparse.Namespace(
        seed=args.seed,
        calib_size=args.calib_size,
        train_limit=args.train_limit,
        test_limit=None,
        curve_size=1000,
        epochs=args.epochs,
        lr=3e-3,
        bs=128,
    )
    start = time.perf_counter()
    data, (calib_x, calib_y) = ds.split(load_data("fashion-mnist"), ds_args)
    torch.manual_seed(args.seed)
    heads = AuxHeads(
        ds.B_TAPS, head="sdn", weights=0.3, head_metrics=False, temperature=3.0,
        distill=args.distill,
    )  # fmt: skip
    run = ds.train(ds.resnet_cnn(), data, ds_args, heads)
    aux_model = run["model"]
    held_heads, held_main = logits_of(aux_model, calib_x)
    test_heads, test_main = logits_of(aux_model, data.valid_x)
    profile = flop_profile(aux_model, data.valid_x[:2])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "taps": list(aux_model.taps),
            "held": {"heads": held_heads, "main": held_main, "y": calib_y},
            "test": {"heads": test_heads, "main": test_main, "y": data.valid_y},
            "profile": {"backbone": profile.backbone, "heads": profile.heads, "full": profile.full},
            "train": {
                "images": len(data.train_y),
                "epochs": args.epochs,
                "distill": args.distill,
                "seed": args.seed,
                "wall_s": run["wall_s"],
            },
        },
        args.out,
    )
    accuracy = (test_main.argmax(-1) == data.valid_y).float().mean().item()
    print(
        f"cached {len(calib_y)} held-out + {len(data.valid_y)} test images to {args.out}; "
        f"main test accuracy {accuracy:.2%}; {time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
