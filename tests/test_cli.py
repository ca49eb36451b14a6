"""`auxhead train` driven as a user drives it: a subprocess, tiny budgets."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

QUICK = ["--data", "digits", "--limit", "240", "--epochs", "1", "--bs", "32"]
# The fixture's run, repeated by the determinism test.
FULL = [*QUICK, "--compare", "--early-exit", "--confidence", "0.9", "--threads", "1"]


def auxhead(*args, cwd=None, timeout=240):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "auxhead", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env=env,
    )


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    result = auxhead("train", *FULL, "--out", out)
    return result, out


def test_train_writes_the_report(quick_run):
    result, out = quick_run
    assert result.returncode == 0, result.stderr[-3000:]
    for name in (
        "report.md",
        "report.json",
        "heads.png",
        "compute.png",
        "model.pkl",
        "checkpoint.pth",
    ):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert report["data"] == "digits" and report["arch"] == "small_cnn"
    assert set(report["heads"]) == {"stage1", "stage2"}
    for head in report["heads"].values():
        assert 0.0 <= head["accuracy"] <= 1.0 and head["flops"] > 0
    assert report["heads"]["stage1"]["flops"] < report["main_flops"]
    assert isinstance(report["baseline_accuracy"], float)
    assert report["train_seconds"] > 0
    assert report["early_exit"]["test"]["exits"] == ["stage1", "stage2", "main"]
    assert report["early_exit"]["calibration"]["confidence"] == 0.9
    # the terminal table names every exit
    for name in ("stage1", "stage2", "main (final layer)", "baseline (no heads)"):
        assert name in result.stdout
    md = (out / "report.md").read_text()
    assert "## Exits" in md and "## Early exit" in md and "![accuracy per epoch](heads.png)" in md
    assert "accuracy lost (with 90% confidence)" in md


def test_checkpoint_has_heads_and_export_needs_no_auxhead(quick_run):
    _, out = quick_run
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=False)
    assert checkpoint["epoch"] == 1 and checkpoint["taps"] == ["stage1", "stage2"]
    assert any(k.startswith("heads.") for k in checkpoint["state_dict"])
    script = (
        "import sys; sys.modules['auxhead'] = None\n"
        "from fastai.learner import load_learner\n"
        f"learn = load_learner({str(out / 'model.pkl')!r})\n"
        "print(type(learn.model).__name__)\n"
    )
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=out)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.strip() == "Sequential"


def test_same_seed_same_numbers(quick_run, tmp_path):
    _, first = quick_run
    again = auxhead("train", *FULL, "--out", tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    a = json.loads((first / "report.json").read_text())
    b = json.loads((tmp_path / "report.json").read_text())
    for key in ("main_accuracy", "heads", "baseline_accuracy", "history"):
        assert a[key] == b[key], key


def _error_line(result):
    assert result.returncode == 2, (result.stdout[-1000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("auxhead: error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def _png(path: Path, value: int = 128, mode: str = "L") -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (8, 8), value).save(path)


def test_bad_input_one_clear_line(tmp_path):
    missing = _error_line(auxhead("train", "--data", tmp_path / "nope", "--out", tmp_path / "o"))
    assert "nope" in missing
    (tmp_path / "empty").mkdir()
    assert "empty" in _error_line(auxhead("train", "--data", tmp_path / "empty"))
    _png(tmp_path / "one" / "cat" / "a.png")
    _png(tmp_path / "one" / "cat" / "b.png")
    assert "class" in _error_line(auxhead("train", "--data", tmp_path / "one"))
    _png(tmp_path / "bad" / "cat" / "a.png")
    (tmp_path / "bad" / "dog").mkdir()
    (tmp_path / "bad" / "dog" / "b.png").write_bytes(b"not an image")
    assert "b.png" in _error_line(auxhead("train", "--data", tmp_path / "bad"))
    arch = _error_line(auxhead("train", *QUICK, "--arch", "resnet9000"))
    assert "resnet9000" in arch
    layer = _error_line(auxhead("train", *QUICK, "--at", "stage7"))
    assert "stage7" in layer and "list_layers" in layer
    out = tmp_path / "exits"
    drop = _error_line(auxhead("train", *QUICK, "--early-exit", "--max-drop", "5", "--out", out))
    assert "--max-drop is a fraction in [0, 1]" in drop and "got 5.0" in drop
    confidence = _error_line(auxhead("train", *QUICK, "--confidence", "1.5", "--out", out))
    assert "--confidence is a probability in (0, 1)" in confidence and "1.5" in confidence
    assert not out.exists()  # refused before anything was written


def test_bad_option_values_are_refused_by_the_parser(tmp_path):
    result = auxhead("train", "--threads", "0", "--out", tmp_path)
    assert result.returncode == 2 and "--threads: must be at least 1, got 0" in result.stderr
    assert not any(tmp_path.iterdir())


def test_debug_shows_the_traceback(tmp_path):
    result = auxhead("--debug", "train", "--data", tmp_path / "nope")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_ctrl_c_leaves_the_last_epoch_checkpoint(tmp_path):
    args = ["train", "--data", "digits", "--limit", "120", "--bs", "8", "--epochs", "200"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    process = subprocess.Popen(
        [sys.executable, "-m", "auxhead", *args, "--out", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
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
    assert "interrupted" in stderr and "checkpoint.pth" in stderr
    saved = torch.load(checkpoint, weights_only=False)
    assert saved["epoch"] >= 1
    assert not list(tmp_path.glob("*.tmp"))

    # the checkpoint restores into a freshly attached model
    import auxhead
    from auxhead.models import build_model

    model = build_model(saved["arch"], len(saved["classes"]), saved["channels"], saved["size"])
    aux = auxhead.attach(
        model, saved["taps"], head=saved["head"], sample=torch.zeros(2, saved["channels"], 8, 8)
    )
    aux.load_state_dict(saved["state_dict"])


def test_help_and_no_command():
    assert "train" in auxhead("--help").stdout
    assert "--early-exit" in auxhead("train", "--help").stdout
    assert auxhead().returncode == 2
