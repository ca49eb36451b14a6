"""`auxhead train` and `auxhead layers` as a user drives them: `main(argv)` in process for the
error paths (seconds each), one tiny real run shared by several tests, and subprocesses (Ctrl-C,
an export loaded without auxhead, determinism) marked slow."""

import contextlib
import io
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_same_state, error_line, process_state

from auxhead import __version__
from auxhead.cli import main
from auxhead.cli._common import LOCK_NAME, MIXED_SIZE
from auxhead.cli.layers import LayersConfig, run_layers
from auxhead.cli.train import (
    DEFAULT_BS,
    DEFAULT_EPOCHS,
    DEFAULT_LR,
    MIN_STEPS,
    TrainConfig,
    plan_budget,
)

QUICK = ["--data", "digits", "--limit", "300", "--epochs", "1", "--bs", "32", "--threads", "1"]
# The fixture's run, repeated by the determinism test.
FULL = [*QUICK, "--compare", "--early-exit", "--confidence", "0.9"]


def auxhead(*args, cwd=None, timeout=240):
    return subprocess.run(
        [sys.executable, "-m", "auxhead", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
    )


@pytest.fixture(autouse=True)
def _threads_are_left_alone():
    threads = torch.get_num_threads()  # --threads 1 sets them for the run only
    yield
    assert torch.get_num_threads() == threads


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    before = process_state()
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        code = main(["train", *FULL, "--out", str(out)])
    return code, stdout.getvalue(), out, (before, process_state())


# Budgets -------------------------------------------------------------------------------------


def test_budget_keeps_fashion_mnist_defaults():
    budget = plan_budget(60_000, TrainConfig())
    assert (budget.bs, budget.lr, budget.epochs) == (DEFAULT_BS, DEFAULT_LR, DEFAULT_EPOCHS)
    assert budget.steps_per_epoch == 60_000 // 256 and budget.why == "the defaults"


def test_budget_on_small_data_gets_smaller_batches_and_more_epochs():
    budget = plan_budget(1438, TrainConfig())  # digits' training split
    assert budget.bs == 32  # 64 would give 22 steps an epoch, fewer than 32
    assert budget.steps_per_epoch == 1438 // 32
    assert budget.epochs == math.ceil(MIN_STEPS / 44) and budget.steps >= MIN_STEPS
    assert budget.lr == pytest.approx(float(f"{DEFAULT_LR * math.sqrt(32 / 256):.2g}"))
    assert "batch size 32" in budget.why and "300 steps" in budget.why
    tiny = plan_budget(480, TrainConfig())  # 10 classes x 60 images, a fifth held out
    assert tiny.bs == 16 and tiny.steps_per_epoch == 30 and tiny.epochs == 10


def test_budget_options_override():
    assert plan_budget(1438, TrainConfig(epochs=3)).epochs == 3
    steps = plan_budget(1438, TrainConfig(steps=100, bs=64))
    assert (steps.bs, steps.steps_per_epoch, steps.epochs) == (64, 22, 5)
    assert plan_budget(1438, TrainConfig(lr=0.1)).lr == 0.1
    assert plan_budget(10, TrainConfig(bs=256)).bs == 10  # never more than the data
    for config in (TrainConfig(), TrainConfig(bs=256)):  # the reason gives the batch used
        assert "batch size 5 for 5 training images" in plan_budget(5, config).why
    assert "batch size" not in plan_budget(1438, TrainConfig(bs=64)).why  # as given


# One real run --------------------------------------------------------------------------------


def test_train_writes_the_report(quick_run):
    code, stdout, out, _ = quick_run
    assert code == 0, stdout[-3000:]
    for name in ("report.md", "report.json", "heads.png", "compute.png", "model.pkl",
                 "checkpoint.pth"):  # fmt: skip
        assert (out / name).is_file(), name
    assert not (out / LOCK_NAME).exists() and not list(out.glob(".*tmp*"))
    report = json.loads((out / "report.json").read_text())
    assert report["data"] == "digits" and report["arch"] == "small_cnn"
    assert set(report["heads"]) == {"stage1", "stage2"}
    for head in report["heads"].values():
        assert 0.0 <= head["accuracy"] <= 1.0 and head["flops"] > 0
    assert report["heads"]["stage1"]["flops"] < report["main_flops"]
    assert isinstance(report["baseline_accuracy"], float)
    assert report["budget"]["bs"] == 32 and report["budget"]["epochs"] == 1
    assert report["early_exit"]["test"]["exits"] == ["stage1", "stage2", "main"]
    # --limit 300: a fifth (60) of the training images are held out for calibration
    assert report["early_exit"]["n_calibration"] == 60
    # a held-out set that small is worth a warning, printed and in the report
    assert any("only 60 held-out images" in w for w in report["warnings"])
    assert "warning: early exit: calibrating on only 60" in stdout
    assert "budget: 1 epoch of 7 steps (7 steps), batch size 32" in stdout  # 240 images
    assert "--epochs given" in stdout
    for name in ("stage1", "stage2", "main (final layer)", "baseline (no heads)"):
        assert name in stdout
    md = (out / "report.md").read_text()
    assert "## Exits" in md and "## Early exit" in md and "![accuracy per epoch](heads.png)" in md
    assert "only 60 held-out images" in md
    assert "1 epoch of one-cycle" in md and "1 epochs" not in md
    # the early-exit table counts every head run on the way; the exits table one head alone
    assert "FLOPs to leave here" in md and "FLOPs to leave here" in stdout
    assert "every head that runs on the way" in md and "counts each exit alone" in stdout
    assert "- `report.md`: this report" in md and "report_md" not in md


def test_warnings_that_matter_are_printed_and_reported(tmp_path, capsys):
    # heads with weight 0 get no gradient; no exit can be used within a drop of 0
    argv = ["train", *QUICK, "--aux-weight", "0", "--early-exit", "--max-drop", "0",
            "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err[-3000:]
    stdout = capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    for tap in ("stage1", "stage2"):
        message = f"the head at '{tap}' did not train"
        assert f"warning: {message}" in stdout
        assert any(w.startswith(message) for w in report["warnings"])
    assert report["early_exit"]["fallback_to_main"] is True
    assert any("main head" in w for w in report["warnings"] if "did not train" not in w)
    assert "fell back to the main head for every sample" in (tmp_path / "report.md").read_text()


def test_a_run_puts_back_the_threads_seeds_and_cudnn_flags(quick_run):
    _, _, _, (before, after) = quick_run  # --threads 1, seeded, cuDNN deterministic inside
    assert_same_state(before, after)


def test_seeded_and_torch_threads_put_back_what_they_change():
    from auxhead.cli._state import seeded, torch_threads

    before = process_state()
    threads = 1 if before["threads"] != 1 else 2
    with torch_threads(threads), seeded(3):
        assert torch.get_num_threads() == threads
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        first = (torch.rand(2), random.random(), np.random.rand())
    assert_same_state(before, process_state())
    with seeded(3):
        again = (torch.rand(2), random.random(), np.random.rand())
    torch.testing.assert_close(again[0], first[0], rtol=0, atol=0)
    assert again[1:] == first[1:]


def test_checkpoint_has_heads(quick_run):
    _, _, out, _ = quick_run
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=False)
    assert checkpoint["epoch"] == 1 and checkpoint["taps"] == ["stage1", "stage2"]
    assert any(k.startswith("heads.") for k in checkpoint["state_dict"])


@pytest.mark.slow
def test_export_loads_without_auxhead(quick_run):
    _, _, out, _ = quick_run
    script = (
        "import sys; sys.modules['auxhead'] = None\n"
        "from fastai.learner import load_learner\n"
        f"learn = load_learner({str(out / 'model.pkl')!r})\n"
        "print(type(learn.model).__name__)\n"
    )
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=out)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.strip() == "Sequential"


@pytest.mark.slow
def test_same_seed_same_numbers(quick_run, tmp_path):
    _, _, first, _ = quick_run
    again = auxhead("train", *FULL, "--out", tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    a = json.loads((first / "report.json").read_text())
    b = json.loads((tmp_path / "report.json").read_text())
    for key in ("main_accuracy", "heads", "baseline_accuracy", "history"):
        assert a[key] == b[key], key


# Bad input: one line, exit 2 -------------------------------------------------------------------


def _png(path: Path, value: int = 128, mode: str = "L") -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (8, 8), value).save(path)


def test_bad_data_one_clear_line(tmp_path, capsys):
    out = ["--out", tmp_path / "o"]
    assert "nope" in error_line(capsys, ["train", "--data", tmp_path / "nope", *out])
    (tmp_path / "empty").mkdir()
    assert "empty" in error_line(capsys, ["train", "--data", tmp_path / "empty", *out])
    _png(tmp_path / "one" / "cat" / "a.png")
    _png(tmp_path / "one" / "cat" / "b.png")
    assert "class" in error_line(capsys, ["train", "--data", tmp_path / "one", *out])
    _png(tmp_path / "bad" / "cat" / "a.png")
    (tmp_path / "bad" / "dog").mkdir()
    (tmp_path / "bad" / "dog" / "b.png").write_bytes(b"not an image")
    assert "b.png" in error_line(capsys, ["train", "--data", tmp_path / "bad", *out])


def test_images_of_mixed_sizes_are_resized_to_the_size_asked_or_said(tmp_path, capsys):
    for k, name in enumerate(("cat", "dog")):
        for i in range(6):
            _png(tmp_path / "pets" / name / f"{i}.png", value=60 + 120 * k)
    from PIL import Image

    Image.new("L", (12, 10), 30).save(tmp_path / "pets" / "dog" / "big.png")
    for size, said in ((["--size", "8"], None), ([], MIXED_SIZE)):
        argv = ["train", "--data", tmp_path / "pets", *size, "--epochs", "1",
                "--threads", "1", "--out", tmp_path / "o"]  # fmt: skip
        assert main([str(a) for a in argv]) == 0, capsys.readouterr().err[-2000:]
        out = capsys.readouterr().out
        report = json.loads((tmp_path / "o" / "report.json").read_text())
        assert report["classes"] == ["cat", "dog"] and report["n_train"] + report["n_test"] == 13
        assert report["config"]["size"] == (None if said else 8)
        resized = f"resizing every image to {MIXED_SIZE}x{MIXED_SIZE} (--size N chooses)"
        assert (resized in out) == bool(said)
        if said:
            assert "big.png is 12x10" in out
    result = run_layers(LayersConfig(arch="small_cnn", data=tmp_path / "pets"), say=print)
    assert result.input_shape == (1, MIXED_SIZE, MIXED_SIZE)
    assert "resizing every image" in capsys.readouterr().out


def test_a_class_without_a_held_out_image_gets_a_line_in_the_report(tmp_path, capsys, caplog):
    for k, name in enumerate(("cat", "dog")):
        for i in range(6):
            _png(tmp_path / "pets" / name / f"{i}.png", value=60 + 120 * k)
    _png(tmp_path / "pets" / "bird" / "0.png", value=250)  # one image: none held out
    out = tmp_path / "o"
    argv = ["train", "--data", tmp_path / "pets", "--epochs", "1", "--threads", "1", "--out", out]
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err[-2000:]
    # load_data's note, logged once when the folder is read (the run adds no second warning)
    notes = [r.getMessage() for r in caplog.records if r.name == "auxhead.data"]
    assert [n for n in notes if "held-out" in n] == [notes[0]]
    assert "no held-out image for class(es) 'bird' (1 image)" in notes[0]
    assert "without a held-out image" not in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    per_class = {c["name"]: c for c in report["per_class"]}
    assert report["classes"] == ["bird", "cat", "dog"]
    assert per_class["bird"] == {"name": "bird", "n_test": 0, "accuracy": None}
    assert per_class["cat"]["n_test"] >= 1 and set(per_class["cat"]["accuracy"]) == {
        *report["taps"],
        "main",
    }
    markdown = (out / "report.md").read_text()
    assert "| bird | 0 | no held-out image: not in any test figure |" in markdown
    assert "no held-out image for class(es) 'bird'" in markdown  # the note, in the report too
    assert report["data_notes"] == [n for n in report["data_notes"] if "'bird'" in n]


def _idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape
    )
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_one_class_idx_folder_is_refused(tmp_path, capsys):
    folder = tmp_path / "mnist"
    folder.mkdir()
    images = np.zeros((20, 8, 8))
    _idx(folder / "train-images-idx3-ubyte", images)
    _idx(folder / "t10k-images-idx3-ubyte", images[:5])
    _idx(folder / "train-labels-idx1-ubyte", np.zeros(20))
    _idx(folder / "t10k-labels-idx1-ubyte", np.zeros(5))
    line = error_line(capsys, ["train", "--data", folder, "--out", tmp_path / "o"])
    assert "every label in its idx files is 0" in line and "two classes" in line


def test_bad_model_or_layer(tmp_path, capsys):
    out = ["--out", tmp_path / "o"]
    arch = error_line(capsys, ["train", *QUICK, "--arch", "resnet9000", *out])
    assert "--arch" in arch and "resnet9000" in arch and "resnet50" in arch
    layer = error_line(capsys, ["train", *QUICK, "--at", "stage7", *out])
    assert layer == (
        "auxhead: error: --at stage7: no such layer in small_cnn (close matches: stage3, stage2, "
        "stage1, stage3.1, stage3.0); `auxhead layers --arch small_cnn` lists every layer"
    )
    vit = error_line(capsys, ["train", *QUICK, "--arch", "vit_b_16", *out])
    assert "--arch vit_b_16 does not run on 1x8x8 images" in vit and "--size" in vit
    twice = error_line(
        capsys, ["train", *QUICK, "--arch", "resnet18", "--at", "layer1.0.relu", *out]
    )
    assert "runs 2 times" in twice and "auxhead layers --arch resnet18" in twice
    assert "--head linear" not in twice
    inception = error_line(
        capsys, ["train", *QUICK, "--arch", "inception_v3", "--at", "Mixed_5b", *out]
    )
    assert "--arch inception_v3 does not run on 1x8x8 images" in inception
    assert "--size N" in inception


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--lr", "inf"], "--lr: must be a finite number, got inf"),
        (["--lr", "nan"], "--lr: must be a finite number, got nan"),
        (["--lr", "0"], "--lr: must be > 0, got 0"),
        (["--aux-weight", "nan"], "--aux-weight: must be a finite number, got nan"),
        (["--aux-weight", "-1"], "--aux-weight: must be >= 0, got -1"),
        (["--threads", "0"], "--threads: must be at least 1, got 0"),
        (["--max-drop", "5"], "--max-drop: must be in [0, 1], got 5"),
        (["--distill", "2"], "--distill: must be in [0, 1], got 2"),
        (["--weights", "0.3"], "unrecognized arguments: --weights"),
    ],
)
def test_bad_option_values_are_refused_by_the_parser(tmp_path, capsys, argv, expected):
    assert main(["train", *argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_options_that_cannot_work_are_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "o"
    bs = error_line(capsys, ["train", *QUICK, "--bs", "1", "--out", out])
    assert "--bs 1" in bs and "at least 2" in bs
    confidence = error_line(capsys, ["train", *QUICK, "--confidence", "1.5", "--out", out])
    assert "--confidence is a probability in (0, 1)" in confidence and "1.5" in confidence
    both = error_line(capsys, ["train", *QUICK, "--steps", "10", "--out", out])
    assert "--epochs and --steps" in both
    assert not out.exists()


def test_early_exit_needs_held_out_images(tmp_path, capsys):
    line = error_line(capsys, ["train", *QUICK, "--limit", "3", "--early-exit", "--out", tmp_path])
    assert "--early-exit" in line and "raise --limit to 250 or more" in line
    for k, name in enumerate(("cat", "dog")):  # a small folder: no --limit to raise
        for i in range(6):
            _png(tmp_path / "pets" / name / f"{i}.png", value=60 + 120 * k)
    argv = ["train", "--data", tmp_path / "pets", "--early-exit", "--out", tmp_path / "o"]
    line = error_line(capsys, argv)
    assert "use a data set with at least 250 training images" in line and "--limit" not in line


def test_non_finite_loss_stops_with_one_line(tmp_path, capsys):
    line = error_line(capsys, ["train", *QUICK, "--limit", "64", "--aux-weight", "1e38",
                               "--out", tmp_path])  # fmt: skip
    assert "training loss became inf at epoch 1, step 1" in line and "--aux-weight" in line
    assert not (tmp_path / "report.md").exists()


def test_a_non_finite_head_loss_stops_with_one_line(tmp_path, capsys, monkeypatch):
    import auxhead.cli.train as train

    def diverge(learn, budget, fine_tune):  # what AuxLoss raises, as fastai rewrites it
        raise FloatingPointError(
            "Exception occured in `AuxHeads` when calling event `after_loss`:\n"
            "\tthe aux loss of head 'stage1' is not finite (tensor([nan]))"
        )

    monkeypatch.setattr(train, "_fit", diverge)
    line = error_line(capsys, ["train", *QUICK, "--limit", "64", "--out", tmp_path])
    assert "the aux loss of head 'stage1' is not finite" in line
    assert "training diverged; likely cause: --lr 0.0014 too high" in line  # bs 32


# --out -----------------------------------------------------------------------------------------


def test_bad_out_is_refused(tmp_path, capsys):
    assert "--out is empty" in error_line(capsys, ["train", *QUICK, "--out", ""])
    file = tmp_path / "file.txt"
    file.write_text("mine")
    assert "is a file" in error_line(capsys, ["train", *QUICK, "--out", file])
    below_a_file = error_line(capsys, ["train", *QUICK, "--out", file / "run"])
    assert "--out" in below_a_file and "cannot be used" in below_a_file
    assert below_a_file.endswith("choose another folder")  # the way out
    assert file.read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into a read-only folder")
def test_unwritable_out_is_refused_before_training(tmp_path, capsys):
    tmp_path.chmod(0o500)
    try:
        line = error_line(capsys, ["train", *QUICK, "--out", tmp_path / "run"])
    finally:
        tmp_path.chmod(0o700)
    assert "--out" in line and "not writable" in line


def test_an_earlier_runs_report_is_removed_when_a_run_starts(tmp_path, capsys):
    for name in ("report.md", "report.json", "checkpoint.pth", "notes.txt"):
        (tmp_path / name).write_text("earlier run")
    error_line(capsys, ["train", "--data", tmp_path / "nope", "--out", tmp_path])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # not ours: kept


def test_a_second_run_into_the_same_out_is_refused(tmp_path, capsys):
    (tmp_path / LOCK_NAME).write_text(f"{os.getppid()}\n")  # a live process holds it
    (tmp_path / "report.md").write_text("the other run's")
    line = error_line(capsys, ["train", *QUICK, "--out", tmp_path])
    assert f"in use by another auxhead run (process {os.getppid()})" in line
    assert (tmp_path / "report.md").read_text() == "the other run's"
    assert (tmp_path / LOCK_NAME).exists()


def test_a_stale_lock_is_taken_over(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(f"{dead.pid}\n")
    line = error_line(capsys, ["train", "--data", tmp_path / "nope", "--out", tmp_path])
    assert "nope" in line  # got past the lock
    assert not (tmp_path / LOCK_NAME).exists()  # and released it


# Interrupts, bugs, --debug, help -----------------------------------------------------------------


def test_ctrl_c_names_only_files_that_exist(tmp_path, capsys, monkeypatch):
    import auxhead.cli.train as train

    (tmp_path / "checkpoint.pth").write_text("an earlier run's")

    def interrupted(config, say):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "run_train", interrupted)
    assert main(["train", "--out", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert "interrupted; no epoch completed, so nothing was saved" in err
    assert not (tmp_path / "checkpoint.pth").exists()

    def after_one_epoch(config, say):
        (config.out / "checkpoint.pth").write_text("epoch 1")
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "run_train", after_one_epoch)
    assert main(["train", "--out", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert f"the last completed epoch is in {tmp_path / 'checkpoint.pth'}" in err
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_bug_shows_its_traceback_and_asks_for_a_report(tmp_path, capsys, monkeypatch):
    import auxhead.cli.train as train

    def broken(config, say):
        raise KeyError("an internal key")  # not the user's fault: no 'usage error'

    monkeypatch.setattr(train, "run_train", broken)
    assert main(["train", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError: 'an internal key'" in err
    assert "please report it" in err and "auxhead: error:" not in err


def test_a_bug_while_the_learner_is_built_is_not_a_bad_at(tmp_path, capsys, monkeypatch):
    import auxhead.fastai

    def broken(*args, **kwargs):
        raise RuntimeError("an internal failure in attach")

    monkeypatch.setattr(auxhead.fastai, "attach", broken)
    assert main(["train", *QUICK, "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError" in err and "an internal failure" in err
    assert "--at" not in err and "auxhead: error:" not in err
    # A tap attach refuses is still one line, exit 2: test_bad_model_or_layer.


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_before_or_after_the_subcommand(tmp_path, capsys, where):
    argv = ["train", "--data", str(tmp_path / "nope")]
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "auxhead: error: no data set" in err


def test_help_is_a_manual(capsys):
    assert main(["--help"]) == 0
    assert "train" in capsys.readouterr().out
    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    for expected in ("examples:", "auxhead train --data digits", "report.md", "checkpoint.pth",
                     "exit codes:", "130", "are deleted when a run starts", "--aux-weight",
                     "--pretrained"):  # fmt: skip
        assert expected in text, expected
    assert "seed of the weights" in text and "max(N/4, 2 x classes)" in " ".join(text.split())
    assert main(["layers", "--help"]) == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "0    the table was printed" in text
    assert "wrote its report" not in text and "files that were kept" not in text
    assert main([]) == 2
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"auxhead {__version__}"


def test_a_torchvision_model_trains_without_at(tmp_path, capsys):
    argv = ["train", "--data", "digits", "--arch", "mobilenet_v3_small", "--size", "32"]
    code = main([*argv, "--limit", "50", "--epochs", "1", "--threads", "1", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    assert "features.4" in captured.out and "features.8" in captured.out


def test_layers_lists_the_layers_and_marks_the_default_taps(capsys):
    assert main(["layers"]) == 0
    out = capsys.readouterr().out
    assert "small_cnn on 1x28x28 inputs (* default taps: stage1, stage2)" in out
    rows = {line.split()[-4] if line.startswith("*") else line.split()[0]: line
            for line in out.splitlines()[4:]}  # fmt: skip
    assert rows["stage1"].startswith("* ") and rows["stage1"].endswith("pooled,dense      32x14x14")
    assert rows["stage3"].startswith("  ") and rows["stage3"].endswith("128x4x4")
    assert rows["head.fc"].split()[-2:] == ["pooled", "10"]  # the heads that fit, the shape
    assert main(["layers", "--arch", "resnet18", "--data", "digits"]) == 0
    out = capsys.readouterr().out
    assert "resnet18 on 1x8x8 inputs (* default taps: layer2, layer3)" in out
    assert "* layer2" in out
    assert main(["layers", "--arch", "mobilenet_v3_small", "--size", "32"]) == 0
    out = capsys.readouterr().out
    assert "(* default taps: features.4, features.8)" in out and "* features.4" in out
    line = error_line(capsys, ["layers", "--arch", "squeezenet1_0", "--size", "8"])
    assert "--arch squeezenet1_0 does not run on 3x8x8 images" in line and "--size N" in line


# Pretrained fine-tuning, offline --------------------------------------------------------------


def _cached_resnet18(torch_home: Path) -> dict:
    import torchvision

    state = torchvision.models.resnet18().state_dict()
    checkpoints = torch_home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(state, checkpoints / "resnet18-f37072fd.pth")  # the file torchvision expects
    return state


def test_pretrained_fine_tunes_from_the_cache(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    _cached_resnet18(tmp_path / "torch")
    out = tmp_path / "run"
    argv = ["train", *QUICK, "--limit", "64", "--arch", "resnet18", "--pretrained", "--head",
            "linear", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err[-3000:]
    stdout = capsys.readouterr().out
    assert "after 1 epoch with the body frozen" in stdout
    report = json.loads((out / "report.json").read_text())
    assert len(report["history"]) == 2  # fastai's fine_tune: 1 frozen epoch, then 1
    assert "fine-tuned from pretrained weights" in (out / "report.md").read_text()


def test_pretrained_without_network_says_how_to_provide_the_weights(tmp_path, capsys, monkeypatch):
    import urllib.error

    import torch.hub

    import auxhead._weights

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setattr(auxhead._weights, "_reachable", lambda url: True)  # the host answers
    line = error_line(capsys, ["train", *QUICK, "--arch", "resnet18", "--pretrained",
                               "--out", tmp_path / "run"])  # fmt: skip
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert line.startswith("auxhead: error: --pretrained:") and str(cached) in line
    assert "--init PATH" in line and "no network" in line


def test_init_starts_from_a_state_dict(tmp_path, capsys):
    from auxhead.models import build_model

    start = build_model("small_cnn", 10, channels=1, size=8).state_dict()
    torch.save(start, tmp_path / "start.pth")
    out = tmp_path / "run"
    argv = ["train", *QUICK, "--limit", "64", "--init", tmp_path / "start.pth", "--out", out]
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err[-3000:]
    assert "fine-tuned from" in (out / "report.md").read_text()
    (tmp_path / "junk.pth").write_text("not a state_dict")
    line = error_line(capsys, ["train", *QUICK, "--init", tmp_path / "junk.pth", "--out", out])
    assert "--init" in line and "junk.pth" in line
    earlier = tmp_path / "earlier"  # a run's folder given for the checkpoint in it
    earlier.mkdir()
    torch.save(start, earlier / "checkpoint.pth")
    line = error_line(capsys, ["train", *QUICK, "--init", earlier, "--out", out])
    assert line.endswith(f"not a weights file; give a file in it ({earlier / 'checkpoint.pth'})")
    line = error_line(capsys, ["train", *QUICK, "--init", tmp_path, "--out", out])
    assert line.endswith("is a folder, not a weights file")  # nothing in it to suggest


def test_init_starts_from_auxhead_trains_own_checkpoint(quick_run, tmp_path, capsys):
    _, _, first, _ = quick_run
    out = tmp_path / "run"
    argv = ["train", *QUICK, "--limit", "64", "--init", first / "checkpoint.pth", "--out", out]
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err[-3000:]
    stdout = capsys.readouterr().out
    assert "the heads at stage1, stage2 start from" in stdout  # same taps and kind: loaded too
    argv = [*argv[:-2], "--head", "linear", "--out", tmp_path / "linear"]
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err[-3000:]
    assert "are not this run's; the heads start fresh" in capsys.readouterr().out


# Subprocesses ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_leaves_the_last_epoch_checkpoint(tmp_path):
    args = ["train", "--data", "digits", "--limit", "120", "--bs", "8", "--epochs", "200"]
    process = subprocess.Popen(
        [sys.executable, "-m", "auxhead", *args, "--out", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A shell's background job inherits SIGINT ignored, and Python then never raises
        # KeyboardInterrupt: give the child the default handler, as a terminal would.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    checkpoint = tmp_path / "checkpoint.pth"
    deadline = time.time() + 180
    while not checkpoint.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert checkpoint.exists(), "no checkpoint after the first epoch"
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert f"the last completed epoch is in {checkpoint}" in stderr
    saved = torch.load(checkpoint, weights_only=False)
    assert saved["epoch"] >= 1
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / "report.md").exists()

    # the checkpoint restores into a freshly attached model
    import auxhead
    from auxhead.models import build_model

    model = build_model(
        saved["arch"], len(saved["classes"]), channels=saved["channels"], size=saved["size"]
    )
    aux = auxhead.attach(
        model, saved["taps"], head=saved["head"], sample=torch.zeros(2, saved["channels"], 8, 8)
    )
    aux.load_state_dict(saved["state_dict"])


@pytest.mark.slow
def test_the_command_and_python_m_work(tmp_path):
    result = auxhead("train", "--help")
    assert result.returncode == 0 and "--early-exit" in result.stdout
    assert auxhead().returncode == 2
    command = Path(sys.executable).with_name("auxhead")
    result = subprocess.run([command, "layers"], capture_output=True, text=True)
    assert result.returncode == 0 and "* stage1" in result.stdout


# Writing files: atomic, and a full disk is the user's to fix -----------------------------------


def test_a_failed_write_leaves_no_partial_file_and_the_old_one_untouched(tmp_path, monkeypatch):
    from auxhead.cli import _common

    target = tmp_path / "report.md"
    target.write_text("the old report\n")
    real_write = Path.write_text

    def write_half_then_fail(self, text, *args, **kwargs):
        real_write(self, text[: len(text) // 2])
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(Path, "write_text", write_half_then_fail)
    with pytest.raises(OSError, match="Input/output"):
        _common.write_text_atomic(target, "a new report, much longer than the old one\n")
    monkeypatch.undo()
    assert target.read_text() == "the old report\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]  # no temporary left


def test_atomic_path_renames_only_a_complete_file(tmp_path):
    from auxhead.cli._common import atomic_path

    target = tmp_path / "samples.npz"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".npz" and tmp != target
        np.savez_compressed(tmp, x=np.arange(3))
        assert not target.exists()
    assert np.load(target)["x"].tolist() == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.npz"]


@pytest.mark.parametrize(
    "error",
    [
        OSError(28, "No space left on device"),  # ENOSPC
        OSError(122, "Disk quota exceeded"),  # EDQUOT
        RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 512 vs 448"),
    ],
)
def test_running_out_of_space_is_a_disk_full_error(tmp_path, error):
    from auxhead.cli._common import DiskFull, UsageError, atomic_path

    target = tmp_path / "checkpoint.pth"
    with pytest.raises(DiskFull) as caught, atomic_path(target) as tmp:
        tmp.write_bytes(b"half a checkpoint")
        raise error
    assert isinstance(caught.value, UsageError)
    assert str(caught.value) == (
        f"no space left on device writing {target}: free space or choose another --out"
    )
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_ends_in_one_line_and_no_partial_model(tmp_path, capsys, monkeypatch):
    import errno

    import auxhead.cli.train as train

    def export_until_full(learn, fname):
        Path(fname).write_bytes(b"the first bytes of a pickle")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(train, "export_learner", export_until_full)
    argv = ["train", "--data", "digits", "--limit", "50", "--epochs", "1", "--threads", "1"]
    line = error_line(capsys, [*argv, "--out", tmp_path])
    assert line == (
        f"auxhead: error: no space left on device writing {(tmp_path / 'model.pkl').resolve()}: "
        "free space or choose another --out"
    )
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint.pth"]  # whole (written before), no model.pkl, no temporary
    assert "state_dict" in torch.load(tmp_path / "checkpoint.pth", weights_only=False)


def test_a_full_disk_outside_auxhead_writes_is_one_line_too(tmp_path, capsys, monkeypatch):
    import errno

    import auxhead.cli.train as train

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.png"))

    monkeypatch.setattr(train, "run_train", full)
    line = error_line(capsys, ["train", "--data", "digits", "--out", tmp_path])
    assert "no space left on device writing" in line and "x.png" in line


@pytest.mark.parametrize("size", ["100000", "4"])
def test_size_is_bounded_with_the_reason(tmp_path, capsys, size):
    assert main(["train", "--data", "digits", "--size", size, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"--size: must be 8 to 1024, got {size}" in err
    assert ("memory" if size == "100000" else "downsampling") in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate "
            "memory: you tried to allocate 4000000000000 bytes"
        ),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    ],
)
def test_out_of_memory_in_training_names_the_options(tmp_path, capsys, monkeypatch, error):
    import auxhead.cli.train as train

    def fit(*args, **kwargs):
        raise error

    monkeypatch.setattr(train, "_fit", fit)
    argv = ["train", "--data", "digits", "--limit", "50", "--epochs", "1", "--threads", "1"]
    line = error_line(capsys, [*argv, "--out", tmp_path])
    assert line == (
        "auxhead: error: out of memory training on 1x8x8 images in batches of 16: lower the "
        "batch size (--bs) or the image size (--size)"
    )


def test_ctrl_c_while_the_libraries_import_is_one_line(capsys, monkeypatch):
    import auxhead.cli as cli

    def importing():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", importing)
    assert main(["train", "--help"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "auxhead: interrupted" and "Traceback" not in err


# Warnings ------------------------------------------------------------------------------------


def test_collect_warnings_keeps_runtime_warnings_and_passes_deprecations_on():
    import warnings

    from auxhead.cli._common import collect_warnings

    deprecation = pytest.warns(DeprecationWarning, match="an old API")
    with deprecation as passed_on, collect_warnings() as seen:
        warnings.warn("overflow in  exp", RuntimeWarning, stacklevel=1)
        warnings.warn("a head did not train", UserWarning, stacklevel=1)
        warnings.warn("a head did not train", UserWarning, stacklevel=1)
        warnings.warn("an old API", DeprecationWarning, stacklevel=1)
    assert seen == ["overflow in exp", "a head did not train"]
    assert [w.category for w in passed_on] == [DeprecationWarning]


WARNS_TWICE = """
import types, warnings, auxhead.cli.layers as layers
from auxhead.cli import main

def run_layers(config, say=None):
    for _ in range(2):
        warnings.warn("an old API", DeprecationWarning, stacklevel=1)
        warnings.warn("an old API", FutureWarning, stacklevel=1)
    return types.SimpleNamespace(table=lambda: "the layers")

layers.run_layers = run_layers
raise SystemExit(main(["layers"]))
"""


def test_the_cli_shows_each_warning_once_instead_of_silencing_it():
    import warnings

    before = list(warnings.filters)
    out = subprocess.run([sys.executable, "-c", WARNS_TWICE], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("DeprecationWarning: an old API") == 1, out.stderr
    assert out.stderr.count("FutureWarning: an old API") == 1, out.stderr
    main(["layers", "--help"])  # in process: the filters are put back
    assert warnings.filters == before


def test_the_libraries_deprecation_notices_at_import_are_not_shown():
    # fastai's import warns about torch.jit.script and a pandas option: not the user's to fix.
    out = subprocess.run(
        [sys.executable, "-m", "auxhead", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.startswith("auxhead "), out.stderr
    assert out.stderr == ""


# A missing extra ------------------------------------------------------------------------------

WITHOUT_FASTAI = "import sys; sys.modules['fastai'] = None\n"  # `import fastai` now fails


def test_without_fastai_the_command_says_which_extra_to_install(tmp_path):
    code = WITHOUT_FASTAI + (
        "from auxhead.cli import main\n"
        f"raise SystemExit(main(['train', '--out', {str(tmp_path / 'o')!r}]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        "auxhead: error: the auxhead command needs fastai, which is not installed: "
        "pip install 'auxhead[fastai]'"
    )
