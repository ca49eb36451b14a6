"""The optional dependencies and the extra that installs each: a missing one is one line
naming the `pip install` to run, not a traceback ending in `No module named 'fastai'`."""

from __future__ import annotations

__all__ = ["EXTRA_OF", "missing_extra", "raise_missing_extra"]

# Top-level package -> the extra of pyproject.toml that installs it.
EXTRA_OF = {
    "fastai": "fastai",
    "matplotlib": "fastai",
    "sklearn": "fastai",
    "torchmetrics": "fastai",
    "torchvision": "fastai",
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "onnxscript": "onnx",
    "tokenizers": "transformers",
    "transformers": "transformers",
}


def missing_extra(error: BaseException, user: str) -> ModuleNotFoundError | None:
    """If `error` is an optional dependency that is not installed, the error to raise instead:
    `user` (a module or command) needs it, and the `pip install` that brings it. None when
    `error` is about anything else."""
    if not isinstance(error, ModuleNotFoundError) or not error.name:
        return None
    package = error.name.partition(".")[0]
    extra = EXTRA_OF.get(package)
    if extra is None:
        return None
    return ModuleNotFoundError(
        f"{user} needs {package}, which is not installed: pip install 'auxhead[{extra}]'",
        name=package,
    )


def raise_missing_extra(error: BaseException, user: str) -> None:
    """Raise `missing_extra(error, user)`, chained from `error`, if there is one.

    Example:
        >>> try:
        ...     from fastai.learner import Learner
        ... except ModuleNotFoundError as error:
        ...     raise_missing_extra(error, "auxhead.fastai")
        ...     raise
    """
    replacement = missing_extra(error, user)
    if replacement is not None:
        raise replacement from error
