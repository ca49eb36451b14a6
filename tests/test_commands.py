"""Every shell command in the README and the docs is checked as it is written, and the README
carries the two set-up commands of a fresh machine.

Each ```bash block is split into commands (continuation lines joined, comments and leading
`VAR=value` settings dropped, `&&` chains split), and each command goes through the parser of
the program it calls: `auxhead` through its own parser and its subcommand's config checks,
`benchmarks/*.py` through the script's `build_parser()`, torchrun, `accelerate launch` and
mkdocs through theirs, `pip install -e` against the extras in pyproject.toml. A renamed option
or a script that moved fails here, not in a user's terminal. The cheap commands also run for
real: ruff here, `auxhead train --data digits` and `auxhead layers` (on a small generated
folder in place of `path/to/images`) with the slow tests. The long ones (the default training
runs, the benchmarks, `bash scripts/install.sh && ... pytest`) are what `.ci/run` and the
documented benchmark runs execute.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
ENV = re.compile(r"^[A-Z_][A-Z0-9_]*=\S*$")
PLACEHOLDER_FOLDER = "path/to/images"


@dataclass(frozen=True)
class Command:
    where: str  # file:line
    argv: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.where}: {shlex.join(self.argv)}"


def _split(line: str, where: str) -> list[Command]:
    found = []
    words = shlex.split(line.split(" | ")[0], comments=True)  # `cmd | head`: check cmd
    for part in " ".join(words).split(" && "):
        argv = shlex.split(part)
        while argv and (ENV.match(argv[0]) or argv[0] == "time"):
            argv = argv[1:]
        if argv:
            found.append(Command(where, tuple(argv)))
    return found


def blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """(language, line number of its first line, lines) of each fenced block."""
    found, current = [], None
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            if current is None:
                current = (line[3:].strip(), number + 1, [])
            else:
                found.append(current)
                current = None
        elif current is not None:
            current[2].append(line)
    return found


def commands() -> list[Command]:
    """Each ```bash block's commands, and the `$ command` lines of plain blocks (transcripts:
    a command, then its output)."""
    found = []
    for path in FILES:
        for language, first, lines in blocks(path.read_text()):
            if language not in ("bash", ""):
                continue
            prompt = "" if language == "bash" else "$ "
            joined: list[tuple[int, str]] = []
            for number, line in enumerate(lines, first):
                if joined and joined[-1][1].endswith("\\"):
                    joined[-1] = (joined[-1][0], joined[-1][1][:-1] + " " + line)
                else:
                    joined.append((number, line))
            for number, line in joined:
                if line.startswith(prompt):
                    where = f"{path.relative_to(ROOT)}:{number}"
                    found += _split(line.removeprefix(prompt), where)
    return found


COMMANDS = commands()


def _script_parser(path: str):
    """`build_parser()` of a script in benchmarks/, imported from its file."""
    file = ROOT / path
    assert file.is_file(), f"no such script {path}"
    sys.path.insert(0, str(file.parent))
    try:
        name = f"_docs_{file.stem}"
        if name not in sys.modules:  # dataclasses look their module up while it loads
            spec = importlib.util.spec_from_file_location(name, file)
            sys.modules[name] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(sys.modules[name])
        module = sys.modules[name]
    finally:
        sys.path.remove(str(file.parent))
    assert hasattr(module, "build_parser"), f"{path} has no build_parser() to check options with"
    return module.build_parser()


def _check_auxhead(args: list[str]) -> None:
    from auxhead.cli import build_parser

    namespace = build_parser().parse_args(args)  # SystemExit(2) on a refused option
    module = importlib.import_module(f"auxhead.cli.{namespace.command}")
    config = module.config_from_args(namespace)
    if hasattr(module, "check_config"):
        module.check_config(config)


def _check_python(args: list[str]) -> None:
    if args[:2] == ["-m", "pytest"]:
        markers = (ROOT / "pyproject.toml").read_text()
        for i, arg in enumerate(args):
            if arg == "-m" and i > 1:
                assert f'"{args[i + 1]}:' in markers, (
                    f"pytest marker {args[i + 1]} is not registered"
                )
        return
    if args and args[0].startswith("examples/"):  # examples take no options
        assert (ROOT / args[0]).is_file() and len(args) == 1, f"no such example {args}"
        return
    assert args and args[0].startswith("benchmarks/"), f"no check for python {args}"
    _script_parser(args[0]).parse_args(args[1:])


def _check_pip(args: list[str]) -> None:
    """`pip install -e .` or `pip install -e '.[extra,...]'`, with extras pyproject.toml has."""
    assert args[:2] == ["install", "-e"] and len(args) == 3, f"no check for pip {args}"
    match = re.fullmatch(r"\.(?:\[(?P<extras>[\w,-]+)\])?", args[2])
    assert match, f"pip install -e {args[2]}: expected . or .[extra]"
    pyproject = (ROOT / "pyproject.toml").read_text()  # tomllib is Python >= 3.11
    section = pyproject.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    known = re.findall(r"^([\w-]+) = \[", section, flags=re.M)
    extras = match["extras"].split(",") if match["extras"] else []
    missing = [extra for extra in extras if extra not in known]
    assert not missing, f"pyproject.toml has no extra {missing}"


def _check_mkdocs(args: list[str]) -> None:
    from mkdocs.__main__ import cli

    command = cli.get_command(None, args[0])
    assert command is not None, f"mkdocs has no command {args[0]}"
    command.make_context(args[0], args[1:])
    assert (ROOT / "mkdocs.yml").is_file()


def _check_torchrun(args: list[str]) -> None:
    from torch.distributed.run import get_args_parser

    parsed = get_args_parser().parse_args(args)
    assert parsed.training_script.endswith(".py")


def _check_accelerate(args: list[str]) -> None:
    from accelerate.commands.launch import launch_command_parser

    assert args[0] == "launch", f"only `accelerate launch` is documented, got {args}"
    parsed = launch_command_parser().parse_args(args[1:])
    assert parsed.training_script.endswith(".py")


def _check_ruff(args: list[str]) -> None:
    result = subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True)
    assert result.returncode == 0, result.stdout.decode()[-2000:]


def _check_bash(args: list[str]) -> None:
    assert args == ["scripts/install.sh"], f"no check for bash {args}"
    result = subprocess.run(["bash", "-n", str(ROOT / args[0])], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


CHECKS = {
    ".venv/bin/auxhead": _check_auxhead,
    ".venv/bin/python": _check_python,
    ".venv/bin/mkdocs": _check_mkdocs,
    ".venv/bin/ruff": _check_ruff,
    "torchrun": _check_torchrun,
    "accelerate": _check_accelerate,
    "bash": _check_bash,
    "pip": _check_pip,
}


def test_the_docs_have_commands():
    programs = {command.argv[0] for command in COMMANDS}
    assert {".venv/bin/auxhead", ".venv/bin/python", "bash"} <= programs


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_documented_command_parses(command, monkeypatch, tmp_path):
    program, *args = command.argv
    assert program in CHECKS, f"{command}: no check for {program!r}; add one to CHECKS"
    if program.startswith(".venv/bin/"):  # installed by scripts/install.sh into the venv
        name = program.removeprefix(".venv/bin/")
        assert (Path(sys.executable).parent / name).exists() or name == "python", command
    monkeypatch.chdir(tmp_path)  # relative --out folders land here, not in the checkout
    try:
        CHECKS[program](args)
    except SystemExit as exit_:
        pytest.fail(f"{command}: its parser refused it (exit {exit_.code})")


def test_the_readme_has_the_two_setup_commands():
    """A fresh machine: install everything, then run the main job, or the tests."""
    lines: dict[str, list[tuple[str, ...]]] = {}
    for command in COMMANDS:
        if command.where.startswith("README.md:"):
            lines.setdefault(command.where, []).append(command.argv)
    install = ("bash", "scripts/install.sh")
    for then in ((".venv/bin/auxhead", "train"), (".venv/bin/python", "-m", "pytest")):
        assert [install, then] in lines.values(), (
            f"README.md lacks `bash scripts/install.sh && {shlex.join(then)}`"
        )


def test_a_renamed_option_is_caught():
    """The checks can fail: a misspelt option, an unknown script, a bad value."""
    with pytest.raises(SystemExit):
        _check_auxhead(["train", "--no-such-option"])
    with pytest.raises(SystemExit):
        _check_python(["benchmarks/exit_speed.py", "--no-such-option", "1"])
    with pytest.raises(AssertionError):
        _check_python(["benchmarks/no_such_benchmark.py"])
    with pytest.raises(AssertionError):
        _check_pip(["install", "-e", ".[no-such-extra]"])
    from auxhead.cli._common import UsageError

    with pytest.raises(UsageError):
        _check_auxhead(["train", "--epochs", "1", "--steps", "10"])


def _runnable(command: Command) -> bool:
    return command.argv[:2] == (".venv/bin/auxhead", "layers") or command.argv == (
        ".venv/bin/auxhead",
        "train",
        "--data",
        "digits",
    )


@pytest.mark.slow
@pytest.mark.parametrize("command", [c for c in COMMANDS if _runnable(c)], ids=str)
def test_cheap_documented_command_runs(command, tmp_path):
    from PIL import Image

    argv = list(command.argv)
    if PLACEHOLDER_FOLDER in argv:  # a small folder of the user's own images, two classes
        folder = tmp_path / "images"
        for label, colour in (("cats", (200, 40, 40)), ("dogs", (40, 40, 200))):
            (folder / label).mkdir(parents=True)
            for i in range(6):
                Image.new("RGB", (40 + i, 30), colour).save(folder / label / f"{i}.png")
        argv[argv.index(PLACEHOLDER_FOLDER)] = str(folder)
    program = Path(sys.executable).parent / Path(argv[0]).name
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [str(program), *argv[1:]], cwd=tmp_path, capture_output=True, text=True, env=env,
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
