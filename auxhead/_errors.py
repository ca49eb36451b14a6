"""`DataError`, here so that the private modules reading image folders can raise it without
importing `auxhead.data` (which imports them); its public home is `auxhead.data`."""

from __future__ import annotations


class DataError(ValueError):
    """Data that cannot be loaded. The message is one line a command line can print."""


class MixedSizes(DataError):
    """A folder whose images differ in size, loaded without `size=`: nothing to stack them at."""


DataError.__module__ = MixedSizes.__module__ = "auxhead.data"
