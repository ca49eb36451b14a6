"""Griffe extension: read a Google docstring's "Example:" section as "Examples:".

auxhead's docstrings write `Example:` over `>>>` lines. Griffe's Google parser knows only the
plural as the examples section and renders the singular as an admonition of plain text, where
Markdown reads `>>>` as nested block quotes; as an examples section the lines render as
Python console code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

SINGULAR = re.compile(r"^(?P<indent>[ \t]*)Example:[ \t]*$", re.M)


class ExampleSections(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = SINGULAR.sub(r"\g<indent>Examples:", obj.docstring.value)
