"""Early exits for a text classifier: a 6-layer transformer encoder trained from scratch on MR
with a head on every layer, and how many layers its exits skip at a bounded accuracy drop.

Per split (--splits random 90/10 splits of the 10,662 MR sentences, seeded 0, 1, ...):
`auxhead.data.load_mr` splits off 10% as the test set and trains a BPE tokenizer on the other
90%; --calib-pct of that 90% is held out for calibration (never trained on, never the test
set), and the encoder trains on the rest with `AuxLoss` (each head weighted --aux-weight).
Heads: `attach(model, ["layers.0", ..., "layers.4"], head="linear", pool="mean")` (the masked
mean over real tokens), the model's own classifier on layer 6 (mean-pooled too) as the main
output, so a sample leaving at head i has run i + 1 layers.

One pass over the calibration and test sentences caches every head's logits; every rule below
is then replayed from the cache:

    - ltt 90%: `choose_thresholds(max_accuracy_drop=--eps, confidence=0.9)` on the max-softmax
      scores of the calibration sentences (what `EarlyExit.calibrate` would do), and the same
      with `method="empirical"` (the plain fit, no guarantee);
    - DeeBERT: one entropy threshold shared by every layer (1 - H / log K), the cheapest whose
      drop on the calibration sentences is within --eps (DeeBERT tunes its threshold on dev
      data this way), and the same entropy scores under ltt 90%;
    - PABEE: patience k (k + 1 heads in a row agree; `auxhead.exits._patience`), each k in
      --patience; PABEE has no target to calibrate, so its drop is what it is;
    - both baselines at matched accuracy: the cheapest entropy threshold and the smallest
      patience whose TEST drop is no larger than max softmax's under ltt 90% (fitted on the
      test sentences: an optimistic bound for them).

Reported on the test sentences: the full model's accuracy (beside Kim 2014 CNN-rand, 76.1%),
mean layers run (exit depth), the speed-up in layers (6 / mean layers), FLOPs saved (the
encoder layers and the heads each sample runs at its own length, counted with
FlopCounterMode; the embedding costs none) and the accuracy drop against the full model;
across splits, how often the drop exceeded --eps.

Wall-clock, through `auxhead.EarlyExit` itself (staged: the encoder cut into stages from its
torch.export graph, the batch and its padding mask narrowed as sentences exit): the ltt 90%
max-softmax thresholds set on `EarlyExit(aux)`, DeeBERT's shared entropy threshold on
`EarlyExit(aux, criterion="entropy")` and PABEE with patience 1 as
`EarlyExit(aux, criterion="patience", patience=1)`, against the full model
(`model(input_ids=..., attention_mask=...)`, eval, no grad, the heads' hooks removed), the same
with PyTorch's fused encoder-layer kernel off, and `EarlyExit` with every exit off (thresholds
1), on --threads torch threads. At batch size 1, the first --time-sentences test sentences,
unpadded; at batch size 32, --time-batches batches of 32 test sentences drawn in shuffled
orders (padded to the longest of each batch). The four alternate which runs first, batch by
batch; the figure is the median over batches of seconds per sentence, and the speed-up full /
early. Batches that `EarlyExit` runs generic (outside its trace) are counted. The routing is
checked first: each test sentence's exit from `EarlyExit` (shuffled batches of 32) against
the exit the replay gives it from the cached logits. `EarlyExit.calibrate` on the
calibration sentences (a DataLoader of `TokenDataset.collate` batches) is run too: its
thresholds and their test figures are reported beside the replay's, with the replay's search
run again on the calibration sentences in the order, and with the seed, that calibrate reads
them; and so is `EarlyExit(aux, criterion="patience").calibrate`, with the patience it picks
and its test figures.

Commands (one process; --json keeps the raw results, --merge reports runs made apart):

    OMP_NUM_THREADS=1 python benchmarks/text_exits.py --data ../shared/data/mr --splits 5
    OMP_NUM_THREADS=1 python benchmarks/text_exits.py --first-split 4 --splits 1 --json a.json
    python benchmarks/text_exits.py --merge a.json b.json c.json

Without the data at --data it says so in one line and exits.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from torch.utils.flop_counter import FlopCounterMode

import auxhead
from auxhead.data import load_mr
from auxhead.exits import (
    FlopProfile,
    choose_thresholds,
    confidence,
    entropy_confidence,
    exit_indices,
    patience_exits,
)

KIM_CNN_RAND = 0.761  # Kim (2014), CNN-rand on MR, 10-fold cross-validation
DEPTH = 6
LTT = "max softmax, ltt 90%"
DEEBERT = "DeeBERT (one entropy threshold, fit on calib.)"
PABEE = "PABEE, patience 1"
TIMED = (LTT, DEEBERT, PABEE)  # the rules timed through EarlyExit


class Encoder(nn.Module):
    """Token ids and their attention mask (1 real, 0 padding) through `DEPTH` post-norm
    transformer layers; the masked mean of the last layer's tokens, classified."""

    def __init__(self, vocab: int, width: int, ff: int, heads: int, max_len: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(1, max_len, width) * 0.02)
        self.drop = nn.Dropout(0.1)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(width, heads, ff, dropout=0.1, batch_first=True)
            for _ in range(DEPTH)
        )
        self.fc = nn.Linear(width, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.emb(input_ids) + self.pos[:, : input_ids.shape[1]])
        pad = attention_mask == 0
        for layer in self.layers:
            h = layer(h, src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        return self.fc((h * keep).sum(1) / keep.sum(1).clamp(min=1))


def batches(dataset, rows: Sequence[int], size: int, generator: torch.Generator | None):
    """Padded batches of `rows`, sentences of similar length together (less padding); the
    batch order shuffled with `generator`, or in order when it is None."""
    rows = sorted(rows, key=lambda i: len(dataset.ids[i]))
    chunks = [rows[i : i + size] for i in range(0, len(rows), size)]
    if generator is not None:
        chunks = [chunks[i] for i in torch.randperm(len(chunks), generator=generator)]
    for chunk in chunks:
        yield chunk, dataset.batch(chunk)


def train(args: argparse.Namespace, data, fit_rows: list[int], seed: int):
    torch.manual_seed(seed)
    model = Encoder(data.vocab_size, args.width, args.ff, args.heads, args.max_length)
    taps = [f"layers.{i}" for i in range(DEPTH - 1)]
    sample = data.train.batch(fit_rows[:4])
    sample = {k: sample[k] for k in ("input_ids", "attention_mask")}
    aux = auxhead.attach(model, taps, head="linear", pool="mean", sample=sample)
    loss_fn = auxhead.AuxLoss(nn.CrossEntropyLoss(), aux, weights=args.aux_weight)
    opt = torch.optim.AdamW(aux.parameters(), lr=args.lr, weight_decay=0.01)
    steps = args.epochs * math.ceil(len(fit_rows) / args.bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    aux.train()
    for _ in range(args.epochs):
        for _, batch in batches(data.train, fit_rows, args.bs, generator):
            logits = aux(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            loss = loss_fn(logits, batch["labels"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return aux.eval()


@torch.no_grad()
def cache(aux, dataset, rows: list[int], layer_flops, head_flops: int) -> dict:
    """Every head's and the main output's logits on `rows`, their labels, and the per-sample
    FLOPs of layers (N, DEPTH) at each sentence's own length."""
    heads, main, labels, lengths, order = [], [], [], [], []
    with aux.heads_enabled():
        for chunk, batch in batches(dataset, rows, 256, None):
            order += chunk
            out = aux(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            heads.append(torch.stack(list(aux.aux_outputs.values()), dim=1))
            main.append(out)
            labels.append(batch["labels"])
            lengths += [len(dataset.ids[i]) for i in chunk]
    per_layer = torch.tensor([layer_flops(n) for n in lengths], dtype=torch.float64)
    return {
        "heads": torch.cat(heads).float(),  # (N, E, 2)
        "main": torch.cat(main).float(),  # (N, 2)
        "y": torch.cat(labels),
        "layer_flops": per_layer,  # (N,): one layer at this length
        "head_flops": head_flops,
        "rows": order,  # the dataset row of each cached sentence
    }


def flop_counter(aux, width: int):
    """(layer_flops(length), head_flops): one encoder layer on one sentence of that length,
    and one head (or the main classifier) on one pooled row, counted by FlopCounterMode."""
    layer = aux.model.layers[0]
    known: dict[int, int] = {}

    def layer_flops(n: int) -> int:
        if n not in known:
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                layer(torch.zeros(1, n, width), src_key_padding_mask=torch.zeros(1, n).bool())
            known[n] = counter.get_total_flops()
        return known[n]

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        aux.model.fc(torch.zeros(1, width))
    return layer_flops, counter.get_total_flops()


class Pool:
    """Cached logits of some sentences: correctness, scores by each criterion, FLOPs."""

    def __init__(self, c: dict) -> None:
        self.heads, self.main, self.y = c["heads"], c["main"], c["y"]
        n_exits = self.heads.shape[1]
        right = [self.heads[:, e].argmax(-1) == self.y for e in range(n_exits)]
        self.correct = torch.stack([*right, self.main.argmax(-1) == self.y], dim=1)
        self.layer, self.head = c["layer_flops"], c["head_flops"]
        self.rows = c["rows"]
        self.scores = {
            name: torch.stack([fn(self.heads[:, e]) for e in range(n_exits)], dim=1).double()
            for name, fn in (("confidence", confidence), ("entropy", entropy_confidence))
        }

    def profile(self) -> FlopProfile:
        """Mean per-sentence FLOPs, as `choose_thresholds` wants them."""
        layer = float(self.layer.mean())
        taps = [f"layers.{i}" for i in range(DEPTH - 1)]
        return FlopProfile(
            backbone={t: round(layer * (i + 1)) for i, t in enumerate(taps)},
            heads=dict.fromkeys(taps, self.head),
            full=round(layer * DEPTH) + self.head,
        )

    def measure(self, exits: torch.Tensor, heads_run: torch.Tensor) -> dict[str, float]:
        """Accuracy, layers and FLOPs of sending each sentence to `exits` (E: main), having run
        `heads_run` (N,) auxiliary heads on the way."""
        right = self.correct.gather(1, exits[:, None]).squeeze(1)
        depth = (exits + 1).double()  # head i sits on layer i + 1; the main output on layer 6
        flops = depth * self.layer + (heads_run + (exits == DEPTH - 1)) * self.head
        full = DEPTH * self.layer + self.head
        main = self.correct[:, -1].double().mean().item()
        acc = right.double().mean().item()
        return {
            "acc": acc,
            "drop": main - acc,
            "layers": depth.mean().item(),
            "flops_saved": 1 - (flops.sum() / full.sum()).item(),
        }

    def thresholded(self, criterion: str, thresholds: torch.Tensor) -> dict[str, float]:
        exits = exit_indices(self.scores[criterion], thresholds)
        active = (thresholds < 1).long()
        # heads run: every active head up to and including the one a sentence leaves at
        ran = torch.cumsum(torch.cat([active, active.new_zeros(1)]), 0)[exits]
        return self.measure(exits, ran.double())

    def patience(self, k: int) -> dict[str, float]:
        exits = patience_exits(list(self.heads.unbind(1)), k)
        ran = torch.clamp(exits + 1, max=DEPTH - 1).double()  # PABEE runs every head it reaches
        return self.measure(exits, ran)


def shared_fit(pool: Pool, criterion: str, eps: float) -> torch.Tensor:
    """DeeBERT's rule: one threshold for every exit, the cheapest (most sentences leaving
    early) whose drop on `pool` is within eps."""
    scores = pool.scores[criterion]
    best = torch.ones(DEPTH - 1, dtype=torch.float64)
    best_flops = 0.0
    for t in torch.cat([scores.flatten().unique(), torch.ones(1, dtype=torch.float64)]):
        thresholds = torch.full((DEPTH - 1,), float(t), dtype=torch.float64)
        result = pool.thresholded(criterion, thresholds)
        if result["drop"] <= eps + 1e-12 and result["flops_saved"] > best_flops:
            best, best_flops = thresholds, result["flops_saved"]
    return best


def rules(args: argparse.Namespace, calib: Pool, test: Pool, seed: int) -> dict[str, dict]:
    """Each rule's test-set figures, its thresholds fitted on `calib`."""
    out = {}
    profile = calib.profile()
    for criterion, label in (("confidence", "max softmax"), ("entropy", "entropy")):
        for method, name in (("ltt", "ltt 90%"), ("empirical", "plain fit")):
            choice = choose_thresholds(
                calib.scores[criterion], calib.correct, profile, max_accuracy_drop=args.eps,
                confidence=0.9, method=method, seed=seed,
            )  # fmt: skip
            thresholds = torch.tensor(choice.thresholds, dtype=torch.float64)
            out[f"{label}, {name}"] = test.thresholded(criterion, thresholds)
            out[f"{label}, {name}"]["thresholds"] = thresholds.tolist()
    thresholds = shared_fit(calib, "entropy", args.eps)
    out[DEEBERT] = test.thresholded("entropy", thresholds)
    out[DEEBERT]["thresholds"] = thresholds.tolist()
    for k in args.patience:
        out[f"PABEE, patience {k}"] = test.patience(k)
    # At matched accuracy (fitted on the test sentences themselves, so an optimistic bound for
    # the baselines): the cheapest entropy threshold, and the smallest patience, whose test
    # drop is no larger than that of max softmax under ltt 90%.
    target = out[LTT]["drop"]
    thresholds = shared_fit(test, "entropy", max(target, 0.0))
    out["DeeBERT, matched on test (oracle)"] = test.thresholded("entropy", thresholds)
    matched = [test.patience(k) for k in range(1, DEPTH)]
    out["PABEE, matched on test (oracle)"] = next(
        (m for m in matched if m["drop"] <= max(target, 0.0) + 1e-12), test.patience(DEPTH - 1)
    )
    return out


def _inputs(batch: dict) -> dict[str, torch.Tensor]:
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@torch.no_grad()
def wall_clock(
    aux,
    early: auxhead.EarlyExit,
    baseline: auxhead.EarlyExit,
    dataset,
    test: Pool,
    args: argparse.Namespace,
    seed: int,
) -> dict:
    """Through `early` (its thresholds set): each test sentence's exit against the replay's
    (`test`), and the median seconds per sentence of the full model (with PyTorch's fused
    encoder-layer kernel and without), of `early`, and of `baseline` (every exit off:
    the same stages, no sentence leaving; what routing costs or gains by itself),
    interleaved batch by batch (which runs first rotates),
    at batch size 1 (the first --time-sentences test sentences) and 32 (--time-batches
    shuffled batches)."""
    if early.criterion == "patience":
        replay = patience_exits(list(test.heads.unbind(1)), early.patience).tolist()
    else:
        thresholds = torch.tensor(early.thresholds, dtype=torch.float64)
        replay = exit_indices(test.scores[early.criterion], thresholds).tolist()
    replayed = dict(zip(test.rows, replay, strict=True))

    def full(inputs: dict) -> float:
        with aux.hooks_removed() as model:  # the model as it is served: no hooks on it
            start = time.perf_counter()
            model(**inputs)
            return time.perf_counter() - start

    def routed(inputs: dict, exits: auxhead.EarlyExit = early) -> float:
        start = time.perf_counter()
        exits(**inputs)
        return time.perf_counter() - start

    def plain(inputs: dict) -> float:  # without PyTorch's fused encoder-layer kernel
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            return full(inputs)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)

    def off(inputs: dict) -> float:
        return routed(inputs, baseline)

    def timed(chunks: list[list[int]]) -> dict[str, float]:
        runs = {
            "full_s": (full, []),
            "plain_s": (plain, []),
            "off_s": (off, []),
            "early_s": (routed, []),
        }
        names = list(runs)
        for index, chunk in enumerate(chunks):
            inputs = _inputs(dataset.batch(chunk))
            first = index % len(names)
            for name in names[first:] + names[:first]:
                fn, times = runs[name]
                times.append(fn(inputs) / len(chunk))
        out = {name: statistics.median(times) for name, (_, times) in runs.items()}
        out["speedup"] = out["full_s"] / out["early_s"]
        out["speedup_plain"] = out["plain_s"] / out["early_s"]
        out["speedup_off"] = out["off_s"] / out["early_s"]
        out["batches"] = len(chunks)
        return out

    generic, log = GenericCount(), logging.getLogger("auxhead.exits._early")
    level = log.level
    log.setLevel(logging.INFO)
    log.addHandler(generic)
    # The routing check (and the warm-up: the first call cuts the stages): every test
    # sentence once, in shuffled batches of 32.
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=generator).tolist()
    agree, right, depth = 0, 0, 0
    early.return_exits = True
    for i in range(0, len(order), 32):
        chunk = order[i : i + 32]
        batch = dataset.batch(chunk)
        logits, exits = early(**_inputs(batch))
        right += int((logits.argmax(-1) == batch["labels"]).sum())
        depth += int((exits + 1).sum())
        agree += sum(replayed[row] == e for row, e in zip(chunk, exits.tolist(), strict=True))
    early.return_exits = False
    result = {
        "thresholds": list(early.thresholds),
        "patience": early.patience if early.criterion == "patience" else None,
        "mode": early.mode,
        "acc": right / len(order),
        "layers": depth / len(order),
        "agree": agree / len(order),
    }
    if args.time_sentences:
        result["bs1"] = timed([[row] for row in range(min(args.time_sentences, len(dataset)))])
    if args.time_batches:
        chunks: list[list[int]] = []
        while len(chunks) < args.time_batches:  # full batches only, a new order each pass
            order = torch.randperm(len(dataset), generator=generator).tolist()
            chunks += [order[i : i + 32] for i in range(0, len(order) - 31, 32)]
        result["bs32"] = timed(chunks[: args.time_batches])
    log.removeHandler(generic)
    log.setLevel(level)
    result["generic_batches"] = generic.count  # run whole: outside the trace's shapes
    return result


class GenericCount(logging.Handler):
    """Counts the batches `EarlyExit` runs generic (shapes outside its trace)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += record.getMessage().startswith("EarlyExit runs this batch generic")


def calibrate_check(
    aux, data, calib_rows: list[int], args: argparse.Namespace
) -> tuple[list[float], int]:
    """The thresholds `EarlyExit.calibrate` picks on the calibration sentences (the same
    target as the replay's ltt 90% rule), read from a DataLoader of collated dicts, and the
    patience it picks for PABEE's rule."""
    loader = DataLoader(Subset(data.train, calib_rows), batch_size=64, collate_fn=data.collate)
    early = auxhead.EarlyExit(aux)
    early.calibrate(loader, max_accuracy_drop=args.eps, confidence=0.9, timing_batches=0)
    patient = auxhead.EarlyExit(aux, criterion="patience")
    patient.calibrate(loader, max_accuracy_drop=args.eps, confidence=0.9, timing_batches=0)
    return list(early.thresholds), patient.patience


def timed_exits(aux, name: str, found: dict) -> auxhead.EarlyExit:
    """The `EarlyExit` of a rule of TIMED."""
    if name == PABEE:
        return auxhead.EarlyExit(aux, criterion="patience", patience=1)
    criterion = "entropy" if name == DEEBERT else "confidence"
    return auxhead.EarlyExit(aux, criterion=criterion, thresholds=found[name]["thresholds"])


def run_split(args: argparse.Namespace, seed: int) -> dict:
    start = time.perf_counter()
    data = load_mr(
        args.data, valid_pct=0.1, seed=seed, vocab_size=args.vocab, max_length=args.max_length
    )
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed)).tolist()
    n_calib = round(args.calib_pct * len(order))
    calib_rows, fit_rows = order[:n_calib], order[n_calib:]
    aux = train(args, data, fit_rows, seed)
    layer_flops, head_flops = flop_counter(aux, args.width)
    calib = Pool(cache(aux, data.train, calib_rows, layer_flops, head_flops))
    test = Pool(cache(aux, data.valid, list(range(len(data.valid))), layer_flops, head_flops))
    heads_acc = test.correct.double().mean(0).tolist()
    found = rules(args, calib, test, seed)
    baseline = auxhead.EarlyExit(aux)  # thresholds 1: every exit off
    wall = {
        name: wall_clock(aux, timed_exits(aux, name, found), baseline, data.valid, test, args, seed)
        for name in TIMED
    }
    calibrated, patience = calibrate_check(aux, data, calib_rows, args)
    # The replay's search again, on the calibration sentences in the order calibrate reads
    # them (its DataLoader's) and with its seed (0): the betting test reads the samples in a
    # seeded random order of the data as given, so the order can change where it stops.
    position = {row: i for i, row in enumerate(calib.rows)}
    order = torch.tensor([position[row] for row in calib_rows])
    again = choose_thresholds(
        calib.scores["confidence"][order], calib.correct[order], calib.profile(),
        max_accuracy_drop=args.eps, confidence=0.9, seed=0,
    )  # fmt: skip
    check = {
        "thresholds": calibrated,
        "test": test.thresholded("confidence", torch.tensor(calibrated, dtype=torch.float64)),
        "replay_in_its_order": list(again.thresholds),
        "patience": patience,
        "patience_test": test.patience(patience),
    }
    result = {
        "seed": seed,
        "train": len(fit_rows),
        "calib": len(calib_rows),
        "test": len(data.valid),
        "full_acc": heads_acc[-1],
        "head_acc": heads_acc[:-1],
        "rules": found,
        "wall": wall,
        "calibrate": check,
        "seconds": time.perf_counter() - start,
    }
    print(
        f"split {seed}: {len(fit_rows)} train / {len(calib_rows)} calib / {len(data.valid)} test, "
        f"full model {heads_acc[-1]:.2%}, heads "
        + " ".join(f"{a:.1%}" for a in heads_acc[:-1])
        + f" ({result['seconds']:.0f} s)",
        file=sys.stderr,
        flush=True,
    )
    return result


def _speedup(r: dict, name: str, size: str) -> str:
    timing = (r.get("wall") or {}).get(name, {}).get(size)
    return f"{timing['speedup']:.2f}x" if timing else "-"


def report(args: argparse.Namespace, results: list[dict]) -> None:
    accs = [r["full_acc"] for r in results]
    print(
        "\n| split (seed) | full model test acc | heads 1-5 test acc | "
        "ltt 90%: layers run | speed-up (layers) | FLOPs saved | drop | "
        "wall-clock bs 1 | wall-clock bs 32 |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    for r in results:
        m = r["rules"][LTT]
        print(
            f"| {r['seed']} | {r['full_acc']:.2%} | "
            + " / ".join(f"{a:.1%}" for a in r["head_acc"])
            + f" | {m['layers']:.2f} | {DEPTH / m['layers']:.2f}x | {m['flops_saved']:.1%} | "
            f"{m['drop'] * 100:+.2f} pt | {_speedup(r, LTT, 'bs1')} | {_speedup(r, LTT, 'bs32')} |"
        )
    timed = [r for r in results if r.get("wall")]
    names = [name for name in TIMED if all(name in r["wall"] for r in timed)]
    if timed:
        print(
            f"\nWall-clock through auxhead.EarlyExit ({timed[0]['wall'][LTT]['mode']} mode), "
            "median seconds per sentence, interleaved batch by batch: the full model as PyTorch "
            "runs it (its fused encoder-layer fast path on), the same without the fast path, "
            "EarlyExit with every exit off (the stages alone), EarlyExit; speed-ups of the "
            "early exits over each."
        )
        for size, label in (("bs1", "batch size 1"), ("bs32", "batch size 32")):
            if not all(size in r["wall"][name] for r in timed for name in names):
                continue
            print(
                f"\n{label}:\n\n| rule | split | full | full, no fast path | exits off | early "
                "| speed-up | over no fast path | over exits off | layers run | drop | "
                "exits as replayed |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
            )
            for name in names:
                for r in timed:
                    w = r["wall"][name]
                    t = w[size]
                    print(
                        f"| {name} | {r['seed']} | "
                        + " | ".join(
                            f"{t[k] * 1e3:.3f} ms"
                            for k in ("full_s", "plain_s", "off_s", "early_s")
                        )
                        + f" | {t['speedup']:.2f}x | {t['speedup_plain']:.2f}x | "
                        f"{t['speedup_off']:.2f}x | {w['layers']:.2f} | "
                        f"{(r['full_acc'] - w['acc']) * 100:+.2f} pt | {w['agree']:.1%} |"
                    )
                means = [
                    statistics.fmean(r["wall"][name][size][k] for r in timed)
                    for k in ("speedup", "speedup_plain", "speedup_off")
                ]
                print(
                    f"| {name} | mean | | | | | **{means[0]:.2f}x** | {means[1]:.2f}x | "
                    f"{means[2]:.2f}x | "
                    f"{statistics.fmean(r['wall'][name]['layers'] for r in timed):.2f} | | |"
                )
        generic = sum(w.get("generic_batches", 0) for r in timed for w in r["wall"].values())
        print(f"\nbatches EarlyExit ran generic (outside its trace): {generic}")
        for r in timed:
            if "calibrate" not in r:
                continue
            c, m = r["calibrate"], r["rules"][LTT]

            def row(values: list[float]) -> str:
                return "[" + ", ".join(f"{t:.4f}" for t in values) + "]"

            print(
                f"split {r['seed']}: ltt 90% thresholds, replay {row(m['thresholds'])} (test: "
                f"{m['layers']:.2f} layers, drop {m['drop'] * 100:+.2f} pt); "
                f"EarlyExit.calibrate {row(c['thresholds'])} (test: {c['test']['layers']:.2f} "
                f"layers, drop {c['test']['drop'] * 100:+.2f} pt); the replay's search in "
                f"calibrate's order and seed {row(c['replay_in_its_order'])}"
            )
            if "patience" in c:
                t = c["patience_test"]
                print(
                    f"split {r['seed']}: EarlyExit(criterion='patience').calibrate picks "
                    f"patience {c['patience']} (test: {t['layers']:.2f} layers, drop "
                    f"{t['drop'] * 100:+.2f} pt)"
                )
    sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
    print(
        f"\nfull model: mean test accuracy {statistics.fmean(accs):.2%} (sd {sd:.2%}) over "
        f"{len(accs)} splits; Kim (2014) CNN-rand {KIM_CNN_RAND:.1%}"
    )
    print(
        f"\n| rule (fit on the calibration sentences) | mean layers run | speed-up (layers) | "
        f"FLOPs saved | mean test drop | worst drop | splits with drop > {args.eps * 100:.1f} pt |"
        "\n|---|---|---|---|---|---|---|"
    )
    for name in results[0]["rules"]:
        runs = [r["rules"][name] for r in results]
        layers = statistics.fmean(m["layers"] for m in runs)
        over = sum(m["drop"] > args.eps + 1e-12 for m in runs)
        print(
            f"| {name} | {layers:.2f} | {DEPTH / layers:.2f}x | "
            f"{statistics.fmean(m['flops_saved'] for m in runs):.1%} | "
            f"{statistics.fmean(m['drop'] for m in runs) * 100:+.2f} pt | "
            f"{max(m['drop'] for m in runs) * 100:+.2f} pt | {over} of {len(runs)} |"
        )


def build_parser() -> argparse.ArgumentParser:
    """The script's options (the docs' commands are parsed with it in tests/test_commands.py)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/mr"))
    parser.add_argument("--splits", type=int, default=5)
    parser.add_argument("--first-split", type=int, default=0, help="seed of the first split")
    parser.add_argument("--calib-pct", type=float, default=0.15, help="of the training part")
    parser.add_argument("--eps", type=float, default=0.01, help="the accuracy drop allowed")
    parser.add_argument("--patience", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--bs", type=int, default=32)
    parser.add_argument(
        "--lr", type=float, default=1e-3, help="2e-3 makes layer 1's head as good as the model"
    )
    parser.add_argument("--aux-weight", type=float, default=1.0, help="each head's weight")
    parser.add_argument("--width", type=int, default=64, help="d_model")
    parser.add_argument("--ff", type=int, default=128, help="feed-forward width")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument(
        "--time-sentences", type=int, default=300, help="bs-1 timing sentences (0: none)"
    )
    parser.add_argument(
        "--time-batches", type=int, default=100, help="bs-32 timing batches (0: none)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="save the raw results here")
    parser.add_argument(
        "--merge", type=Path, nargs="+", default=None, help="only report these --json files"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.merge:  # the tables of runs made apart (splits run side by side), from their --json
        results = [r for path in args.merge for r in json.loads(path.read_text())["results"]]
        report(args, sorted(results, key=lambda r: r["seed"]))
        return
    if not (args.data / "rt-polarity.pos").is_file():
        print(f"no MR data at {args.data} (rt-polarity.pos/.neg); pass --data", file=sys.stderr)
        raise SystemExit(2)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print(
        f"{args.splits} splits; {args.threads} torch thread(s); load average "
        f"{os.getloadavg()[0]:.2f} at the start",
        flush=True,
    )
    seeds = range(args.first_split, args.first_split + args.splits)
    results = [run_split(args, seed) for seed in seeds]
    report(args, results)
    print(
        f"\ntotal {time.perf_counter() - start:.0f} s; load average {os.getloadavg()[0]:.2f} "
        "at the end"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {"args": vars(args), "results": results}
        args.json.write_text(json.dumps(record, indent=1, default=str))


if __name__ == "__main__":
    main()
