"""The documentation site: it builds with `mkdocs build --strict`, its API pages cover every
public name, its Command line page covers every subcommand, every Python block in
`docs/**/*.md` runs as written (the blocks of one page run in order, as one script), and the
built home page, a tutorial and the API page render in a real browser (Debian's chromium,
headless; screenshots kept in runs/docs-screenshots/)."""

from __future__ import annotations

import importlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(path.relative_to(DOCS).as_posix() for path in DOCS.rglob("*.md"))
PUBLIC_MODULES = ("auxhead", "auxhead.fastai", "auxhead.gan")
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
# A block preceded by `<!-- not run: why -->` is shown, not run (a torchrun script, say).
BLOCK = re.compile(r"(?:<!-- not run: (?P<why>.*?) -->\n+)?```python\n(?P<code>.*?)```", re.S)
DIRECTIVE = re.compile(r"^::: (?P<path>[\w.]+)\s*$", re.M)
# Pages that train models run with the slow tests (`pytest -m slow`, as `.ci/run` does).
SLOW_PAGES = {page for page in PAGES if page.startswith("tutorials/")}
SLOW_PAGES |= {"api/transformers.md"}  # trains a Hugging Face model with its Trainer


def python_blocks(page: str) -> list[str]:
    """The page's Python blocks that run (not those marked `not run`)."""
    text = (DOCS / page).read_text()
    return [match["code"] for match in BLOCK.finditer(text) if match["why"] is None]


def documented_objects() -> dict[int, str]:
    """id() of every object an API page documents with `::: dotted.path` -> that path."""
    found = {}
    for page in sorted((DOCS / "api").glob("*.md")):
        for match in DIRECTIVE.finditer(page.read_text()):
            module_name, _, name = match["path"].rpartition(".")
            found[id(getattr(importlib.import_module(module_name), name))] = match["path"]
    return found


def public_names() -> list[tuple[str, str]]:
    return [
        (module, name)
        for module in PUBLIC_MODULES
        for name in importlib.import_module(module).__all__
    ]


def test_api_pages_cover_every_public_name():
    documented = documented_objects()
    missing = [
        f"{module}.{name}"
        for module, name in public_names()
        if id(getattr(importlib.import_module(module), name)) not in documented
    ]
    assert not missing, f"add a `::: path` line to docs/api/*.md for {missing}"


def test_cli_page_covers_every_subcommand():
    from auxhead.cli import build_parser

    text = (DOCS / "cli.md").read_text()
    (subparsers,) = [a for a in build_parser()._actions if hasattr(a, "choices") and a.choices]
    missing = [name for name in subparsers.choices if f"<!-- auxhead-help {name} -->" not in text]
    assert not missing, f"docs/cli.md has no `<!-- auxhead-help NAME -->` for {missing}"


def test_pages_hold_only_markers_the_build_knows():
    """A page holds its own text: the only comments are `<!-- auxhead-help [COMMAND] -->`,
    which the build replaces (docs/hooks/pages.py), and `<!-- not run: why -->`."""
    known = re.compile(r" auxhead-help(?: [a-z-]+)? | not run: .*", re.S)
    unknown = [
        f"{page}: <!--{body}-->"
        for page in PAGES
        for body in re.findall(r"<!--(.*?)-->", (DOCS / page).read_text(), flags=re.S)
        if not known.fullmatch(body)
    ]
    assert not unknown, f"comments the docs build does not replace: {unknown}"


def test_every_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    assert [page for page in PAGES if f": {page}" not in nav] == []


def _page_params():
    for page in PAGES:
        if not python_blocks(page):
            continue
        marks = [pytest.mark.slow] if page in SLOW_PAGES else []
        yield pytest.param(page, marks=marks, id=page)


@pytest.mark.parametrize("page", list(_page_params()))
def test_page_examples_run(page, tmp_path):
    code = "\n".join(python_blocks(page))
    if "load_data()" in code and not FASHION_MNIST.is_dir():
        pytest.skip("needs Fashion-MNIST (apt-get install dataset-fashion-mnist)")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env["MPLBACKEND"] = "Agg"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="module")
def built_site(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """`mkdocs build --strict` into a temporary folder, once for the tests that need it."""
    site = tmp_path_factory.mktemp("docs") / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )
    return result, site


@pytest.mark.slow
def test_site_builds_strict(built_site):
    result, site = built_site
    assert result.returncode == 0, result.stderr[-4000:]
    # Every public name has its own anchor on the API pages, rendered from its docstring.
    api = "".join(
        (site / "api" / page.stem / "index.html").read_text()
        for page in sorted((DOCS / "api").glob("*.md"))
    )
    for path in documented_objects().values():
        assert f'id="{path}"' in api, path
    # The Command line page holds the generated --help text of each subcommand.
    cli = (site / "cli" / "index.html").read_text()
    for command in ("train", "acgan", "layers"):
        assert f"usage: auxhead {command}" in cli, command


# ---- the built site in a real browser ------------------------------------------------------

SCREENSHOTS = ROOT / "runs" / "docs-screenshots"  # kept for a person to look at (git-ignored)
# page -> files the browser must fetch for it to render: the theme's stylesheet, the page's
# own images.
BROWSER_PAGES = {
    "": ["assets/stylesheets/main."],
    "tutorials/fastai/": ["assets/stylesheets/main.", "img/tutorial_fastai_heads.png"],
    "api/core/": ["assets/stylesheets/main."],
}
HEADER_BLUE = (64, 81, 181)  # mkdocs-material's indigo header: the theme's CSS was applied


@pytest.fixture(scope="module")
def chromium() -> str:
    found = shutil.which("chromium")  # Debian's; .ci/run installs it, no test does
    if found is None:
        message = "needs Debian's chromium (apt-get install chromium, as root)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


@pytest.fixture()
def site_server(built_site, tmp_path):
    """The built site over HTTP on 127.0.0.1; yields (base URL, the server's request log)."""
    result, site = built_site
    assert result.returncode == 0, result.stderr[-4000:]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path / "http.log"
    with log.open("w") as stream:
        server = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
            cwd=site,
            stdout=stream,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(base, timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        yield base, log
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.mark.slow
def test_pages_render_in_chromium(chromium, site_server, tmp_path):
    from PIL import Image

    base, log = site_server
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for page, needed in BROWSER_PAGES.items():
        png = SCREENSHOTS / f"{page.strip('/').replace('/', '_') or 'home'}.png"
        png.unlink(missing_ok=True)
        command = [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1280,2400",
            f"--screenshot={png}",
            base + page,
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert png.is_file(), f"no screenshot of /{page}: {result.stderr[-2000:]}"
        image = Image.open(png).convert("RGB")
        colours = image.getcolors(maxcolors=1 << 24)
        assert len(colours) > 100, f"/{page} rendered nearly blank ({len(colours)} colours)"
        header = sum(count for count, colour in colours if colour == HEADER_BLUE)
        assert header > 1280 * 20, f"/{page}: no theme header, so the stylesheet did not apply"
        requests = log.read_text()
        for path in needed:
            assert re.search(rf'"GET /{re.escape(path)}\S* HTTP/1.[01]" 200', requests), (
                f"/{page}: the browser did not fetch /{path}"
            )
