"""The AC-GAN's variants side by side: same data, step budget, seed and evaluation.

For each data set and seed, three groups of runs, each one `run_acgan` (the code behind
`auxhead acgan`, so one evaluation classifier scores every run of a group):
  classic   the AC-GAN of the paper's era: BCE loss, BatchNorm discriminator, no EMA
            (`auxhead acgan`'s defaults before this benchmark)
  modern    hinge loss, spectral normalisation and a generator EMA (decay 0.999), with each
            conditioning: ac (AC-GAN), tac (TAC-GAN), adc (ADC-GAN), reacgan (ReACGAN) and
            projection (the projection discriminator, no auxiliary classifier)
  diffaug   modern AC-GAN with DiffAugment (translation, cutout) on every discriminator input
  ema       classic, with only the generator EMA added, for AC-GAN and ADC-GAN

Every figure is in the evaluation classifier's feature space, next to the real data's own
value (the floor): the share of samples recognised as their class, Frechet distance (FD) and
mean intra-class FD as multiples of their floors, improved precision and recall (k = 3), the
classification accuracy score (a classifier trained on the samples only, tested on real test
images) and the smallest per-class diversity ratio. Each (data, seed) is its own process, so
they can run in parallel:

    OMP_NUM_THREADS=1 python benchmarks/gan_conditioning.py --data fashion-mnist --seed 0
    OMP_NUM_THREADS=1 python benchmarks/gan_conditioning.py --data digits --seed 1
    python benchmarks/gan_conditioning.py --table      # every result under --out, one table

Each run writes its grids and report under --out/<data>-seed<seed>/<group>/ and the figures to
results.json there; --table reads them all.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from auxhead._format import table as format_table
from auxhead.cli.acgan import ACGANConfig, run_acgan
from auxhead.cli.report import write_acgan_report
from auxhead.data import load_data

# Every group spells out all four ingredients, so it does not move with the CLI's defaults.
CLASSIC = {"loss": "bce", "spectral_norm": False, "ema": 0.0, "augment": "none"}
MODERN = {**CLASSIC, "loss": "hinge", "spectral_norm": True, "ema": 0.999}
GROUPS = {
    "classic": {"conditioning": ("ac",), **CLASSIC},
    "modern": {"conditioning": ("ac", "tac", "adc", "reacgan", "projection"), **MODERN},
    "diffaug": {"conditioning": ("ac",), **MODERN, "augment": "translation,cutout"},
    "ema": {"conditioning": ("ac", "adc"), **CLASSIC, "ema": 0.999},  # classic + the EMA alone
}


def epochs_for(data: str, steps: int, bs: int) -> int:
    """Epochs that make at least `steps` optimizer steps of `bs` images on `data`."""
    n_train = len(load_data(data).train_y)
    return max(1, math.ceil(steps / max(1, n_train // bs)))


def run(data: str, seed: int, steps: int, groups: Sequence[str], out: Path, n_per_class: int):
    base = ACGANConfig(data=data, seed=seed, threads=1)
    base = replace(base, epochs=epochs_for(data, steps, base.bs), n_per_class=n_per_class)
    folder = out / f"{data}-seed{seed}"
    rows = []
    for group in groups:
        config = replace(base, out=folder / group, **GROUPS[group])
        config.out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        tag = f"[{data} {seed} {group}]"
        result = run_acgan(config, say=lambda line, tag=tag: print(f"  {tag} {line}", flush=True))
        write_acgan_report(result, config.out)
        report = result.as_json()
        for r in report["runs"]:
            rows.append(row(data, seed, group, r, report["reference"]))
        print(f"{data} seed {seed} {group}: {time.perf_counter() - start:.0f} s", flush=True)
    path = folder / "results.json"  # other groups' rows, from earlier runs, are kept
    kept = (
        [r for r in json.loads(path.read_text()) if r["group"] not in groups]
        if path.exists()
        else []
    )
    path.write_text(json.dumps(kept + rows, indent=1))
    return rows


def row(data: str, seed: int, group: str, r: dict, reference: dict) -> dict:
    cas = r["cas"] or {}
    return {
        "data": data,
        "seed": seed,
        "group": group,
        "variant": r["variant"],
        "steps_epochs": r["epochs"],
        "recognised": r["accuracy"]["overall"],
        "fd": r["fid"],
        "fd_floor": r["fid_floor"],
        "intra_fd": r["intra_fid"]["mean"],
        "intra_fd_floor": r["intra_fid_floor"]["mean"],
        "precision": r["precision"],
        "recall": r["recall"],
        "cas": cas.get("accuracy"),
        "cas_real": cas.get("real_accuracy"),
        "min_diversity_ratio": r["min_diversity_ratio"],
        "collapses": len(r["collapses"]),
        "train_seconds": r["train_seconds"],
        "grid": str(Path(r["out"]) / "grid.png"),
    }


def _fmt(values: list[float | None], digits: int = 2, percent: bool = False) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "-"
    if percent:
        return " / ".join(f"{v:.1%}" for v in known)
    return " / ".join(f"{v:.{digits}f}" for v in known)


def table(rows: list[dict]) -> str:
    """One line per (data, group, variant): the seeds' values side by side, 'a / b'."""
    keys = sorted({(r["data"], r["group"], r["variant"]) for r in rows}, key=_order(rows))
    lines = []
    for data, group, variant in keys:
        runs = sorted(
            (r for r in rows if (r["data"], r["group"], r["variant"]) == (data, group, variant)),
            key=lambda r: r["seed"],
        )
        ratio = [r["fd"] / r["fd_floor"] if r["fd_floor"] else None for r in runs]
        intra = [
            r["intra_fd"] / r["intra_fd_floor"] if r["intra_fd"] and r["intra_fd_floor"] else None
            for r in runs
        ]
        lines.append(
            [
                data,
                f"{variant} ({group})",
                ", ".join(str(r["seed"]) for r in runs),
                _fmt([r["recognised"] for r in runs], percent=True),
                _fmt(ratio, 1),
                _fmt(intra, 1),
                _fmt([r["precision"] for r in runs]),
                _fmt([r["recall"] for r in runs]),
                _fmt([r["cas"] for r in runs], percent=True)
                + f" ({_fmt([r['cas_real'] for r in runs], percent=True)})",
                _fmt([r["min_diversity_ratio"] for r in runs]),
                " / ".join(str(r["collapses"]) for r in runs),
                _fmt([r["train_seconds"] for r in runs], 0),
            ]
        )
    header = [
        "data", "variant", "seeds", "recognised", "FD / floor", "intra-FD / floor",
        "precision", "recall", "CAS (real-trained)", "min diversity", "collapses", "train s",
    ]  # fmt: skip
    return format_table(header, lines, markdown=True)


def _order(rows: list[dict]):
    groups = list(GROUPS)
    variants = ["AC-GAN", "TAC-GAN", "ADC-GAN", "ReACGAN", "projection GAN"]

    def key(k):
        data, group, variant = k
        v = variants.index(variant) if variant in variants else len(variants)
        return (data, groups.index(group), v)

    return key


def build_parser() -> argparse.ArgumentParser:
    """The script's options (the docs' commands are parsed with it in tests/test_commands.py)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=["fashion-mnist", "digits"], default="fashion-mnist")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1400, help="optimizer steps of each GAN")
    parser.add_argument("--groups", nargs="+", choices=list(GROUPS), default=list(GROUPS))
    parser.add_argument("--n-per-class", type=int, default=300, help="samples evaluated")
    parser.add_argument("--out", type=Path, default=Path("runs/gan-conditioning"))
    parser.add_argument("--table", action="store_true", help="print the table of --out's runs")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore")
    if not args.table:
        torch.set_num_threads(1)
        run(args.data, args.seed, args.steps, args.groups, args.out, args.n_per_class)
    rows = [
        row
        for path in sorted(args.out.glob("*/results.json"))
        for row in json.loads(path.read_text())
    ]
    print(
        f"\n{len(rows)} runs under {args.out}; seeds side by side as 'a / b'; every figure in "
        "the evaluation classifier's feature space\n"
    )
    print(table(rows))
    by_group: dict[str, list[float]] = {}
    for r in rows:
        if r["fd_floor"]:
            by_group.setdefault(f"{r['data']} {r['variant']} ({r['group']})", []).append(
                r["fd"] / r["fd_floor"]
            )
    if by_group:
        best = min(by_group, key=lambda k: statistics.mean(by_group[k]))
        print(f"\nlowest mean FD / floor: {best}")


if __name__ == "__main__":
    main()
