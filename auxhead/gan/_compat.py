"""Clear errors for the GAN's old spellings.

The networks once took their configuration positionally, in orders that differed between the
generator and the discriminator, and said `n_classes`, `twin=True` and `tac=True`. Now the
class count is the one positional argument and everything else is keyword-only. A call in the
old style raises a TypeError that spells out the call to write instead, rather than Python's
bare "takes 2 positional arguments but 5 were given".
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

T = TypeVar("T", bound=type)


def refuse_old_spellings(
    *,
    positional: str | None,
    old_positional: tuple[str, ...] = (),
    replaced: Mapping[str, Callable[[Any], str]],
) -> Callable[[T], T]:
    """Class decorator: its `__init__` refuses the old call styles, naming the call to write.

    Args:
        positional: the one argument the new signature takes positionally (None: none).
        old_positional: the names the old signature took positionally, in its order; a call
            with more positional arguments than the new signature allows is read with them.
        replaced: old keyword -> function of its value giving the new keyword text, e.g.
            {"n_classes": lambda v: f"num_classes={v!r}"}.
    """
    allowed = 0 if positional is None else 1

    def decorate(cls: T) -> T:
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            old = [key for key in kwargs if key in replaced]
            if len(args) <= allowed and not old:
                init(self, *args, **kwargs)
                return
            if len(args) > max(allowed, len(old_positional)):  # not the old signature either
                init(self, *args, **kwargs)  # Python's own message
                return
            raise TypeError(
                _message(cls.__name__, positional, old_positional, replaced, args, kwargs)
            )

        cls.__init__ = __init__  # type: ignore[misc]
        return cls

    return decorate


def _message(
    name: str,
    positional: str | None,
    old_positional: tuple[str, ...],
    replaced: Mapping[str, Callable[[Any], str]],
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
) -> str:
    # Read the call as the old signature would have: its positionals in the old order.
    given = {**dict(zip(old_positional, args, strict=False)), **kwargs}
    new = {key: replaced[key](value) if key in replaced else f"{key}={value!r}"
           for key, value in given.items()}  # fmt: skip
    reasons = [f"`{key}={given[key]!r}` is now `{new[key]}`" for key in kwargs if key in replaced]
    if len(args) > (0 if positional is None else 1):
        only = f"only {positional}" if positional else "no argument"
        reasons.append(f"{name} takes {only} positionally, the rest by keyword")
    parts = list(new.values())
    if positional is not None:  # the one positional argument goes first, without its name
        key = next((p for p in parts if p.startswith(f"{positional}=")), None)
        if key is not None:
            parts = [key.removeprefix(f"{positional}="), *(p for p in parts if p is not key)]
    return f"{'; '.join(reasons)}: write {name}({', '.join(parts)})"
