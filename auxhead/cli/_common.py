"""What every subcommand shares: the usage error, option types, the output folder (checked,
locked and cleared before any work), atomic writes and the warnings a run reports.

Nothing here imports fastai, so `auxhead --help` and the error paths stay fast.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import math
import os
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from auxhead.data import ImageData

EXIT_OK, EXIT_BUG, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
LOCK_NAME = ".auxhead.lock"  # in --out while a run writes there: the run's process id
# The size a folder of images of mixed sizes is resized to when no --size is given: small
# enough to train on a CPU; pretrained ImageNet models get the size they were trained at.
MIXED_SIZE = 64
IMAGENET_SIZE = 224


class UsageError(Exception):
    """Bad input from the user: the CLI prints the one-line message and exits with status 2.

    The message names the option (`--lr`, `--out`, ...) and says what to do instead.
    """


_FASTAI_PREFIX = "Exception occured in `"  # fastai rewrites errors raised in callbacks


def load_images(
    spec: str | os.PathLike,
    *,
    size: int | None,
    fallback: int,
    say: Callable[[str], None],
    seed: int = 0,
) -> ImageData:
    """`load_data(spec, seed=seed, size=size)`; a folder whose images differ in size, with no
    --size given, is resized to `fallback` pixels and the run says so (one line)."""
    from auxhead.data import MixedSizes, load_data

    try:
        return load_data(spec, seed=seed, size=size)
    except MixedSizes as error:
        if size is not None:
            raise
        say(f"{error} -- resizing every image to {fallback}x{fallback} (--size N chooses)")
        return load_data(spec, seed=seed, size=fallback)


def one_line(error: BaseException) -> str:
    """An error's message on one line, without the line fastai puts before errors raised in
    its callbacks ("Exception occured in `AuxHeads` when calling event ...")."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if lines and lines[0].startswith(_FASTAI_PREFIX):
        lines = lines[1:]
    return " ".join(lines) or repr(error)


# Option types for argparse: a bad value is refused by the parser (exit 2), naming the option.


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


MIN_SIZE, MAX_SIZE = 8, 1024


def image_size(text: str) -> int:
    """`--size`: 8 to 1024 pixels a side."""
    value = int(text)
    if not MIN_SIZE <= value <= MAX_SIZE:
        why = (
            "a batch of larger images does not fit in memory (resize them beforehand)"
            if value > MAX_SIZE
            else "smaller images do not survive a CNN's downsampling"
        )
        raise argparse.ArgumentTypeError(f"must be {MIN_SIZE} to {MAX_SIZE}, got {value}: {why}")
    return value


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def positive_float(text: str) -> float:
    value = _finite(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def void_label(text: str) -> int | str | None:
    """`--void`: a mask value >= 0, 'none' (every pixel labelled) or 'auto'."""
    if text.lower() in ("none", "auto"):
        return None if text.lower() == "none" else "auto"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a mask value (e.g. 255), 'none' or 'auto', got {text!r}"
        ) from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def ema_decay(text: str) -> float:
    value = _finite(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1) (e.g. 0.999; 0 for none), got {text}")
    return value


def fraction(text: str) -> float:
    value = _finite(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


class ManualFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written (examples keep their lines); an option's default
    is added to its help unless the help speaks of it or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


EXIT_CODES = """\
exit codes:
  0    the run completed and wrote its report
  2    bad input (an option, the data, --out), or out of disk space or memory; one line on
       stderr names the option or the file and says what to do
  130  interrupted (Ctrl-C); the message names the files that were kept
  1    a bug in auxhead: the traceback, and a line asking to report it
"""


# The output folder ---------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class OutputFolder:
    """`--out`, checked, locked and cleared of an earlier run's files before the run starts.

    Use as a context manager: entering refuses an empty path, an existing file, an unwritable
    folder, or a folder another live auxhead run holds (a lock from a dead process is taken
    over), then deletes `owned` (the files and folders this command writes) so that a failed
    or interrupted run never leaves an earlier report looking like its own. Leaving releases
    the lock.
    """

    def __init__(self, path: str | os.PathLike, owned: Sequence[str]) -> None:
        if str(path).strip() == "":
            raise UsageError("--out is empty; give a folder path (it is created if missing)")
        self.path = Path(path).expanduser()
        self.owned = list(owned)
        self.lock = self.path / LOCK_NAME

    def __enter__(self) -> OutputFolder:
        out = self.path
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out} is a file; give a folder (it is created if missing)")
        try:
            out.mkdir(parents=True, exist_ok=True)
            self._acquire()
        except PermissionError as error:
            raise UsageError(
                f"--out {out} is not writable ({error.strerror}); choose another folder"
            ) from None
        except OSError as error:
            raise UsageError(
                f"--out {out} cannot be used ({error.strerror or error}); choose another folder"
            ) from None
        for name in self.owned:
            target = out / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
        return self

    def _acquire(self) -> None:
        for _ in range(2):
            try:
                fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(self.lock.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and _pid_alive(pid):
                    raise UsageError(
                        f"--out {self.path} is in use by another auxhead run (process {pid}); "
                        "wait for it to finish or choose another --out"
                    ) from None
                self.lock.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as file:
                file.write(f"{os.getpid()}\n")
            return
        raise UsageError(f"--out {self.path}: cannot take the lock {self.lock}; remove it")

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            self.lock.unlink()

    def existing(self, names: Sequence[str]) -> list[Path]:
        """Those of `names` (relative to the folder) that exist now."""
        return [self.path / name for name in names if (self.path / name).exists()]


_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# What torch.save's zip writer (and pickle through it) raise when the disk fills mid-write.
_DISK_FULL_MESSAGES = ("unexpected pos", "PytorchStreamWriter failed", "file write failed")


class DiskFull(UsageError):
    """No space left on the device (or over quota) while writing a file of the run."""


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` (or an error it was raised from) is running out of space: an OSError
    with ENOSPC or EDQUOT, or torch's zip writer failing as the disk fills."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _DISK_FULL_ERRNOS:
            return True
        if isinstance(current, RuntimeError) and any(
            m in str(current) for m in _DISK_FULL_MESSAGES
        ):
            return True
        current = current.__cause__ or current.__context__
    return False


_OOM_MESSAGES = ("out of memory", "can't allocate memory", "not enough memory")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is running out of (CPU or accelerator) memory."""
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    return isinstance(error, RuntimeError) and any(m in str(error).lower() for m in _OOM_MESSAGES)


def disk_full_message(path: str | os.PathLike) -> str:
    return f"no space left on device writing {path}: free space or choose another --out"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary name beside `path` (same folder, same suffix) to write the file to;
    when the block completes it is renamed to `path`, so `path` is never a partial file. If the
    block fails the temporary file is removed and `path` is left as it was; running out of
    space raises `DiskFull` (a `UsageError` naming the file and the way out).

        with atomic_path(out / "model.pkl") as tmp:
            torch.save(obj, tmp)
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(error, Exception) and not isinstance(error, DiskFull) and is_disk_full(error):
            raise DiskFull(disk_full_message(path)) from error
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through `atomic_path`: never a half-written file."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


# Warnings that matter to the user --------------------------------------------------------------


@contextlib.contextmanager
def collect_warnings() -> Iterator[list[str]]:
    """Record the `UserWarning`s and `RuntimeWarning`s raised inside (auxhead's own, torch's,
    fastai's: what a run reports), one message each, deduplicated, in order. Other categories
    (deprecations) go on to the filters and `warnings.showwarning` in force outside."""
    seen: list[str] = []
    with warnings.catch_warnings():
        shown_outside = warnings.showwarning

        def record(message, category, filename, lineno, file=None, line=None) -> None:
            if issubclass(category, (UserWarning, RuntimeWarning)):
                text = " ".join(str(message).split())
                if text not in seen:
                    seen.append(text)
            else:
                shown_outside(message, category, filename, lineno, file, line)

        warnings.showwarning = record
        warnings.simplefilter("always", UserWarning)
        warnings.simplefilter("always", RuntimeWarning)
        yield seen


@contextlib.contextmanager
def warnings_shown_once() -> Iterator[None]:
    """Inside, every warning is shown (on stderr), once per message and category, whatever its
    category or where it comes from; `-W` or `PYTHONWARNINGS`, when given, choose instead.
    Filters and `showwarning` are put back afterwards."""
    seen: set[tuple[str, type]] = set()
    with warnings.catch_warnings():
        if not sys.warnoptions:
            warnings.simplefilter("always")
        shown = warnings.showwarning

        def once(message, category, filename, lineno, file=None, line=None) -> None:
            key = (str(message), category)
            if key not in seen:
                seen.add(key)
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = once
        yield
