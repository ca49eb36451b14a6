"""mkdocs hook: the parts of pages that are generated at build time, so they cannot drift.

- `<!-- auxhead-help COMMAND -->` becomes that command's `--help` text, from the argparse
  parsers in `auxhead/cli/`; `<!-- auxhead-help -->` alone is the top-level `auxhead --help`.
- Docstring brackets that Markdown mistook for reference links are put back (see below).
"""

from __future__ import annotations

import argparse
import os
import re

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


def on_page_markdown(markdown: str, **kwargs: object) -> str:
    def cli(match: re.Match) -> str:
        return "```text\n" + help_text(match["command"]).rstrip() + "\n```"

    return MARKER.sub(cli, markdown)


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
