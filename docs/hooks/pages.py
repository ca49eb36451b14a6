"""mkdocs hook: the parts of pages that are generated at build time, so they cannot drift.

- `<!-- auxhead-help COMMAND -->` becomes that command's `--help` text, from the argparse
  parsers in `auxhead/cli/`; `<!-- auxhead-help -->` alone is the top-level `auxhead --help`.
- `<!-- readme from="TEXT" -->` becomes the README from the line that starts with TEXT (a
  heading line itself is left out) to the next heading, or to the line that starts with
  `until="TEXT"` when given: the Results page shows the README's measured tables as they are.
- Docstring brackets that Markdown mistook for reference links are put back (see below).
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

MARKER = re.compile(r"<!-- auxhead-help(?: (?P<command>[a-z-]+))? -->")
WIDTH = "78"  # argparse wraps to $COLUMNS: fix it so the page is the same on every machine


def help_text(command: str | None = None) -> str:
    """What `auxhead [COMMAND] --help` prints, at a fixed width."""
    from auxhead.cli import build_parser

    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        parser = build_parser()
        if command is None:
            return parser.format_help()
        for action in parser._actions:  # argparse has no public accessor for subparsers
            if isinstance(action, argparse._SubParsersAction):
                if command not in action.choices:
                    raise ValueError(f"no subcommand {command!r}; have {sorted(action.choices)}")
                return action.choices[command].format_help()
        raise ValueError("auxhead's parser has no subcommands")
    finally:
        if saved is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = saved


README = Path(__file__).resolve().parents[2] / "README.md"
README_PART = re.compile(r'<!-- readme from="(?P<start>[^"]+)"(?: until="(?P<end>[^"]+)")? -->')


def readme_part(start: str, end: str | None = None) -> str:
    """README lines from the one starting with `start` to the next heading (outside code
    blocks) or the line starting with `end`; links into docs/ made relative to docs/."""
    lines = README.read_text().splitlines()
    first = next((i for i, line in enumerate(lines) if line.startswith(start)), None)
    if first is None:
        raise ValueError(f"README.md has no line starting with {start!r} (docs/results.md)")
    part, fenced, ended = [], False, end is None
    for line in lines[first + (1 if line_is_heading(lines[first]) else 0) :]:
        if end is not None and line.startswith(end) and part:
            ended = True
            break
        if not fenced and line_is_heading(line) and part:
            break
        if line.startswith("```"):
            fenced = not fenced
        part.append(line)
    if not ended:
        raise ValueError(f"README.md has no line starting with {end!r} after {start!r}")
    return re.sub(r"\]\(docs/", "](", "\n".join(part).strip()) + "\n"


def line_is_heading(line: str) -> bool:
    return re.match(r"#{1,6} ", line) is not None


def on_page_markdown(markdown: str, **kwargs: object) -> str:
    def cli(match: re.Match) -> str:
        return "```text\n" + help_text(match["command"]).rstrip() + "\n```"

    def readme(match: re.Match) -> str:
        return readme_part(match["start"], match["end"])

    return README_PART.sub(readme, MARKER.sub(cli, markdown))


# A docstring that writes dict keys or optional items in brackets ({"loss"[, "twin"]},
# d["accuracy"]["overall"]) reads to Markdown as a reference link, and mkdocs-autorefs then
# fails the strict build looking for an object called '"overall"'. An identifier that cannot
# name a Python object is no cross-reference: put the text back as it was written.
AUTOREF = re.compile(r"<autoref (?P<attrs>[^>]*)>(?P<title>.*?)</autoref>", flags=re.S)
IDENTIFIER = re.compile(r'identifier="(?P<id>[^"]*)"')
PYTHON_PATH = re.compile(r"^[A-Za-z_][\w.]*(\(\))?$")


def on_page_content(html: str, **kwargs: object) -> str:
    def restore(match: re.Match) -> str:
        found = IDENTIFIER.search(match["attrs"])
        if found is None or PYTHON_PATH.match(found["id"].replace("&quot;", '"')):
            return match[0]
        return f"[{match['title']}][{found['id']}]"

    return AUTOREF.sub(restore, html)
