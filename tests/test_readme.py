"""The README is a front door: every Python example in it runs as it is written, every
relative link in it resolves, and it stays short (results and guides live on the docs site)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TEXT = README.read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, flags=re.S)
LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")


def test_readme_has_examples():
    assert len(BLOCKS) >= 2


def test_readme_is_short():
    lines = len(TEXT.splitlines())
    assert lines <= 250, f"README.md has {lines} lines: move details to a page in docs/"


def test_readme_links_resolve():
    targets = [match["target"] for match in LINK.finditer(TEXT)]
    relative = [t for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")]
    assert relative, "expected links into docs/"
    missing = [t for t in relative if not (ROOT / t.split("#")[0]).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


@pytest.mark.slow  # the README's training runs
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path):
    code = BLOCKS[index]
    if "load_data()" in code and not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("needs Fashion-MNIST (apt-get install dataset-fashion-mnist)")
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
