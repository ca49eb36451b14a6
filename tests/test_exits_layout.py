"""`auxhead/exits/` is one package with one public face: its modules import each other without
a cycle (TYPE_CHECKING imports count), and none uses another module's private (`_`) names:
not by import, not as `module._name`, not by reaching into an object (`early._plan`)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import auxhead
import auxhead.exits

PACKAGE = Path(auxhead.exits.__file__).parent
MODULES = {f"auxhead.exits.{p.stem}": p for p in sorted(PACKAGE.glob("*.py"))}
MODULES["auxhead.exits"] = MODULES.pop("auxhead.exits.__init__")


def _tree(name: str) -> ast.Module:
    return ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _imports(name: str) -> set[str]:
    """The package's modules that `name` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(_tree(name)):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {module for module in found if module in MODULES and module != name}


def test_the_package_has_the_modules_it_should():
    assert {"auxhead.exits._early", "auxhead.exits._calibrate", "auxhead.exits._fx"} <= set(MODULES)
    old = ["_calibrate", "_exit_bounds", "_exit_export", "_exit_fx", "_exit_summary", "_stages"]
    for name in [*old, "_flops"]:  # all inside the package now
        assert not (PACKAGE.parent / f"{name}.py").exists()


def test_no_import_cycle():
    graph = {name: _imports(name) for name in MODULES}
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycle = [*path[path.index(name) :], name]
            pytest.fail(f"import cycle: {' -> '.join(cycle)}")
        if name in done:
            return
        for other in sorted(graph[name]):
            visit(other, [*path, name])
        done.add(name)

    for name in MODULES:
        visit(name, [])


# torch's own API whose names start with "_" but that torch documents for users (torch._check:
# the way to tell torch.export a fact about a data-dependent size).
TORCH_PUBLIC = {"torch._check"}


def _reaches(tree: ast.Module) -> list[str]:
    """Where `tree` uses a private name that is not its own."""
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            problems += [
                f"line {node.lineno}: from {node.module} import {alias.name}"
                for alias in node.names
                if _private(alias.name)
            ]
        elif isinstance(node, ast.Attribute) and _private(node.attr):
            if ast.unparse(node) in TORCH_PUBLIC:
                continue
            owner = node.value
            # self._x and cls._x are an object's own; super()._apply is the nn.Module override
            if isinstance(owner, ast.Name) and owner.id in {"self", "cls"}:
                continue
            if isinstance(owner, ast.Call) and getattr(owner.func, "id", None) == "super":
                continue
            problems.append(f"line {node.lineno}: {ast.unparse(node)}")
    return problems


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_private_name_crosses_a_module(name):
    problems = _reaches(_tree(name))
    assert not problems, f"{MODULES[name].name} reaches into private names: {problems}"


def test_the_public_face():
    exported = auxhead.exits.__all__
    assert not [name for name in exported if name.startswith("_")]
    for name in exported:
        assert getattr(auxhead.exits, name) is not None
    from auxhead.exits import CRITERIA, EarlyExit, ExitSummary  # noqa: F401

    assert auxhead.EarlyExit is EarlyExit and auxhead.ExitSummary is ExitSummary
    assert auxhead.exit_flops is auxhead.exits.exit_flops


def test_the_checks_catch_what_they_should():
    source = (
        "from auxhead.exits._calibrate import _leaves\n"
        "import auxhead.exits._route as route\n"
        "def f(early):\n"
        "    return early._plan, self._plan, route._hidden, super()._apply(f)\n"
    )
    found = [problem.split(": ", 1)[1] for problem in _reaches(ast.parse(source))]
    assert sorted(found) == ["early._plan", "from auxhead.exits._calibrate import _leaves",
                             "route._hidden"]  # fmt: skip
