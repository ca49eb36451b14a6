"""auxhead's layers, bottom up: the core (torch only), the GAN (torch only), data, the trainer
adapters (fastai), the command line. Read statically from every file under auxhead/, each module
imports auxhead modules of its own layer or below and only the third-party packages its layer
allows; and importing the torch-only layers in a fresh interpreter loads nothing beyond the
standard library, torch and what torch itself requires."""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "auxhead"

# Bottom up; a module may import auxhead modules of its own layer or a lower one.
LAYERS = ("core", "gan", "data", "adapter", "cli")
# The modules that are not core. Everything else under auxhead/ (attach, heads, losses, the
# early exits wherever they live, ...) is the core.
# data loading (with its private folder and pixel readers); the CLI's model zoo and its
# weights reader
DATA = {
    "auxhead.data",
    "auxhead._folders",
    "auxhead._masks",
    "auxhead._pixels",
    "auxhead._seg_folders",
    "auxhead.models",
    "auxhead._segmodels",
    "auxhead._weights",
}
ADAPTERS = {"auxhead.fastai", "auxhead.gan.learner", "auxhead.gan.monitor"}  # fastai's

# Third-party packages each layer may import when the module is imported ("eager"), and also
# inside a function or under TYPE_CHECKING ("lazy": needed only by the function that uses it).
# The core's eager set is `[project] dependencies` in pyproject.toml.
CORE = {"torch", "numpy"}
EAGER = {
    "core": CORE,
    "gan": CORE,
    "data": CORE,
    "adapter": CORE | {"fastai", "PIL"},
    "cli": None,  # anything: the command line is the top of the stack
}
LAZY = {
    # the `onnx` extra: EarlyExit.export("x.onnx") checks what it wrote; the `fastai` extra's
    # torchmetrics: the segmentation scores (auxhead._segmetrics)
    "core": CORE | {"onnx", "torchmetrics"},
    "gan": CORE | {"torchmetrics"},  # the Fréchet distance's Inception network
    "data": CORE
    | {"fastai", "sklearn", "PIL", "torchvision", "timm", "huggingface_hub", "safetensors"}
    | {"segmentation_models_pytorch"},  # the `segment` extra's models (auxhead._segmodels)
    "adapter": CORE | {"fastai", "PIL", "matplotlib"},
    "cli": None,
}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module, e.g. "auxhead.exits"
    target: str  # the imported module, e.g. "torch.nn" or "auxhead.attach"
    line: int
    lazy: bool  # inside a function or under `if TYPE_CHECKING:`

    def __str__(self) -> str:
        return f"{self.source}:{self.line} imports {self.target}"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> str:
    if module == "auxhead.cli" or module.startswith("auxhead.cli.") or module == "auxhead.__main__":
        return "cli"
    if module in ADAPTERS:
        return "adapter"
    if module in DATA:
        return "data"
    if module == "auxhead.gan" or module.startswith("auxhead.gan."):
        return "gan"
    return "core"


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(module: str, path: Path) -> list[Import]:
    """Every import statement of `module` (the file `path`), relative imports resolved."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend(Import(module, alias.name, node.lineno, lazy) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                # `from auxhead import cli` imports the module auxhead.cli
                submodule = f"{base}.{alias.name}"
                target = submodule if submodule in MODULES else base
                found.append(Import(module, target, node.lineno, lazy))
        lazy_inside = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, lazy)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, lazy_inside)

    visit(ast.parse(path.read_text(), filename=str(path)), False)
    return found


ALL_IMPORTS = [found for module, path in MODULES.items() for found in imports(module, path)]


def test_the_walk_sees_every_layer():
    # A rename that empties a layer would make the checks below pass vacuously.
    assert {layer(module) for module in MODULES} == set(LAYERS)
    named = {"auxhead", "auxhead.attach", "auxhead.cli", *DATA, *ADAPTERS}
    assert named - set(MODULES) == set(), "a module named here moved: update the layers"


def _lazy_reexport(found: Import) -> bool:
    """A package's `__init__` importing one of its own modules on first use (a module
    `__getattr__`, PEP 562), so that, say, a torch-only package can offer its fastai learner
    without importing fastai: importing the package is checked at run time below."""
    package = MODULES[found.source].name == "__init__.py"
    return found.lazy and package and found.target.startswith(found.source + ".")


def test_auxhead_modules_import_only_their_layer_or_below():
    wrong = [
        f"{found} ({layer(found.source)} -> {layer(found.target)})"
        for found in ALL_IMPORTS
        if found.target.split(".")[0] == "auxhead"
        and LAYERS.index(layer(found.target)) > LAYERS.index(layer(found.source))
        and not _lazy_reexport(found)
    ]
    assert not wrong, "imports from a higher layer:\n" + "\n".join(wrong)


def test_third_party_imports_stay_in_their_layer():
    wrong = []
    for found in ALL_IMPORTS:
        top = found.target.split(".")[0]
        if top == "auxhead" or top in sys.stdlib_module_names:
            continue
        allowed = (LAZY if found.lazy else EAGER)[layer(found.source)]
        if allowed is not None and top not in allowed:
            wrong.append(f"{found} ({'lazily, ' if found.lazy else ''}{layer(found.source)})")
    assert not wrong, "third-party imports outside their layer:\n" + "\n".join(wrong)


def test_the_walk_resolves_relative_and_lazy_imports(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text(
        "from typing import TYPE_CHECKING\n"
        "from . import models\n"
        "from ..cli import main\n"
        "if TYPE_CHECKING:\n"
        "    import fastai\n"
        "def plot():\n"
        "    import matplotlib.pyplot\n"
    )
    found = [(f.target, f.lazy) for f in imports("auxhead.gan.probe", path)]
    assert found == [
        ("typing", False),
        ("auxhead.gan.models", False),
        ("auxhead.cli", False),
        ("fastai", True),
        ("matplotlib.pyplot", True),
    ]


# ---- at run time ---------------------------------------------------------------------------

# The layers that need torch only: importing them must not load fastai, torchvision,
# matplotlib, scikit-learn, PIL, ... (each costs seconds, and a user may not have them).
TORCH_ONLY = ["auxhead", "auxhead.gan", "auxhead.distributed", "auxhead.data", "auxhead.models"]


def _normalise(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


@functools.cache
def _torch_and_its_requirements() -> set[str]:
    requires = importlib.metadata.requires("torch") or []
    names = {re.match(r"[A-Za-z0-9._-]+", line)[0] for line in requires if "extra ==" not in line}
    return {_normalise(name) for name in names | CORE}


def heavy(loaded: set[str]) -> list[str]:
    """The top-level modules in `loaded` that come neither from torch, numpy nor a package
    torch itself requires."""
    distributions = _distributions()
    allowed = _torch_and_its_requirements()
    return sorted(
        name
        for name in loaded
        if not {_normalise(dist) for dist in distributions.get(name, [])} & allowed
    )


@functools.cache
def _distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def test_importing_the_torch_only_layers_loads_nothing_heavy():
    code = (
        "import importlib, json, sys, torch\n"
        "before = {name.split('.')[0] for name in sys.modules}\n"
        f"for name in {TORCH_ONLY!r}: importlib.import_module(name)\n"
        "after = {name.split('.')[0] for name in sys.modules}\n"
        "print(json.dumps(sorted(after - before - set(sys.stdlib_module_names))))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert result.returncode == 0, result.stderr[-4000:]
    loaded = set(json.loads(result.stdout)) - {"auxhead"}
    assert heavy(loaded) == [], f"importing {TORCH_ONLY} loads {heavy(loaded)}"


def test_the_runtime_check_sees_a_heavy_import():
    # numpy and torch pass; fastai, PIL and a module no installed distribution provides do not.
    pytest.importorskip("fastai")
    assert heavy({"numpy", "torch", "fastai", "PIL", "not_a_module"}) == [
        "PIL",
        "fastai",
        "not_a_module",
    ]
